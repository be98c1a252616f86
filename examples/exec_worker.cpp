// exec_worker: one worker of a pool that shares the messages of a channel.
//
// In execution-lock mode every worker LISTENs, and each message is processed
// by exactly one of them: the workers claim it in the database and only the
// winner's handler runs. Unlike single-listener mode, the load is spread and
// no worker is a standby. Ctrl-C / SIGTERM ends a worker cleanly.
//
//   exec_worker DSN CHANNEL
//   exec_worker "host=127.0.0.1 user=postgres dbname=postgres" jobs   # start 2-3 of these
//   publisher --rate=100 --count=300 "host=127.0.0.1 user=postgres dbname=postgres" jobs
//
// Output ("<WORD> <milliseconds since the epoch> <details>"):
//   READY 1718000000000 pid=4242 sharing jobs
//   MSG 1718000000120 <payload>          (only the messages this worker won)
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

void say(const char* word, std::string_view details) {
  std::printf("%s %lld %.*s\n", word, now_ms(), static_cast<int>(details.size()), details.data());
  std::fflush(stdout);
}

pgiplock::task<void> start(pgiplock::pubsub& ps, std::string channel) {
  co_await ps.connect();
  co_await ps.listen(channel);
  say("READY", "pid=" + std::to_string(::getpid()) + " sharing " + channel);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s DSN CHANNEL\n", argv[0]);
    return 2;
  }
  pgiplock::event_loop loop;
  pgiplock::pubsub_options o;
  o.conninfo = argv[1];
  o.execution_lock = true;   // each message to exactly one worker
  o.handle_signals = true;   // SIGINT/SIGTERM/SIGABRT end the worker cleanly
  // A message's identity for the claim is, by default, (sender, channel,
  // payload): the publisher's numbered payloads are distinct. Set
  // o.execution_key when equal payloads from one sender are distinct jobs.
  pgiplock::pubsub ps(loop, o);
  ps.on_message([](std::string_view, std::string_view payload) { say("MSG", payload); });
  ps.on_error([](const std::exception& e) { say("ERROR", e.what()); });
  try {
    loop.run(start(ps, argv[2]));
  } catch (const std::exception& e) {
    say("ERROR", e.what());
    return 1;
  }
  loop.run();  // until a signal ends the process
  return 0;
}
