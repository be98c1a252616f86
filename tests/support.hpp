// Helpers shared by the test programs: the server under test, waiting for a
// condition with a deadline, and counting what a process holds.
#pragma once

#include "pgiplock.hpp"

#include <catch2/catch.hpp>

#include <dirent.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>

namespace test {

using namespace std::chrono_literals;
using pgiplock::event_loop;
using pgiplock::task;
using clock = std::chrono::steady_clock;

// Built with AddressSanitizer (GCC defines the macro, clang the feature).
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool sanitized = true;
#else
inline constexpr bool sanitized = false;
#endif
#else
inline constexpr bool sanitized = false;
#endif

// AddressSanitizer keeps freed memory in quarantine, so RSS says nothing
// there; LeakSanitizer checks for leaks in that build instead.
inline constexpr bool rss_is_meaningful = !sanitized;

inline std::string dsn() {
  const char* d = std::getenv("PGIPLOCK_DSN");
  return d ? d : "";
}

// A channel name of its own for each test, so rows left by one never meet
// another (the server is shared by the whole suite).
inline std::string fresh_channel(const std::string& stem) {
  static int n = 0;
  return stem + "_" + std::to_string(::getpid()) + "_" + std::to_string(++n);
}

inline std::string env_or(const char* name, std::string fallback = {}) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// Polls `pred` every millisecond on the loop until it holds or `limit`
// passes; returns whether it held.
template <class Pred>
task<bool> wait_until(event_loop& loop, Pred pred, std::chrono::milliseconds limit) {
  auto deadline = clock::now() + limit;
  while (!pred()) {
    if (clock::now() >= deadline) co_return false;
    co_await loop.sleep(1ms);
  }
  co_return true;
}

inline int open_fd_count() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d)) ++n;
    ::closedir(d);
  }
  return n;
}

inline long rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string key;
  long value = 0;
  while (f >> key) {
    if (key == "VmRSS:") {
      f >> value;
      return value;
    }
    f.ignore(4096, '\n');
  }
  return -1;
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

inline double ms_since(clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
}

}  // namespace test
