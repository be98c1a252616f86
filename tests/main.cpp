// Catch2 runner shared by every test program. A program that needs the
// database and finds no PGIPLOCK_DSN reports itself skipped (77), and
// so does one that defines test_skip_reason() and gets a reason from it.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

extern const bool test_needs_database;
// Optional (weak: most programs do not define it). Non-empty: why this
// machine cannot run the program, e.g. it needs root to build a network.
std::string test_skip_reason() __attribute__((weak));

int main(int argc, char** argv) {
  if (test_needs_database && !std::getenv("PGIPLOCK_DSN")) {
    std::puts("skipped: PGIPLOCK_DSN is not set (tools/check starts a server and sets it)");
    return 77;
  }
  if (test_skip_reason) {
    std::string why;
    try {
      why = test_skip_reason();
    } catch (const std::exception& e) {  // e.g. a PGIPLOCK_DSN libpq cannot parse: a failure, not a reason to skip
      std::printf("error: %s\n", e.what());
      return 1;
    }
    if (!why.empty()) {
      std::printf("skipped: %s\n", why.c_str());
      return 77;
    }
  }
  return Catch::Session().run(argc, argv);
}
