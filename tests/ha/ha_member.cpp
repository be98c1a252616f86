// One member of a fleet for the HA suite: two single-listener pubsubs on
// one event loop and one multi-host conninfo, a plain one on channel P and
// a durable one on channel D (pubsub_options::durable), each a member of
// the fleet of its own. One line per event on stdout, K being P or D:
//   READY K <backend pid>     connected and listening (the first time)
//   HOLD K <t> <token>        became the deliverer (on_listen), its fencing token
//   LOSE K <t>                is_active() went false (polled every millisecond)
//   MSG K <n> <t> <id>        delivered message n (id: the journal's, 0 on P)
//   RECONNECT K <t> <tries>   on_reconnect
//   ERROR K <t> <what>        on_error
//   WARN K <t> <what>         the library logged a warning
//   TRACE K <t> <what>        ... anything else it logged (env PGIPLOCK_HA_TRACE set)
// <t> is test::now_ns() (tests/clock.hpp), the clock the test reads too.
// Usage: ha_member CONNINFO P D [--retry MS] [--liveness MS]
#include "../clock.hpp"
#include "pgiplock.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

namespace {

using test::now_ns;

void say(const char* kind, char which, std::string_view rest) {
  std::string line(rest);
  std::replace(line.begin(), line.end(), '\n', ' ');
  std::printf("%s %c %s\n", kind, which, line.c_str());
  std::fflush(stdout);
}

std::string stamp() { return std::to_string(now_ns()); }

struct member {
  char which;
  std::string channel;
  std::unique_ptr<pgiplock::pubsub> ps;
};

pgiplock::task<void> start(pgiplock::event_loop& loop, member& m) {
  // The first connect may meet a failover too: keep trying, as a user would.
  for (;;) {
    try {
      co_await m.ps->connect();
      break;
    } catch (const std::exception& e) {
      say("ERROR", m.which, stamp() + " " + e.what());
    }
    co_await loop.sleep(m.ps->options().retry_delay);
  }
  co_await m.ps->listen(m.channel);
  say("READY", m.which, std::to_string(m.ps->client()->backend_pid()));
}

pgiplock::task<void> watch_active(pgiplock::event_loop& loop, member& m) {
  bool was = false;
  for (;;) {
    bool now = m.ps->is_active(m.channel);
    if (was && !now) say("LOSE", m.which, stamp());
    was = now;
    co_await loop.sleep(std::chrono::milliseconds(1));
  }
}

void wire(member& m) {
  auto* mp = &m;
  m.ps->on_listen([mp](std::string_view) { say("HOLD", mp->which, stamp() + " " + std::to_string(mp->ps->token(mp->channel))); });
  m.ps->on_delivery([mp](const pgiplock::delivery& d) {
    say("MSG", mp->which, std::string(d.payload) + " " + stamp() + " " + std::to_string(d.id));
  });
  m.ps->on_reconnect([mp](std::size_t tries) { say("RECONNECT", mp->which, stamp() + " " + std::to_string(tries)); });
  m.ps->on_error([mp](const std::exception& e) { say("ERROR", mp->which, stamp() + " " + e.what()); });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: ha_member CONNINFO PLAIN_CHANNEL DURABLE_CHANNEL [--retry MS] [--liveness MS]\n");
    return 2;
  }
  pgiplock::pubsub_options base;
  base.conninfo = argv[1];
  for (int i = 4; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    auto ms = std::chrono::milliseconds(std::atol(argv[i + 1]));
    if (a == "--retry") base.retry_delay = ms;
    else if (a == "--liveness") base.liveness_timeout = ms;
  }
  pgiplock::event_loop loop;
  member plain{'P', argv[2], nullptr}, durable{'D', argv[3], nullptr};
  for (member* m : {&plain, &durable}) {
    auto o = base;
    o.durable = m == &durable;
    char which = m->which;
    bool trace = std::getenv("PGIPLOCK_HA_TRACE") != nullptr;
    o.logger = [which, trace](pgiplock::log_level level, std::string_view text) {
      if (level >= pgiplock::log_level::warn) say("WARN", which, stamp() + " " + std::string(text));
      else if (trace) say("TRACE", which, stamp() + " " + std::string(text));
    };
    m->ps = std::make_unique<pgiplock::pubsub>(loop, o);
    wire(*m);
    loop.spawn(start(loop, *m));
    loop.spawn(watch_active(loop, *m));
  }
  loop.run();
}
