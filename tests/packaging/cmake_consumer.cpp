// The program the CMake packaging test builds as a CMake user would
// (find_package, add_subdirectory, FetchContent): it connects to the server
// in PGIPLOCK_DSN, LISTENs a channel of its own and hears its own NOTIFY, so
// a missing include path, library or C++20 flag fails the build and a broken
// link fails the run.
#include "pgiplock.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unistd.h>

namespace {

pgiplock::task<std::string> listen_and_hear(pgiplock::event_loop& loop, std::string dsn) {
  auto conn = co_await pgiplock::connection::connect(loop, dsn);
  std::string channel = "cmake_consumer_" + std::to_string(::getpid()), heard;
  auto sub = conn->subscribe(channel, [&](const pgiplock::notification& n) { heard = std::string(n.payload); });
  co_await conn->listen(channel);
  auto r = co_await conn->query("SELECT pg_notify($1, 'hello')", channel);
  (void)r;
  for (int i = 0; i < 2000 && heard.empty(); ++i) co_await loop.sleep(std::chrono::milliseconds(1));
  conn->unsubscribe(sub);
  co_await conn->close();
  co_return heard;
}

}  // namespace

int main() {
  const char* dsn = std::getenv("PGIPLOCK_DSN");
  if (!dsn || !*dsn) {
    std::fprintf(stderr, "cmake consumer: PGIPLOCK_DSN is not set\n");
    return 2;
  }
  pgiplock::event_loop loop;
  std::string heard;
  try {
    heard = loop.run(listen_and_hear(loop, dsn));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cmake consumer: %s\n", e.what());
    return 1;
  }
  if (heard != "hello") {
    std::fprintf(stderr, "cmake consumer: LISTENed, but heard '%s', not 'hello'\n", heard.c_str());
    return 1;
  }
  std::printf("pgiplock %s ok on %s, LISTEN heard its NOTIFY\n", PGIPLOCK_VERSION, loop.backend_name());
  return 0;
}
