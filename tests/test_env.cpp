// The environment variables the library reads, parsed strictly: an invalid
// value is named in one warning and the default is used (the Node package
// silently reads "abc" as 0), and a lock schema name the server would
// truncate is refused. No server needed.
#include <catch2/catch.hpp>

#include <fcntl.h>

#include <fstream>
#include <sstream>

#include "pgiplock.hpp"

extern const bool test_needs_database = false;

using namespace std::chrono_literals;

namespace {

// Runs `fn` with stderr going to a file; yields what it wrote there.
template <class F>
std::string stderr_of(F fn) {
  char path[] = "/tmp/pgiplock-env-XXXXXX";
  int file = ::mkstemp(path);
  REQUIRE(file >= 0);
  std::fflush(stderr);
  int saved = ::dup(2);
  ::dup2(file, 2);
  fn();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  ::close(file);
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  ::unlink(path);
  return text.str();
}

struct env_var {
  const char* name;
  env_var(const char* n, const char* value) : name(n) { ::setenv(n, value, 1); }
  ~env_var() { ::unsetenv(name); }
};

std::size_t count(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("PG_PUBSUB_SHUTDOWN_TIMEOUT: a number of milliseconds, anything else warns once and means 1000", "[env]") {
  {
    env_var v("PG_PUBSUB_SHUTDOWN_TIMEOUT", "250");
    CHECK(pgiplock::detail::shutdown_timeout() == 250ms);
  }
  {
    env_var v("PG_PUBSUB_SHUTDOWN_TIMEOUT", "0");  // exit at once, as in the seed
    CHECK(pgiplock::detail::shutdown_timeout() == 0ms);
  }
  for (const char* bad : {"abc", "12ms", "-5", " 7", "1e3"}) {
    env_var v("PG_PUBSUB_SHUTDOWN_TIMEOUT", bad);
    std::chrono::milliseconds first{}, second{};
    auto warned = stderr_of([&] {
      first = pgiplock::detail::shutdown_timeout();
      second = pgiplock::detail::shutdown_timeout();
    });
    INFO("value '" << bad << "', stderr: " << warned);
    CHECK(first == 1000ms);
    CHECK(second == 1000ms);
    CHECK(count(warned, std::string("PG_PUBSUB_SHUTDOWN_TIMEOUT='") + bad + "'") == 1);
  }
  CHECK(pgiplock::detail::shutdown_timeout() == 1000ms);  // unset
}

TEST_CASE("PG_PUBSUB_EXECUTION_LOCK: a number (0 = off) or true/false; anything else warns and means off", "[env]") {
  auto flag = [] { return pgiplock::pubsub_options{}.execution_lock; };
  CHECK_FALSE(flag());
  {
    env_var v("PG_PUBSUB_EXECUTION_LOCK", "1");
    CHECK(flag());
  }
  {
    env_var v("PG_PUBSUB_EXECUTION_LOCK", "true");
    CHECK(flag());
  }
  {
    env_var v("PG_PUBSUB_EXECUTION_LOCK", "0");
    CHECK_FALSE(flag());
  }
  {
    env_var v("PG_PUBSUB_EXECUTION_LOCK", "yes please");
    bool on = true;
    auto warned = stderr_of([&] { on = flag(); });
    CHECK_FALSE(on);
    CHECK(count(warned, "PG_PUBSUB_EXECUTION_LOCK='yes please'") == 1);
  }
}

TEST_CASE("PG_PUBSUB_SCHEMA_NAME the server would truncate is refused, naming the limit", "[env]") {
  std::string longest(pgiplock::detail::max_schema, 's');
  {
    env_var v("PG_PUBSUB_SCHEMA_NAME", longest.c_str());
    CHECK(pgiplock::ip_lock::schema_name() == longest);
  }
  std::string too_long = longest + "s";
  env_var v("PG_PUBSUB_SCHEMA_NAME", too_long.c_str());
  CHECK_THROWS_WITH(pgiplock::ip_lock::schema_name(),
                    Catch::Contains("PG_PUBSUB_SCHEMA_NAME is 57 bytes") && Catch::Contains("at most 56"));
}

TEST_CASE("PGIPLOCK_BACKEND other than io_uring or epoll is refused, naming it", "[env]") {
  env_var v("PGIPLOCK_BACKEND", "kqueue");
  CHECK_THROWS_WITH(pgiplock::event_loop(), Catch::Contains("PGIPLOCK_BACKEND") && Catch::Contains("kqueue"));
}
