// Durable channels (DESIGN.md section 8, docs/durable.md): the journal, the
// cursor and its fence, order under out-of-order commits, payload sizes and
// bytes, the outbox function, retention. Against the real server.
#include "support.hpp"

#include <charconv>
#include <map>
#include <optional>
#include <set>

extern const bool test_needs_database = true;

namespace {

using namespace test;
using pgiplock::delivery;
using pgiplock::pubsub;

pgiplock::pubsub_options durable_opts() {
  auto o = pubsub_opts();
  o.durable = true;
  if (std::getenv("DEBUG_LOG")) o.logger = [](pgiplock::log_level, std::string_view m) { std::fprintf(stderr, "%.*s\n", (int)m.size(), m.data()); };
  return o;
}

// A durable pubsub whose holder was killed comes back late (a standby, not
// its own reconnect, takes the channel over).
pgiplock::pubsub_options slow_return_opts() {
  auto o = durable_opts();
  o.retry_delay = 2s;
  return o;
}

// A plain pubsub that hears every notification on its channels (no lock).
pgiplock::pubsub_options plain_opts() {
  auto o = pubsub_opts();
  o.single_listener = false;
  return o;
}

struct seen {
  std::vector<std::int64_t> ids;
  std::vector<std::string> payloads;
};

task<void> basic_flow(event_loop& loop, seen& out, std::string ch) {
  pubsub pub(loop, durable_opts()), sub(loop, durable_opts());
  co_await pub.connect();
  // Published before anyone listens: kept in the journal, replayed at the first tenure.
  co_await pub.notify(ch, "before");
  co_await sub.connect();
  sub.on_delivery([&](const delivery& d) {
    if (d.channel != ch) return;
    out.ids.push_back(d.id);
    out.payloads.emplace_back(d.payload);
  });
  co_await sub.listen(ch);
  bool first = co_await wait_until(loop, [&] { return out.ids.size() == 1; }, 5s);
  REQUIRE(first);
  for (int i = 0; i < 100; ++i) co_await pub.notify(ch, "m" + std::to_string(i));
  co_await pub.notify(ch, std::string(20000, 'x'));
  bool all = co_await wait_until(loop, [&] { return out.ids.size() == 102; }, 5s);
  CHECK(all);
  co_await sub.close();
  co_await pub.close();
}

// ==== helpers ====

// One delivery as a durable pubsub gave it.
struct got_msg {
  std::int64_t id = 0, token = 0;
  std::string payload;
};

// A pubsub that records its deliveries on one channel and its errors.
struct recorder {
  pubsub ps;
  std::string channel;
  std::vector<got_msg> got;
  std::vector<std::string> errors;
  std::vector<std::string> messages;  // on_message, every channel (plain observers)
  std::size_t reconnects = 0;
  bool keep_payloads = true;
  recorder(event_loop& loop, pgiplock::pubsub_options o, std::string ch) : ps(loop, std::move(o)), channel(std::move(ch)) {
    ps.on_delivery([this](const delivery& d) {
      if (d.channel != channel) return;
      got.push_back(got_msg{d.id, d.token, keep_payloads ? std::string(d.payload) : std::string()});
    });
    ps.on_message([this](std::string_view, std::string_view p) { messages.emplace_back(p); });
    ps.on_error([this](const std::exception& e) { errors.emplace_back(e.what()); });
    ps.on_reconnect([this](std::size_t) { ++reconnects; });
  }
  std::size_t errors_with(const std::string& needle) const {
    return static_cast<std::size_t>(
        std::count_if(errors.begin(), errors.end(), [&](const std::string& e) { return e.find(needle) != std::string::npos; }));
  }
  std::string all_errors() const {
    std::string out;
    for (auto& e : errors) out += e + "\n";
    return out;
  }
};

task<void> start(recorder& r) {
  co_await r.ps.connect();
  co_await r.ps.listen(r.channel);
}

// Acknowledges everything published on the test's channels when the test
// ends (also while a failed REQUIRE unwinds), so a later test's retention
// check never waits for rows a test left behind; and drops what it made.
class cleanup {
 public:
  cleanup() = default;
  cleanup(const cleanup&) = delete;
  cleanup& operator=(const cleanup&) = delete;
  void channel(const std::string& ch) { channels_.push_back(ch); }
  void sql(const std::string& s) { sql_.push_back(s); }
  ~cleanup() {
    blocking_session s(dsn());
    std::string schema = s.quote_identifier(pgiplock::ip_lock::schema_name());
    for (auto& q : sql_) s.exec(q);
    for (auto& ch : channels_) {
      std::string lit = "'";
      for (char c : ch) lit += (c == '\'' ? std::string("''") : std::string(1, c));
      lit += "'";
      auto failure = s.exec("INSERT INTO " + schema + ".pgiplock_cursor AS c (channel, acked) SELECT channel, last_id FROM " +
                            schema + ".pgiplock_channel WHERE channel = " + lit +
                            " ON CONFLICT (channel) DO UPDATE SET acked = EXCLUDED.acked");
      if (!failure.empty()) std::fprintf(stderr, "cleanup of %s: %s\n", ch.c_str(), failure.c_str());
    }
  }

 private:
  std::vector<std::string> channels_, sql_;
};

// Polls a one-value query every 10 ms until it yields `want`.
template <class... Params>
task<bool> wait_for_value(event_loop& loop, conn_ptr c, std::string sql, std::string want,
                          std::chrono::milliseconds limit, Params... params) {
  auto deadline = clock::now() + limit;
  for (;;) {
    std::string v = co_await scalar(c, sql, params...);
    if (v == want) co_return true;
    if (clock::now() >= deadline) co_return false;
    co_await loop.sleep(10ms);
  }
}

// The channel's cursor has reached `upto`.
task<bool> wait_acked(event_loop& loop, conn_ptr c, std::string ch, std::int64_t upto,
                      std::chrono::milliseconds limit = 10s) {
  std::string s = lock_schema(*c);
  co_return co_await wait_for_value(loop, c,
                                    "SELECT coalesce((SELECT acked >= $2::bigint FROM " + s +
                                        ".pgiplock_cursor WHERE channel = $1), false)",
                                    "t", limit, ch, upto);
}

task<std::int64_t> number(conn_ptr c, std::string sql, std::string ch) {
  std::string v = co_await scalar(c, std::move(sql), ch);
  co_return v == "(none)" || v.empty() ? -1 : std::stoll(v);
}

task<std::int64_t> journal_rows(conn_ptr c, std::string ch) {
  co_return co_await number(c, "SELECT count(*) FROM " + lock_schema(*c) + ".pgiplock_journal WHERE channel = $1", ch);
}

task<std::int64_t> acked_of(conn_ptr c, std::string ch) {
  co_return co_await number(c, "SELECT acked FROM " + lock_schema(*c) + ".pgiplock_cursor WHERE channel = $1", ch);
}

task<std::int64_t> publish_sql(conn_ptr c, std::string ch, std::string payload) {
  auto r = co_await c->query("SELECT " + lock_schema(*c) + ".pgiplock_publish($1, $2)", ch, payload);
  co_return std::stoll(std::string(r.get(0, 0)));
}

// Printable ASCII that neither TOAST compression nor a repeat can shrink;
// '"' and '\\' included (array literals escape them).
std::string noise(std::size_t n, std::uint32_t seed) {
  std::string s(n, ' ');
  std::uint32_t x = seed * 2654435761u + 1;
  for (std::size_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    s[i] = static_cast<char>(33 + (x >> 24) % 94);
  }
  return s;
}

// What a set of deliveries tells about order and completeness.
struct audit {
  std::size_t redelivered = 0, wrong_payload = 0, out_of_order = 0, skipped = 0, missing = 0;
  std::vector<std::int64_t> tenure_tokens;
};

// Per tenure (token): ids strictly increasing, each the previous + 1, the
// first no later than one past everything delivered before it (tenures in
// token order); every id 1..n delivered; a redelivery has the same payload.
audit check_deliveries(const std::vector<const recorder*>& subs, const std::map<std::int64_t, std::string>& published,
                       std::int64_t n) {
  audit a;
  std::map<std::int64_t, std::vector<got_msg>> tenures;
  for (auto* r : subs) {
    for (auto& g : r->got) tenures[g.token].push_back(g);
  }
  std::set<std::int64_t> delivered;
  std::int64_t high = 0;
  for (auto& [token, msgs] : tenures) {
    a.tenure_tokens.push_back(token);
    for (std::size_t i = 0; i < msgs.size(); ++i) {
      auto& m = msgs[i];
      if (i == 0 && m.id > high + 1) ++a.skipped;
      if (i > 0 && m.id <= msgs[i - 1].id) ++a.out_of_order;
      if (i > 0 && m.id > msgs[i - 1].id + 1) ++a.skipped;
      auto p = published.find(m.id);
      if (p == published.end() || p->second != m.payload) ++a.wrong_payload;
      if (!delivered.insert(m.id).second) ++a.redelivered;
      high = std::max(high, m.id);
    }
  }
  for (std::int64_t id = 1; id <= n; ++id) {
    if (!delivered.count(id)) ++a.missing;
  }
  return a;
}

// ==== 1. out-of-order commits, with takeovers ====

struct raw_publish {
  std::string payload;
  std::int64_t id = 0;
  bool done = false;
  std::string error;
};

task<void> publish_on(conn_ptr c, std::string ch, raw_publish* out, bool then_commit) {
  try {
    out->id = co_await publish_sql(c, ch, out->payload);
    if (then_commit) co_await c->query("COMMIT");
  } catch (const std::exception& e) {
    out->error = e.what();
  }
  out->done = true;
}

struct order_report {
  double takeover1_ms = 0, takeover2_ms = 0;
  std::size_t redelivered = 0, tenures = 0;
};

task<void> out_of_order_flow(event_loop& loop, std::string ch, order_report& rep) {
  recorder a(loop, slow_return_opts(), ch), b(loop, slow_return_opts(), ch), watch(loop, plain_opts(), ch);
  co_await start(a);
  co_await start(b);
  co_await start(watch);
  REQUIRE(a.ps.is_active(ch));
  REQUIRE_FALSE(b.ps.is_active(ch));
  auto admin = co_await open(loop);
  std::map<std::int64_t, std::string> published;
  for (int i = 0; i < 10; ++i) {
    std::string p = "first " + std::to_string(i);
    auto id = co_await publish_sql(admin, ch, p);
    published[id] = p;
  }
  bool ten = co_await wait_until(loop, [&] { return a.got.size() == 10; }, 5s);
  REQUIRE(ten);

  // T0 begins first; T1 then takes the channel's counter row and holds it
  // ~2 s; T0 and five autocommit publishers queue behind it.
  auto t0c = co_await open(loop);
  auto t1c = co_await open(loop);
  co_await t0c->query("BEGIN");
  co_await t0c->query("SELECT txid_current()");
  auto t1_begin = clock::now();
  co_await t1c->query("BEGIN");
  std::int64_t held_id = co_await publish_sql(t1c, ch, "held");
  published[held_id] = "held";
  std::vector<conn_ptr> waiters;
  std::vector<raw_publish> queued(6);
  std::vector<task<void>> running;
  std::string pids = "{" + std::to_string(t0c->backend_pid());
  queued[0].payload = "early";
  running.push_back(publish_on(t0c, ch, &queued[0], true));
  for (std::size_t k = 1; k < queued.size(); ++k) {
    waiters.push_back(co_await open(loop));
    pids += "," + std::to_string(waiters.back()->backend_pid());
    queued[k].payload = "queued " + std::to_string(k);
    running.push_back(publish_on(waiters.back(), ch, &queued[k], false));
  }
  pids += "}";
  for (auto& t : running) loop.start(t);
  bool blocked = co_await wait_for_value(loop, admin,
                                         "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[]) "
                                         "AND wait_event_type = 'Lock'",
                                         "6", 5s, pids);
  REQUIRE(blocked);
  for (auto& q : queued) CHECK_FALSE(q.done);
  CHECK(a.got.size() == 10);  // nothing else has committed

  // The holder dies while T1 is open; B takes over.
  auto kill_at = clock::now();
  co_await admin->query("SELECT pg_terminate_backend($1)", a.ps.client()->backend_pid());
  bool b_holds = co_await wait_until(loop, [&] { return b.ps.is_active(ch); }, 5s);
  REQUIRE(b_holds);
  rep.takeover1_ms = ms_since(kill_at);
  auto held_for = clock::now() - t1_begin;
  if (held_for < 2s) co_await loop.sleep(std::chrono::duration_cast<std::chrono::milliseconds>(2s - held_for));
  for (auto& q : queued) CHECK_FALSE(q.done);
  co_await t1c->query("COMMIT");
  bool all_queued = co_await wait_until(
      loop, [&] { return std::all_of(queued.begin(), queued.end(), [](const raw_publish& q) { return q.done; }); }, 5s);
  REQUIRE(all_queued);
  for (auto& q : queued) {
    INFO(q.payload << ": " << q.error);
    CHECK(q.error.empty());
    published[q.id] = q.payload;
  }
  // T0 began before T1 and committed after it: a larger id.
  CHECK(queued[0].id > held_id);
  for (int i = 0; i < 10; ++i) {
    std::string p = "after T1 " + std::to_string(i);
    auto id = co_await publish_sql(admin, ch, p);
    published[id] = p;
  }
  auto n = static_cast<std::int64_t>(published.size());
  auto b_has_all = [&] { return !b.got.empty() && b.got.back().id == static_cast<std::int64_t>(published.size()); };
  bool caught_up = co_await wait_until(loop, b_has_all, 5s);
  REQUIRE(caught_up);

  // A is back as a standby; now B's backend dies and A takes over.
  bool a_back = co_await wait_until(loop, [&] { return a.reconnects >= 1; }, 5s);
  REQUIRE(a_back);
  kill_at = clock::now();
  co_await admin->query("SELECT pg_terminate_backend($1)", b.ps.client()->backend_pid());
  bool a_holds = co_await wait_until(loop, [&] { return a.ps.is_active(ch); }, 5s);
  REQUIRE(a_holds);
  rep.takeover2_ms = ms_since(kill_at);
  for (int i = 0; i < 10; ++i) {
    std::string p = "last " + std::to_string(i);
    auto id = co_await publish_sql(admin, ch, p);
    published[id] = p;
  }
  n = static_cast<std::int64_t>(published.size());
  bool a_has_all = co_await wait_until(loop, [&] { return !a.got.empty() && a.got.back().id == n; }, 5s);
  CHECK(a_has_all);
  bool acked = co_await wait_acked(loop, admin, ch, n);
  CHECK(acked);
  bool watched = co_await wait_until(loop, [&] { return watch.messages.size() == static_cast<std::size_t>(n); }, 5s);
  CHECK(watched);
  for (auto& t : running) co_await std::move(t);

  // Ids: 1..n, no gap, none twice.
  REQUIRE(published.size() == static_cast<std::size_t>(n));
  CHECK(published.begin()->first == 1);
  CHECK(published.rbegin()->first == n);
  // Commit order == id order: NOTIFY delivers in commit order.
  std::vector<std::int64_t> commit_order;
  for (auto& m : watch.messages) {
    REQUIRE(m.rfind("pgiplock#", 0) == 0);
    auto colon = m.find(':');
    REQUIRE(colon != std::string::npos);
    auto id = std::stoll(m.substr(9, colon - 9));
    commit_order.push_back(id);
    CHECK(m.substr(colon + 1) == published[id]);
  }
  std::vector<std::int64_t> expected(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < expected.size(); ++i) expected[i] = static_cast<std::int64_t>(i + 1);
  CHECK(commit_order == expected);

  auto au = check_deliveries({&a, &b}, published, n);
  INFO(a.all_errors() << b.all_errors());
  CHECK(au.missing == 0);
  CHECK(au.skipped == 0);
  CHECK(au.out_of_order == 0);
  CHECK(au.wrong_payload == 0);
  CHECK(au.tenure_tokens.size() >= 3);
  rep.redelivered = au.redelivered;
  rep.tenures = au.tenure_tokens.size();
  co_await a.ps.destroy();
  co_await b.ps.destroy();
  co_await watch.ps.destroy();
  for (auto& w : waiters) co_await w->close();
  co_await t0c->close();
  co_await t1c->close();
  co_await admin->close();
}


// ==== 2. large payloads ====

long peak_rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string key;
  long value = 0;
  while (f >> key) {
    if (key == "VmHWM:") {
      f >> value;
      return value;
    }
    f.ignore(4096, '\n');
  }
  return -1;
}

struct large_report {
  double notify64_ms = 0, replay_ms = 0;
  long rss_before_kib = 0, peak_kib = 0;
  std::vector<std::int64_t> ids;
  std::vector<std::size_t> sizes;
  std::vector<bool> equal;
};

task<void> large_flow(event_loop& loop, std::string ch, large_report& rep) {
  const std::string big = noise(std::size_t{64} << 20, 64);
  auto admin = co_await open(loop);
  std::string s = lock_schema(*admin);
  std::string md5 = co_await scalar(admin, "SELECT md5('x')");
  std::string ten_mb;
  ten_mb.reserve(32 * 327680);
  for (int i = 0; i < 327680; ++i) ten_mb += md5;
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  rep.rss_before_kib = rss_kib();
  // Both before anyone listens: the first tenure reads them from the journal
  // (the 64 MiB row fills its page; the 10 MB one comes in the next).
  auto t0 = clock::now();
  co_await pub.notify(ch, big);
  rep.notify64_ms = ms_since(t0);
  co_await admin->query("SELECT " + s + ".pgiplock_publish($1, repeat(md5('x'), 327680))", ch);
  const std::map<std::int64_t, const std::string*> expected{{1, &big}, {2, &ten_mb}, {3, &ten_mb}};
  pubsub sub(loop, durable_opts());
  std::vector<std::string> errors;
  sub.on_error([&](const std::exception& e) { errors.emplace_back(e.what()); });
  sub.on_delivery([&](const delivery& d) {
    if (d.channel != ch) return;
    rep.ids.push_back(d.id);
    rep.sizes.push_back(d.payload.size());
    auto it = expected.find(d.id);
    rep.equal.push_back(it != expected.end() && d.payload == *it->second);
  });
  co_await sub.connect();
  t0 = clock::now();
  co_await sub.listen(ch);
  bool replayed = co_await wait_until(loop, [&] { return rep.ids.size() == 2; }, 20s);
  rep.replay_ms = ms_since(t0);
  CHECK(replayed);
  // Live: from SQL, 10 MB, nudged by its id alone.
  co_await admin->query("SELECT " + s + ".pgiplock_publish($1, repeat(md5('x'), 327680))", ch);
  bool live = co_await wait_until(loop, [&] { return rep.ids.size() == 3; }, 20s);
  CHECK(live);
  bool acked = co_await wait_acked(loop, admin, ch, 3);
  CHECK(acked);
  rep.peak_kib = peak_rss_kib();
  for (auto& e : errors) UNSCOPED_INFO("on_error: " << e);
  CHECK(errors.empty());
  co_await sub.destroy();
  co_await pub.close();
  co_await admin->close();
}

// ==== 3. bytes: every ASCII byte, UTF-8 of 1..4 bytes; invalid input refused ====

std::string every_byte_and_utf8() {
  std::string s;
  for (int c = 1; c < 128; ++c) s.push_back(static_cast<char>(c));
  s += "a";                             // 1 byte
  s += "\xc3\xa9";                      // U+00E9, 2 bytes
  s += "\xe2\x82\xac";                  // U+20AC, 3 bytes
  s += "\xf0\x9d\x84\x9e";              // U+1D11E, 4 bytes
  s += "\xef\xbf\xbd\xf4\x8f\xbf\xbf";  // U+FFFD, U+10FFFF
  return s;
}

struct refusal {
  std::string what;
  bool refused = false;
};

// notify() of `payload`: the std::invalid_argument it threw, or "(accepted)".
task<refusal> try_notify(pubsub& p, std::string ch, std::string payload) {
  refusal r;
  try {
    co_await p.notify(ch, payload);
    r.what = "(accepted)";
  } catch (const std::invalid_argument& e) {
    r.what = e.what();
    r.refused = true;
  }
  co_return r;
}

struct bytes_report {
  std::vector<std::string> got;
  std::vector<refusal> durable_utf8, plain_utf8, nul;
  std::int64_t bad_rows = 0, bad_counter = 0, good_id = 0;
};

task<void> bytes_flow(event_loop& loop, std::string ch, std::string bad, const std::vector<std::string>& sent,
                      const std::vector<std::string>& invalid, bytes_report& rep) {
  recorder a(loop, durable_opts(), ch);
  co_await start(a);
  pubsub pub(loop, durable_opts()), plain(loop, pubsub_opts());
  co_await pub.connect();
  co_await plain.connect();
  auto admin = co_await open(loop);
  REQUIRE(admin->client_encoding() == "UTF8");
  co_await pub.notify(ch, sent[0]);
  co_await pub.notify(ch, sent[1]);
  co_await publish_sql(admin, ch, sent[2]);
  co_await publish_sql(admin, ch, sent[3]);
  bool all = co_await wait_until(loop, [&] { return a.got.size() == 4; }, 5s);
  CHECK(all);
  for (auto& g : a.got) rep.got.push_back(g.payload);
  for (auto& p : invalid) {
    rep.durable_utf8.push_back(co_await try_notify(pub, bad, p));
    if (p.size() < 8000) rep.plain_utf8.push_back(co_await try_notify(plain, bad, p));  // larger: too long for a plain channel
  }
  std::string big_nul(9000, 'n');
  big_nul[8500] = '\0';
  rep.nul.push_back(co_await try_notify(pub, bad, std::string("a\0b", 3)));
  rep.nul.push_back(co_await try_notify(pub, bad, big_nul));
  rep.nul.push_back(co_await try_notify(plain, bad, std::string("a\0b", 3)));
  // Nothing of it reached the server: no row, no id drawn.
  rep.bad_rows = co_await journal_rows(admin, bad);
  rep.bad_counter = co_await number(admin, "SELECT last_id FROM " + lock_schema(*admin) + ".pgiplock_channel WHERE channel = $1", bad);
  co_await pub.notify(bad, "fine");
  rep.good_id = co_await number(admin, "SELECT max(id) FROM " + lock_schema(*admin) + ".pgiplock_journal WHERE channel = $1", bad);
  INFO(a.all_errors());
  CHECK(a.errors.empty());
  co_await a.ps.destroy();
  co_await pub.close();
  co_await plain.close();
  co_await admin->close();
}

// ==== 4. transactional outbox: a trigger publishes ====

task<void> outbox_flow(event_loop& loop, std::string ch, std::string table, std::vector<std::string>& got,
                       std::vector<std::string>& committed, std::vector<std::int64_t>& ids) {
  auto admin = co_await open(loop);
  std::string s = lock_schema(*admin);
  recorder a(loop, durable_opts(), ch);
  co_await start(a);
  co_await admin->query("CREATE TABLE " + table + " (id serial PRIMARY KEY, body text NOT NULL)");
  co_await admin->query("CREATE FUNCTION " + table + "_fn() RETURNS trigger LANGUAGE plpgsql AS $pgip$ BEGIN PERFORM " +
                        s + ".pgiplock_publish('" + ch + "', row_to_json(NEW)::text); RETURN NEW; END $pgip$");
  co_await admin->query("CREATE TRIGGER " + table + "_tr AFTER INSERT ON " + table + " FOR EACH ROW EXECUTE FUNCTION " +
                        table + "_fn()");
  std::string ins = "INSERT INTO " + table + " (body) VALUES ($1)";
  co_await admin->query(ins, "one");
  co_await admin->query("BEGIN");
  co_await admin->query(ins, "two");
  co_await admin->query(ins, "three \"quoted\" \\ ü");
  co_await admin->query("COMMIT");
  co_await admin->query("BEGIN");
  co_await admin->query(ins, "rolled back");
  co_await admin->query("ROLLBACK");
  co_await admin->query("BEGIN");
  co_await admin->query(ins, "four");
  co_await admin->query("SAVEPOINT sp");
  co_await admin->query(ins, "to the savepoint");
  co_await admin->query("ROLLBACK TO SAVEPOINT sp");
  co_await admin->query(ins, "five");
  co_await admin->query("COMMIT");
  co_await admin->query("BEGIN");
  co_await admin->query(ins, "failed transaction");
  bool failed = false;
  try {
    co_await admin->query("SELECT 1 / 0");
  } catch (const pgiplock::sql_error&) {
    failed = true;
  }
  CHECK(failed);
  co_await admin->query("ROLLBACK");
  // Another session's transaction, open while the next one commits.
  auto other = co_await open(loop);
  co_await other->query("BEGIN");
  co_await other->query(ins, "rolled back later");
  co_await other->query("ROLLBACK");
  co_await admin->query(ins, "six");
  auto rows = co_await admin->query("SELECT row_to_json(t)::text FROM " + table + " t ORDER BY id");
  for (int i = 0; i < rows.rows(); ++i) committed.emplace_back(rows.get(i, 0));
  bool all = co_await wait_until(loop, [&] { return a.got.size() >= committed.size(); }, 5s);
  CHECK(all);
  bool acked = co_await wait_acked(loop, admin, ch, static_cast<std::int64_t>(committed.size()));
  CHECK(acked);
  co_await a.ps.client()->query("SELECT 1");  // anything still on its way has arrived
  for (auto& g : a.got) {
    got.push_back(g.payload);
    ids.push_back(g.id);
  }
  INFO(a.all_errors());
  CHECK(a.errors.empty());
  co_await a.ps.destroy();
  co_await other->close();
  co_await admin->close();
}

// ==== 5. the fence ====

struct fence_report {
  std::int64_t token = 0, cursor_token = 0, acked_before = 0, acked_after = 0;
  std::vector<std::int64_t> ids_after_bump, ids_after_fence;
  std::vector<std::string> errors;
  std::string ack_sqlstate, ack_message;
  bool ack_with_new_token = false;
};

task<void> fence_flow(event_loop& loop, std::string ch, fence_report& rep) {
  auto admin = co_await open(loop);
  std::string s = lock_schema(*admin);
  recorder a(loop, durable_opts(), ch);
  pubsub pub(loop, durable_opts());
  co_await start(a);
  co_await pub.connect();
  REQUIRE(a.ps.is_active(ch));
  rep.token = a.ps.token(ch);
  for (int i = 1; i <= 3; ++i) co_await pub.notify(ch, "m" + std::to_string(i));
  bool acked = co_await wait_acked(loop, admin, ch, 3);
  REQUIRE(acked);
  rep.cursor_token = co_await number(admin, "SELECT token FROM " + s + ".pgiplock_cursor WHERE channel = $1", ch);
  rep.acked_before = co_await acked_of(admin, ch);
  // Someone else takes the cursor.
  co_await admin->query("UPDATE " + s + ".pgiplock_cursor SET token = token + 1000000 WHERE channel = $1", ch);
  std::size_t before = a.got.size();
  for (int i = 4; i <= 6; ++i) co_await pub.notify(ch, "m" + std::to_string(i));
  bool fenced = co_await wait_until(loop, [&] { return a.errors_with("replaced") > 0; }, 5s);
  CHECK(fenced);
  for (std::size_t i = before; i < a.got.size(); ++i) rep.ids_after_bump.push_back(a.got[i].id);
  std::size_t at_fence = a.got.size();
  for (int i = 7; i <= 11; ++i) co_await pub.notify(ch, "m" + std::to_string(i));
  // Nothing more from this holder (a second of silence; the messages
  // reach its connection within milliseconds).
  bool more = co_await wait_until(loop, [&] { return a.got.size() > at_fence; }, 1s);
  CHECK_FALSE(more);
  for (std::size_t i = at_fence; i < a.got.size(); ++i) rep.ids_after_fence.push_back(a.got[i].id);
  rep.acked_after = co_await acked_of(admin, ch);
  // The old tenure's acknowledgement is refused with PGF01.
  try {
    co_await admin->query("SELECT " + s + ".pgiplock_ack($1, $2::bigint, $3::bigint)", ch, std::int64_t{6}, rep.token);
    rep.ack_sqlstate = "(accepted)";
  } catch (const pgiplock::sql_error& e) {
    rep.ack_sqlstate = e.sqlstate();
    rep.ack_message = e.what();
  }
  // The new token's is not.
  co_await admin->query("SELECT " + s + ".pgiplock_ack($1, $2::bigint, $3::bigint)", ch, std::int64_t{11},
                        rep.cursor_token + 1000000);
  rep.ack_with_new_token = (co_await acked_of(admin, ch)) == 11;
  rep.errors = a.errors;
  co_await a.ps.destroy();
  co_await pub.close();
  co_await admin->close();
}

// ==== 6. at-least-once: what was delivered but not acknowledged comes again ====

struct redelivery_report {
  std::vector<got_msg> a, b;
  std::int64_t acked_while_held = 0;
  std::map<std::int64_t, std::string> published;
};

task<void> redelivery_flow(event_loop& loop, std::string ch, redelivery_report& rep) {
  auto admin = co_await open(loop);
  std::string s = lock_schema(*admin);
  recorder a(loop, slow_return_opts(), ch), b(loop, slow_return_opts(), ch);
  pubsub pub(loop, durable_opts());
  co_await start(a);
  co_await start(b);
  co_await pub.connect();
  REQUIRE(a.ps.is_active(ch));
  int n = 0;
  auto send = [&](int count) -> std::vector<std::string> {
    std::vector<std::string> out;
    for (int i = 0; i < count; ++i) {
      ++n;
      out.push_back("payload " + std::to_string(n) + " " + noise(static_cast<std::size_t>(n), static_cast<std::uint32_t>(n)));
      rep.published[n] = out.back();
    }
    return out;
  };
  for (auto& p : send(5)) co_await pub.notify(ch, p);
  bool acked = co_await wait_acked(loop, admin, ch, 5);
  REQUIRE(acked);
  // Acknowledgements block behind this lock from now on.
  auto locker = co_await open(loop);
  co_await locker->query("BEGIN");
  co_await locker->query("SELECT * FROM " + s + ".pgiplock_cursor WHERE channel = $1 FOR UPDATE", ch);
  // In one transaction: the ten nudges reach the holder together, before
  // its acknowledgement (which then blocks) keeps its session busy (a busy
  // session is sent no notifications).
  co_await admin->query("BEGIN");
  for (auto& p : send(10)) co_await publish_sql(admin, ch, p);
  co_await admin->query("COMMIT");
  bool delivered = co_await wait_until(loop, [&] { return a.got.size() == 15; }, 5s);
  REQUIRE(delivered);
  int a_pid = a.ps.client()->backend_pid();
  bool waiting = co_await wait_for_value(loop, admin, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                                         "Lock", 5s, a_pid);
  CHECK(waiting);  // its acknowledgement is in flight, blocked
  rep.acked_while_held = co_await acked_of(admin, ch);
  co_await admin->query("SELECT pg_terminate_backend($1)", a_pid);
  bool gone = co_await wait_for_value(loop, admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", "0", 5s, a_pid);
  REQUIRE(gone);
  co_await locker->query("ROLLBACK");
  bool replayed = co_await wait_until(loop, [&] { return b.got.size() >= 10; }, 5s);
  CHECK(replayed);
  for (auto& p : send(5)) co_await pub.notify(ch, p);
  bool rest = co_await wait_until(loop, [&] { return !b.got.empty() && b.got.back().id == 20; }, 5s);
  CHECK(rest);
  bool all_acked = co_await wait_acked(loop, admin, ch, 20);
  CHECK(all_acked);
  rep.a = a.got;
  rep.b = b.got;
  co_await a.ps.destroy();
  co_await b.ps.destroy();
  co_await pub.close();
  co_await locker->close();
  co_await admin->close();
}

// ==== 7. exactly-once effects ====

task<void> record_effect(pgiplock::connection& c, std::string table, std::int64_t id, std::string payload) {
  co_await c.query("INSERT INTO " + table + " (id, payload) VALUES ($1, $2)", id, payload);
  co_await c.query("SELECT pg_sleep(0.001)");  // a transaction is open most of the time
}

struct effect_log {
  std::vector<int> tx_pids;
  std::size_t calls = 0;
};

void effects_into(recorder& r, effect_log& log, const std::string& table) {
  r.ps.on_delivery_in_transaction([&log, table](const delivery& d, pgiplock::connection& c) {
    ++log.calls;
    log.tx_pids.push_back(c.backend_pid());
    return record_effect(c, table, d.id, std::string(d.payload));
  });
}

task<void> produce(event_loop& loop, pubsub& pub, std::string ch, std::vector<std::string> payloads,
                   std::chrono::milliseconds gap, int* sent) {
  for (auto& p : payloads) {
    co_await pub.notify(ch, p);
    ++*sent;
    if (gap.count() > 0) co_await loop.sleep(gap);
  }
}

struct effects_report {
  std::int64_t count = 0, distinct = 0, min = 0, max = 0, wrong = 0, acked = 0;
  std::size_t calls_a = 0, calls_b = 0;
  std::vector<std::string> errors_a, errors_b;
  double takeover_ms = 0;
};

task<void> exactly_once_flow(event_loop& loop, std::string ch, std::string table, int total, effects_report& rep) {
  auto admin = co_await open(loop);
  co_await admin->query("CREATE TABLE " + table + " (id bigint PRIMARY KEY, payload text NOT NULL)");
  recorder a(loop, slow_return_opts(), ch), b(loop, slow_return_opts(), ch);
  effect_log la, lb;
  effects_into(a, la, table);
  effects_into(b, lb, table);
  co_await start(a);
  co_await start(b);
  REQUIRE(a.ps.is_active(ch));
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  std::vector<std::string> payloads;
  for (int i = 1; i <= total; ++i) payloads.push_back("e" + std::to_string(i));
  int sent = 0;
  auto producer = produce(loop, pub, ch, payloads, 2ms, &sent);
  loop.start(producer);
  bool third = co_await wait_until(loop, [&] { return la.calls >= static_cast<std::size_t>(total / 3); }, 10s);
  REQUIRE(third);
  // Both of the holder's sessions die, its transaction most likely open.
  int main_pid = a.ps.client()->backend_pid(), tx_pid = la.tx_pids.back();
  auto t0 = clock::now();
  co_await admin->query("SELECT pg_terminate_backend(p) FROM unnest(ARRAY[$1::int, $2::int]) AS p", main_pid, tx_pid);
  bool b_holds = co_await wait_until(loop, [&] { return b.ps.is_active(ch); }, 5s);
  REQUIRE(b_holds);
  rep.takeover_ms = ms_since(t0);
  co_await std::move(producer);
  REQUIRE(sent == total);
  bool all = co_await wait_for_value(loop, admin, "SELECT count(*) FROM " + table, std::to_string(total), 20s);
  CHECK(all);
  bool acked = co_await wait_acked(loop, admin, ch, total);
  CHECK(acked);
  auto r = co_await admin->query("SELECT count(*), count(DISTINCT id), coalesce(min(id), 0), coalesce(max(id), 0), "
                                 "count(*) FILTER (WHERE payload <> 'e' || id) FROM " + table);
  rep.count = std::stoll(std::string(r.get(0, 0)));
  rep.distinct = std::stoll(std::string(r.get(0, 1)));
  rep.min = std::stoll(std::string(r.get(0, 2)));
  rep.max = std::stoll(std::string(r.get(0, 3)));
  rep.wrong = std::stoll(std::string(r.get(0, 4)));
  rep.acked = co_await acked_of(admin, ch);
  rep.calls_a = la.calls;
  rep.calls_b = lb.calls;
  rep.errors_a = a.errors;
  rep.errors_b = b.errors;
  co_await a.ps.destroy();
  co_await b.ps.destroy();
  co_await pub.close();
  co_await admin->close();
}

// ==== 8. retention ====

task<std::int64_t> journal_bytes(conn_ptr c) {
  co_return co_await number(c,
                            "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree($1::regclass)",
                            lock_schema(*c) + ".pgiplock_journal");
}

struct retention_report {
  std::int64_t base = 0, peak = 0, low = 0, quiet_rows = -1, quiet_in_backlog = -1;
  double shrink_s = 0;
};

// 60 messages of 100 KiB, acknowledged; between them, on a channel nobody
// listens to, three small ones that must be kept. The journal has to give
// the space back anyway (their rows move to the backlog partition), whatever
// other channels left in it before (the baseline).
task<void> retention_flow(event_loop& loop, std::string ch, std::string quiet, retention_report& rep) {
  auto admin = co_await open(loop);
  recorder a(loop, durable_opts(), ch);
  a.keep_payloads = false;
  co_await start(a);
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  rep.base = co_await journal_bytes(admin);
  constexpr int count = 60;
  for (int i = 0; i < count; ++i) {
    if (i % 20 == 0) co_await pub.notify(quiet, "unheard " + std::to_string(i));
    co_await pub.notify(ch, noise(100 * 1024, static_cast<std::uint32_t>(1000 + i)));
  }
  bool acked = co_await wait_acked(loop, admin, ch, count);
  REQUIRE(acked);
  rep.peak = co_await journal_bytes(admin);
  REQUIRE(rep.peak - rep.base >= count * 100 * 1024);
  auto t0 = clock::now();
  // Small messages go on meanwhile: a listener prunes every 2 s while it
  // acknowledges something (every 30 s when idle).
  int ticks = 0;
  auto in_backlog = "SELECT count(*) FROM " + lock_schema(*admin) + ".pgiplock_journal_8 WHERE channel = $1";
  for (;;) {
    rep.low = co_await journal_bytes(admin);
    rep.quiet_in_backlog = co_await number(admin, in_backlog, quiet);
    bool shrunk = (rep.low - rep.base) * 10 < rep.peak - rep.base;
    if ((shrunk && rep.quiet_in_backlog == 3) || ms_since(t0) > 40000) break;
    co_await pub.notify(ch, "tick");
    ++ticks;
    co_await loop.sleep(200ms);
  }
  rep.shrink_s = ms_since(t0) / 1000;
  rep.quiet_rows = co_await journal_rows(admin, quiet);
  bool all = co_await wait_until(loop, [&] { return a.got.size() == static_cast<std::size_t>(count + ticks); }, 5s);
  CHECK(all);
  INFO(a.all_errors());
  CHECK(a.errors.empty());
  co_await a.ps.destroy();
  co_await pub.close();
  co_await admin->close();
}

// A journal an older pgiplock made ("pgiplock journal 2"): no backlog
// partition, the old pgiplock_prune. The first durable notify() of this
// version adds the partition and replaces the functions, in place.
struct journal_upgrade {
  bool had_backlog = true, has_backlog = false;
  std::string comment_after;
  std::int64_t delivered_before = -1;
  std::string payloads;
  bool listener_recreated = false;
  std::vector<std::string> listener_errors;  // after the old prune was put back
};
task<void> upgrade_old_journal(event_loop& loop, std::string ch, journal_upgrade& out) {
  auto admin = co_await open(loop);
  {
    pubsub pub(loop, durable_opts());
    co_await pub.connect();
    co_await pub.notify(ch, "before the upgrade");
    co_await pub.close();
  }
  std::string s = lock_schema(*admin);
  std::string backlog = "SELECT to_regclass($1) IS NOT NULL";
  co_await admin->query("DROP TABLE " + s + ".pgiplock_journal_8");
  // Journal 3's row: one message, its payload in a column of that name.
  co_await admin->query("ALTER TABLE " + s + ".pgiplock_journal RENAME COLUMN body TO payload");
  co_await admin->query("ALTER TABLE " + s + ".pgiplock_journal DROP COLUMN first_id, DROP COLUMN bodies");
  co_await admin->query("COMMENT ON FUNCTION " + s + ".pgiplock_prune(interval) IS 'pgiplock journal 2'");
  out.had_backlog = (co_await admin->query(backlog, s + ".pgiplock_journal_8")).get(0, 0) == "t";
  recorder r(loop, durable_opts(), ch);
  co_await start(r);
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  co_await pub.notify(ch, "after the upgrade");
  bool both = co_await wait_until(loop, [&] { return r.got.size() == 2; }, 5s);
  CHECK(both);
  out.delivered_before = static_cast<std::int64_t>(r.got.size());
  // An older member starts: its functions replace this version's and name
  // journal 3's column. This version's next publish puts them back.
  co_await admin->query("CREATE OR REPLACE FUNCTION " + s + ".pgiplock_publish_many(chs text[], payloads text[]) "
                        "RETURNS SETOF bigint LANGUAGE plpgsql AS $f$ BEGIN INSERT INTO " + s +
                        ".pgiplock_journal (slot, channel, id, payload) VALUES (0, chs[1], 0, payloads[1]); END $f$");
  co_await admin->query("COMMENT ON FUNCTION " + s + ".pgiplock_prune(interval) IS 'pgiplock journal 3'");
  co_await pub.notify(ch, "after an older member");
  bool third = co_await wait_until(loop, [&] { return r.got.size() == 3; }, 5s);
  CHECK(third);
  if (third) out.payloads = r.got[0].payload + " | " + r.got[1].payload + " | " + r.got[2].payload;
  out.has_backlog = (co_await admin->query(backlog, s + ".pgiplock_journal_8")).get(0, 0) == "t";
  std::string version = "SELECT coalesce(obj_description(to_regprocedure($1), 'pg_proc'), '<none>')";
  out.comment_after = std::string((co_await admin->query(version, s + ".pgiplock_prune(interval)")).get(0, 0));
  // Again, with nobody of this version publishing: the holder, which only
  // listens, calls the old prune (it acknowledged, so within 2 s) and
  // re-creates the functions itself, and says so once on on_error.
  INFO(r.all_errors());
  CHECK(r.errors.empty());
  co_await pub.close();
  co_await admin->query("CREATE OR REPLACE FUNCTION " + s + ".pgiplock_prune(keep interval) RETURNS integer "
                        "LANGUAGE plpgsql AS $f$ BEGIN RETURN (SELECT count(payload) FROM " + s +
                        ".pgiplock_journal); END $f$");
  co_await admin->query("COMMENT ON FUNCTION " + s + ".pgiplock_prune(interval) IS 'pgiplock journal 3'");
  auto t0 = clock::now();
  while (!out.listener_recreated && ms_since(t0) < 10000) {
    co_await loop.sleep(50ms);
    auto now = co_await admin->query(version, s + ".pgiplock_prune(interval)");
    out.listener_recreated = now.get(0, 0) == std::string_view(pgiplock::detail::sql::journal_version);
  }
  out.listener_errors = r.errors;
  co_await r.ps.destroy();
  co_await admin->close();
}

// One publishing statement's messages of a channel share a journal row; a
// takeover resumes inside one, pages through it, and goes on across a
// large message's own row.
struct shared_rows_report {
  std::int64_t rows = -1, shared = -1;
  std::vector<got_msg> got;
  std::string errors;
};
task<void> replay_shared_rows(event_loop& loop, std::string ch, std::string other, shared_rows_report& out) {
  auto admin = co_await open(loop);
  std::string s = lock_schema(*admin);
  {
    pubsub pub(loop, durable_opts());  // makes the journal
    co_await pub.connect();
    co_await pub.close();
  }
  co_await admin->query("SELECT " + s + ".pgiplock_publish_many(array_fill($1::text, ARRAY[1000]), "
                        "ARRAY(SELECT 'm' || i FROM generate_series(1, 1000) AS i))", ch);
  co_await admin->query("SELECT " + s + ".pgiplock_publish($1, repeat('L', 9000))", ch);
  co_await admin->query("SELECT " + s + ".pgiplock_publish_many(ARRAY[$1, $1, $1], ARRAY['m1002', 'm1003', 'm1004'])",
                        ch);
  // Two channels in one call: the general path, a shared row per channel.
  co_await admin->query("SELECT " + s + ".pgiplock_publish_many(ARRAY[$1, $2, $1], ARRAY['m1005', 'other', 'm1006'])",
                        ch, other);
  out.rows = co_await journal_rows(admin, ch);
  out.shared = co_await number(admin, "SELECT count(*) FROM " + s + ".pgiplock_journal WHERE channel = $1 AND bodies "
                                      "IS NOT NULL", ch);
  // A holder that acknowledged 400 of the first row's 1,000.
  co_await admin->query("INSERT INTO " + s + ".pgiplock_cursor (channel, acked) VALUES ($1, 400)", ch);
  recorder r(loop, durable_opts(), ch);
  co_await start(r);
  co_await wait_until(loop, [&] { return r.got.size() >= 606; }, 10s);
  co_await wait_until(loop, [&] { return r.got.size() > 606; }, 300ms);  // nothing more comes
  out.got = r.got;
  out.errors = r.all_errors();
  co_await r.ps.destroy();
  co_await admin->close();
}

// A durable holder's release does not wait for a successor to announce
// (there is nothing to drain: it acknowledged what it delivered), even when
// another member exists that does not want the channel.
struct quick_release {
  double destroy_ms = -1;
  std::int64_t acked = -1;
};
task<void> release_without_drain(event_loop& loop, std::string ch, std::string other_ch, quick_release& out) {
  auto admin = co_await open(loop);
  recorder a(loop, durable_opts(), ch), b(loop, durable_opts(), other_ch);
  co_await start(a);
  co_await start(b);
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  for (int i = 0; i < 3; ++i) co_await pub.notify(ch, "m" + std::to_string(i));
  bool got = co_await wait_until(loop, [&] { return a.got.size() == 3; }, 5s);
  CHECK(got);
  auto t0 = clock::now();
  co_await a.ps.destroy();
  out.destroy_ms = ms_since(t0);
  out.acked = co_await number(admin, "SELECT acked FROM " + lock_schema(*admin) + ".pgiplock_cursor WHERE channel = $1",
                              ch);
  INFO(a.all_errors() << b.all_errors());
  CHECK(a.errors.empty());
  CHECK(b.errors.empty());
  co_await b.ps.destroy();
  co_await pub.close();
  co_await admin->close();
}

struct unheard_report {
  std::int64_t rows_kept = 0, rows_dropped = 0;
  std::vector<got_msg> kept, after_drop;
  std::vector<std::string> drop_errors;
};

// Five messages on `quiet` (nobody listens) with a marker on `busy`, in one
// transaction (one time slot); waits until a listener's pruning has removed
// the marker (the slot was pruned), then counts `quiet`'s rows.
task<std::int64_t> publish_and_prune(event_loop& loop, conn_ptr admin, std::string quiet, std::string busy,
                                     pgiplock::pubsub_options opts, std::string& failure) {
  recorder l(loop, opts, busy);
  co_await start(l);
  co_await admin->query("BEGIN");
  for (int i = 1; i <= 5; ++i) co_await publish_sql(admin, quiet, "kept " + std::to_string(i));
  co_await publish_sql(admin, busy, "marker");
  co_await admin->query("COMMIT");
  bool delivered = co_await wait_until(loop, [&] { return l.got.size() == 1; }, 5s);
  // A listener prunes every 2 s while it acknowledges (every 30 s idle):
  // keep it busy until the marker's slot was pruned.
  auto tp = clock::now();
  bool pruned = false;
  while (!pruned && ms_since(tp) < 20000) {
    co_await publish_sql(admin, busy, "tick");
    co_await loop.sleep(200ms);
    pruned = (co_await number(admin, "SELECT count(*) FROM " + lock_schema(*admin) +
                                         ".pgiplock_journal WHERE channel = $1 AND id = 1", busy)) == 0;
  }
  if (!delivered || !pruned) failure = "delivered " + std::to_string(delivered) + " (" + std::to_string(l.got.size()) + "), pruned " + std::to_string(pruned) + " after " + std::to_string(ms_since(tp)) + " ms: " + l.all_errors();
  auto rows = co_await journal_rows(admin, quiet);
  co_await l.ps.destroy();
  co_return rows;
}

task<void> unheard_flow(event_loop& loop, std::string quiet, std::string busy, std::string quiet2, std::string busy2,
                        unheard_report& rep) {
  auto admin = co_await open(loop);
  std::string failure;
  // Default retention: an unacknowledged message stays.
  rep.rows_kept = co_await publish_and_prune(loop, admin, quiet, busy, durable_opts(), failure);
  CHECK(failure == std::string());
  {
    recorder late(loop, durable_opts(), quiet);
    co_await start(late);
    bool got = co_await wait_until(loop, [&] { return late.got.size() == 5; }, 5s);
    UNSCOPED_INFO("late: " << late.got.size() << " delivered; " << late.all_errors());
    CHECK(got);
    rep.kept = late.got;
    co_await late.ps.destroy();
  }
  // durable_retention 1 s: what nobody acknowledged within it goes; a later
  // holder says so when the next message shows the gap.
  auto short_lived = durable_opts();
  short_lived.durable_retention = 1s;
  failure.clear();
  rep.rows_dropped = co_await publish_and_prune(loop, admin, quiet2, busy2, short_lived, failure);
  CHECK(failure == std::string());
  recorder late(loop, durable_opts(), quiet2);
  co_await start(late);
  co_await publish_sql(admin, quiet2, "after the drop");
  bool got = co_await wait_until(loop, [&] { return late.got.size() == 1; }, 5s);
  CHECK(got);
  rep.after_drop = late.got;
  rep.drop_errors = late.errors;
  co_await late.ps.destroy();
  co_await admin->close();
}

// ==== 9. the journal truncated under a running listener ====

// "... messages A..B ..." in an on_error text: the range it reports lost.
// (Not std::regex: GCC 12's <regex> trips -Wmaybe-uninitialized under the
// sanitizers.)
std::optional<std::pair<std::int64_t, std::int64_t>> reported_range(std::string_view e) {
  constexpr std::string_view word = "messages ";
  for (auto at = e.find(word); at != std::string_view::npos; at = e.find(word, at + 1)) {
    const char* p = e.data() + at + word.size();
    const char* end = e.data() + e.size();
    std::int64_t a = 0, b = 0;
    auto [p1, ec1] = std::from_chars(p, end, a);
    if (ec1 != std::errc{} || end - p1 < 2 || p1[0] != '.' || p1[1] != '.') continue;
    auto [p2, ec2] = std::from_chars(p1 + 2, end, b);
    if (ec2 == std::errc{}) return std::pair{a, b};
  }
  return std::nullopt;
}

struct truncate_report {
  std::vector<got_msg> got;
  std::vector<std::string> errors;
  std::int64_t last_id = 0, gap_id = 0;
  std::vector<std::string> order_of_producer;
};

task<void> truncate_flow(event_loop& loop, std::string ch, truncate_report& rep) {
  auto admin = co_await open(loop);
  std::string s = lock_schema(*admin);
  recorder a(loop, durable_opts(), ch);
  co_await start(a);
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  std::vector<std::string> payloads;
  for (int i = 0; i < 300; ++i) {
    std::string p = "p" + std::to_string(i) + " ";
    p += (i % 10 == 0) ? noise(9000, static_cast<std::uint32_t>(i)) : std::string("small");
    payloads.push_back(p);
  }
  rep.order_of_producer = payloads;
  int sent = 0;
  auto producer = produce(loop, pub, ch, payloads, 1ms, &sent);
  loop.start(producer);
  bool hundred = co_await wait_until(loop, [&] { return a.got.size() >= 100; }, 10s);
  REQUIRE(hundred);
  co_await admin->query("TRUNCATE " + s + ".pgiplock_journal");
  bool two_hundred = co_await wait_until(loop, [&] { return sent >= 200; }, 10s);
  REQUIRE(two_hundred);
  // A large message whose row is gone before its nudge is heard.
  // The journal locked first, as TRUNCATE will: publishers queue on the
  // lock (taking the counter row first and then TRUNCATE would deadlock
  // with a publisher that holds the journal and waits for the row).
  co_await admin->query("BEGIN");
  co_await admin->query("LOCK TABLE " + s + ".pgiplock_journal IN ACCESS EXCLUSIVE MODE");
  rep.gap_id = co_await publish_sql(admin, ch, "gap " + noise(9000, 7));
  co_await admin->query("TRUNCATE " + s + ".pgiplock_journal");
  co_await admin->query("COMMIT");
  co_await std::move(producer);
  rep.last_id = co_await number(admin, "SELECT last_id FROM " + s + ".pgiplock_channel WHERE channel = $1", ch);
  bool caught_up = co_await wait_until(loop, [&] { return !a.got.empty() && a.got.back().id == rep.last_id; }, 10s);
  CHECK(caught_up);
  bool acked = co_await wait_acked(loop, admin, ch, rep.last_id);
  CHECK(acked);
  CHECK(a.ps.is_active(ch));
  rep.got = a.got;
  rep.errors = a.errors;
  co_await a.ps.destroy();
  co_await pub.close();
  co_await admin->close();
}

// ==== 10. a plain peer hears the nudges ====

task<std::vector<std::string>> nudges_flow(event_loop& loop, std::string ch, std::string large) {
  recorder plain(loop, plain_opts(), ch);
  co_await start(plain);
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  auto admin = co_await open(loop);
  co_await pub.notify(ch, "hello");
  co_await pub.notify(ch, large);
  co_await pub.notify(ch, "a:b:c");
  co_await pub.notify(ch, std::string(7900, 'y'));
  co_await pub.notify(ch, std::string(7901, 'z'));
  co_await publish_sql(admin, ch, "from sql");
  bool all = co_await wait_until(loop, [&] { return plain.messages.size() == 6; }, 5s);
  CHECK(all);
  auto out = plain.messages;
  co_await plain.ps.destroy();
  co_await pub.close();
  co_await admin->close();
  co_return out;
}

// ==== 12. a steady stream through one holder ====

task<void> notify_one(pubsub& p, std::string ch, std::string payload, int* failed) {
  try {
    co_await p.notify(ch, payload);
  } catch (const std::exception&) {
    ++*failed;
  }
}

struct stream_report {
  std::vector<got_msg> got;
  std::vector<std::string> errors;
  int failed = 0;
  double ms = 0;
};

// Bursts of concurrent notify() calls (batched into transactions of many
// messages) while the holder delivers and acknowledges.
task<void> stream_flow(event_loop& loop, std::string ch, int bursts, int per_burst, stream_report& rep) {
  auto admin = co_await open(loop);
  recorder a(loop, durable_opts(), ch);
  co_await start(a);
  pubsub pub(loop, durable_opts());
  co_await pub.connect();
  auto t0 = clock::now();
  int n = 0;
  for (int b = 0; b < bursts; ++b) {
    std::vector<task<void>> calls;
    for (int i = 0; i < per_burst; ++i) calls.push_back(notify_one(pub, ch, "s" + std::to_string(++n), &rep.failed));
    for (auto& c : calls) loop.start(c);
    for (auto& c : calls) co_await std::move(c);
    co_await loop.sleep(2ms);
  }
  bool all = co_await wait_until(loop, [&] { return !a.got.empty() && a.got.back().id >= n; }, 20s);
  CHECK(all);
  bool acked = co_await wait_acked(loop, admin, ch, n);
  CHECK(acked);
  rep.ms = ms_since(t0);
  co_await admin->query("SELECT 1");
  rep.got = a.got;
  rep.errors = a.errors;
  co_await a.ps.destroy();
  co_await pub.close();
  co_await admin->close();
}

// ==== 11. misuse ====

struct misuse_report {
  std::string not_single, exec_lock, plain_tx, plain_long;
  bool not_single_invalid = false, exec_lock_invalid = false, plain_tx_logic = false, plain_long_length = false;
};

task<void> misuse_flow(event_loop& loop, std::string ch, misuse_report& rep) {
  auto o = durable_opts();
  o.single_listener = false;
  pubsub many(loop, o);
  co_await many.connect();
  try {
    co_await many.listen(ch);
  } catch (const std::invalid_argument& e) {
    rep.not_single = e.what();
    rep.not_single_invalid = true;
  }
  auto e = durable_opts();
  e.execution_lock = true;
  pubsub exec(loop, e);
  co_await exec.connect();
  try {
    co_await exec.listen(ch);
  } catch (const std::invalid_argument& ex) {
    rep.exec_lock = ex.what();
    rep.exec_lock_invalid = true;
  }
  pubsub plain(loop, pubsub_opts());
  try {
    plain.on_delivery_in_transaction([](const delivery&, pgiplock::connection&) -> task<void> { co_return; });
  } catch (const std::logic_error& ex) {
    rep.plain_tx = ex.what();
    rep.plain_tx_logic = true;
  }
  co_await plain.connect();
  try {
    co_await plain.notify(ch, std::string(8000, 'x'));
  } catch (const std::length_error& ex) {
    rep.plain_long = ex.what();
    rep.plain_long_length = true;
  }
  co_await many.close();
  co_await exec.close();
  co_await plain.close();
}

}  // namespace

TEST_CASE("durable: replayed from the journal, then live, in id order, large payloads read back", "[durable]") {
  cleanup guard;
  auto ch = fresh_channel("durable_basic");
  guard.channel(ch);
  event_loop loop;
  seen out;
  loop.run(basic_flow(loop, out, ch));
  REQUIRE(out.ids.size() == 102);
  for (std::size_t i = 0; i < out.ids.size(); ++i) CHECK(out.ids[i] == static_cast<std::int64_t>(i + 1));
  CHECK(out.payloads[0] == "before");
  CHECK(out.payloads[1] == "m0");
  CHECK(out.payloads[101] == std::string(20000, 'x'));
}

TEST_CASE("durable: publishers committing out of order behind a held transaction, two holders killed: ids in commit "
          "order, none skipped, all delivered",
          "[durable][order]") {
  cleanup guard;
  auto ch = fresh_channel("durable_order");
  guard.channel(ch);
  event_loop loop;
  order_report rep;
  loop.run(out_of_order_flow(loop, ch, rep));
  WARN("takeovers " << rep.takeover1_ms << " ms and " << rep.takeover2_ms << " ms after pg_terminate_backend; "
                    << rep.tenures << " tenures, " << rep.redelivered << " redelivered");
}

TEST_CASE("durable: a 64 MiB payload and 10 MB ones from SQL, byte-equal", "[durable][large]") {
  cleanup guard;
  auto ch = fresh_channel("durable_large");
  guard.channel(ch);
  event_loop loop;
  large_report rep;
  loop.run(large_flow(loop, ch, rep));
  CHECK(rep.ids == std::vector<std::int64_t>{1, 2, 3});
  CHECK(rep.sizes == std::vector<std::size_t>{std::size_t{64} << 20, 32 * 327680, 32 * 327680});
  CHECK(rep.equal == std::vector<bool>{true, true, true});
  WARN("64 MiB notify " << rep.notify64_ms << " ms; replay of 64 MiB + 10 MB " << rep.replay_ms << " ms; RSS "
                        << rep.rss_before_kib / 1024 << " MiB before, peak " << rep.peak_kib / 1024 << " MiB");
  if (rss_is_meaningful) CHECK(rep.peak_kib - rep.rss_before_kib < 1024 * 1024);
}

TEST_CASE("durable: every ASCII byte and UTF-8 of 1-4 bytes round-trip inline and via the journal; invalid UTF-8 "
          "and NUL are refused before sending",
          "[durable][bytes]") {
  cleanup guard;
  auto ch = fresh_channel("durable_bytes"), bad = fresh_channel("durable_bad");
  guard.channel(ch);
  guard.channel(bad);
  std::string small = every_byte_and_utf8(), large;
  while (large.size() <= 9000) large += small;
  std::vector<std::string> sent{small, large, small, large};
  std::vector<std::string> invalid{"\xff", std::string("ab\xc0\xaf"), "\xed\xa0\x80", "x\xe2\x82", "\xf4\x90\x80\x80",
                                   large + "\xff"};
  event_loop loop;
  bytes_report rep;
  loop.run(bytes_flow(loop, ch, bad, sent, invalid, rep));
  CHECK(rep.got == sent);
  REQUIRE(rep.durable_utf8.size() == invalid.size());
  for (std::size_t i = 0; i < invalid.size(); ++i) {
    INFO("invalid payload #" << i);
    CHECK(rep.durable_utf8[i].refused);
    CHECK_THAT(rep.durable_utf8[i].what, Catch::Contains("UTF-8"));
    if (invalid[i].size() >= 8000) continue;
    CHECK(rep.plain_utf8[i].refused);
    CHECK_THAT(rep.plain_utf8[i].what, Catch::Contains("UTF-8"));
  }
  CHECK_THAT(rep.durable_utf8[1].what, Catch::Contains("offset 2"));
  CHECK_THAT(rep.durable_utf8[5].what, Catch::Contains("offset " + std::to_string(large.size())));
  for (auto& r : rep.nul) {
    CHECK(r.refused);
    CHECK_THAT(r.what, Catch::Contains("NUL"));
  }
  CHECK(rep.bad_rows == 0);
  CHECK(rep.bad_counter == -1);  // no id drawn either
  CHECK(rep.good_id == 1);
}

TEST_CASE("durable: a trigger publishes as a transactional outbox: exactly the committed rows, in order",
          "[durable][outbox]") {
  cleanup guard;
  auto ch = fresh_channel("durable_outbox");
  auto table = fresh_channel("outbox");
  guard.channel(ch);
  guard.sql("DROP TABLE IF EXISTS " + table + "; DROP FUNCTION IF EXISTS " + table + "_fn()");
  event_loop loop;
  std::vector<std::string> got, committed;
  std::vector<std::int64_t> ids;
  loop.run(outbox_flow(loop, ch, table, got, committed, ids));
  REQUIRE(committed.size() == 6);
  CHECK_THAT(committed[2], Catch::Contains("three"));
  CHECK_THAT(committed[4], Catch::Contains("five"));
  CHECK_THAT(committed[5], Catch::Contains("six"));
  CHECK(got == committed);
  CHECK(ids == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6});
}

TEST_CASE("durable: a holder whose cursor another tenure took is refused, says so and stops; pgiplock_ack raises "
          "PGF01",
          "[durable][fence]") {
  cleanup guard;
  auto ch = fresh_channel("durable_fence");
  guard.channel(ch);
  event_loop loop;
  fence_report rep;
  loop.run(fence_flow(loop, ch, rep));
  CHECK(rep.token > 0);
  CHECK(rep.cursor_token == rep.token);
  CHECK(rep.acked_before == 3);
  // At least once: what it had in hand may still be delivered, never acknowledged.
  CHECK(rep.ids_after_bump.size() <= 3);
  for (std::size_t i = 0; i < rep.ids_after_bump.size(); ++i) CHECK(rep.ids_after_bump[i] == static_cast<std::int64_t>(4 + i));
  CHECK(rep.ids_after_fence.empty());
  CHECK(rep.acked_after == 3);
  std::string errors;
  for (auto& e : rep.errors) errors += e + "\n";
  INFO("on_error:\n" << errors);
  std::size_t replaced = 0;
  for (auto& e : rep.errors) {
    if (e.find("replaced") != std::string::npos) {
      ++replaced;
      CHECK_THAT(e, Catch::Contains("tenure " + std::to_string(rep.token)));
      CHECK_THAT(e, Catch::Contains(ch));
    }
  }
  CHECK(replaced >= 1);
  if (replaced > 1) WARN("the replaced tenure was reported " << replaced << " times");
  CHECK(rep.ack_sqlstate == "PGF01");
  CHECK_THAT(rep.ack_message, Catch::Contains("replaced"));
  CHECK(rep.ack_with_new_token);
}

TEST_CASE("durable: delivered but not acknowledged when the holder's backend dies: the standby delivers the same ids "
          "with the same payloads, nothing lost",
          "[durable][redelivery]") {
  cleanup guard;
  auto ch = fresh_channel("durable_redeliver");
  guard.channel(ch);
  event_loop loop;
  redelivery_report rep;
  loop.run(redelivery_flow(loop, ch, rep));
  CHECK(rep.acked_while_held == 5);
  REQUIRE(rep.a.size() == 15);
  for (std::size_t i = 0; i < rep.a.size(); ++i) {
    CHECK(rep.a[i].id == static_cast<std::int64_t>(i + 1));
    CHECK(rep.a[i].payload == rep.published[rep.a[i].id]);
  }
  REQUIRE(rep.b.size() == 15);
  for (std::size_t i = 0; i < rep.b.size(); ++i) {
    CHECK(rep.b[i].id == static_cast<std::int64_t>(i + 6));
    CHECK(rep.b[i].payload == rep.published[rep.b[i].id]);
    CHECK(rep.b[i].token == rep.b[0].token);
  }
  CHECK(rep.b[0].token > rep.a[0].token);
}

TEST_CASE("durable: effects written in the delivery's transaction happen exactly once across a takeover",
          "[durable][exactly-once]") {
  cleanup guard;
  auto ch = fresh_channel("durable_effects");
  auto table = fresh_channel("effects");
  guard.channel(ch);
  guard.sql("DROP TABLE IF EXISTS " + table);
  event_loop loop;
  effects_report rep;
  constexpr int total = 300;
  loop.run(exactly_once_flow(loop, ch, table, total, rep));
  std::string errors;
  for (auto& e : rep.errors_a) errors += "first holder: " + e + "\n";
  for (auto& e : rep.errors_b) errors += "second holder: " + e + "\n";
  INFO(errors);
  CHECK(rep.count == total);
  CHECK(rep.distinct == total);
  CHECK(rep.min == 1);
  CHECK(rep.max == total);
  CHECK(rep.wrong == 0);
  CHECK(rep.acked == total);
  // The killed holder may say that its transaction failed (its session
  // was terminated under it); no transaction ever meets an effect that
  // committed already, and the survivor's all commit.
  CHECK(errors.find("duplicate key") == std::string::npos);
  for (auto& e : rep.errors_b) CHECK(e.find("failed and is retried") == std::string::npos);
  WARN("handler calls: " << rep.calls_a << " by the first holder, " << rep.calls_b << " by the second ("
                         << rep.calls_a + rep.calls_b - total << " rolled back and run again); takeover "
                         << rep.takeover_ms << " ms");
}

TEST_CASE("durable: acknowledged slots are truncated, an idle channel's messages kept: the journal shrinks under "
          "10% of its peak",
          "[durable][retention]") {
  cleanup guard;
  auto ch = fresh_channel("durable_retention"), quiet = fresh_channel("durable_unheard");
  guard.channel(ch);
  guard.channel(quiet);
  event_loop loop;
  retention_report rep;
  loop.run(retention_flow(loop, ch, quiet, rep));
  WARN("journal " << rep.base / 1024 << " KiB before, " << rep.peak / 1024 << " KiB at its peak, " << rep.low / 1024
                  << " KiB " << rep.shrink_s << " s later; the idle channel's 3 rows: " << rep.quiet_in_backlog
                  << " in the backlog partition");
  CHECK((rep.low - rep.base) * 10 < rep.peak - rep.base);
  CHECK(rep.quiet_rows == 3);
  CHECK(rep.quiet_in_backlog == 3);
}

TEST_CASE("durable: a journal from an older pgiplock gets the backlog partition and the current functions",
          "[durable][retention][bootstrap]") {
  cleanup guard;
  auto ch = fresh_channel("durable_upgrade");
  guard.channel(ch);
  event_loop loop;
  journal_upgrade rep;
  loop.run(upgrade_old_journal(loop, ch, rep));
  CHECK_FALSE(rep.had_backlog);
  CHECK(rep.has_backlog);
  CHECK(rep.comment_after == std::string(pgiplock::detail::sql::journal_version));
  CHECK(rep.delivered_before == 2);
  CHECK(rep.payloads == "before the upgrade | after the upgrade | after an older member");
  CHECK(rep.listener_recreated);
  for (auto& e : rep.listener_errors) UNSCOPED_INFO("on_error: " << e);
  REQUIRE(rep.listener_errors.size() == 1);
  CHECK_THAT(rep.listener_errors[0], Catch::Contains("from another pgiplock version"));
}

TEST_CASE("durable: a takeover resumes inside a shared row, pages through it and past a large message's own row",
          "[durable][shared]") {
  cleanup guard;
  auto ch = fresh_channel("durable_shared"), other = fresh_channel("durable_shared_other");
  guard.channel(ch);
  guard.channel(other);
  event_loop loop;
  shared_rows_report rep;
  loop.run(replay_shared_rows(loop, ch, other, rep));
  INFO(rep.errors);
  CHECK(rep.rows == 7);  // 1,000 in rows of 256; the large one; 3; 2 beside another channel's
  CHECK(rep.shared == 6);
  REQUIRE(rep.got.size() == 606);
  for (std::size_t i = 0; i < rep.got.size(); ++i) {
    auto id = static_cast<std::int64_t>(401 + i);
    INFO("delivery " << i);
    CHECK(rep.got[i].id == id);
    CHECK(rep.got[i].payload == (id == 1001 ? std::string(9000, 'L') : "m" + std::to_string(id)));
  }
  CHECK(rep.errors.empty());
}

TEST_CASE("durable: a holder's destroy() acknowledges and returns without waiting handover_timeout for a successor",
          "[durable][release]") {
  cleanup guard;
  auto ch = fresh_channel("durable_release"), other = fresh_channel("durable_release_other");
  guard.channel(ch);
  guard.channel(other);
  event_loop loop;
  quick_release rep;
  loop.run(release_without_drain(loop, ch, other, rep));
  WARN("destroy() of the holder: " << rep.destroy_ms << " ms (handover_timeout " << durable_opts().handover_timeout.count()
                                    << " ms)");
  CHECK(rep.acked == 3);
  CHECK(rep.destroy_ms < durable_opts().handover_timeout.count() / 2);
}

TEST_CASE("durable: messages nobody listens to are kept while others are pruned, and delivered later; past "
          "durable_retention they go and the gap is reported",
          "[durable][retention]") {
  cleanup guard;
  auto quiet = fresh_channel("durable_quiet"), busy = fresh_channel("durable_busy");
  auto quiet2 = fresh_channel("durable_quiet"), busy2 = fresh_channel("durable_busy");
  for (auto* c : {&quiet, &busy, &quiet2, &busy2}) guard.channel(*c);
  event_loop loop;
  unheard_report rep;
  loop.run(unheard_flow(loop, quiet, busy, quiet2, busy2, rep));
  CHECK(rep.rows_kept == 5);
  REQUIRE(rep.kept.size() == 5);
  for (std::size_t i = 0; i < 5; ++i) {
    CHECK(rep.kept[i].id == static_cast<std::int64_t>(i + 1));
    CHECK(rep.kept[i].payload == "kept " + std::to_string(i + 1));
  }
  CHECK(rep.rows_dropped == 0);
  REQUIRE(rep.after_drop.size() == 1);
  CHECK(rep.after_drop[0].id == 6);
  CHECK(rep.after_drop[0].payload == "after the drop");
  REQUIRE(rep.drop_errors.size() == 1);
  CHECK_THAT(rep.drop_errors[0], Catch::Contains("messages 1..5") && Catch::Contains("no longer in the journal"));
}

TEST_CASE("durable: the journal truncated under a running listener: it keeps delivering, reports the gaps, never "
          "delivers an id twice",
          "[durable][truncate]") {
  cleanup guard;
  auto ch = fresh_channel("durable_truncate");
  guard.channel(ch);
  event_loop loop;
  truncate_report rep;
  loop.run(truncate_flow(loop, ch, rep));
  // Reported ranges.
  std::vector<std::pair<std::int64_t, std::int64_t>> gaps;
  for (auto& e : rep.errors) {
    UNSCOPED_INFO("on_error: " << e);
    if (auto gap = reported_range(e)) gaps.push_back(*gap);
  }
  std::set<std::int64_t> ids;
  std::size_t twice = 0, out_of_order = 0;
  for (std::size_t i = 0; i < rep.got.size(); ++i) {
    if (!ids.insert(rep.got[i].id).second) ++twice;
    if (i > 0 && rep.got[i].id <= rep.got[i - 1].id) ++out_of_order;
  }
  CHECK(twice == 0);
  CHECK(out_of_order == 0);
  CHECK(rep.last_id == 301);
  auto in_gap = [&](std::int64_t id) {
    return std::any_of(gaps.begin(), gaps.end(), [&](auto& g) { return id >= g.first && id <= g.second; });
  };
  std::size_t unexplained = 0, missing = 0;
  for (std::int64_t id = 1; id <= rep.last_id; ++id) {
    if (ids.count(id)) continue;
    ++missing;
    if (!in_gap(id)) ++unexplained;
  }
  CHECK(unexplained == 0);
  CHECK_FALSE(ids.count(rep.gap_id));
  CHECK(in_gap(rep.gap_id));
  // The producer's messages that came through came in its order.
  std::map<std::string, std::size_t> rank;
  for (std::size_t i = 0; i < rep.order_of_producer.size(); ++i) rank[rep.order_of_producer[i]] = i;
  std::size_t unknown = 0, reordered = 0, last = 0;
  bool first = true;
  for (auto& g : rep.got) {
    auto it = rank.find(g.payload);
    if (it == rank.end()) {
      ++unknown;
      continue;
    }
    if (!first && it->second <= last) ++reordered;
    last = it->second;
    first = false;
  }
  CHECK(unknown == 0);
  CHECK(reordered == 0);
  WARN(missing << " of " << rep.last_id << " not delivered (all reported as gaps: " << gaps.size() << " reports)");
}

TEST_CASE("durable: a plain peer hears the nudges: \"pgiplock#<id>:<payload>\" up to 7900 bytes, \"pgiplock#<id>\" beyond",
          "[durable][nudge]") {
  cleanup guard;
  auto ch = fresh_channel("durable_nudge");
  guard.channel(ch);
  std::string large = noise(20000, 3);
  event_loop loop;
  auto got = loop.run(nudges_flow(loop, ch, large));
  CHECK(got == std::vector<std::string>{"pgiplock#1:hello", "pgiplock#2", "pgiplock#3:a:b:c",
                                        "pgiplock#4:" + std::string(7900, 'y'), "pgiplock#5", "pgiplock#6:from sql"});
}

TEST_CASE("durable: misuse is refused: listen without single_listener or with the execution lock, a transaction "
          "handler on a plain pubsub; a plain payload over 7999 bytes points at durable channels",
          "[durable][misuse]") {
  cleanup guard;
  auto ch = fresh_channel("durable_misuse");
  guard.channel(ch);
  event_loop loop;
  misuse_report rep;
  loop.run(misuse_flow(loop, ch, rep));
  CHECK(rep.not_single_invalid);
  CHECK_THAT(rep.not_single, Catch::Contains("single_listener"));
  CHECK(rep.exec_lock_invalid);
  CHECK_THAT(rep.exec_lock, Catch::Contains("execution_lock"));
  CHECK(rep.plain_tx_logic);
  CHECK_THAT(rep.plain_tx, Catch::Contains("durable"));
  CHECK(rep.plain_long_length);
  CHECK_THAT(rep.plain_long, Catch::Contains("durable"));
}

// A regression test: journal::take_acks once compared the channel's last id
// as the acknowledgement read it with the stream's position when the result
// was processed, not when the statement went; deliveries in between made it
// conclude that the journal was re-created, and it delivered the channel
// again from id 1 (thousands of repeats here, in every run).
TEST_CASE("durable: a steady stream through one holder: every id once, in order, no spurious restart",
          "[durable][stream]") {
  cleanup guard;
  auto ch = fresh_channel("durable_stream");
  guard.channel(ch);
  event_loop loop;
  stream_report rep;
  constexpr int bursts = 50, per_burst = 200, total = bursts * per_burst;
  loop.run(stream_flow(loop, ch, bursts, per_burst, rep));
  CHECK(rep.failed == 0);
  std::size_t twice = 0, out_of_order = 0, wrong = 0;
  std::set<std::int64_t> ids;
  for (std::size_t i = 0; i < rep.got.size(); ++i) {
    auto& g = rep.got[i];
    if (!ids.insert(g.id).second) ++twice;
    if (i > 0 && g.id <= rep.got[i - 1].id) ++out_of_order;
    if (g.payload != "s" + std::to_string(g.id)) ++wrong;
  }
  CHECK(ids.size() == static_cast<std::size_t>(total));
  std::string errors;
  for (auto& e : rep.errors) errors += e + "\n";
  INFO("on_error:\n" << errors);
  CHECK(twice == 0);
  CHECK(out_of_order == 0);
  CHECK(wrong == 0);
  CHECK(rep.errors.empty());
  WARN(total << " messages delivered and acknowledged in " << rep.ms << " ms; " << rep.got.size() << " deliveries, "
             << twice << " of them repeated");
}

// ==== plain notifications on a durable channel ====

// A plain NOTIFY on a durable channel is not a message of the channel, even
// when it looks like the id of one (a Node notify() of a number): the
// holder delivers only what the journal holds, ids and payloads intact.
task<std::vector<got_msg>> plain_noise_flow(event_loop& loop, std::string ch) {
  recorder holder(loop, durable_opts(), ch);
  co_await start(holder);
  pubsub plain(loop, plain_opts()), pub(loop, durable_opts());
  co_await plain.connect();
  co_await pub.connect();
  for (const char* noise : {"1", "2:forged", "pgiplock", "pgiplock#x", "3"}) co_await plain.notify(ch, noise);
  co_await pub.notify(ch, "real one");
  co_await plain.notify(ch, "1:forged again");
  co_await pub.notify(ch, "real two");
  bool two = co_await wait_until(loop, [&] { return holder.got.size() >= 2; }, 5s);
  CHECK(two);
  co_await loop.sleep(200ms);  // what else would come, comes now
  auto out = holder.got;
  co_await plain.close();
  co_await pub.close();
  co_await holder.ps.destroy();
  co_return out;
}

TEST_CASE("durable: plain notifications on the channel, numbers too, are not taken for messages", "[durable][nudge]") {
  event_loop loop;
  auto got = loop.run(plain_noise_flow(loop, fresh_channel("durable_noise")));
  REQUIRE(got.size() == 2);
  CHECK(got[0].id == 1);
  CHECK(got[0].payload == "real one");
  CHECK(got[1].id == 2);
  CHECK(got[1].payload == "real two");
}
