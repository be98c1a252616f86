// The clock of the test programs and of the child processes they start:
// children stamp their lines with now_ns() and the tests compare those
// stamps with their own, so both sides must read the same clock. No Catch2
// and no pgiplock here: the child programs use neither for this.
#pragma once

#include <chrono>

namespace test {

// CLOCK_MONOTONIC on Linux, in every process alike.
using clock = std::chrono::steady_clock;

inline long long now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now().time_since_epoch()).count();
}

inline double ms_since(clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
}

}  // namespace test
