// One member of a fleet for the fault suite: a single-listener pubsub on one
// channel that reports, one line each, on stdout:
//   READY <backend pid>      connected and subscribed
//   HOLD <t>                 became the deliverer (on_listen)
//   MSG <payload> <t>        delivered a message
//   LOSE <t>                 is_active() went false (with --watch-active)
//   ERROR <t> <what>         on_error fired
//   WARN <t> <what>          the library logged a warning
// <t> is test::now_ns() (tests/clock.hpp), the clock the test reads too.
// With --durable the channel is durable (pubsub_options::durable) and the
// deliveries come from on_delivery, with the message's journal id last:
//   MSG <payload> <t> <id>
// With --exactly-once TABLE (implies --durable) every delivery also runs
// on_delivery_in_transaction, which inserts (channel, id, payload) into
// TABLE in the transaction that acknowledges the message; the test counts
// the rows (TABLE is the test's, created before the members start).
// With --channels N it listens to CHANNEL.0 .. CHANNEL.<N-1> (one listen()
// call) and says which: HOLD <t> <channel>, MSG <payload> <t> <channel>.
// Usage: member DSN CHANNEL [--graceful] [--interval MS] [--liveness MS] [--retry MS] [--watch-active]
//                           [--no-fast-failover] [--channels N] [--balance]
//                           [--durable] [--exactly-once TABLE]
//        member DSN --probe  connects once; prints PROBE OK, or PROBE FAIL <why>
//                            and exits 1 (can this network reach the server?)
// pubsub has no event for "stopped delivering" (a lock demoted by its
// liveness check says nothing to pubsub's handlers), so --watch-active polls
// is_active() every millisecond: the stamp is at most ~1 ms late.
#include "../clock.hpp"
#include "pgiplock.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

using test::now_ns;

pgiplock::task<void> run(pgiplock::pubsub& ps, std::string channel, long many) {
  co_await ps.connect();
  if (many > 0) {
    std::vector<std::string> all;
    for (long i = 0; i < many; ++i) all.push_back(channel + "." + std::to_string(i));
    co_await ps.listen(std::move(all));
  } else {
    co_await ps.listen(channel);
  }
  std::printf("READY %d\n", ps.client()->backend_pid());
  std::fflush(stdout);
}

// The LOSE line: polls the public state a user would look at.
pgiplock::task<void> watch_active(pgiplock::event_loop& loop, pgiplock::pubsub& ps, std::string channel) {
  bool was = false;
  for (;;) {
    bool now = ps.is_active(channel);
    if (was && !now) {
      std::printf("LOSE %lld\n", now_ns());
      std::fflush(stdout);
    }
    was = now;
    co_await loop.sleep(std::chrono::milliseconds(1));
  }
}

pgiplock::task<void> flush_every(pgiplock::event_loop& loop) {
  for (;;) {
    std::fflush(stdout);
    co_await loop.sleep(std::chrono::milliseconds(1));
  }
}

// The exactly-once effect: a named coroutine function (a capturing lambda
// coroutine trips GCC 12), writing on the connection it is given, inside
// the transaction that also moves the channel's cursor.
std::string effects_table;
pgiplock::task<void> record_effect(const pgiplock::delivery& d, pgiplock::connection& c) {
  std::string channel(d.channel), payload(d.payload);
  std::int64_t id = d.id;
  co_await c.query("INSERT INTO " + effects_table + " (channel, id, payload) VALUES ($1, $2, $3)", channel, id,
                   payload);
}

int probe(const char* conninfo) {
  pgiplock::event_loop loop;
  pgiplock::connect_options co;
  co.timeout = std::chrono::milliseconds(3000);
  struct attempt {
    static pgiplock::task<std::string> run(pgiplock::event_loop& loop, std::string conninfo,
                                           pgiplock::connect_options co) {
      std::string failure;
      try {
        auto c = co_await pgiplock::connection::connect(loop, conninfo, co);
        co_await c->close();
      } catch (const std::exception& e) {
        failure = e.what();
      }
      co_return failure;
    }
  };
  std::string failure = loop.run(attempt::run(loop, conninfo, co));
  if (failure.empty()) {
    std::printf("PROBE OK\n");
    return 0;
  }
  std::printf("PROBE FAIL %s\n", failure.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: member DSN CHANNEL [--graceful] [--interval MS] [--liveness MS] [--retry MS] "
                 "[--watch-active] [--no-fast-failover] [--channels N] [--balance] [--durable] "
                 "[--exactly-once TABLE]\n       member DSN --probe\n");
    return 2;
  }
  if (std::strcmp(argv[2], "--probe") == 0) return probe(argv[1]);
  pgiplock::pubsub_options o;
  o.conninfo = argv[1];
  std::string channel = argv[2];
  bool watch = false;
  long many = 0;
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    auto next_ms = [&] { return std::chrono::milliseconds(std::atol(argv[++i])); };
    if (a == "--graceful") o.handle_signals = true;
    else if (a == "--interval" && i + 1 < argc) o.acquire_interval = next_ms();
    else if (a == "--liveness" && i + 1 < argc) o.liveness_timeout = next_ms();
    else if (a == "--retry" && i + 1 < argc) o.retry_delay = next_ms();
    else if (a == "--watch-active") watch = true;
    else if (a == "--no-fast-failover") o.fast_failover = false;
    else if (a == "--channels" && i + 1 < argc) many = std::atol(argv[++i]);
    else if (a == "--balance") o.balance = true;
    else if (a == "--durable") o.durable = true;
    else if (a == "--exactly-once" && i + 1 < argc) {
      o.durable = true;
      effects_table = argv[++i];
    }
  }
  bool trace = std::getenv("PGIPLOCK_MEMBER_TRACE") != nullptr;
  o.logger = [trace](pgiplock::log_level level, std::string_view m) {
    if (level >= pgiplock::log_level::warn) {  // for the tests that count what a member says
      std::printf("WARN %lld %.*s\n", now_ns(), static_cast<int>(m.size()), m.data());
      std::fflush(stdout);
    }
    if (level >= pgiplock::log_level::warn || trace) {
      std::fprintf(stderr, "member %d %lld: %.*s\n", ::getpid(), now_ns() / 1000000, static_cast<int>(m.size()),
                   m.data());
    }
  };
  pgiplock::event_loop loop;
  pgiplock::pubsub ps(loop, o);
  // With many channels, stdout is flushed once per turn of the loop, not per line.
  ps.on_listen([trace, many](std::string_view ch) {
    if (trace) std::fprintf(stderr, "member %d %lld: listening\n", ::getpid(), now_ns() / 1000000);
    if (many > 0) {
      std::printf("HOLD %lld %.*s\n", now_ns(), static_cast<int>(ch.size()), ch.data());
      return;
    }
    std::printf("HOLD %lld\n", now_ns());
    std::fflush(stdout);
  });
  if (o.durable) {  // one channel (no --channels): the id follows the time
    ps.on_delivery([](const pgiplock::delivery& d) {
      std::printf("MSG %.*s %lld %lld\n", static_cast<int>(d.payload.size()), d.payload.data(), now_ns(),
                  static_cast<long long>(d.id));
      std::fflush(stdout);
    });
    if (!effects_table.empty()) ps.on_delivery_in_transaction(record_effect);
  } else {
    ps.on_message([many](std::string_view ch, std::string_view payload) {
      if (many > 0) {
        std::printf("MSG %.*s %lld %.*s\n", static_cast<int>(payload.size()), payload.data(), now_ns(),
                    static_cast<int>(ch.size()), ch.data());
        return;
      }
      std::printf("MSG %.*s %lld\n", static_cast<int>(payload.size()), payload.data(), now_ns());
      std::fflush(stdout);
    });
  }
  ps.on_error([](const std::exception& e) {
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');  // one line each
    std::printf("ERROR %lld %s\n", now_ns(), what.c_str());
    std::fflush(stdout);
    std::fprintf(stderr, "member error: %s\n", e.what());
  });
  loop.spawn(run(ps, channel, many));
  if (watch) loop.spawn(watch_active(loop, ps, channel));
  if (many > 0) loop.spawn(flush_every(loop));
  loop.run();
}
