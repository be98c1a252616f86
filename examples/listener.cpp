// listener: one consumer of a channel in single-listener mode.
//
// Start several of these on one channel: exactly one of them holds the
// channel and prints the messages, the others wait as standbys. Stop the
// holder with Ctrl-C or `kill <pid>` (SIGTERM): it releases its lock before
// exiting (pubsub_options::handle_signals), and a standby takes over at once.
// Kill it with SIGKILL and a standby takes over on its next retry, within
// --acquire-interval.
//
//   listener [--acquire-interval=MS] DSN CHANNEL
//   listener "host=127.0.0.1 user=postgres dbname=postgres" orders
//
// Every output line is "<WORD> <milliseconds since the epoch> <details>", so
// that a script can follow it live (failover_demo does):
//   START 1718000000000 pid=4242 app=<application_name> backend=<server pid>
//   STANDBY 1718000000003 waiting for orders
//   HOLD 1718000000004 now holding orders
//   MSG 1718000000120 <payload>
//   LOG 1718000000300 info: received Terminated: releasing locks before exiting
#include "pgiplock.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>

namespace {

long long now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

// One line per event; fflush so a parent reading a pipe sees it at once.
void say(const char* word, std::string_view details) {
  std::printf("%s %lld %.*s\n", word, now_ms(), static_cast<int>(details.size()), details.data());
  std::fflush(stdout);
}

pgiplock::task<void> start(pgiplock::pubsub& ps, std::string channel) {
  co_await ps.connect();
  auto c = ps.client();
  say("START", "pid=" + std::to_string(::getpid()) + " app=" + std::string(c->app_name()) +
                   " backend=" + std::to_string(c->backend_pid()));
  co_await ps.listen(channel);  // returns once the lock attempt settled
  if (!ps.is_active(channel)) say("STANDBY", "waiting for " + channel);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  long interval_ms = 30000;
  int arg = 1;
  if (arg < argc && std::string_view(argv[arg]).starts_with("--acquire-interval=")) {
    interval_ms = std::strtol(argv[arg] + 19, nullptr, 10);
    ++arg;
  }
  if (argc - arg != 2 || interval_ms <= 0) {
    std::fprintf(stderr, "usage: %s [--acquire-interval=MS] DSN CHANNEL\n", argv[0]);
    return 2;
  }
  std::string dsn = argv[arg], channel = argv[arg + 1];

  // The loop's logger is where graceful shutdown reports what it does.
  pgiplock::event_loop_options lo;
  lo.logger = [](pgiplock::log_level level, std::string_view m) {
    if (level == pgiplock::log_level::debug) return;
    say("LOG", std::string(level >= pgiplock::log_level::warn ? "warn: " : "info: ") + std::string(m));
  };
  pgiplock::event_loop loop(lo);

  pgiplock::pubsub_options o;
  o.conninfo = dsn;
  o.acquire_interval = std::chrono::milliseconds(interval_ms);
  o.handle_signals = true;  // SIGINT/SIGTERM/SIGABRT: release the lock, then exit by that signal
  o.logger = lo.logger;
  pgiplock::pubsub ps(loop, o);

  ps.on_listen([](std::string_view ch) { say("HOLD", "now holding " + std::string(ch)); });
  ps.on_message([](std::string_view, std::string_view payload) { say("MSG", payload); });
  ps.on_end([] { say("LINK-LOST", "the connection to the server is gone; reconnecting"); });
  ps.on_reconnect([](std::size_t n) { say("RECONNECTED", "after " + std::to_string(n) + " attempt(s)"); });
  ps.on_error([](const std::exception& e) { say("ERROR", e.what()); });

  try {
    loop.run(start(ps, channel));
  } catch (const std::exception& e) {
    say("ERROR", e.what());
    return 1;
  }
  loop.run();  // until a signal ends the process
  return 0;
}
