// ip_lock against a real PostgreSQL: the seed's PgIpLock semantics on the
// shared lock schema.
#include "support.hpp"

#include <atomic>

extern const bool test_needs_database = true;

using namespace test;
using pgiplock::connection;
using pgiplock::ip_lock;

namespace {

task<std::string> holder_app(conn_ptr admin, const std::string& channel) {
  std::string sql = "SELECT app FROM " + lock_schema(*admin) + ".lock WHERE channel = $1";
  std::string lock_channel = "__PgIpLock__:" + channel;
  co_return co_await scalar(admin, sql, lock_channel);
}

struct handover_result {
  bool first_a = false, first_b = false, b_after = false, release_seen = false;
  std::string released_channel;
  double ms = 0;
  std::string log;  // both locks' debug lines, shown when a check fails
};

// Collects a lock's log lines, tagged and timed, for a failure report.
pgiplock::log_handler recorder(std::string& into, std::string tag) {
  auto t0 = clock::now();
  return [&into, tag = std::move(tag), t0](pgiplock::log_level, std::string_view line) {
    into += tag + " +" + std::to_string(ms_since(t0)) + " ms: " + std::string(line) + "\n";
  };
}
task<handover_result> handover(event_loop& loop) {
  handover_result out;
  auto ca = co_await open(loop);
  auto cb = co_await open(loop);
  std::string ch = fresh_channel("handover");
  auto oa = lock_opts(ca), ob = lock_opts(cb);
  oa.logger = recorder(out.log, "a");
  ob.logger = recorder(out.log, "b");
  ip_lock a(ch, oa);
  ip_lock b(ch, ob);
  b.on_release([&](std::string_view c) {
    out.release_seen = true;
    out.released_channel = std::string(c);
  });
  // b starts after a holds: b's advisory waiter would otherwise race a.
  co_await a.init();
  out.first_a = co_await a.acquire();
  co_await b.init();
  out.first_b = co_await b.acquire();
  auto t0 = clock::now();
  co_await a.release();
  co_await wait_until(loop, [&] { return b.is_acquired() && out.release_seen; }, 2s);
  out.ms = ms_since(t0);
  out.b_after = b.is_acquired();
  co_await a.destroy();
  co_await b.destroy();
  co_await ca->close();
  co_await cb->close();
  co_return out;
}

struct takeover_result {
  bool a_held = false, b_held_before = false, b_after = false, a_after = true;
  double ms = 0;
};
task<takeover_result> terminated_holder(event_loop& loop) {
  takeover_result out;
  auto ca = co_await open(loop);
  auto cb = co_await open(loop);
  auto admin = co_await open(loop);
  std::string ch = fresh_channel("terminated");
  ip_lock a(ch, lock_opts(ca, 200ms));
  ip_lock b(ch, lock_opts(cb, 200ms));
  co_await a.init();
  out.a_held = co_await a.acquire();
  co_await b.init();
  out.b_held_before = co_await b.acquire();
  co_await admin->query("SELECT pg_terminate_backend($1)", ca->backend_pid());
  auto t0 = clock::now();
  co_await wait_until(loop, [&] { return !ca->is_open(); }, 2s);
  co_await wait_until(loop, [&] { return b.is_acquired(); }, 3s);
  out.ms = ms_since(t0);
  out.b_after = b.is_acquired();
  out.a_after = a.is_acquired();
  co_await b.destroy();
  co_await a.destroy();
  co_await cb->close();
  co_await admin->close();
  co_return out;
}

task<void> init_one(conn_ptr c, std::string ch, int& ok, int& failed, std::string& why) {
  try {
    ip_lock l(ch, lock_opts(c));
    co_await l.init();
    co_await l.acquire();
    co_await l.destroy();
    ++ok;
  } catch (const std::exception& e) {
    ++failed;
    why = e.what();
  }
}

task<std::pair<int, std::string>> fifty_bootstraps(event_loop& loop) {
  std::vector<conn_ptr> conns;
  for (int i = 0; i < 50; ++i) conns.push_back(co_await open(loop));
  int ok = 0, failed = 0;
  std::string why;
  std::string ch = fresh_channel("boot");
  for (auto& c : conns) loop.spawn(init_one(c, ch, ok, failed, why));
  co_await wait_until(loop, [&] { return ok + failed == 50; }, 60s);
  for (auto& c : conns) co_await c->close();
  co_return std::make_pair(ok, why);
}

// A schema an older pgiplock made: its pgiplock_claim has another body and
// no version comment. init() gives it this version's body (and comment).
struct upgraded {
  std::string comment_before, comment_after;
  bool old_body = false, skips_locked_rows = false;
};
task<upgraded> upgrade_old_claim(event_loop& loop) {
  upgraded out;
  auto c = co_await open(loop);
  auto admin = co_await open(loop);
  std::string ch = fresh_channel("upgrade");
  {
    ip_lock l(ch, lock_opts(c));
    co_await l.init();
    co_await l.destroy();
  }
  std::string s = lock_schema(*admin);
  std::string sig = s + ".pgiplock_claim(text,text[],text,text,text,boolean,integer)";
  co_await admin->query("CREATE OR REPLACE FUNCTION " + s +
                        ".pgiplock_claim(me text, want text[], fleet text, prefix text, gone text, sweep boolean, "
                        "quota integer) RETURNS TABLE (ch text, tok bigint, is_fresh boolean, held_by text, "
                        "by_member boolean) LANGUAGE sql AS 'SELECT NULL::text, NULL::bigint, NULL::boolean, "
                        "NULL::text, NULL::boolean WHERE false'");
  co_await admin->query("COMMENT ON FUNCTION " + sig + " IS NULL");
  std::string describe = "SELECT coalesce(obj_description($1::regprocedure, 'pg_proc'), '<none>'), "
                         "(SELECT prosrc LIKE '%SKIP LOCKED%' FROM pg_proc WHERE oid = $1::regprocedure)";
  auto before = co_await admin->query(describe, sig);
  out.comment_before = std::string(before.get(0, 0));
  out.old_body = before.get(0, 1) == "f";
  auto c2 = co_await open(loop);
  {
    ip_lock l(ch, lock_opts(c2));
    co_await l.init();
    co_await l.destroy();
  }
  auto after = co_await admin->query(describe, sig);
  out.comment_after = std::string(after.get(0, 0));
  out.skips_locked_rows = after.get(0, 1) == "t";
  co_await c->close();
  co_await c2->close();
  co_await admin->close();
  co_return out;
}

task<std::vector<std::string>> destroy_all_releases(event_loop& loop) {
  auto c = co_await open(loop);
  auto admin = co_await open(loop);
  std::vector<std::unique_ptr<ip_lock>> locks;
  std::vector<std::string> channels;
  for (int i = 0; i < 3; ++i) {
    channels.push_back(fresh_channel("all"));
    locks.push_back(std::make_unique<ip_lock>(channels.back(), lock_opts(c)));
    co_await locks.back()->init();
    bool won = co_await locks.back()->acquire();
    REQUIRE(won);
  }
  REQUIRE(ip_lock::has_instances());
  co_await ip_lock::destroy_all();
  CHECK_FALSE(ip_lock::has_instances());
  std::vector<std::string> left;
  for (auto& ch : channels) left.push_back(co_await holder_app(admin, ch));
  co_await c->close();
  co_await admin->close();
  co_return left;
}

task<int> quiet_standby(event_loop& loop) {
  auto ca = co_await open(loop);
  auto cb = co_await open(loop);
  std::string ch = fresh_channel("quiet");
  ip_lock a(ch, lock_opts(ca));
  ip_lock b(ch, lock_opts(cb, 50ms));
  co_await a.init();
  bool held = co_await a.acquire();
  REQUIRE(held);
  co_await b.init();
  int attempts = 0;
  auto t0 = clock::now();
  while (ms_since(t0) < 5000) {
    bool won = co_await b.acquire();  // explicit attempts too, on top of its 50 ms retries
    CHECK_FALSE(won);
    ++attempts;
    co_await loop.sleep(50ms);
  }
  co_await a.destroy();
  co_await b.destroy();
  co_await ca->close();
  co_await cb->close();
  co_return attempts;
}

task<std::vector<std::string>> odd_names(event_loop& loop, std::vector<std::string> names) {
  auto c = co_await open(loop);
  auto sender = co_await open(loop);
  std::vector<std::string> failures;
  for (auto& name : names) {
    ip_lock l(name, lock_opts(c));
    co_await l.init();
    bool won = co_await l.acquire();
    if (!won) failures.push_back(name + ": not acquired");
    // The name reaches the server unchanged: LISTEN on it and receive.
    std::string got;
    auto sub = c->subscribe(name, [&](const pgiplock::notification& n) { got = std::string(n.payload); });
    co_await c->query("LISTEN " + c->quote_identifier(name));
    co_await sender->query("SELECT pg_notify($1, 'hi')", name);
    co_await wait_until(loop, [&] { return !got.empty(); }, 2s);
    if (got != "hi") failures.push_back(name + ": no notification");
    c->unsubscribe(sub);
    co_await c->query("UNLISTEN " + c->quote_identifier(name));
    co_await l.destroy();
  }
  co_await c->close();
  co_await sender->close();
  co_return failures;
}

struct dead_result {
  bool threw_connection_error = false;
  bool acquired_after = true;
  bool destroy_ok = false;
};
task<dead_result> dead_connection(event_loop& loop) {
  dead_result out;
  auto c = co_await open(loop);
  auto admin = co_await open(loop);
  std::string ch = fresh_channel("dead");
  ip_lock l(ch, lock_opts(c));
  co_await l.init();
  bool won = co_await l.acquire();
  REQUIRE(won);
  co_await admin->query("SELECT pg_terminate_backend($1)", c->backend_pid());
  co_await wait_until(loop, [&] { return !c->is_open(); }, 2s);
  out.acquired_after = l.is_acquired();
  try {
    co_await l.acquire();
  } catch (const pgiplock::connection_error&) {
    out.threw_connection_error = true;
  }
  co_await l.destroy();
  co_await l.destroy();
  out.destroy_ok = true;
  co_await admin->close();
  co_return out;
}

task<std::pair<std::string, std::string>> non_holder_release(event_loop& loop) {
  auto ca = co_await open(loop);
  auto cb = co_await open(loop);
  std::string ch = fresh_channel("nonholder");
  ip_lock a(ch, lock_opts(ca));
  ip_lock b(ch, lock_opts(cb));
  co_await a.init();
  bool won = co_await a.acquire();
  REQUIRE(won);
  co_await b.init();
  co_await b.release();  // must not delete a's row
  auto after = co_await holder_app(cb, ch);
  std::string a_app(ca->app_name());
  co_await a.destroy();
  co_await b.destroy();
  co_await ca->close();
  co_await cb->close();
  co_return std::make_pair(after, a_app);
}

task<std::pair<bool, double>> dropped_object_releases(event_loop& loop) {
  auto ca = co_await open(loop);
  auto cb = co_await open(loop);
  std::string ch = fresh_channel("dropped");
  auto a = std::make_unique<ip_lock>(ch, lock_opts(ca));
  ip_lock b(ch, lock_opts(cb));
  co_await a->init();
  bool won = co_await a->acquire();
  REQUIRE(won);
  co_await b.init();
  auto t0 = clock::now();
  a.reset();  // no destroy(): the row is released in the background
  co_await wait_until(loop, [&] { return b.is_acquired(); }, 2s);
  double ms = ms_since(t0);
  bool held = b.is_acquired();
  co_await b.destroy();
  co_await ca->close();
  co_await cb->close();
  co_return std::make_pair(held, ms);
}

task<std::string> no_privilege(event_loop& loop) {
  auto admin = co_await open(loop);
  co_await admin->query(
      "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgiplock_noddl') THEN "
      "CREATE ROLE pgiplock_noddl LOGIN; END IF; END $$");
  co_await admin->query("REVOKE CREATE ON DATABASE postgres FROM PUBLIC");
  co_await admin->query("REVOKE CREATE ON DATABASE postgres FROM pgiplock_noddl");
  auto weak = co_await open(loop, dsn() + " user=pgiplock_noddl");
  std::string message = "(no error)";
  try {
    ip_lock l(fresh_channel("nopriv"), lock_opts(weak));
    co_await l.init();
    co_await l.destroy();
  } catch (const pgiplock::sql_error& e) {
    message = e.what();
  }
  co_await weak->close();
  co_await admin->close();
  co_return message;
}

struct drain_result {
  bool held = false;
  double release_ms = 0;
  int lost_during_release = 0;
  std::string demotion_reason;
};
// A holder releasing while an announcing member is present drains until
// the announcement or handover_timeout. Here the member is a bare session
// holding the presence lock, so the drain runs the whole timeout while the
// holder's heartbeat (every 10 ms) finds its row deleted: that is the
// release itself, not a reason to demote in the middle of the drain.
task<drain_result> drain_without_demotion(event_loop& loop) {
  drain_result out;
  auto c = co_await open(loop);
  auto present = co_await open(loop);
  std::string ch = fresh_channel("drain");
  auto o = lock_opts(c);
  o.liveness_timeout = 40ms;
  o.handover_timeout = 300ms;
  o.listen_on_acquire = ch;
  ip_lock lock(ch, o);
  bool releasing = false;
  lock.on_lose([&](std::string_view) { out.lost_during_release += releasing; });
  co_await lock.init();
  out.held = co_await lock.acquire();
  auto k = static_cast<std::uint64_t>(pgiplock::detail::advisory_key("__PgIpLock__:" + ch));
  co_await present->query("SELECT pg_advisory_lock_shared($1::integer, $2::integer)",
                          static_cast<std::int32_t>(static_cast<std::uint32_t>(k >> 32)),
                          static_cast<std::int32_t>(static_cast<std::uint32_t>(k & 0xffffffffULL)));
  auto t0 = clock::now();
  releasing = true;
  co_await lock.release();
  releasing = false;
  out.release_ms = ms_since(t0);
  out.demotion_reason = lock.demotion_reason();
  co_await lock.destroy();
  co_await present->close();
  co_await c->close();
  co_return out;
}

}  // namespace

TEST_CASE("two locks, one channel: exactly one holds; on release the other holds within 100 ms", "[ip_lock]") {
  event_loop loop;
  auto r = loop.run(handover(loop));
  INFO(r.log);
  CHECK(r.first_a);
  CHECK_FALSE(r.first_b);
  CHECK(r.b_after);
  CHECK(r.release_seen);
  CHECK(r.released_channel.rfind("handover_", 0) == 0);
  INFO("takeover after release: " << r.ms << " ms");
  CHECK(r.ms < 100);
}

TEST_CASE("the holder's backend is terminated: the standby holds within acquire_interval + 100 ms", "[ip_lock]") {
  event_loop loop;
  auto r = loop.run(terminated_holder(loop));
  CHECK(r.a_held);
  CHECK_FALSE(r.b_held_before);
  CHECK(r.b_after);
  CHECK_FALSE(r.a_after);
  INFO("takeover: " << r.ms << " ms");
  CHECK(r.ms < 300);
}

TEST_CASE("50 fresh connections bootstrap an empty schema concurrently", "[ip_lock][bootstrap]") {
  schema_guard g("boot");
  event_loop loop;
  auto [ok, why] = loop.run(fifty_bootstraps(loop));
  INFO(why);
  CHECK(ok == 50);
}

TEST_CASE("a lock schema from an older pgiplock: init() upgrades its pgiplock_claim in place",
          "[ip_lock][bootstrap]") {
  schema_guard g("upgrade");
  event_loop loop;
  auto r = loop.run(upgrade_old_claim(loop));
  CHECK(r.comment_before == "<none>");
  CHECK(r.old_body);
  CHECK(r.comment_after == std::string(pgiplock::detail::sql::lock_version));
  CHECK(r.skips_locked_rows);
}

TEST_CASE("destroy_all() releases every held lock of the process", "[ip_lock]") {
  event_loop loop;
  auto left = loop.run(destroy_all_releases(loop));
  for (auto& app : left) CHECK(app == "(none)");
}

TEST_CASE("a standby retrying for 5 s at 50 ms leaves no ERROR line in the server log", "[ip_lock][log]") {
  std::string log = env_or("PGIPLOCK_TEST_LOG");
  if (log.empty()) {
    WARN("PGIPLOCK_TEST_LOG is not set: cannot read the server log");
    return;
  }
  auto before = read_file(log).size();
  event_loop loop;
  int attempts = loop.run(quiet_standby(loop));
  CHECK(attempts > 40);
  auto text = read_file(log).substr(before);
  INFO(text);
  CHECK(text.find("ERROR") == std::string::npos);
}

TEST_CASE("channel names: 50 bytes work, 51 are rejected; odd names work as given", "[ip_lock][names]") {
  CHECK_THROWS_AS(ip_lock("fine", lock_opts(nullptr)), std::invalid_argument);
  event_loop loop;
  CHECK_THROWS_WITH(ip_lock(std::string(51, 'x'), lock_opts(loop.run(open(loop)))),
                    Catch::Contains("51 bytes") && Catch::Contains("at most 50"));
  CHECK_THROWS_WITH(ip_lock("", lock_opts(loop.run(open(loop)))), Catch::Contains("empty"));
  CHECK_THROWS_WITH(ip_lock(std::string("a\0b", 3), lock_opts(loop.run(open(loop)))), Catch::Contains("NUL"));
  std::string fifty(50, 'y');
  fifty.replace(0, 6, std::to_string(::getpid()).substr(0, 6));
  auto failures = loop.run(odd_names(loop, {fifty, "with space", "Mixed\"Quote's", "ünï©ødé ✓", "UPPER", "upper"}));
  for (auto& f : failures) FAIL_CHECK(f);
}

TEST_CASE("a lock on a dead connection: acquire() throws connection_error, is_acquired() is false", "[ip_lock]") {
  event_loop loop;
  auto r = loop.run(dead_connection(loop));
  CHECK(r.threw_connection_error);
  CHECK_FALSE(r.acquired_after);
  CHECK(r.destroy_ok);
}

TEST_CASE("release() by a lock that does not hold leaves the holder's row", "[ip_lock]") {
  event_loop loop;
  auto [after, holder] = loop.run(non_holder_release(loop));
  CHECK(after == holder);
}

TEST_CASE("a second on_release handler is a usage error", "[ip_lock]") {
  event_loop loop;
  auto c = loop.run(open(loop));
  ip_lock l(fresh_channel("twice"), lock_opts(c));
  l.on_release([](std::string_view) {});
  CHECK_THROWS_AS(l.on_release([](std::string_view) {}), std::logic_error);
}

TEST_CASE("destroying a held lock object without destroy() releases its row in the background", "[ip_lock]") {
  event_loop loop;
  auto [held, ms] = loop.run(dropped_object_releases(loop));
  CHECK(held);
  INFO(ms << " ms");
  CHECK(ms < 100);
}

TEST_CASE("without the privilege to create the lock schema, init() fails naming it", "[ip_lock][bootstrap]") {
  schema_guard g("nopriv");
  event_loop loop;
  auto message = loop.run(no_privilege(loop));
  CHECK_THAT(message, Catch::Contains("permission denied") && Catch::Contains("CREATE"));
}

TEST_CASE("a release that drains is not cut short by the holder's own heartbeat", "[ip_lock]") {
  event_loop loop;
  auto r = loop.run(drain_without_demotion(loop));
  CHECK(r.held);
  INFO("release took " << r.release_ms << " ms; demotion reason: " << r.demotion_reason);
  CHECK(r.release_ms >= 250);  // it drained, and the heartbeat ran meanwhile
  CHECK(r.lost_during_release == 1);  // once, at the end of the drain
  CHECK(r.demotion_reason.empty());
}
