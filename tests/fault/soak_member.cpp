// The soak's processes (tools/soak, tests/soak): a member of one kind, or
// the publisher. One line per event on stdout, each stamped with
// test::now_ns() (CLOCK_MONOTONIC, the clock the driver reads too); the
// driver records them into the history that tests/soak/check.py reads.
//
// A member: soak_member DSN --channels A,B,.. [--durable] [--balance]
//                       [--liveness MS] [--interval MS] [--retry MS]
//   R <t> <backend pid>                 connected, listen() returned
//   H <t> <channel> <token>             became the deliverer (on_listen)
//   L <t> <channel> <token>             stopped: is_active() went false
//                                       (polled every millisecond)
//   D <t> <channel> <payload> <id> <token>
//                                       a delivery; plain channels have no
//                                       id (0) and their token is the
//                                       tenure's (pubsub::token(), or the
//                                       last on_listen's while draining)
//   E <t> <what>                        on_error, and on_reconnect
// SIGTERM is the graceful shutdown (handle_signals).
//
// The publisher: soak_member DSN --publish --plain A,B --durable C,D --period MS
//   P <t0> <t1> <channel> <seq> ok|fail  notify(channel, seq) from t0, its
//                                        commit confirmed (ok) or not at t1
// Each channel's messages are sent one after another, so their commit
// order is their seq order; every --period all channels get one message.
#include "../clock.hpp"
#include "pgiplock.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {

using test::now_ns;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t from = 0;
  while (from <= s.size()) {
    auto comma = s.find(',', from);
    if (comma == std::string::npos) comma = s.size();
    if (comma > from) out.push_back(s.substr(from, comma - from));
    from = comma + 1;
  }
  return out;
}

std::string one_line(std::string what) {
  std::replace(what.begin(), what.end(), '\n', ' ');
  return what;
}

// A member restarted during a partition or a server restart cannot connect
// yet: it tries again until it can (reconnects after that are pubsub's).
pgiplock::task<void> member_start(pgiplock::event_loop& loop, pgiplock::pubsub& ps, std::vector<std::string> channels) {
  for (;;) {
    std::string failure;
    try {
      co_await ps.connect();
      break;
    } catch (const std::exception& e) {
      failure = one_line(e.what());
    }
    std::printf("E %lld connect: %s\n", now_ns(), failure.c_str());
    co_await loop.sleep(std::chrono::milliseconds(200));
  }
  co_await ps.listen(std::move(channels));
  std::printf("R %lld %d\n", now_ns(), ps.client()->backend_pid());
  std::fflush(stdout);
}

// The L lines, and stdout flushed once per millisecond.
pgiplock::task<void> watch(pgiplock::event_loop& loop, pgiplock::pubsub& ps, std::vector<std::string> channels,
                           std::map<std::string, long long, std::less<>>& tenure) {
  std::vector<bool> was(channels.size(), false);
  for (;;) {
    for (std::size_t i = 0; i < channels.size(); ++i) {
      bool now = ps.is_active(channels[i]);
      if (was[i] && !now) std::printf("L %lld %s %lld\n", now_ns(), channels[i].c_str(), tenure[channels[i]]);
      was[i] = now;
    }
    std::fflush(stdout);
    co_await loop.sleep(std::chrono::milliseconds(1));
  }
}

int member(int argc, char** argv) {
  pgiplock::pubsub_options o;
  o.conninfo = argv[1];
  o.handle_signals = true;
  o.liveness_timeout = std::chrono::milliseconds(3000);
  o.acquire_interval = std::chrono::milliseconds(5000);
  std::vector<std::string> channels;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto next_ms = [&] { return std::chrono::milliseconds(std::atol(argv[++i])); };
    if (a == "--channels" && i + 1 < argc) channels = split(argv[++i]);
    else if (a == "--durable") o.durable = true;
    else if (a == "--balance") o.balance = true;
    else if (a == "--liveness" && i + 1 < argc) o.liveness_timeout = next_ms();
    else if (a == "--interval" && i + 1 < argc) o.acquire_interval = next_ms();
    else if (a == "--retry" && i + 1 < argc) o.retry_delay = next_ms();
    else {
      std::fprintf(stderr, "soak_member: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (channels.empty()) {
    std::fprintf(stderr, "soak_member: --channels is required\n");
    return 2;
  }
  o.logger = [](pgiplock::log_level level, std::string_view m) {
    if (level >= pgiplock::log_level::warn) {
      std::fprintf(stderr, "soak_member %d %lld: %.*s\n", ::getpid(), now_ns() / 1000000, static_cast<int>(m.size()),
                   m.data());
    }
  };
  pgiplock::event_loop loop;
  pgiplock::pubsub ps(loop, o);
  std::map<std::string, long long, std::less<>> tenure;  // the last on_listen's token per channel
  ps.on_listen([&](std::string_view ch) {
    long long token = ps.token(ch);
    tenure[std::string(ch)] = token;
    std::printf("H %lld %.*s %lld\n", now_ns(), static_cast<int>(ch.size()), ch.data(), token);
  });
  ps.on_delivery([&](const pgiplock::delivery& d) {
    long long token = d.token;
    if (token == 0) token = ps.token(d.channel);
    if (token == 0) {
      auto it = tenure.find(d.channel);
      if (it != tenure.end()) token = it->second;
    }
    std::printf("D %lld %.*s %.*s %lld %lld\n", now_ns(), static_cast<int>(d.channel.size()), d.channel.data(),
                static_cast<int>(d.payload.size()), d.payload.data(), static_cast<long long>(d.id), token);
    std::fflush(stdout);  // before the handler returns: a durable message is acknowledged after it
  });
  ps.on_error([](const std::exception& e) { std::printf("E %lld %s\n", now_ns(), one_line(e.what()).c_str()); });
  // When a lost link came back (an E line too, so the checker counts it as
  // any other event of the member's; the history shows how long it took).
  ps.on_reconnect([&](std::size_t attempts) {
    std::printf("E %lld reconnected after %zu attempt(s), backend %d\n", now_ns(), attempts,
                ps.client() ? ps.client()->backend_pid() : 0);
  });
  loop.spawn(member_start(loop, ps, channels));
  loop.spawn(watch(loop, ps, channels, tenure));
  loop.run();
  std::fflush(stdout);
  return 0;
}

// One channel's messages, one after another, one per period.
pgiplock::task<void> publish(pgiplock::event_loop& loop, pgiplock::pubsub& ps, std::string channel,
                             std::chrono::milliseconds period) {
  auto next = std::chrono::steady_clock::now();
  for (long long seq = 1;; ++seq) {
    long long t0 = now_ns();
    bool ok = true;
    try {
      co_await ps.notify(channel, std::to_string(seq));
    } catch (const std::exception&) {
      ok = false;
    }
    std::printf("P %lld %lld %s %lld %s\n", t0, now_ns(), channel.c_str(), seq, ok ? "ok" : "fail");
    std::fflush(stdout);
    next += period;
    auto now = std::chrono::steady_clock::now();
    if (next < now) next = now;  // behind (a restart): no burst to catch up
    co_await loop.sleep(next - now);
  }
}

pgiplock::task<void> publisher_start(pgiplock::event_loop& loop, pgiplock::pubsub& ps,
                                     std::vector<std::string> channels, std::chrono::milliseconds period) {
  for (;;) {
    try {
      co_await ps.connect();
      break;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "soak publisher: connect: %s\n", e.what());
    }
    co_await loop.sleep(std::chrono::milliseconds(100));
  }
  for (auto& ch : channels) loop.spawn(publish(loop, ps, ch, period));
}

int publisher(int argc, char** argv) {
  std::vector<std::string> plain, durable;
  std::chrono::milliseconds period(20);
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--plain" && i + 1 < argc) plain = split(argv[++i]);
    else if (a == "--durable" && i + 1 < argc) durable = split(argv[++i]);
    else if (a == "--period" && i + 1 < argc) period = std::chrono::milliseconds(std::atol(argv[++i]));
    else {
      std::fprintf(stderr, "soak_member --publish: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  pgiplock::event_loop loop;
  pgiplock::pubsub_options o;
  o.conninfo = argv[1];
  o.retry_delay = std::chrono::milliseconds(50);
  o.handle_signals = true;
  pgiplock::pubsub plain_ps(loop, o);
  o.durable = true;
  pgiplock::pubsub durable_ps(loop, o);
  if (!plain.empty()) loop.spawn(publisher_start(loop, plain_ps, plain, period));
  if (!durable.empty()) loop.spawn(publisher_start(loop, durable_ps, durable, period));
  loop.run();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: soak_member DSN --channels A,B [--durable] [--balance] [--liveness MS] [--interval MS] "
                 "[--retry MS]\n       soak_member DSN --publish [--plain A,B] [--durable C,D] [--period MS]\n");
    return 2;
  }
  if (std::strcmp(argv[2], "--publish") == 0) return publisher(argc, argv);
  return member(argc, argv);
}
