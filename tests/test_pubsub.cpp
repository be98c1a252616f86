// pubsub against a real PostgreSQL: the reference's integration flows, and
// what it gets wrong (takeover without LISTEN, execution lock duplicates).
#include "support.hpp"

#include <malloc.h>

#include <map>
#include <set>

extern const bool test_needs_database = true;

using namespace test;
using pgiplock::connection;
using pgiplock::pubsub;
using pgiplock::pubsub_options;

namespace {

// A pubsub that records what it delivered.
struct instance {
  pubsub ps;
  std::vector<std::string> messages;           // on_message
  std::vector<std::string> channel_messages;   // channels().on
  std::vector<std::string> listened, errors;
  std::size_t reconnects = 0, closes = 0;
  instance(event_loop& loop, pubsub_options o, const std::string& ch) : ps(loop, std::move(o)) {
    ps.on_message([this](std::string_view, std::string_view p) { messages.emplace_back(p); });
    ps.channels().on(ch, [this](std::string_view p) { channel_messages.emplace_back(p); });
    ps.on_listen([this](std::string_view c) { listened.emplace_back(c); });
    ps.on_error([this](const std::exception& e) { errors.emplace_back(e.what()); });
    ps.on_reconnect([this](std::size_t) { ++reconnects; });
    ps.on_close([this] { ++closes; });
  }
};

task<void> start(instance& i, std::string ch) {
  co_await i.ps.connect();
  co_await i.ps.listen(ch);
}

task<std::vector<std::string>> deliver_flow(event_loop& loop) {
  std::string ch = fresh_channel("deliver");
  instance a(loop, pubsub_opts(), ch);
  instance pub(loop, pubsub_opts(), "unused");
  co_await start(a, ch);
  co_await pub.ps.connect();
  CHECK(a.ps.is_active(ch));
  CHECK(a.ps.is_active());
  co_await pub.ps.notify(ch, "{\"hello\":\"json\",\"n\":1}");
  co_await pub.ps.notify(ch, "plain text ✓");
  co_await wait_until(loop, [&] { return a.channel_messages.size() == 2; }, 5s);
  CHECK(a.messages == a.channel_messages);
  co_await a.ps.destroy();
  co_await pub.ps.destroy();
  co_return a.channel_messages;
}

task<void> handover_flow(event_loop& loop, std::vector<std::string>& log) {
  std::string ch = fresh_channel("handover");
  instance a(loop, pubsub_opts(), ch), b(loop, pubsub_opts(), ch), pub(loop, pubsub_opts(), "unused");
  co_await start(a, ch);
  co_await start(b, ch);
  co_await pub.ps.connect();
  REQUIRE(a.ps.is_active(ch));
  REQUIRE_FALSE(b.ps.is_active(ch));
  co_await pub.ps.notify(ch, "1");
  co_await wait_until(loop, [&] { return a.messages.size() == 1; }, 5s);
  auto t0 = clock::now();
  co_await a.ps.destroy();
  co_await wait_until(loop, [&] { return b.ps.is_active(ch); }, 2s);
  log.push_back("takeover ms " + std::to_string(ms_since(t0)));
  CHECK(b.ps.is_active(ch));
  CHECK(b.listened == std::vector<std::string>{ch});
  co_await pub.ps.notify(ch, "2");
  co_await wait_until(loop, [&] { return b.messages.size() == 1; }, 5s);
  CHECK(a.messages == std::vector<std::string>{"1"});
  CHECK(b.messages == std::vector<std::string>{"2"});
  co_await b.ps.destroy();
  co_await pub.ps.destroy();
}

task<void> terminate_backend(event_loop& loop) {
  std::string ch = fresh_channel("reconnect");
  instance a(loop, pubsub_opts(), ch), pub(loop, pubsub_opts(), "unused");
  co_await start(a, ch);
  co_await pub.ps.connect();
  int old_pid = a.ps.client()->backend_pid();
  co_await pub.ps.client()->query("SELECT pg_terminate_backend($1)", old_pid);
  co_await wait_until(loop, [&] { return a.reconnects == 1 && a.ps.is_active(ch); }, 5s);
  REQUIRE(a.reconnects == 1);
  CHECK(a.ps.client()->backend_pid() != old_pid);
  for (int i = 0; i < 10; ++i) co_await pub.ps.notify(ch, std::to_string(i));
  co_await wait_until(loop, [&] { return a.messages.size() == 10; }, 5s);
  CHECK(a.messages.size() == 10);
  co_await a.ps.destroy();
  co_await pub.ps.destroy();
}

task<void> destroy_one_leaves_others(event_loop& loop) {
  std::string ch = fresh_channel("others");
  auto o = pubsub_opts();
  o.single_listener = false;
  instance a(loop, o, ch), b(loop, o, ch), pub(loop, pubsub_opts(), "unused");
  co_await start(a, ch);
  co_await start(b, ch);
  co_await pub.ps.connect();
  co_await pub.ps.notify(ch, "both");
  co_await wait_until(loop, [&] { return a.messages.size() == 1 && b.messages.size() == 1; }, 5s);
  co_await a.ps.destroy();
  co_await pub.ps.notify(ch, "only b");
  co_await wait_until(loop, [&] { return b.messages.size() == 2; }, 5s);
  CHECK(a.messages == std::vector<std::string>{"both"});
  CHECK(b.messages == std::vector<std::string>{"both", "only b"});
  co_await b.ps.destroy();
  co_await pub.ps.destroy();
}

struct bad_input {
  std::string too_long, nul, empty_channel;
  bool too_long_is_length_error = false;
};
task<bad_input> bad_notify(event_loop& loop) {
  bad_input out;
  instance pub(loop, pubsub_opts(), "unused");
  co_await pub.ps.connect();
  try {
    co_await pub.ps.notify("ch", std::string(8000, 'x'));
  } catch (const std::length_error& e) {
    out.too_long = e.what();
    out.too_long_is_length_error = true;
  }
  try {
    co_await pub.ps.notify("ch", std::string("a\0b", 3));
  } catch (const std::invalid_argument& e) {
    out.nul = e.what();
  }
  try {
    co_await pub.ps.notify("", "x");
  } catch (const std::invalid_argument& e) {
    out.empty_channel = e.what();
  }
  co_await pub.ps.notify("ch", std::string(7999, 'x'));  // the limit itself is fine
  co_await pub.ps.destroy();
  co_return out;
}

task<void> filtered_flow(event_loop& loop) {
  std::string ch = fresh_channel("filtered");
  auto o = pubsub_opts();
  o.filtered = true;
  instance a(loop, o, ch), other(loop, pubsub_opts(), "unused");
  co_await start(a, ch);
  co_await other.ps.connect();
  co_await a.ps.notify(ch, "mine");
  co_await other.ps.notify(ch, "theirs");
  co_await a.ps.notify(ch, "mine again");
  co_await other.ps.notify(ch, "theirs again");
  co_await wait_until(loop, [&] { return a.messages.size() == 2; }, 5s);
  co_await a.ps.client()->query("SELECT 1");  // anything else sent has arrived by now
  CHECK(a.messages == std::vector<std::string>{"theirs", "theirs again"});
  co_await a.ps.destroy();
  co_await other.ps.destroy();
}

// Three single-listener instances; the holder's backend is terminated and
// it stays away (its reconnect is slow): a standby takes over by its retry
// timer, LISTENs, and delivers every later message exactly once.
task<void> standby_takes_over(event_loop& loop, double& first_ms) {
  std::string ch = fresh_channel("three");
  auto slow = pubsub_opts(200ms);
  slow.retry_delay = 10s;
  std::vector<std::unique_ptr<instance>> is;
  is.push_back(std::make_unique<instance>(loop, slow, ch));
  is.push_back(std::make_unique<instance>(loop, pubsub_opts(200ms), ch));
  is.push_back(std::make_unique<instance>(loop, pubsub_opts(200ms), ch));
  instance pub(loop, pubsub_opts(), "unused");
  for (auto& i : is) co_await start(*i, ch);
  co_await pub.ps.connect();
  REQUIRE(is[0]->ps.is_active(ch));
  co_await pub.ps.client()->query("SELECT pg_terminate_backend($1)", is[0]->ps.client()->backend_pid());
  auto t0 = clock::now();
  int sent = 0;
  auto delivered = [&] { return is[1]->messages.size() + is[2]->messages.size(); };
  // Keep publishing until somebody delivers again.
  while (delivered() == 0 && ms_since(t0) < 3000) {
    co_await pub.ps.notify(ch, "probe " + std::to_string(sent++));
    co_await loop.sleep(5ms);
  }
  first_ms = ms_since(t0);
  REQUIRE(delivered() > 0);
  std::size_t base1 = is[1]->messages.size(), base2 = is[2]->messages.size();
  for (int i = 0; i < 100; ++i) co_await pub.ps.notify(ch, "n" + std::to_string(i));
  co_await wait_until(loop, [&] { return delivered() >= base1 + base2 + 100; }, 5s);
  co_await pub.ps.client()->query("SELECT 1");
  std::multiset<std::string> got;
  for (std::size_t k = base1; k < is[1]->messages.size(); ++k) got.insert(is[1]->messages[k]);
  for (std::size_t k = base2; k < is[2]->messages.size(); ++k) got.insert(is[2]->messages[k]);
  CHECK(got.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(got.count("n" + std::to_string(i)) == 1);
  bool one_listener = (is[1]->messages.size() == base1) != (is[2]->messages.size() == base2);
  CHECK(one_listener);
  for (auto& i : is) co_await i->ps.destroy();
  co_await pub.ps.destroy();
}

// RSS once the allocator has handed back what is free: a burst's peak stays
// cached in glibc's arenas otherwise, which says nothing about what we keep.
long trimmed_rss_kib() {
  ::malloc_trim(0);
  return rss_kib();
}

struct exec_result {
  std::size_t duplicates = 0, missing = 0, total = 0;
  long rss_growth_kib = 0;
};
task<exec_result> execution_lock_run(event_loop& loop, int count, bool paced, int rounds) {
  exec_result out;
  std::string ch = fresh_channel("exec");
  auto o = pubsub_opts();
  o.execution_lock = true;
  std::vector<std::unique_ptr<instance>> is;
  for (int i = 0; i < 3; ++i) is.push_back(std::make_unique<instance>(loop, o, ch));
  instance pub(loop, pubsub_opts(), "unused");
  for (auto& i : is) co_await start(*i, ch);
  co_await pub.ps.connect();
  long rss_before = 0;
  for (int round = 0; round < rounds; ++round) {
    if (round == 1) rss_before = trimmed_rss_kib();  // round 0 warms up allocators and caches
    for (auto& i : is) i->messages.clear();
    std::string prefix = "r" + std::to_string(round) + "-";
    for (int n = 0; n < count; ++n) {
      std::string payload = prefix + std::to_string(n);
      if (paced) {
        co_await pub.ps.notify(ch, payload);
        co_await loop.sleep(1ms);
      } else {
        loop.spawn([](pubsub& p, std::string c, std::string m) -> task<void> { co_await p.notify(c, m); }(
            pub.ps, ch, std::move(payload)));
      }
    }
    auto total = [&] { return is[0]->messages.size() + is[1]->messages.size() + is[2]->messages.size(); };
    co_await wait_until(loop, [&] { return total() >= static_cast<std::size_t>(count); }, 60s);
    co_await pub.ps.client()->query("SELECT 1");
    for (auto& i : is) co_await i->ps.client()->query("SELECT 1");
    std::map<std::string, int> seen;
    for (auto& i : is) {
      for (auto& m : i->messages) ++seen[m];
    }
    for (auto& [m, c] : seen) out.duplicates += static_cast<std::size_t>(c - 1);
    for (int n = 0; n < count; ++n) {
      if (!seen.count(prefix + std::to_string(n))) ++out.missing;
    }
    out.total += total();
  }
  if (rounds > 1) out.rss_growth_kib = trimmed_rss_kib() - rss_before;
  for (auto& i : is) co_await i->ps.destroy();
  co_await pub.ps.destroy();
  co_return out;
}

task<std::vector<std::string>> retry_limit_flow(event_loop& loop, std::size_t& closes) {
  auto admin = co_await open(loop);
  co_await admin->query(
      "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgiplock_rl') THEN "
      "CREATE ROLE pgiplock_rl LOGIN; END IF; END $$");
  co_await admin->query("ALTER ROLE pgiplock_rl LOGIN");
  auto o = pubsub_opts();
  o.conninfo = dsn() + " user=pgiplock_rl";
  o.retry_limit = 3;
  o.retry_delay = 20ms;
  o.single_listener = false;  // the role has no rights on the lock schema; not what this tests
  std::string ch = fresh_channel("retry");
  instance a(loop, o, ch);
  std::size_t ends = 0;
  a.ps.on_end([&] { ++ends; });
  co_await start(a, ch);
  co_await admin->query("ALTER ROLE pgiplock_rl NOLOGIN");
  co_await admin->query("SELECT pg_terminate_backend($1)", a.ps.client()->backend_pid());
  co_await wait_until(loop, [&] { return a.closes == 1; }, 5s);
  closes = a.closes;
  CHECK(ends == 1);
  CHECK_FALSE(a.ps.is_active(ch));
  CHECK_FALSE(a.ps.is_active());
  co_await admin->query("ALTER ROLE pgiplock_rl LOGIN");
  co_await admin->close();
  co_return a.errors;
}

task<std::pair<std::size_t, std::size_t>> thousand_channels(event_loop& loop) {
  std::string stem = fresh_channel("k");
  pubsub a(loop, pubsub_opts());  // a fleet member: two connections, whatever its channels
  std::set<std::string> got;
  a.on_message([&](std::string_view ch, std::string_view) { got.emplace(ch); });
  co_await a.connect();
  for (int i = 0; i < 1000; ++i) co_await a.listen(stem + "_" + std::to_string(i));
  std::size_t active = a.active_channels().size();
  pubsub pub(loop, pubsub_opts());
  co_await pub.connect();
  for (int i = 0; i < 1000; ++i) {
    loop.spawn([](pubsub& p, std::string c) -> task<void> { co_await p.notify(c, "x"); }(
        pub, stem + "_" + std::to_string(i)));
  }
  co_await wait_until(loop, [&] { return got.size() == 1000; }, 20s);
  co_await a.destroy();
  co_await pub.destroy();
  co_return std::make_pair(active, got.size());
}

}  // namespace

TEST_CASE("a listener receives notifications, payload bytes unchanged", "[pubsub]") {
  event_loop loop;
  auto got = loop.run(deliver_flow(loop));
  CHECK(got == std::vector<std::string>{"{\"hello\":\"json\",\"n\":1}", "plain text ✓"});
}

TEST_CASE("one active listener per channel; when it is destroyed the other takes over", "[pubsub]") {
  event_loop loop;
  std::vector<std::string> log;
  loop.run(handover_flow(loop, log));
  for (auto& l : log) WARN(l);
}

TEST_CASE("after pg_terminate_backend it reconnects, re-listens and keeps receiving", "[pubsub]") {
  event_loop loop;
  loop.run(terminate_backend(loop));
}

TEST_CASE("destroying one instance leaves the others working", "[pubsub]") {
  event_loop loop;
  loop.run(destroy_one_leaves_others(loop));
}

TEST_CASE("notify rejects payloads over 7999 bytes, NUL bytes and empty channels before sending", "[pubsub]") {
  event_loop loop;
  auto r = loop.run(bad_notify(loop));
  CHECK(r.too_long_is_length_error);
  CHECK_THAT(r.too_long, Catch::Contains("8000") && Catch::Contains("7999"));
  CHECK_THAT(r.nul, Catch::Contains("NUL"));
  CHECK_THAT(r.empty_channel, Catch::Contains("empty"));
}

TEST_CASE("filtered drops exactly our own notifications", "[pubsub]") {
  event_loop loop;
  loop.run(filtered_flow(loop));
}

TEST_CASE("three listeners: the holder's backend dies, a standby LISTENs and delivers every later message once",
          "[pubsub][takeover]") {
  event_loop loop;
  double first_ms = 0;
  loop.run(standby_takes_over(loop, first_ms));
  INFO("first delivery by a standby " << first_ms << " ms after the termination");
  CHECK(first_ms < 1000);
}

TEST_CASE("execution lock: each of 5 messages is processed once across two listeners", "[pubsub][exec]") {
  event_loop loop;
  auto r = loop.run(execution_lock_run(loop, 5, false, 1));
  CHECK(r.duplicates == 0);
  CHECK(r.missing == 0);
}

TEST_CASE("execution lock, 3 instances, 20,000 messages in one burst: each exactly once, memory flat",
          "[pubsub][exec][slow]") {
  event_loop loop;
  auto r = loop.run(execution_lock_run(loop, 20000, false, 3));
  CHECK(r.duplicates == 0);
  CHECK(r.missing == 0);
  INFO("RSS growth over two more rounds: " << r.rss_growth_kib << " KiB");
  if (rss_is_meaningful) CHECK(r.rss_growth_kib < 5 * 1024);
}

TEST_CASE("execution lock, 3 instances, 20,000 messages one per millisecond: each exactly once",
          "[pubsub][exec][slow]") {
  event_loop loop;
  auto r = loop.run(execution_lock_run(loop, 20000, true, 1));
  CHECK(r.duplicates == 0);
  CHECK(r.missing == 0);
}

TEST_CASE("reconnect gives up after retry_limit attempts with an error naming the count", "[pubsub]") {
  event_loop loop;
  std::size_t closes = 0;
  auto errors = loop.run(retry_limit_flow(loop, closes));
  CHECK(closes == 1);
  REQUIRE_FALSE(errors.empty());
  CHECK_THAT(errors.back(), Catch::Contains("after 3 attempts") && Catch::Contains("not permitted to log in"));
}

TEST_CASE("1,000 channels on one connection: all listened, all deliver", "[pubsub]") {
  event_loop loop;
  auto [active, got] = loop.run(thousand_channels(loop));
  CHECK(active == 1000);
  CHECK(got == 1000);
}
