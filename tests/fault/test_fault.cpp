// The fault suite: three listener processes on one channel, a publisher
// sending a numbered message every millisecond, and one fault per test.
// Each test repeats its fault, prints median and worst case, and asserts the
// targets of the failover issue and that no message is delivered twice.
#include "fleet.hpp"

#include <set>

extern const bool test_needs_database = true;

using namespace test;

namespace {

struct run_result {
  double takeover_ms = -1;
  double victim_told_ms = -1;  // the victim's first on_error after the fault
  long lost = 0, duplicated = 0;
  int changes = 0;
};

enum class fault { sigkill, sigterm, terminate_backend, delete_row, delete_row_woken, truncate_table };

task<run_result> one_run(event_loop& loop, fault f) {
  run_result out;
  fleet fl(loop, fresh_channel("fault"));
  std::vector<std::string> extra{"--interval", "30000", "--liveness", "2000"};
  if (f == fault::sigterm) extra.push_back("--graceful");
  fl.start(3, extra);
  bool up = co_await fl.ready(20s);
  REQUIRE(up);
  pubsub pub(loop, pubsub_opts());
  co_await pub.connect();
  loop.spawn(fleet::publish(fl, pub));
  co_await wait_until(loop, [&] { return fl.deliveries.size() >= 100; }, 5s);
  int victim = fl.holder();
  REQUIRE(victim >= 0);
  long long t0 = now_ns();
  if (std::getenv("PGIPLOCK_MEMBER_TRACE")) std::fprintf(stderr, "test %lld: fault\n", t0 / 1000000);
  switch (f) {
    case fault::sigkill:
      fl.members[static_cast<std::size_t>(victim)]->signal(SIGKILL);
      fl.alive[static_cast<std::size_t>(victim)] = false;
      break;
    case fault::sigterm:
      fl.members[static_cast<std::size_t>(victim)]->signal(SIGTERM);
      fl.alive[static_cast<std::size_t>(victim)] = false;
      break;
    case fault::terminate_backend:
      co_await pub.client()->query("SELECT pg_terminate_backend($1)", fl.backend_pid[static_cast<std::size_t>(victim)]);
      break;
    case fault::delete_row:
      co_await pub.client()->query("DELETE FROM " + lock_schema(*pub.client()) + ".lock WHERE channel = $1",
                                   "__PgIpLock__:" + fl.channel);
      break;
    case fault::delete_row_woken:
      // The standbys hear 'free' with the DELETE, as they do whenever any
      // member releases anything, so one claims the free row at once,
      // while the holder's heartbeat has not yet seen it gone.
      co_await pub.client()->query("WITH d AS (DELETE FROM " + lock_schema(*pub.client()) +
                                       ".lock WHERE channel = $1 RETURNING 1) "
                                       "SELECT count(pg_notify($2, 'free')) FROM d",
                                   "__PgIpLock__:" + fl.channel,
                                   pgiplock::detail::fleet_channel(pgiplock::ip_lock::schema_name()));
      break;
    case fault::truncate_table:
      co_await pub.client()->query("TRUNCATE " + lock_schema(*pub.client()) + ".lock");
      break;
  }
  bool moved = co_await wait_until(loop, [&] { return fl.first_delivery_after(t0, victim).has_value(); }, 10s);
  long long resumed_by_victim = 0;
  if (!moved && (f == fault::delete_row || f == fault::delete_row_woken || f == fault::truncate_table)) {
    // The holder may legitimately win its own lock back after demoting.
    for (auto& d : fl.deliveries) {
      if (d.t > t0 + 1000000LL) resumed_by_victim = d.t;
    }
  }
  if (auto first = fl.first_delivery_after(t0, victim)) out.takeover_ms = static_cast<double>(*first - t0) / 1e6;
  else if (resumed_by_victim) out.takeover_ms = 0;
  long target = fl.sent + 200;
  co_await wait_until(loop, [&] { return fl.sent >= target; }, 5s);
  fl.publishing = false;
  long last = fl.sent - 1;
  co_await wait_until(loop, [&] {
    for (auto& d : fl.deliveries) {
      if (d.n == last) return true;
    }
    return false;
  }, 3s);
  co_await loop.sleep(20ms);  // let the tail drain through the pipes
  auto t = fl.count();
  if (std::getenv("PGIPLOCK_FAULT_DEBUG") && (t.lost || t.duplicated)) {
    std::map<long, std::vector<int>> by;
    for (auto& d : fl.deliveries) by[d.n].push_back(d.member);
    long first_bad = -1;
    for (long n = 0; n < fl.sent && first_bad < 0; ++n) {
      if (by[n].size() != 1) first_bad = n;
    }
    for (long n = std::max(0L, first_bad - 3); n < fl.sent; ++n) {
      auto& v = by[n];
      if (n <= first_bad + 4) {
        std::fprintf(stderr, "n=%ld delivered by", n);
        for (int m : v) std::fprintf(stderr, " %d", m);
        std::fprintf(stderr, " (victim %d)\n", victim);
      }
    }
  }
  for (long long e : fl.errors[static_cast<std::size_t>(victim)]) {
    if (e > t0 && out.victim_told_ms < 0) out.victim_told_ms = static_cast<double>(e - t0) / 1e6;
  }
  out.lost = t.lost;
  out.duplicated = t.duplicated;
  out.changes = fl.deliverer_changes();
  co_await fl.stop();
  co_await pub.close();
  co_return out;
}

task<std::vector<run_result>> runs(event_loop& loop, fault f, int n) {
  std::vector<run_result> out;
  for (int i = 0; i < n; ++i) out.push_back(co_await one_run(loop, f));
  co_return out;
}

}  // namespace

// The sanitizers slow every member's own work (the waiter's wake-up, the
// takeover statement, the delivery) two- to threefold; the kernel's and the
// server's part is unchanged.
constexpr double sigkill_median_ms = sanitized ? 20 : 10;

TEST_CASE("holder SIGKILLed: a standby delivers within 10 ms median, 50 ms worst; nothing twice", "[fault]") {
  event_loop loop;
  for (int attempt = 1;; ++attempt) {
    auto rs = loop.run(runs(loop, fault::sigkill, 7));
    stats takeover;
    long lost = 0;
    for (auto& r : rs) {
      CHECK(r.takeover_ms >= 0);
      CHECK(r.duplicated == 0);
      CHECK(r.changes == 1);
      // What is lost is what was sent while nobody listened: about the
      // takeover time at one message per millisecond.
      CHECK(r.lost <= static_cast<long>(r.takeover_ms) + 10);
      takeover.values.push_back(r.takeover_ms);
      lost += r.lost;
    }
    WARN(describe("SIGKILL takeover", takeover) << "; lost " << lost << " in total");
    if (!timing_final(attempt, takeover.median() <= sigkill_median_ms && takeover.worst() <= 50, "SIGKILL takeover"))
      continue;
    CHECK(takeover.median() <= sigkill_median_ms);
    CHECK(takeover.worst() <= 50);
    break;
  }
}

TEST_CASE("holder SIGTERM (graceful): nothing lost, nothing twice", "[fault]") {
  event_loop loop;
  auto rs = loop.run(runs(loop, fault::sigterm, 5));
  stats takeover;
  for (auto& r : rs) {
    CHECK(r.lost == 0);
    CHECK(r.duplicated == 0);
    CHECK(r.changes == 1);
    takeover.values.push_back(r.takeover_ms);
  }
  WARN(describe("SIGTERM handover", takeover));
}

TEST_CASE("holder's backend terminated: the new holder delivers within 50 ms, tenures do not overlap", "[fault]") {
  event_loop loop;
  for (int attempt = 1;; ++attempt) {
    auto rs = loop.run(runs(loop, fault::terminate_backend, 5));
    stats takeover;
    for (auto& r : rs) {
      CHECK(r.duplicated == 0);
      CHECK(r.changes == 1);
      CHECK(r.takeover_ms >= 0);
      takeover.values.push_back(r.takeover_ms);
    }
    WARN(describe("pg_terminate_backend takeover", takeover));
    if (!timing_final(attempt, takeover.worst() <= 50, "pg_terminate_backend takeover")) continue;
    CHECK(takeover.worst() <= 50);
    break;
  }
}

TEST_CASE("the lock row deleted or the table truncated under a live holder: never two deliver", "[fault]") {
  event_loop loop;
  auto rs = loop.run(runs(loop, fault::delete_row, 2));
  auto rt = loop.run(runs(loop, fault::truncate_table, 2));
  rs.insert(rs.end(), rt.begin(), rt.end());
  stats resumed, told;
  for (auto& r : rs) {
    CHECK(r.duplicated == 0);
    CHECK(r.changes <= 1);
    // The holder notices within one heartbeat (liveness 2000 ms: every
    // 500 ms) and tells the application through on_error.
    CHECK(r.victim_told_ms >= 0);
    CHECK(r.victim_told_ms <= 750);
    resumed.values.push_back(r.takeover_ms);
    told.values.push_back(r.victim_told_ms);
  }
  WARN(describe("row deleted / table truncated, holder's on_error", told));
  WARN(describe("row deleted / table truncated, delivery by another member", resumed));
}

TEST_CASE("the lock row deleted and a standby woken at once: it claims the row, the holder stops at its "
          "announcement; nothing twice, nothing lost", "[fault]") {
  event_loop loop;
  for (int attempt = 1;; ++attempt) {
    auto rs = loop.run(runs(loop, fault::delete_row_woken, 3));
    stats resumed;
    for (auto& r : rs) {
      CHECK(r.duplicated == 0);
      CHECK(r.lost == 0);  // the successor's LISTEN and its announcement commit together: the exact cut
      CHECK(r.changes == 1);
      CHECK(r.takeover_ms >= 0);
      resumed.values.push_back(r.takeover_ms);
    }
    WARN(describe("row deleted with 'free', delivery by the claimer", resumed));
    // The claim, not the holder's heartbeat (every 500 ms).
    if (!timing_final(attempt, resumed.worst() <= 50, "row deleted with 'free'")) continue;
    CHECK(resumed.worst() <= 50);
    break;
  }
}

namespace {

struct restart_result {
  double resumed_ms = -1;  // first delivery after the server accepts connections again
  std::set<int> late_deliverers;
  long duplicated = 0;
  bool restarted = false;
};

task<restart_result> restart_run(event_loop& loop) {
  restart_result out;
  fleet fl(loop, fresh_channel("restart"));
  fl.start(3, {"--interval", "30000", "--liveness", "2000", "--retry", "100"});
  bool up = co_await fl.ready(20s);
  REQUIRE(up);
  auto po = pubsub_opts();
  po.retry_delay = 100ms;
  pubsub pub(loop, po);
  co_await pub.connect();
  loop.spawn(fleet::publish(fl, pub));
  co_await wait_until(loop, [&] { return fl.deliveries.size() >= 100; }, 5s);
  out.restarted = restart_server();  // blocks this loop for the restart; the members run on
  long long accepting = now_ns();
  if (!out.restarted) co_return out;
  co_await wait_until(loop, [&] {
    for (auto& d : fl.deliveries) {
      if (d.t > accepting) return true;
    }
    return false;
  }, 10s);
  for (auto& d : fl.deliveries) {
    if (d.t > accepting && (out.resumed_ms < 0 || (d.t - accepting) / 1e6 < out.resumed_ms)) {
      out.resumed_ms = static_cast<double>(d.t - accepting) / 1e6;
    }
  }
  // Once settled, exactly one member delivers.
  co_await loop.sleep(2500ms);
  long long settled = now_ns();
  co_await loop.sleep(500ms);
  for (auto& d : fl.deliveries) {
    if (d.t > settled) out.late_deliverers.insert(d.member);
  }
  fl.publishing = false;
  co_await loop.sleep(100ms);
  out.duplicated = fl.count().duplicated;
  co_await fl.stop();
  co_await pub.close();
  co_return out;
}

}  // namespace

TEST_CASE("PostgreSQL restarted (immediate): exactly one holder within retry_delay + 2 s", "[fault][restart]") {
  if (env_or("PGIPLOCK_TEST_PGDATA").empty() || env_or("PGIPLOCK_TEST_PGBIN").empty()) {
    WARN("PGIPLOCK_TEST_PGDATA/PGBIN are not set (a server given by DSN): cannot restart it");
    return;
  }
  event_loop loop;
  auto r = loop.run(restart_run(loop));
  REQUIRE(r.restarted);
  WARN("after the restart, delivery resumed " << r.resumed_ms << " ms after the server accepted connections");
  CHECK(r.resumed_ms >= 0);
  CHECK(r.resumed_ms <= 2100);
  CHECK(r.late_deliverers.size() == 1);
  CHECK(r.duplicated == 0);
}
