// Helpers shared by the benchmark programs. Every program speaks a line
// protocol on stdout that bench/driver.py reads; times are CLOCK_MONOTONIC
// nanoseconds, which is one clock for every process on the machine (Python's
// time.monotonic_ns() and Node's process.hrtime.bigint() read it too).
#pragma once

#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace bench {

inline std::int64_t now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// User + system CPU of this process, all threads, in microseconds.
inline std::int64_t cpu_us() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<std::int64_t>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec +
         ru.ru_stime.tv_usec;
}

// One protocol line, flushed at once (stdout is a pipe).
template <class... Args>
void say(const char* fmt, Args... args) {
  std::printf(fmt, args...);
  std::putchar('\n');
  std::fflush(stdout);
}

[[noreturn]] inline void die(const std::string& why) {
  std::fprintf(stderr, "bench: %s\n", why.c_str());
  std::exit(1);
}

inline long arg_long(int argc, char** argv, int i, long fallback) {
  return i < argc ? std::strtol(argv[i], nullptr, 10) : fallback;
}

// Blocks until the driver closes our stdin (or writes a line): the process
// stays alive, so the driver can read /proc/<pid>/status after "done".
inline void wait_for_driver() {
  char buf[64];
  while (::read(0, buf, sizeof buf) > 0) {
  }
}

// Payload i of a run: a JSON string of exactly `bytes` bytes, so the Node
// package parses it without a warning: "<tag><zero-padded i>".
inline std::string payload(const std::string& tag, long i, std::size_t bytes = 64) {
  std::string digits = std::to_string(i);
  std::size_t pad = bytes - 2 - tag.size() - digits.size();
  return "\"" + tag + std::string(pad, '0') + digits + "\"";
}

}  // namespace bench
