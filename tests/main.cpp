// Catch2 runner shared by every test program. A program that needs the
// database and finds no PGIPLOCK_TEST_DSN reports itself skipped (77).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>

extern const bool test_needs_database;

int main(int argc, char** argv) {
  if (test_needs_database && !std::getenv("PGIPLOCK_TEST_DSN")) {
    std::puts("skipped: PGIPLOCK_TEST_DSN is not set (tools/check starts a server and sets it)");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
