// One member of a fleet for the fault suite: a single-listener pubsub on one
// channel that reports, one line each, on stdout:
//   READY <backend pid>      connected and subscribed
//   HOLD <t>                 became the deliverer (on_listen)
//   MSG <payload> <t>        delivered a message
// <t> is CLOCK_MONOTONIC in nanoseconds, comparable with the test's clock.
// Usage: member DSN CHANNEL [--graceful] [--interval MS] [--liveness MS] [--retry MS]
#include "pgiplock.hpp"

#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

namespace {

long long now_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

pgiplock::task<void> run(pgiplock::pubsub& ps, std::string channel) {
  co_await ps.connect();
  co_await ps.listen(channel);
  std::printf("READY %d\n", ps.client()->backend_pid());
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: member DSN CHANNEL [--graceful] [--interval MS] [--liveness MS] [--retry MS]\n");
    return 2;
  }
  pgiplock::pubsub_options o;
  o.conninfo = argv[1];
  std::string channel = argv[2];
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    auto next_ms = [&] { return std::chrono::milliseconds(std::atol(argv[++i])); };
    if (a == "--graceful") o.handle_signals = true;
    else if (a == "--interval" && i + 1 < argc) o.acquire_interval = next_ms();
    else if (a == "--liveness" && i + 1 < argc) o.liveness_timeout = next_ms();
    else if (a == "--retry" && i + 1 < argc) o.retry_delay = next_ms();
  }
  bool trace = std::getenv("PGIPLOCK_MEMBER_TRACE") != nullptr;
  o.logger = [trace](pgiplock::log_level level, std::string_view m) {
    if (level >= pgiplock::log_level::warn || trace) {
      std::fprintf(stderr, "member %d %lld: %.*s\n", ::getpid(), now_ns() / 1000000, static_cast<int>(m.size()),
                   m.data());
    }
  };
  pgiplock::event_loop loop;
  pgiplock::pubsub ps(loop, o);
  ps.on_listen([trace](std::string_view) {
    if (trace) std::fprintf(stderr, "member %d %lld: listening\n", ::getpid(), now_ns() / 1000000);
    std::printf("HOLD %lld\n", now_ns());
    std::fflush(stdout);
  });
  ps.on_message([](std::string_view, std::string_view payload) {
    std::printf("MSG %.*s %lld\n", static_cast<int>(payload.size()), payload.data(), now_ns());
    std::fflush(stdout);
  });
  ps.on_error([](const std::exception& e) { std::fprintf(stderr, "member error: %s\n", e.what()); });
  loop.spawn(run(ps, channel));
  loop.run();
}
