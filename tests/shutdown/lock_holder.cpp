// lock_holder: the child process of the shutdown tests. It holds a channel
// in single-listener mode and reports, one line each:
//   SIG <SigBlk> <SigIgn> <SigCgt>     its signal mask and dispositions
//   HOLD <application_name> <backend pid>   or   STANDBY
//
//   lock_holder DSN CHANNEL                graceful shutdown on (handle_signals)
//   lock_holder DSN CHANNEL --no-signals   pubsub and a plain ip_lock without it
#include "pgiplock.hpp"

#include <sys/resource.h>

#include <cstdio>
#include <fstream>
#include <string>

namespace {

// The three masks from /proc/self/status, as hex words.
void report_signals() {
  std::ifstream f("/proc/self/status");
  std::string line, blk, ign, cgt;
  while (std::getline(f, line)) {
    if (line.rfind("SigBlk:", 0) == 0) blk = line.substr(8);
    if (line.rfind("SigIgn:", 0) == 0) ign = line.substr(8);
    if (line.rfind("SigCgt:", 0) == 0) cgt = line.substr(8);
  }
  std::printf("SIG %s %s %s\n", blk.c_str(), ign.c_str(), cgt.c_str());
}

pgiplock::task<void> hold(pgiplock::event_loop& loop, pgiplock::pubsub& ps, std::string dsn, std::string channel,
                          bool plain_lock, std::unique_ptr<pgiplock::ip_lock>& lock) {
  co_await ps.connect();
  co_await ps.listen(channel);
  if (plain_lock) {  // the ip_lock API on its own connection, too
    pgiplock::ip_lock_options o;
    o.client = co_await pgiplock::connection::connect(loop, dsn);
    lock = std::make_unique<pgiplock::ip_lock>(channel + "_ip", o);
    co_await lock->init();
    bool won = co_await lock->acquire();
    if (!won) std::printf("ERROR the plain ip_lock was not acquired\n");
  }
  report_signals();
  if (ps.is_active(channel)) {
    std::printf("HOLD %s %d\n", std::string(ps.client()->app_name()).c_str(), ps.client()->backend_pid());
  } else {
    std::printf("STANDBY\n");
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s DSN CHANNEL [--no-signals]\n", argv[0]);
    return 2;
  }
  bool graceful = !(argc > 3 && std::string(argv[3]) == "--no-signals");
  rlimit no_core{0, 0};
  ::setrlimit(RLIMIT_CORE, &no_core);  // SIGABRT tests: no core files
  report_signals();                    // before the library did anything
  pgiplock::event_loop loop;
  pgiplock::pubsub_options o;
  o.conninfo = argv[1];
  o.handle_signals = graceful;
  pgiplock::pubsub ps(loop, o);
  std::unique_ptr<pgiplock::ip_lock> lock;
  try {
    loop.run(hold(loop, ps, argv[1], argv[2], !graceful, lock));
  } catch (const std::exception& e) {
    std::printf("ERROR %s\n", e.what());
    return 1;
  }
  loop.run();  // until a signal ends the process
  return 0;
}
