// bench_pgiplock - the same jobs through pgiplock::pubsub, the path users get:
//
//   bench_pgiplock listen   DSN CH COUNT SINGLE   pubsub (single_listener =
//                                                  SINGLE), counts on_message
//   bench_pgiplock notify   DSN CH COUNT INFLIGHT pubsub::notify, INFLIGHT
//                                                  coroutines; a raw libpq
//                                                  connection counts deliveries
//   bench_pgiplock exec     DSN CH QUIET_MS FILE  execution-lock worker: writes
//                                                  the payloads it won to FILE
//   bench_pgiplock holder   DSN CH INTERVAL_MS    single-listener pubsub that
//                                                  reports listening/messages and
//                                                  obeys `destroy` / `exit` on stdin
//   bench_pgiplock e2e_listen  DSN CH COUNT DURABLE
//                                                  single-listener pubsub (durable
//                                                  = DURABLE), counts on_delivery
//                                                  and checks the ids (1, 2, ...)
//   bench_pgiplock e2e_publish DSN CH COUNT INFLIGHT DURABLE BYTES
//                                                  pubsub::notify, INFLIGHT
//                                                  coroutines, payloads of BYTES
//                                                  (64: bench::payload; more:
//                                                  random, incompressible)
//   bench_pgiplock latency  DSN CH COUNT PAUSE_MS  a plain and a durable
//                                                  publisher/listener pair on one
//                                                  loop, one message at a time,
//                                                  alternating: notify() call ->
//                                                  the listener's handler
//
// Protocol: see bench/driver.py.
#include "bench_common.hpp"

#include "pgiplock.hpp"

#include <poll.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace std::chrono_literals;
using pgiplock::event_loop;
using pgiplock::pubsub;
using pgiplock::pubsub_options;
using pgiplock::task;

pubsub_options options_for(const char* dsn) {
  pubsub_options o;
  o.conninfo = dsn;
  o.execution_lock = false;
  return o;
}

// ---- listen -----------------------------------------------------------------

struct drain_state {
  long count = 0, got = 0;
  std::int64_t cpu0 = 0, t_first = 0;
};

task<void> listen_main(event_loop& loop, pubsub& ps, std::string ch, drain_state& st) {
  pgiplock::async_event finished(loop);
  ps.on_message([&st, &finished](std::string_view, std::string_view) {
    if (st.got++ == 0) st.t_first = bench::now_ns();
    if (st.got == st.count) {
      std::int64_t t_done = bench::now_ns(), cpu1 = bench::cpu_us();
      bench::say("done %ld %lld %lld %lld", st.got, static_cast<long long>(cpu1 - st.cpu0),
                 static_cast<long long>(t_done), static_cast<long long>(st.t_first));
      finished.set();
    }
  });
  co_await ps.connect();
  co_await ps.listen(ch);
  if (!ps.is_active(ch)) bench::die("listener is not active on " + ch);
  bench::say("ready %d", static_cast<int>(::getpid()));
  st.cpu0 = bench::cpu_us();
  co_await finished.wait();
}

int listen(int argc, char** argv) {
  if (argc < 6) bench::die("usage: listen DSN CH COUNT SINGLE");
  event_loop loop;
  auto o = options_for(argv[2]);
  o.single_listener = bench::arg_long(argc, argv, 5, 1) != 0;
  pubsub ps(loop, o);
  drain_state st;
  st.count = bench::arg_long(argc, argv, 4, 0);
  loop.run(listen_main(loop, ps, argv[3], st));
  bench::wait_for_driver();
  return 0;
}

// ---- notify -----------------------------------------------------------------

struct notify_state {
  long count = 0, inflight = 0, done = 0, workers_left = 0;
  std::exception_ptr failure;
};

task<void> notify_worker(pubsub& ps, std::string ch, long first, notify_state& st, pgiplock::async_event& all) {
  try {
    for (long i = first; i < st.count; i += st.inflight) {
      std::string p = bench::payload("p", i);
      co_await ps.notify(ch, p);
      ++st.done;
    }
  } catch (...) {
    if (!st.failure) st.failure = std::current_exception();
  }
  if (--st.workers_left == 0) all.set();
}

task<std::int64_t> notify_main(event_loop& loop, pubsub& ps, std::string ch, notify_state& st) {
  co_await ps.connect();
  pgiplock::async_event all(loop);
  st.workers_left = st.inflight;
  std::int64_t t0 = bench::now_ns();
  for (long w = 0; w < st.inflight; ++w) loop.spawn(notify_worker(ps, ch, w, st, all));
  co_await all.wait();
  std::int64_t t1 = bench::now_ns();
  if (st.failure) std::rethrow_exception(st.failure);
  co_return t1 - t0;
}

int notify(int argc, char** argv) {
  if (argc < 6) bench::die("usage: notify DSN CH COUNT INFLIGHT");
  // The counting listener: plain libpq, read only after the timed part.
  PGconn* l = PQconnectdb(argv[2]);
  if (PQstatus(l) != CONNECTION_OK) bench::die(std::string("connect: ") + PQerrorMessage(l));
  char* q = PQescapeIdentifier(l, argv[3], std::strlen(argv[3]));
  PGresult* r = PQexec(l, (std::string("LISTEN ") + q).c_str());
  PQfreemem(q);
  if (PQresultStatus(r) != PGRES_COMMAND_OK) bench::die(PQerrorMessage(l));
  PQclear(r);

  event_loop loop;
  pubsub ps(loop, options_for(argv[2]));
  notify_state st;
  st.count = bench::arg_long(argc, argv, 4, 0);
  st.inflight = std::max(1L, std::min(st.count, bench::arg_long(argc, argv, 5, 1000)));
  std::int64_t elapsed = loop.run(notify_main(loop, ps, argv[3], st));

  long got = 0;
  pollfd p{PQsocket(l), POLLIN, 0};
  while (got < st.count && ::poll(&p, 1, 5000) > 0) {
    PQconsumeInput(l);
    while (PGnotify* n = PQnotifies(l)) {
      ++got;
      PQfreemem(n);
    }
  }
  bench::say("sent %ld %lld delivered %ld", st.done, static_cast<long long>(elapsed), got);
  loop.run(ps.destroy());
  PQfinish(l);
  return 0;
}

// ---- execution-lock worker ---------------------------------------------------

struct exec_state {
  std::vector<std::string> won;
  std::int64_t t_first = 0, t_last = 0, cpu0 = 0;
};

task<void> exec_main(event_loop& loop, pubsub& ps, std::string ch, std::chrono::milliseconds quiet,
                     exec_state& st) {
  ps.on_message([&st](std::string_view, std::string_view payload) {
    st.t_last = bench::now_ns();
    if (st.won.empty()) st.t_first = st.t_last;
    st.won.emplace_back(payload);
  });
  co_await ps.connect();
  co_await ps.listen(ch);
  bench::say("ready %d", static_cast<int>(::getpid()));
  st.cpu0 = bench::cpu_us();
  auto quiet_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(quiet).count();
  auto give_up = bench::now_ns() + 60'000'000'000LL;
  for (;;) {
    co_await loop.sleep(20ms);
    auto now = bench::now_ns();
    if (now > give_up) break;
    // Done when the messages stopped; the first wait may be long (the
    // publisher starts after every worker is ready).
    if (st.t_last && now - st.t_last > quiet_ns) break;
  }
  co_await ps.destroy();
}

int exec(int argc, char** argv) {
  if (argc < 6) bench::die("usage: exec DSN CH QUIET_MS FILE");
  event_loop loop;
  auto o = options_for(argv[2]);
  o.execution_lock = true;
  pubsub ps(loop, o);
  exec_state st;
  loop.run(exec_main(loop, ps, argv[3], std::chrono::milliseconds(bench::arg_long(argc, argv, 4, 500)), st));
  std::ofstream out(argv[5]);
  for (auto& p : st.won) out << p << '\n';
  out.close();
  bench::say("done %zu %lld %lld %lld", st.won.size(), static_cast<long long>(bench::cpu_us() - st.cpu0),
             static_cast<long long>(st.t_first), static_cast<long long>(st.t_last));
  return 0;
}

// ---- handover / crash holder ------------------------------------------------

task<void> holder_main(event_loop& loop, pubsub& ps, std::string ch) {
  ps.on_listen([](std::string_view) { bench::say("listening %lld", static_cast<long long>(bench::now_ns())); });
  ps.on_message([](std::string_view, std::string_view payload) {
    bench::say("msg %lld %.*s", static_cast<long long>(bench::now_ns()), static_cast<int>(payload.size()),
               payload.data());
  });
  co_await ps.connect();
  co_await ps.listen(ch);
  bench::say("ready %s", ps.is_active(ch) ? "active" : "standby");
  std::string line;
  for (;;) {
    auto r = co_await loop.poll(0, POLLIN);
    char buf[256];
    ssize_t n = ::read(0, buf, sizeof buf);
    if (n <= 0) break;
    (void)r;
    line.append(buf, static_cast<std::size_t>(n));
    if (line.find("destroy") != std::string::npos) {
      line.clear();
      bench::say("destroy %lld", static_cast<long long>(bench::now_ns()));
      co_await ps.destroy();
      bench::say("destroyed %lld", static_cast<long long>(bench::now_ns()));
    }
    if (line.find("exit") != std::string::npos) break;
  }
  co_await ps.destroy();
}

int holder(int argc, char** argv) {
  if (argc < 5) bench::die("usage: holder DSN CH INTERVAL_MS");
  event_loop loop;
  auto o = options_for(argv[2]);
  o.acquire_interval = std::chrono::milliseconds(bench::arg_long(argc, argv, 4, 30000));
  pubsub ps(loop, o);
  loop.run(holder_main(loop, ps, argv[3]));
  return 0;
}

// ---- durable channels: end to end, latency ----------------------------------

pubsub_options e2e_options(const char* dsn, bool durable) {
  auto o = options_for(dsn);
  o.durable = durable;
  return o;
}

struct e2e_state {
  long count = 0, got = 0, out_of_order = 0, errors = 0, repeats = 0, calls = 0;
  std::int64_t next_id = 1, cpu0 = 0, t_first = 0;
  std::vector<bool> seen;  // durable: ids delivered at least once
};

task<void> e2e_listen_main(event_loop& loop, pubsub& ps, std::string ch, bool durable, e2e_state& st) {
  pgiplock::async_event finished(loop);
  // Done when every message arrived (durable: every id 1..COUNT at least
  // once; a redelivery is counted, not mistaken for progress).
  ps.on_delivery([&st, &finished, durable](const pgiplock::delivery& d) {
    if (st.calls++ == 0) st.t_first = bench::now_ns();
    if (durable) {
      if (d.id != st.next_id) ++st.out_of_order;  // a gap, a repeat, or out of order
      st.next_id = d.id + 1;
      if (d.id < 1 || d.id > st.count) return;
      if (st.seen[static_cast<std::size_t>(d.id)]) {
        ++st.repeats;
        return;
      }
      st.seen[static_cast<std::size_t>(d.id)] = true;
    }
    if (++st.got == st.count) {
      std::int64_t t_done = bench::now_ns(), cpu1 = bench::cpu_us();
      bench::say("done %ld %lld %lld %lld %ld %ld %ld", st.got, static_cast<long long>(cpu1 - st.cpu0),
                 static_cast<long long>(t_done), static_cast<long long>(st.t_first), st.out_of_order, st.errors,
                 st.repeats);
      finished.set();
    }
  });
  ps.on_error([&st](const std::exception& e) {
    ++st.errors;
    std::fprintf(stderr, "bench: e2e_listen: on_error after %ld deliveries: %s\n", st.got, e.what());
  });
  co_await ps.connect();
  co_await ps.listen(ch);
  if (!ps.is_active(ch)) bench::die("listener is not active on " + ch);
  bench::say("ready %d", static_cast<int>(::getpid()));
  st.cpu0 = bench::cpu_us();
  co_await finished.wait();
  // Stays the holder (acknowledging) until the driver closes stdin.
  for (;;) {
    auto r = co_await loop.poll(0, POLLIN);
    (void)r;
    char buf[64];
    if (::read(0, buf, sizeof buf) <= 0) break;
  }
  co_await ps.close();
}

int e2e_listen(int argc, char** argv) {
  if (argc < 6) bench::die("usage: e2e_listen DSN CH COUNT DURABLE");
  event_loop loop;
  bool durable = bench::arg_long(argc, argv, 5, 0) != 0;
  pubsub ps(loop, e2e_options(argv[2], durable));
  e2e_state st;
  st.count = bench::arg_long(argc, argv, 4, 0);
  if (durable) st.seen.assign(static_cast<std::size_t>(st.count) + 1, false);
  loop.run(e2e_listen_main(loop, ps, argv[3], durable, st));
  return 0;
}

// Incompressible payloads (pglz finds no repeats in random letters): the
// journal's size on disk is then what was sent.
struct payload_source {
  std::size_t bytes = 64;
  std::string noise;
  std::mt19937_64 rng{42};
  explicit payload_source(std::size_t b) : bytes(b) {
    if (bytes <= 64) return;
    static constexpr char letters[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    noise.resize(bytes * 4);
    for (auto& c : noise) c = letters[rng() % (sizeof letters - 1)];
  }
  std::string make(long i) {
    if (bytes <= 64) return bench::payload("p", i, bytes);
    std::string p = std::to_string(i) + ":";
    std::size_t at = rng() % (noise.size() - bytes);
    p.append(noise, at, bytes - p.size());
    return p;
  }
};

struct e2e_pub_state {
  long count = 0, inflight = 0, next = 0, done = 0, workers_left = 0;
  payload_source payloads{64};
  std::exception_ptr failure;
};

// Messages are taken in order from one counter, so the journal's ids follow
// the calls' order (notify() calls in flight together are journaled in the
// order they were made).
task<void> e2e_worker(pubsub& ps, std::string ch, e2e_pub_state& st, pgiplock::async_event& all) {
  try {
    while (st.next < st.count) {
      std::string p = st.payloads.make(st.next++);
      co_await ps.notify(ch, p);
      ++st.done;
    }
  } catch (...) {
    if (!st.failure) st.failure = std::current_exception();
  }
  if (--st.workers_left == 0) all.set();
}

task<void> e2e_publish_main(event_loop& loop, pubsub& ps, std::string ch, e2e_pub_state& st) {
  co_await ps.connect();
  pgiplock::async_event all(loop);
  st.workers_left = st.inflight;
  std::int64_t t0 = bench::now_ns();
  for (long w = 0; w < st.inflight; ++w) loop.spawn(e2e_worker(ps, ch, st, all));
  co_await all.wait();
  std::int64_t t1 = bench::now_ns();
  if (st.failure) std::rethrow_exception(st.failure);
  bench::say("sent %ld %lld %lld", st.done, static_cast<long long>(t0), static_cast<long long>(t1));
  co_await ps.close();
}

int e2e_publish(int argc, char** argv) {
  if (argc < 8) bench::die("usage: e2e_publish DSN CH COUNT INFLIGHT DURABLE BYTES");
  event_loop loop;
  pubsub ps(loop, e2e_options(argv[2], bench::arg_long(argc, argv, 6, 0) != 0));
  e2e_pub_state st;
  st.count = bench::arg_long(argc, argv, 4, 0);
  st.inflight = std::max(1L, std::min(st.count, bench::arg_long(argc, argv, 5, 1000)));
  st.payloads = payload_source(static_cast<std::size_t>(bench::arg_long(argc, argv, 7, 64)));
  loop.run(e2e_publish_main(loop, ps, argv[3], st));
  return 0;
}

struct latency_pair {
  pubsub pub, sub;
  pgiplock::async_event got;
  std::int64_t t_got = 0;
  std::vector<std::int64_t> samples;
  latency_pair(event_loop& loop, const char* dsn, bool durable)
      : pub(loop, e2e_options(dsn, durable)), sub(loop, e2e_options(dsn, durable)), got(loop) {}
};

task<void> latency_once(latency_pair& p, std::string ch, long i, bool keep) {
  p.got.reset();
  std::string payload = bench::payload("t", i);
  std::int64_t t0 = bench::now_ns();
  co_await p.pub.notify(ch, payload);
  co_await p.got.wait();
  if (keep) p.samples.push_back(p.t_got - t0);
}

task<void> latency_setup(latency_pair& p, std::string ch) {
  p.sub.on_delivery([&p](const pgiplock::delivery&) {
    p.t_got = bench::now_ns();
    p.got.set();
  });
  co_await p.pub.connect();
  co_await p.sub.connect();
  co_await p.sub.listen(ch);
  if (!p.sub.is_active(ch)) bench::die("latency: listener is not active on " + ch);
}

std::int64_t percentile(std::vector<std::int64_t> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1))];
}

// One message at a time, plain and durable alternating (the first of each
// pair alternates too), so both see the same server and machine load.
task<void> latency_main(event_loop& loop, latency_pair& plain, latency_pair& durable, std::string ch, long count,
                        std::chrono::milliseconds pause) {
  co_await latency_setup(plain, ch + "_p");
  co_await latency_setup(durable, ch + "_d");
  const long warmup = 50;
  for (long i = 0; i < count + warmup; ++i) {
    bool keep = i >= warmup;
    if (i % 2 == 0) {
      co_await latency_once(plain, ch + "_p", i, keep);
      co_await loop.sleep(pause);
      co_await latency_once(durable, ch + "_d", i, keep);
    } else {
      co_await latency_once(durable, ch + "_d", i, keep);
      co_await loop.sleep(pause);
      co_await latency_once(plain, ch + "_p", i, keep);
    }
    co_await loop.sleep(pause);
  }
  auto line = [](const latency_pair& p) {
    return std::to_string(p.samples.size()) + " " + std::to_string(percentile(p.samples, 0.5)) + " " +
           std::to_string(percentile(p.samples, 0.9)) + " " + std::to_string(percentile(p.samples, 0.99));
  };
  bench::say("lat plain %s durable %s", line(plain).c_str(), line(durable).c_str());
  co_await plain.sub.close();
  co_await plain.pub.close();
  co_await durable.sub.close();
  co_await durable.pub.close();
}

int latency(int argc, char** argv) {
  if (argc < 6) bench::die("usage: latency DSN CH COUNT PAUSE_MS");
  event_loop loop;
  latency_pair plain(loop, argv[2], false), durable(loop, argv[2], true);
  loop.run(latency_main(loop, plain, durable, argv[3], bench::arg_long(argc, argv, 4, 1000),
                        std::chrono::milliseconds(bench::arg_long(argc, argv, 5, 2))));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "listen") return listen(argc, argv);
    if (cmd == "notify") return notify(argc, argv);
    if (cmd == "exec") return exec(argc, argv);
    if (cmd == "holder") return holder(argc, argv);
    if (cmd == "e2e_listen") return e2e_listen(argc, argv);
    if (cmd == "e2e_publish") return e2e_publish(argc, argv);
    if (cmd == "latency") return latency(argc, argv);
  } catch (const std::exception& e) {
    bench::die(e.what());
  }
  bench::die("usage: bench_pgiplock listen|notify|exec|holder|e2e_listen|e2e_publish|latency ...");
}
