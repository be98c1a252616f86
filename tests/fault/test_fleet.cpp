// The fleet rows of the fault suite (DESIGN.md section 7): what a fleet
// costs the server does not grow with its channels, and a crash is taken
// over on every channel at once, in milliseconds.
//   - 3 members x 2,000 channels: connections and advisory locks per member,
//     an admin connection and a 100-lock transaction working meanwhile, and
//     kill -9 of the member holding the channels under 2 messages per ms.
//   - Successive crashes: 4 members, the holder killed, then each new holder.
//   - listen() of 10,000 channels on one member.
//   - A member whose watching connection is refused keeps delivering and
//     says so once.
//   - Balanced members share the channels and move them without loss.
#include "fleet.hpp"

#include <set>

extern const bool test_needs_database = true;

using namespace test;

namespace {

// A member process on many channels (member --channels N): what it holds
// and delivers, per channel.
struct big_member {
  std::unique_ptr<child_process> proc;
  int backend_pid = 0;
  std::map<std::string, long long> holds;  // channel -> last HOLD
  std::vector<std::string> warnings;
  bool alive = true;
  int index = 0;
};

struct many_fleet {
  event_loop& loop;
  std::string stem;
  long channels;
  std::vector<std::unique_ptr<big_member>> members;
  std::map<long, std::vector<std::pair<int, long long>>> delivered;  // n -> (member, t)
  std::map<long, long long> sent_at;                                  // n -> t
  long sent = 0;
  bool publishing = false;
  int readers = 0;

  many_fleet(event_loop& l, std::string s, long c) : loop(l), stem(std::move(s)), channels(c) {}

  std::string channel(long i) const { return stem + "." + std::to_string(i); }

  big_member& start(std::vector<std::string> extra = {}, std::string conninfo = dsn()) {
    auto m = std::make_unique<big_member>();
    m->index = static_cast<int>(members.size());
    std::vector<std::string> argv{env_or("PGIPLOCK_FAULT_MEMBER"), conninfo, stem, "--channels",
                                  std::to_string(channels), "--interval", "30000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    m->proc = std::make_unique<child_process>(argv);
    members.push_back(std::move(m));
    ++readers;
    loop.spawn(read(*members.back()));
    return *members.back();
  }

  task<void> read(big_member& m) {
    for (;;) {
      auto line = co_await m.proc->read_line(loop, 200ms);
      if (!line) {
        if (m.proc->at_eof()) break;
        continue;
      }
      std::istringstream in(*line);
      std::string kind, ch;
      long long t = 0;
      long n = 0;
      in >> kind;
      if (kind == "READY") in >> m.backend_pid;
      if (kind == "HOLD" && in >> t >> ch) m.holds[ch] = t;
      if (kind == "MSG" && in >> n >> t) delivered[n].emplace_back(m.index, t);
      if (kind == "WARN") m.warnings.push_back(*line);
    }
    --readers;
  }

  // Two messages per millisecond, round robin over the channels.
  static task<void> publish(many_fleet& f, pubsub& pub) {
    f.publishing = true;
    while (f.publishing) {
      for (int k = 0; k < 2; ++k) {
        long n = f.sent++;
        f.sent_at[n] = now_ns();
        f.loop.spawn(send(pub, f.channel(n % f.channels), std::to_string(n)));
      }
      co_await f.loop.sleep(1ms);
    }
  }
  static task<void> send(pubsub& pub, std::string ch, std::string payload) {
    try {
      co_await pub.notify(ch, payload);
    } catch (const std::exception&) {
      // counted as lost if it matters
    }
  }

  std::size_t holding(long long after, int except) const {
    std::set<std::string> held;
    for (auto& m : members) {
      if (m->index == except || !m->alive) continue;
      for (auto& [ch, t] : m->holds) {
        if (t > after) held.insert(ch);
      }
    }
    return held.size();
  }

  task<void> stop() {
    publishing = false;
    for (auto& m : members) m->proc->signal(SIGKILL);
    co_await wait_until(loop, [&] { return readers == 0; }, 5s);
  }
};

// What the server spends on us: backends in this database and granted
// advisory locks.
struct server_cost {
  long backends = 0, advisory_locks = 0;
};

task<server_cost> cost_now(std::shared_ptr<pgiplock::connection> c) {
  auto r = co_await c->query(
      "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()), "
      "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted)");
  co_return server_cost{std::stol(std::string(r.get(0, 0))), std::stol(std::string(r.get(0, 1)))};
}

// What another client of the database does meanwhile: connect, and take 100
// advisory locks in one transaction (the shared lock table has room).
task<std::string> other_client_works(event_loop& loop) {
  try {
    auto admin = co_await pgiplock::connection::connect(loop, dsn());
    co_await admin->query("BEGIN");
    co_await admin->query("SELECT count(pg_advisory_xact_lock(k)) FROM generate_series(1, 100) AS k");
    co_await admin->query("COMMIT");
    co_await admin->close();
  } catch (const std::exception& e) {
    co_return e.what();
  }
  co_return std::string();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

struct scale_result {
  server_cost before, settled;
  std::string other_client;
  std::vector<double> takeover_ms;  // per channel: kill -> its new holder's LISTEN
  std::size_t taken_over = 0;
  long duplicated = 0, lost_after_takeover = 0, messages = 0;
};

constexpr long scale_channels = 2000;
// The targets; the ASan+UBSan build's members do their own part two to three
// times slower (the server's part, most of a takeover, is the same).
constexpr double slower = sanitized ? 2.5 : 1;

task<scale_result> scale_run(event_loop& loop) {
  scale_result out;
  auto admin = co_await pgiplock::connection::connect(loop, dsn());
  out.before = co_await cost_now(admin);
  many_fleet fl(loop, fresh_channel("fleet"), scale_channels);
  auto& first = fl.start();
  bool held = co_await wait_until(loop, [&] { return first.holds.size() == scale_channels; }, 20s);
  REQUIRE(held);
  fl.start();
  fl.start();
  bool up = co_await wait_until(loop, [&] {
    return std::all_of(fl.members.begin(), fl.members.end(), [](auto& m) { return m->backend_pid != 0; });
  }, 20s);
  REQUIRE(up);
  co_await loop.sleep(300ms);  // the watchers connect and start their first slice
  out.settled = co_await cost_now(admin);
  out.other_client = co_await other_client_works(loop);
  pgiplock::pubsub_options po;
  po.conninfo = dsn();
  pubsub pub(loop, po);
  co_await pub.connect();
  loop.spawn(many_fleet::publish(fl, pub));
  co_await loop.sleep(500ms);
  long long t_kill = now_ns();
  first.proc->signal(SIGKILL);
  first.alive = false;
  bool all = co_await wait_until(loop, [&] { return fl.holding(t_kill, 0) == scale_channels; }, 5s);
  out.taken_over = fl.holding(t_kill, 0);
  co_await loop.sleep(1500ms);
  fl.publishing = false;
  co_await loop.sleep(300ms);
  std::map<std::string, long long> took;
  for (auto& m : fl.members) {
    if (m->index == 0) continue;
    for (auto& [ch, t] : m->holds) {
      if (t > t_kill && (!took.count(ch) || t < took[ch])) took[ch] = t;
    }
  }
  for (auto& [ch, t] : took) out.takeover_ms.push_back(static_cast<double>(t - t_kill) / 1e6);
  for (auto& [n, ds] : fl.delivered) out.duplicated += static_cast<long>(ds.size()) - 1;
  for (long n = 0; n < fl.sent; ++n) {  // sent after its channel's new holder LISTENs: must arrive
    auto it = took.find(fl.channel(n % scale_channels));
    if (it != took.end() && fl.sent_at[n] > it->second + 5'000'000 && !fl.delivered.count(n)) ++out.lost_after_takeover;
  }
  out.messages = fl.sent;
  (void)all;
  co_await fl.stop();
  co_await pub.close();
  co_await admin->close();
  co_return out;
}

}  // namespace

TEST_CASE("3 members x 2,000 channels: a constant server cost per member; kill -9 of the holder is taken over on "
          "every channel within 1 s, median <= 50 ms, p99 <= 200 ms, nothing twice",
          "[fault][fleet]") {
  event_loop loop;
  for (int attempt = 1;; ++attempt) {
    auto r = loop.run(scale_run(loop));
    long backends = r.settled.backends - r.before.backends;
    long locks = r.settled.advisory_locks - r.before.advisory_locks;
    double median = percentile(r.takeover_ms, 0.5), p99 = percentile(r.takeover_ms, 0.99),
           worst = percentile(r.takeover_ms, 1.0);
    WARN("3 members x " << scale_channels << " channels: " << backends << " connections, " << locks
                        << " advisory locks in all; takeover per channel: median " << median << " ms, p99 " << p99
                        << " ms, worst " << worst << " ms over " << r.takeover_ms.size() << " channels; "
                        << r.messages << " messages, " << r.duplicated << " twice, " << r.lost_after_takeover
                        << " lost after their channel's takeover");
    CHECK(backends <= 3 * 3);
    CHECK(locks <= 3 * 2);
    INFO(r.other_client);
    CHECK(r.other_client.empty());
    CHECK(r.taken_over == static_cast<std::size_t>(scale_channels));
    CHECK(r.duplicated == 0);
    CHECK(r.lost_after_takeover == 0);
    bool met = median <= 50 * slower && p99 <= 200 * slower && worst <= 1000;
    if (!timing_final(attempt, met, "3 x 2,000 channels takeover")) continue;
    CHECK(median <= 50 * slower);
    CHECK(p99 <= 200 * slower);
    CHECK(worst <= 1000);
    break;
  }
}

namespace {

// 4 members on one channel; the holder is killed, then each new holder.
task<std::vector<double>> successive_run(event_loop& loop) {
  fleet fl(loop, fresh_channel("successive"));
  std::vector<std::string> extra{"--interval", "30000"};
  fl.start(4, extra);
  bool up = co_await fl.ready(20s);
  REQUIRE(up);
  co_await loop.sleep(1500ms);  // every member's watcher has re-read the ring at least once
  pgiplock::pubsub_options po;
  po.conninfo = dsn();
  pubsub pub(loop, po);
  co_await pub.connect();
  loop.spawn(fleet::publish(fl, pub));
  std::vector<double> takeovers;
  for (int kill = 0; kill < 3; ++kill) {
    co_await wait_until(loop, [&] { return fl.deliveries.size() >= 100 * static_cast<std::size_t>(kill + 1); }, 5s);
    int victim = fl.holder();
    REQUIRE(victim >= 0);
    long long t0 = now_ns();
    fl.members[static_cast<std::size_t>(victim)]->signal(SIGKILL);
    fl.alive[static_cast<std::size_t>(victim)] = false;
    bool resumed = co_await wait_until(loop, [&] { return fl.first_delivery_after(t0, victim).has_value(); }, 40s);
    REQUIRE(resumed);
    takeovers.push_back(static_cast<double>(*fl.first_delivery_after(t0, victim) - t0) / 1e6);
    co_await loop.sleep(200ms);
  }
  auto tally = fl.count();
  CHECK(tally.duplicated == 0);
  co_await fl.stop();
  co_await pub.close();
  co_return takeovers;
}

}  // namespace

TEST_CASE("successive crashes: 4 members, the holder killed, then each new holder; every takeover within 50 ms",
          "[fault][fleet]") {
  event_loop loop;
  for (int attempt = 1;; ++attempt) {
    auto t = loop.run(successive_run(loop));
    std::ostringstream o;
    for (auto ms : t) o << " " << ms << " ms";
    WARN("successive SIGKILL takeovers:" << o.str());
    REQUIRE(t.size() == 3);
    bool met = std::all_of(t.begin(), t.end(), [](double ms) { return ms <= 50 * slower; });
    if (!timing_final(attempt, met, "successive SIGKILL takeovers")) continue;
    for (auto ms : t) CHECK(ms <= 50 * slower);
    break;
  }
}

namespace {

struct big_listen_result {
  double ms = 0;
  std::size_t active = 0;
  server_cost before, after;
};

task<big_listen_result> listen_many(event_loop& loop, long count) {
  big_listen_result out;
  auto admin = co_await pgiplock::connection::connect(loop, dsn());
  out.before = co_await cost_now(admin);
  pgiplock::pubsub_options po;
  po.conninfo = dsn();
  pubsub ps(loop, po);
  co_await ps.connect();
  std::string stem = fresh_channel("tenk");
  std::vector<std::string> all;
  for (long i = 0; i < count; ++i) all.push_back(stem + "." + std::to_string(i));
  auto t0 = clock::now();
  co_await ps.listen(all);
  out.ms = ms_since(t0);
  out.active = ps.active_channels().size();
  co_await loop.sleep(300ms);  // the watcher connects
  out.after = co_await cost_now(admin);
  co_await ps.destroy();
  co_await admin->close();
  co_return out;
}

}  // namespace

TEST_CASE("listen() of 10,000 channels on one member: all active within 1 s, two connections, one lock",
          "[fault][fleet]") {
  event_loop loop;
  for (int attempt = 1;; ++attempt) {
    auto r = loop.run(listen_many(loop, 10000));
    WARN("listen() of 10,000 channels: all " << r.active << " active after " << r.ms << " ms; "
                                             << (r.after.backends - r.before.backends) << " connections, "
                                             << (r.after.advisory_locks - r.before.advisory_locks)
                                             << " advisory locks");
    CHECK(r.active == 10000);
    CHECK(r.after.backends - r.before.backends <= 2);
    CHECK(r.after.advisory_locks - r.before.advisory_locks <= 1);
    if (!timing_final(attempt, r.ms <= 1000 * slower, "listen() of 10,000 channels")) continue;
    CHECK(r.ms <= 1000 * slower);
    break;
  }
}

namespace {

// A role that may hold one connection: a member logging in as it gets its
// listening connection, and its watching connection is refused.
struct one_connection_role {
  std::string name = "pgiplock_one_" + std::to_string(::getpid());
  std::shared_ptr<pgiplock::connection> admin;
  static task<std::shared_ptr<one_connection_role>> make(event_loop& loop) {
    auto r = std::make_shared<one_connection_role>();
    r->admin = co_await pgiplock::connection::connect(loop, dsn());
    std::string s = r->admin->quote_identifier(pgiplock::ip_lock::schema_name());
    co_await r->admin->query("CREATE ROLE " + r->name + " LOGIN CONNECTION LIMIT 1");
    co_await r->admin->query("GRANT USAGE ON SCHEMA " + s + " TO " + r->name);
    co_await r->admin->query("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA " + s + " TO " + r->name);
    co_await r->admin->query("GRANT USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA " + s + " TO " + r->name);
    co_return r;
  }
  task<void> drop() {
    co_await admin->query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name);
    co_await admin->query("DROP OWNED BY " + name);
    co_await admin->query("DROP ROLE " + name);
    co_await admin->close();
  }
};

struct refused_result {
  std::size_t warnings = 0, named_setting = 0, delivered = 0;
  long sent = 0;
  std::vector<std::string> lines;
};

task<refused_result> refused_run(event_loop& loop) {
  refused_result out;
  // The lock schema exists (another test made it) before the role is granted.
  pgiplock::pubsub_options po;
  po.conninfo = dsn();
  pubsub pub(loop, po);
  co_await pub.connect();
  std::string warmup = fresh_channel("warm");
  co_await pub.listen(warmup);
  auto role = co_await one_connection_role::make(loop);
  many_fleet fl(loop, fresh_channel("refused"), 1);
  auto& m = fl.start({"--interval", "300"}, dsn() + " user=" + role->name);
  bool held = co_await wait_until(loop, [&] { return m.holds.size() == 1; }, 20s);
  REQUIRE(held);
  loop.spawn(many_fleet::publish(fl, pub));
  co_await loop.sleep(2000ms);  // some six attempts to connect its watcher
  fl.publishing = false;
  co_await loop.sleep(200ms);
  out.sent = fl.sent;
  out.delivered = fl.delivered.size();
  for (auto& w : m.warnings) {
    out.lines.push_back(w);
    out.warnings += w.find("fast failover unavailable") != std::string::npos;
    out.named_setting += w.find("CONNECTION LIMIT") != std::string::npos;  // the setting to raise
  }
  co_await fl.stop();
  co_await role->drop();
  co_await pub.close();
  co_return out;
}

}  // namespace

TEST_CASE("a member whose watching connection is refused keeps delivering and says so once", "[fault][fleet]") {
  event_loop loop;
  auto r = loop.run(refused_run(loop));
  std::ostringstream o;
  for (auto& l : r.lines) o << "\n  " << l;
  INFO("its warnings:" << o.str());
  CHECK(r.warnings == 1);
  CHECK(r.named_setting == 1);
  CHECK(r.sent > 1000);
  CHECK(static_cast<long>(r.delivered) >= r.sent - 10);  // the last few may still be in flight
}

namespace {

constexpr long balanced_channels = 300;

// Who holds how many of the fleet's channels, by the lock table.
task<std::map<std::string, long>> holdings(std::shared_ptr<pgiplock::connection> c, std::string stem) {
  auto r = co_await c->query("SELECT app, count(*) FROM " + lock_schema(*c) +
                                 ".lock WHERE starts_with(channel, $1) GROUP BY app",
                             "__PgIpLock__:" + stem + ".");
  std::map<std::string, long> out;
  for (int i = 0; i < r.rows(); ++i) out[std::string(r.get(i, 0))] = std::stol(std::string(r.get(i, 1)));
  co_return out;
}

bool shares_are(const std::map<std::string, long>& held, std::size_t members, long total) {
  if (held.size() != members) return false;
  long even = total / static_cast<long>(members), sum = 0;
  for (auto& [app, n] : held) {
    if (n < even || n > even + 1) return false;
    sum += n;
  }
  return sum == total;
}

std::string show(const std::map<std::string, long>& held) {
  std::ostringstream o;
  for (auto& [app, n] : held) o << " " << app << ":" << n;
  return o.str();
}

// Polls the lock table until the shares are even (+-1) over `members`:
// the time it took, or -1 after 5 s; `view` gets the last holdings seen.
task<double> settle(event_loop& loop, std::shared_ptr<pgiplock::connection> admin, std::string stem,
                    std::size_t members, std::string& view) {
  auto t0 = clock::now();
  for (;;) {
    std::map<std::string, long> held;
    try {
      held = co_await holdings(admin, stem);
    } catch (const pgiplock::sql_error&) {
      // the first member has not made the lock schema yet
    }
    view = show(held);
    if (shares_are(held, members, balanced_channels)) co_return ms_since(t0);
    if (clock::now() - t0 > 5s) co_return -1.0;
    co_await loop.sleep(20ms);
  }
}

struct balance_result {
  std::vector<double> settle_ms;  // after each join, then after the leave
  std::vector<std::string> views;
  long sent = 0, lost = 0, duplicated = 0;
};

task<balance_result> balance_run(event_loop& loop) {
  balance_result out;
  auto admin = co_await pgiplock::connection::connect(loop, dsn());
  many_fleet fl(loop, fresh_channel("balance"), balanced_channels);
  pgiplock::pubsub_options po;
  po.conninfo = dsn();
  pubsub pub(loop, po);
  co_await pub.connect();
  std::vector<std::string> extra{"--balance", "--graceful"};
  for (std::size_t joined = 1; joined <= 3; ++joined) {
    if (joined > 1) co_await loop.sleep(1s);
    fl.start(extra);
    std::string view;
    out.settle_ms.push_back(co_await settle(loop, admin, fl.stem, joined, view));
    out.views.push_back(view);
    if (joined == 1) loop.spawn(many_fleet::publish(fl, pub));  // from the first tenure on: none is lost
  }
  co_await loop.sleep(1s);
  fl.members.front()->proc->signal(SIGTERM);  // a graceful leave
  fl.members.front()->alive = false;
  std::string view;
  out.settle_ms.push_back(co_await settle(loop, admin, fl.stem, 2, view));
  out.views.push_back(view);
  co_await loop.sleep(1s);
  fl.publishing = false;
  co_await loop.sleep(500ms);
  out.sent = fl.sent;
  for (long n = 0; n < fl.sent; ++n) {
    auto it = fl.delivered.find(n);
    if (it == fl.delivered.end()) ++out.lost;
    else out.duplicated += static_cast<long>(it->second.size()) - 1;
  }
  co_await fl.stop();
  co_await pub.close();
  co_await admin->close();
  co_return out;
}

// Two balanced members beside a single-listener member of other channels,
// all in one lock schema (one process may well run both kinds): the time
// until the balanced channels are shared 150/150, or -1.
task<double> mixed_run(event_loop& loop, std::string& view) {
  auto admin = co_await pgiplock::connection::connect(loop, dsn());
  many_fleet single(loop, fresh_channel("single"), 10);
  single.start();
  bool joined = co_await wait_until(loop, [&] { return !single.members.front()->holds.empty(); }, 10s);
  REQUIRE(joined);
  many_fleet balanced(loop, fresh_channel("mixed"), balanced_channels);
  balanced.start({"--balance"});
  balanced.start({"--balance"});
  auto ms = co_await settle(loop, admin, balanced.stem, 2, view);
  co_await balanced.stop();
  co_await single.stop();
  co_await admin->close();
  co_return ms;
}

}  // namespace

TEST_CASE("balanced members share among themselves: a single-listener member of other channels in the same lock "
          "schema leaves no balanced channel unheld",
          "[fault][fleet][balance]") {
  event_loop loop;
  std::string view;
  auto ms = loop.run(mixed_run(loop, view));
  INFO("last holdings:" << view);
  CHECK(ms >= 0);
  WARN("balanced beside a single-listener member: 150/150 after " << ms << " ms:" << view);
}

TEST_CASE("balanced: 3 members joining 1 s apart on 300 channels hold 100 +- 1 each within 5 s; joins and a "
          "graceful leave lose and duplicate nothing",
          "[fault][fleet][balance]") {
  event_loop loop;
  auto r = loop.run(balance_run(loop));
  std::ostringstream o;
  for (std::size_t i = 0; i < r.settle_ms.size(); ++i) o << "\n  " << r.settle_ms[i] << " ms:" << r.views[i];
  WARN("balanced, settled after each join and the leave:" << o.str() << "\n  " << r.sent << " messages, " << r.lost
                                                          << " lost, " << r.duplicated << " twice");
  REQUIRE(r.settle_ms.size() == 4);
  for (auto ms : r.settle_ms) CHECK(ms >= 0);
  CHECK(r.lost == 0);
  CHECK(r.duplicated == 0);
}
