// The program every packaging test builds against pgiplock as a consumer
// would get it (subproject, installed copy, header dropped in): it runs a
// coroutine on an event_loop and calls into libpq, so a missing include path
// or library fails the build, and a broken header fails the run. No server.
#include "pgiplock.hpp"

#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

pgiplock::task<int> answer(pgiplock::event_loop& loop) {
  co_await loop.sleep(std::chrono::milliseconds(1));
  co_return 42;
}

// libpq parses the conninfo: this links and runs PQconninfoParse.
pgiplock::task<std::string> refused_conninfo(pgiplock::event_loop& loop) {
  try {
    auto conn = co_await pgiplock::connection::connect(loop, "this is not a conninfo");
    (void)conn;
  } catch (const std::invalid_argument& e) {
    co_return e.what();
  }
  co_return "";
}

}  // namespace

int main() {
  pgiplock::event_loop loop;
  int value = loop.run(answer(loop));
  std::string why = loop.run(refused_conninfo(loop));
  if (value != 42) {
    std::fprintf(stderr, "consumer: the task returned %d, not 42\n", value);
    return 1;
  }
  if (why.find("conninfo") == std::string::npos) {
    std::fprintf(stderr, "consumer: a bad conninfo was not refused by libpq (got '%s')\n", why.c_str());
    return 1;
  }
  std::printf("pgiplock %s ok on %s\n", PGIPLOCK_VERSION, loop.backend_name());
  return 0;
}
