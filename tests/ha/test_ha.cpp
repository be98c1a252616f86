// The HA suite: pgiplock against a PostgreSQL that fails over. tests/ha/run.sh
// starts the set-up (tools/lib/ha.sh: a primary with a streaming replica, or
// a Patroni cluster on etcd), exports PGIPLOCK_HA_* and runs this program;
// the failover itself goes through tests/ha/ctl.sh (PGIPLOCK_HA_CTL).
//
// [promote] / [patroni]: three member processes (ha_member.cpp: a plain and
// a durable single-listener pubsub each) and two publishers in this process
// (one per channel, a numbered message every millisecond), all on the
// multi-host conninfo. The primary is stopped with `-m immediate` and the
// replica promoted with `pg_ctl promote` half a second later (with
// PGIPLOCK_HA_LAG_MS, the replica is cut off from the primary that long
// before), or Patroni's leader (its patroni and postmaster) is SIGKILLed and
// Patroni promotes the other node. Measured from the moment the new primary
// first answers a session as read-write (a poller on its port): the first
// holder and the first delivery on each channel. Counted: messages lost
// (notify() returned, never delivered: at-most-once on the plain channel;
// 0 on the durable one with synchronous replication), delivered twice,
// journal ids delivered for two different messages, the fencing tokens
// before and after, and the holders once it settled (exactly one per
// channel, by deliveries and by lock rows). One line per failover starts
// with HA-ROW (docs/failover.md's figures); with PGIPLOCK_HA_TRACE set, the
// members log everything and the new primary's lock waits are sampled.
//
// [bad-input]: conninfos a user of an HA cluster gets wrong; [silent-host]
// (may fail: a known limit, see docs/failover.md) a host that never answers
// listed before the primary.
#include "../child_process.hpp"

#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <map>
#include <set>
#include <sstream>
#include <thread>

extern const bool test_needs_database = false;

std::string test_skip_reason() {
  if (!std::getenv("PGIPLOCK_HA_DSN")) {
    return "PGIPLOCK_HA_DSN is not set (tests/ha/run.sh starts a primary and a replica, or Patroni, and sets it)";
  }
  return {};
}

using namespace test;
using pgiplock::pubsub;

namespace {

std::string ha_dsn() { return env_or("PGIPLOCK_HA_DSN"); }
bool synchronous() { return env_or("PGIPLOCK_HA_SYNC") == "1"; }
// PGIPLOCK_HA_LAG_MS (pair): the replica is cut off from the primary this
// long before the primary dies, so it is that far behind when promoted.
long lag_ms() { return std::atol(env_or("PGIPLOCK_HA_LAG_MS", "0").c_str()); }
std::string node_dsn(const std::string& port) {
  return "host=127.0.0.1 port=" + port + " user=postgres dbname=postgres";
}
double ms_between(long long from_ns, long long to_ns) { return static_cast<double>(to_ns - from_ns) / 1e6; }

// ==== the fleet: member processes and what they said =========================

struct ha_delivery {
  int member;
  char which;  // 'P' plain, 'D' durable
  long n;
  long long t, id;
};
struct ha_hold {
  int member;
  char which;
  long long t, token;
};

struct ha_fleet {
  event_loop& loop;
  std::string plain, durable;
  std::vector<std::unique_ptr<child_process>> members;
  std::vector<int> ready;  // READY lines per member (P and D)
  std::vector<ha_delivery> deliveries;
  std::vector<ha_hold> holds;
  std::vector<std::string> errors;  // ERROR and WARN lines, for the report
  std::vector<std::pair<long long, std::string>> events;  // every line but MSG, by its stamp
  int reconnects = 0;
  int readers = 0;

  ha_fleet(event_loop& l, std::string stem) : loop(l), plain(fresh_channel(stem + "_p")), durable(fresh_channel(stem + "_d")) {}

  void start(int count) {
    for (int k = 0; k < count; ++k) {
      int i = static_cast<int>(members.size());
      members.push_back(std::make_unique<child_process>(
          std::vector<std::string>{env_or("PGIPLOCK_HA_MEMBER"), ha_dsn(), plain, durable, "--retry", "100"}));
      ready.push_back(0);
      ++readers;
      loop.spawn(read(i));
    }
  }

  task<void> read(int i) {
    auto& m = *members[static_cast<std::size_t>(i)];
    for (;;) {
      auto line = co_await m.read_line(loop, 200ms);
      if (!line) {
        if (m.at_eof()) break;
        continue;
      }
      std::istringstream in(*line);
      std::string kind;
      char which = '?';
      in >> kind >> which;
      if (kind == "READY") ++ready[static_cast<std::size_t>(i)];
      if (kind == "HOLD") {
        ha_hold h{i, which, 0, 0};
        in >> h.t >> h.token;
        holds.push_back(h);
      }
      if (kind == "MSG") {
        ha_delivery d{i, which, 0, 0, 0};
        in >> d.n >> d.t >> d.id;
        deliveries.push_back(d);
      }
      if (kind != "MSG" && kind != "READY") {
        long long t = 0;
        std::istringstream again(*line);
        std::string k;
        char w;
        again >> k >> w >> t;
        events.emplace_back(t, std::to_string(i) + " " + *line);
      }
      if (kind == "RECONNECT") ++reconnects;
      if (kind == "ERROR" || kind == "WARN") errors.push_back(std::to_string(i) + ": " + *line);
    }
    --readers;
  }

  task<bool> settled(std::chrono::milliseconds limit) {
    co_return co_await wait_until(loop, [&] {
      std::set<char> held;
      for (auto& h : holds) held.insert(h.which);
      for (int r : ready) {
        if (r < 2) return false;
      }
      return held.size() == 2;
    }, limit);
  }

  std::optional<long long> first_delivery_after(char which, long long t) const {
    std::optional<long long> first;
    for (auto& d : deliveries) {
      if (d.which == which && d.t > t && (!first || d.t < *first)) first = d.t;
    }
    return first;
  }
  std::optional<long long> first_hold_after(char which, long long t) const {
    std::optional<long long> first;
    for (auto& h : holds) {
      if (h.which == which && h.t > t && (!first || h.t < *first)) first = h.t;
    }
    return first;
  }
  std::set<int> deliverers_after(char which, long long t) const {
    std::set<int> out;
    for (auto& d : deliveries) {
      if (d.which == which && d.t > t) out.insert(d.member);
    }
    return out;
  }

  task<void> stop() {
    for (auto& m : members) m->signal(SIGKILL);
    co_await wait_until(loop, [&] { return readers == 0; }, 5s);
  }
};

// ==== publishers =============================================================

// One numbered message per millisecond, on a fixed schedule: each is sent
// without waiting for the one before (notify() calls in flight together
// share a transaction), at most `cap` in flight (a tick that finds them all
// busy sends nothing: the rate drops to what the server commits). Every
// attempt made while connected gets a number of its own, so one whose
// notify() threw is never sent again under the same number.
struct publisher {
  enum state : char { in_doubt, confirmed };
  std::vector<char> states;
  std::vector<long long> at;  // when notify() returned or threw
  std::vector<long long> issued;  // when notify() was called
  long refused = 0;           // not connected: nothing sent
  long skipped = 0;           // ticks that found `cap` notify() calls in flight
  int in_flight = 0;
  static constexpr int cap = 32;
  bool running = true;
  bool done = false;
};

task<void> send_one(pubsub& ps, std::string channel, publisher& p, long n) {
  try {
    co_await ps.notify(channel, std::to_string(n));
    p.states[static_cast<std::size_t>(n)] = publisher::confirmed;
  } catch (const std::exception&) {
    // in doubt: the link went while it was on its way
  }
  p.at[static_cast<std::size_t>(n)] = now_ns();
  --p.in_flight;
}

task<void> publish(event_loop& loop, pubsub& ps, std::string channel, publisher& p) {
  auto start = clock::now();
  for (long tick = 1; p.running; ++tick) {
    if (!ps.client() || !ps.client()->is_open()) {
      ++p.refused;
    } else if (p.in_flight >= publisher::cap) {
      ++p.skipped;
    } else {
      long n = static_cast<long>(p.states.size());
      p.states.push_back(publisher::in_doubt);
      p.at.push_back(0);
      p.issued.push_back(now_ns());
      ++p.in_flight;
      loop.spawn(send_one(ps, channel, p, n));
    }
    auto next = start + tick * 1ms;
    if (auto now = clock::now(); next > now) co_await loop.sleep(next - now);
  }
  co_await wait_until(loop, [&] { return p.in_flight == 0; }, 10s);
  p.done = true;
}

// ==== when the new primary first answers as read-write =======================

// A thread with a blocking libpq session on the node that is to be promoted:
// `SELECT pg_is_in_recovery()` every millisecond (a session stays open across
// a promotion; if it breaks, a new one), the first 'f' stamped.
class writable_poller {
 public:
  explicit writable_poller(std::string conninfo) : conninfo_(std::move(conninfo) + " connect_timeout=2") {
    thread_ = std::thread([this] { run(); });
  }
  ~writable_poller() {
    stop_ = true;
    thread_.join();
  }
  long long at() const { return at_.load(); }

 private:
  void run() {
    PGconn* c = nullptr;
    while (!stop_ && at_ == 0) {
      if (!c || PQstatus(c) != CONNECTION_OK) {
        if (c) PQfinish(c);
        c = PQconnectdb(conninfo_.c_str());
      }
      if (PQstatus(c) == CONNECTION_OK) {
        PGresult* r = PQexec(c, "SELECT pg_is_in_recovery()");
        bool writable = PQresultStatus(r) == PGRES_TUPLES_OK && std::string(PQgetvalue(r, 0, 0)) == "f";
        PQclear(r);
        if (writable) at_ = now_ns();
      }
      std::this_thread::sleep_for(1ms);
    }
    if (c) PQfinish(c);
  }

  std::string conninfo_;
  std::atomic<bool> stop_{false};
  std::atomic<long long> at_{0};
  std::thread thread_;
};

// With PGIPLOCK_HA_TRACE: what the new primary's sessions wait for, every
// 100 ms for 3 s after it answered read-write (stderr).
void sample_waits(std::string conninfo, long long from) {
  PGconn* c = PQconnectdb((conninfo + " connect_timeout=2").c_str());
  for (int i = 0; i < 30 && PQstatus(c) == CONNECTION_OK; ++i) {
    PGresult* r = PQexec(c,
                         "SELECT pid, application_name, wait_event_type || ':' || wait_event, "
                         "left(regexp_replace(query, '\\s+', ' ', 'g'), 100), "
                         "(SELECT string_agg(DISTINCT l.locktype || '/' || l.mode || coalesce('/' || l.relation::regclass::text, ''), ',') "
                         "FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted) || ' blocked by ' || "
                         "coalesce((SELECT string_agg(b.pid || ' ' || b.state || ' ' || left(b.query, 60), '; ') "
                         "FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(a.pid))), '?') "
                         "FROM pg_stat_activity a WHERE state = 'active' AND pid <> pg_backend_pid() "
                         "AND backend_type = 'client backend' AND wait_event_type IS NOT NULL "
                         "AND wait_event_type <> 'Client'");
    for (int k = 0; PQresultStatus(r) == PGRES_TUPLES_OK && k < PQntuples(r); ++k) {
      std::fprintf(stderr, "waits %+.0f ms: pid %s %s %s [%s] %s\n", ms_between(from, now_ns()), PQgetvalue(r, k, 0),
                   PQgetvalue(r, k, 1), PQgetvalue(r, k, 2), PQgetvalue(r, k, 4), PQgetvalue(r, k, 3));
    }
    PQclear(r);
    std::this_thread::sleep_for(100ms);
  }
  PQfinish(c);
}

// tests/ha/ctl.sh ACTION, without blocking the loop; its output and status.
struct ctl_result {
  int status = -1;
  std::string output;
  long long started = 0, ended = 0;
};
task<ctl_result> ctl(event_loop& loop, std::string action) {
  ctl_result out;
  out.started = now_ns();
  child_process p({"bash", env_or("PGIPLOCK_HA_CTL"), action});
  p.close_stdin();
  for (;;) {
    auto line = co_await p.read_line(loop, 60s);
    if (!line) break;
    out.output += *line + "\n";
  }
  auto st = co_await p.wait_exit(loop, 60s);
  out.ended = now_ns();
  out.status = st && WIFEXITED(*st) ? WEXITSTATUS(*st) : -1;
  co_return out;
}

// ==== one failover ===========================================================

enum class how { promote, patroni };

struct channel_figures {
  double first_delivery_ms = -1;  // after the new primary answered read-write
  double first_hold_ms = -1;
  long sent = 0, confirmed = 0, in_doubt = 0;
  long skipped = 0;  // ticks with publisher::cap calls in flight already
  std::string lost_detail;  // the first lost messages, one line each
  std::string conflict_detail;  // the first ids given to two messages
  double notify_median_ms = 0, notify_p99_ms = 0;  // notify() latency before the crash
  double doubt_from_ms = 0, doubt_to_ms = 0;  // when the in-doubt notify() calls threw, from the crash
  long lost = 0;             // confirmed, never delivered
  long lost_before = 0;      // ... of those, confirmed before the crash
  long duplicated = 0;       // deliveries of a message beyond its first
  long redelivered_ids = 0;  // durable: ids delivered more than once
  double redelivery_window_ms = 0;  // durable: the oldest first delivery of a redelivered id, before the crash
  long id_conflicts = 0;     // durable: an id for two messages, or a message under two ids
  long long token_before = 0, token_after = 0;  // max before the crash, min after the promotion
  std::set<int> final_deliverers;
  long lock_rows = -1, live_lock_rows = -1;
};

struct failover_figures {
  double down_to_writable_ms = -1;  // the crash to the new primary answering read-write
  double promote_ms = -1;           // pg_ctl promote's own time (promote only)
  double crash_seen_ms = 0;         // the crash command to the members' first "connection lost"
  channel_figures plain, durable;
  int reconnects = 0;
  long server_errors = 0, deadlocks = 0;  // ERROR lines in the new primary's log
  std::vector<std::string> errors;
  std::string timeline;  // the members' events from the crash on, in ms after the promotion
};

void count_channel(const ha_fleet& fl, const publisher& p, char which, long long crash, channel_figures& out) {
  std::map<long, int> seen;
  std::map<long long, int> ids;
  std::map<long long, std::set<long>> messages_of;  // id -> message numbers
  std::map<long, std::set<long long>> ids_of;       // message number -> ids
  std::map<long long, long long> first_at;          // id -> its first delivery
  for (auto& d : fl.deliveries) {
    if (d.which != which) continue;
    ++seen[d.n];
    if (!d.id) continue;
    ++ids[d.id];
    messages_of[d.id].insert(d.n);
    ids_of[d.n].insert(d.id);
    if (!first_at.count(d.id)) first_at[d.id] = d.t;
  }
  for (auto& [id, ns] : messages_of) {
    if (ns.size() < 2) continue;
    ++out.id_conflicts;
    if (out.conflict_detail.size() > 1500) continue;
    out.conflict_detail += "  id " + std::to_string(id) + ":";
    for (long n : ns) {
      auto i = static_cast<std::size_t>(n);
      long long first = 0;
      for (auto& d : fl.deliveries) {
        if (d.which == which && d.n == n && d.id == id && (!first || d.t < first)) first = d.t;
      }
      char part[200];
      std::snprintf(part, sizeof part, " message %ld (notify() %s %+.1f ms, delivered %+.1f ms after the crash)", n,
                    i < p.states.size() && p.states[i] == publisher::confirmed ? "returned" : "threw",
                    i < p.at.size() ? ms_between(crash, p.at[i]) : 0.0, ms_between(crash, first));
      out.conflict_detail += part;
    }
    out.conflict_detail += "\n";
  }
  for (auto& [n, is] : ids_of) out.id_conflicts += is.size() > 1;
  out.sent = static_cast<long>(p.states.size());
  out.skipped = p.skipped;
  for (long n = 0; n < out.sent; ++n) {
    auto i = static_cast<std::size_t>(n);
    if (p.states[i] != publisher::confirmed) {
      ++out.in_doubt;
      double rel = ms_between(crash, p.at[i]);
      if (out.in_doubt == 1 || rel < out.doubt_from_ms) out.doubt_from_ms = rel;
      if (out.in_doubt == 1 || rel > out.doubt_to_ms) out.doubt_to_ms = rel;
      continue;
    }
    ++out.confirmed;
    if (!seen.count(n)) {
      ++out.lost;
      if (p.at[i] < crash) ++out.lost_before;
      if (out.lost_detail.size() < 600) {
        char line[160];
        std::snprintf(line, sizeof line, "  message %ld: notify() called %+.1f ms, returned %+.1f ms after the crash\n",
                      n, ms_between(crash, p.issued[i]), ms_between(crash, p.at[i]));
        out.lost_detail += line;
      }
    }
  }
  for (auto& [n, k] : seen) out.duplicated += k - 1;
  std::vector<double> latency;  // notify() of the confirmed messages before the crash
  for (std::size_t i = 0; i < p.states.size(); ++i) {
    if (p.states[i] == publisher::confirmed && p.at[i] < crash) latency.push_back(ms_between(p.issued[i], p.at[i]));
  }
  std::sort(latency.begin(), latency.end());
  if (!latency.empty()) {
    out.notify_median_ms = latency[latency.size() / 2];
    out.notify_p99_ms = latency[latency.size() * 99 / 100];
  }
  for (auto& [id, k] : ids) {
    if (k < 2) continue;
    ++out.redelivered_ids;
    out.redelivery_window_ms = std::max(out.redelivery_window_ms, ms_between(first_at[id], crash));
  }
  for (auto& h : fl.holds) {
    if (h.which != which) continue;
    if (h.t < crash) out.token_before = std::max(out.token_before, h.token);
    else if (out.token_after == 0 || h.token < out.token_after) out.token_after = h.token;
  }
}

// Lock rows of a channel on the new primary, and how many name a live session.
task<std::pair<long, long>> lock_rows(event_loop& loop, std::string channel) {
  auto c = co_await pgiplock::connection::connect(loop, ha_dsn());
  std::string schema = lock_schema(*c);
  auto all = co_await scalar(c, "SELECT count(*) FROM " + schema + ".lock WHERE channel = $1", "__PgIpLock__:" + channel);
  auto live = co_await scalar(c,
                              "SELECT count(*) FROM " + schema + ".lock l WHERE channel = $1 AND EXISTS "
                              "(SELECT 1 FROM pg_stat_activity a WHERE a.application_name = l.app)",
                              "__PgIpLock__:" + channel);
  co_await c->close();
  co_return std::pair<long, long>{std::stol(all), std::stol(live)};
}

task<failover_figures> one_failover(event_loop& loop, how h) {
  failover_figures out;
  ha_fleet fl(loop, h == how::promote ? "ha_promote" : "ha_patroni");
  fl.start(3);
  bool up = co_await fl.settled(30s);
  INFO(fl.errors.size() << " errors/warnings; first: " << (fl.errors.empty() ? "" : fl.errors.front()));
  REQUIRE(up);

  pgiplock::pubsub_options po;
  po.conninfo = ha_dsn();
  pubsub plain_pub(loop, po);
  po.durable = true;
  pubsub durable_pub(loop, po);
  co_await plain_pub.connect();
  co_await durable_pub.connect();
  publisher pp, dp;
  loop.spawn(publish(loop, plain_pub, fl.plain, pp));
  loop.spawn(publish(loop, durable_pub, fl.durable, dp));
  co_await wait_until(loop, [&] {
    long p = 0, d = 0;
    for (auto& x : fl.deliveries) (x.which == 'P' ? p : d) += 1;
    return p >= 300 && d >= 300;
  }, 10s);

  // The node that is to become the primary, polled from before the crash.
  std::string survivor;
  if (h == how::promote) {
    survivor = env_or("PGIPLOCK_HA_REPLICA_PORT");
  } else {
    auto leader = co_await ctl(loop, "leader");
    REQUIRE(leader.status == 0);
    std::istringstream in(leader.output);
    std::string name, port;
    in >> name >> port;
    std::istringstream ports(env_or("PGIPLOCK_HA_PORTS"));
    for (std::string p; ports >> p;) {
      if (p != port) survivor = p;
    }
  }
  REQUIRE(!survivor.empty());
  writable_poller poller(node_dsn(survivor));

  if (h == how::promote && lag_ms() > 0) {
    auto cut = co_await ctl(loop, "cut-replication");
    INFO(cut.output);
    REQUIRE(cut.status == 0);
    co_await loop.sleep(std::chrono::milliseconds(lag_ms()));
  }
  long long crash = now_ns();
  if (h == how::promote) {
    auto stop = co_await ctl(loop, "stop-primary");
    REQUIRE(stop.status == 0);
    co_await loop.sleep(500ms);  // a failover manager's detection time, at its shortest
    auto promote = co_await ctl(loop, "promote");
    REQUIRE(promote.status == 0);
    out.promote_ms = ms_between(promote.started, promote.ended);
  } else {
    auto kill = co_await ctl(loop, "kill-leader");
    INFO(kill.output);
    REQUIRE(kill.status == 0);
  }
  bool writable = co_await wait_until(loop, [&] { return poller.at() != 0; }, 30s);
  REQUIRE(writable);
  long long promoted = poller.at();
  out.down_to_writable_ms = ms_between(crash, promoted);
  std::jthread sampler;
  if (std::getenv("PGIPLOCK_HA_TRACE")) sampler = std::jthread(sample_waits, node_dsn(survivor), promoted);

  co_await wait_until(loop, [&] {
    return fl.first_delivery_after('P', promoted) && fl.first_delivery_after('D', promoted);
  }, 10s);
  co_await loop.sleep(2s);
  if (sampler.joinable()) sampler.join();
  long long window = now_ns();
  co_await loop.sleep(1s);
  pp.running = dp.running = false;
  co_await wait_until(loop, [&] { return pp.done && dp.done; }, 15s);
  // Durable: what was confirmed comes, however late (catching up): until
  // all of it is there, or nothing more came for a second (lost for good).
  std::size_t seen_count = 0;
  auto quiet_since = clock::now();
  co_await wait_until(loop, [&] {
    if (fl.deliveries.size() != seen_count) {
      seen_count = fl.deliveries.size();
      quiet_since = clock::now();
    }
    if (clock::now() - quiet_since > 1s) return true;
    std::set<long> seen;
    for (auto& d : fl.deliveries) {
      if (d.which == 'D') seen.insert(d.n);
    }
    for (std::size_t n = 0; n < dp.states.size(); ++n) {
      if (dp.states[n] == publisher::confirmed && !seen.count(static_cast<long>(n))) return false;
    }
    return true;
  }, 10s);
  co_await loop.sleep(200ms);

  // The crash as the members saw it: their first "connection lost" (the
  // command that stops the server takes a while to start).
  long long lost_at = 0;
  for (auto& [t, line] : fl.events) {
    if (t >= crash && line.find(" ERROR ") != std::string::npos && (!lost_at || t < lost_at)) lost_at = t;
  }
  if (!lost_at) lost_at = crash;
  out.crash_seen_ms = ms_between(crash, lost_at);
  for (auto [which, pub, figures] : {std::tuple{'P', &pp, &out.plain}, std::tuple{'D', &dp, &out.durable}}) {
    count_channel(fl, *pub, which, lost_at, *figures);
    if (auto t = fl.first_delivery_after(which, promoted)) figures->first_delivery_ms = ms_between(promoted, *t);
    if (auto t = fl.first_hold_after(which, promoted)) figures->first_hold_ms = ms_between(promoted, *t);
    figures->final_deliverers = fl.deliverers_after(which, window);
    auto rows = co_await lock_rows(loop, which == 'P' ? fl.plain : fl.durable);
    figures->lock_rows = rows.first;
    figures->live_lock_rows = rows.second;
  }
  out.reconnects = fl.reconnects;
  out.errors = fl.errors;
  // What the new primary logged: ERRORs (a deadlock between members' claims
  // shows here).
  std::string server_log = env_or("PGIPLOCK_HA_REPLICA_LOG");
  if (h == how::patroni) {  // Patroni's postgres logs to Patroni's stderr
    for (const char* i : {"1", "2"}) {
      if (env_or((std::string("PGIPLOCK_HA_NODE") + i + "_PORT").c_str()) == survivor) {
        server_log = env_or((std::string("PGIPLOCK_HA_NODE") + i + "_LOG").c_str());
      }
    }
  }
  {
    std::istringstream log(read_file(server_log));
    for (std::string line; std::getline(log, line);) {
      if (line.find("ERROR:") == std::string::npos) continue;
      ++out.server_errors;
      out.deadlocks += line.find("deadlock detected") != std::string::npos;
      if (out.server_errors <= 5) out.timeline += "server: " + line.substr(0, 200) + "\n";
    }
  }
  std::sort(fl.events.begin(), fl.events.end());
  for (auto& [t, line] : fl.events) {
    if (t < crash) continue;
    char at[32];
    std::snprintf(at, sizeof at, "%+9.1f ms  ", ms_between(promoted, t));
    out.timeline += at + line.substr(0, 160) + "\n";
  }
  {
    char at[64];
    std::snprintf(at, sizeof at, "%+9.1f ms  (crash)\n", ms_between(promoted, crash));
    out.timeline = at + out.timeline;
  }
  co_await fl.stop();
  co_await plain_pub.close();
  co_await durable_pub.close();
  co_return out;
}

std::string row(const char* scenario, const failover_figures& f) {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << "HA-ROW | " << scenario << " | " << (synchronous() ? "sync" : "async");
  if (lag_ms() > 0 && f.promote_ms >= 0) o << ", replica " << lag_ms() << " ms behind";
  o << " | crash->writable " << f.down_to_writable_ms << " ms";
  if (f.promote_ms >= 0) o << " (pg_ctl promote " << f.promote_ms << " ms)";
  for (auto [name, c] : {std::pair{"plain", &f.plain}, std::pair{"durable", &f.durable}}) {
    o << " | " << name << ": notify() " << c->notify_median_ms << " ms median, " << c->notify_p99_ms
      << " ms p99 before the crash; holder " << c->first_hold_ms << " ms, first delivery " << c->first_delivery_ms
      << " ms; sent " << c->sent << " (" << c->skipped << " ticks skipped), confirmed " << c->confirmed
      << ", in doubt " << c->in_doubt << " (threw " << c->doubt_from_ms << ".." << c->doubt_to_ms
      << " ms after the crash), lost " << c->lost << " (" << c->lost_before << " before the crash), twice "
      << c->duplicated;
    if (name == std::string("durable")) {
      o << ", ids redelivered " << c->redelivered_ids << " (first delivered up to " << c->redelivery_window_ms
        << " ms before the crash), id conflicts " << c->id_conflicts;
    }
    o << ", tokens " << c->token_before << " -> " << c->token_after << ", deliverers at the end "
      << c->final_deliverers.size() << ", lock rows " << c->lock_rows << " (live " << c->live_lock_rows << ")";
  }
  o << " | reconnects " << f.reconnects;
  o << ", server ERRORs " << f.server_errors << " (deadlocks " << f.deadlocks << ")";
  return o.str();
}

void check_failover(const char* scenario, const failover_figures& f) {
  std::string r = row(scenario, f);
  std::printf("%s\n", r.c_str());
  std::fflush(stdout);
  WARN(r);
  INFO("the members' events, in ms after the new primary answered read-write:\n" << f.timeline);
  if (f.durable.id_conflicts) {
    std::printf("HA-CONFLICT durable (an id delivered for two messages):\n%s", f.durable.conflict_detail.c_str());
  }
  if (f.durable.lost) {
    std::printf("HA-LOST durable (confirmed, never delivered; the crash is the members' first \"connection lost\"):\n%s",
                f.durable.lost_detail.c_str());
  }
  if (std::getenv("PGIPLOCK_HA_TRACE")) std::printf("%s", f.timeline.c_str());
  const double target_ms = 100 + 1000;  // retry_delay + 1 s
  for (auto* c : {&f.plain, &f.durable}) {
    CHECK(c->first_delivery_ms >= 0);
    CHECK(c->first_delivery_ms <= target_ms);
    CHECK(c->final_deliverers.size() == 1);
    CHECK(c->lock_rows == 1);
    CHECK(c->live_lock_rows == 1);
  }
  CHECK(f.plain.duplicated == 0);
  // An id given to two messages: the old primary made a message visible
  // that never reached the replica (asynchronous replication; or, even
  // with synchronous replication, a commit left waiting for the standby
  // when its server died: PostgreSQL commits it locally, its notify()
  // fails, the holder may deliver it), and the promoted node numbered the
  // next message the same. Measured and reported (docs/failover.md), not a
  // target of the issue.
  if (f.durable.id_conflicts) {
    WARN(f.durable.id_conflicts << " journal ids delivered for two different messages:\n" << f.durable.conflict_detail);
  }
  if (synchronous()) {
    CHECK(f.durable.lost == 0);
    // At least once: what comes again is what was delivered but not yet
    // acknowledged (acknowledgements are paced at 5 ms) when the primary died.
    CHECK(f.durable.redelivery_window_ms <= 1000);
    CHECK(f.plain.token_after > f.plain.token_before);
    CHECK(f.durable.token_after > f.durable.token_before);
  } else {
    if (f.durable.lost) WARN("asynchronous replication: " << f.durable.lost << " confirmed durable messages lost");

    if (f.plain.token_after <= f.plain.token_before || f.durable.token_after <= f.durable.token_before) {
      WARN("asynchronous replication: a fencing token after the promotion is not above the last one before it");
    }
  }
}

}  // namespace

TEST_CASE("primary stopped (immediate), replica promoted (pg_ctl): one holder per channel within retry_delay + 1 s",
          "[promote]") {
  if (env_or("PGIPLOCK_HA_KIND") != "pair") {
    WARN("not a primary/replica pair (PGIPLOCK_HA_KIND=" << env_or("PGIPLOCK_HA_KIND") << ")");
    return;
  }
  event_loop loop;
  auto f = loop.run(one_failover(loop, how::promote));
  check_failover("pg_ctl promote", f);
}

TEST_CASE("Patroni fails over (the leader's patroni and postgres SIGKILLed): one holder per channel within "
          "retry_delay + 1 s of the new leader",
          "[patroni]") {
  if (env_or("PGIPLOCK_HA_KIND") != "patroni") {
    WARN("not a Patroni cluster (PGIPLOCK_HA_KIND=" << env_or("PGIPLOCK_HA_KIND") << ")");
    return;
  }
  event_loop loop;
  auto f = loop.run(one_failover(loop, how::patroni));
  check_failover("Patroni", f);
}

// ==== bad input ==============================================================

namespace {

// A TCP port on 127.0.0.1 that nothing listens on (bound, then closed).
int closed_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(s);
  return ntohs(a.sin_port);
}

// Which server a conninfo reaches: its port, or what connect() threw.
task<std::string> reached(event_loop& loop, std::string conninfo, double& ms) {
  auto t0 = clock::now();
  std::string out;
  try {
    auto c = co_await pgiplock::connection::connect(loop, conninfo);
    out = "port " + co_await scalar(c, "SELECT current_setting('port')") + ", in recovery " +
          co_await scalar(c, "SELECT pg_is_in_recovery()");
    co_await c->close();
  } catch (const std::exception& e) {
    out = std::string("error: ") + e.what();
  }
  ms = ms_since(t0);
  co_return out;
}

}  // namespace

TEST_CASE("bad input: standbys, unreachable hosts, mismatched lists", "[bad-input]") {
  if (env_or("PGIPLOCK_HA_KIND") != "pair") {
    WARN("needs a primary/replica pair (PGIPLOCK_HA_KIND=pair)");
    return;
  }
  std::string primary = env_or("PGIPLOCK_HA_PRIMARY_PORT"), standby = env_or("PGIPLOCK_HA_REPLICA_PORT");
  const std::string who = " user=postgres dbname=postgres";
  event_loop loop;

  SECTION("a single host that is a hot standby: connection_error saying so, at once") {
    auto r = loop.run(try_connect(loop, node_dsn(standby)));
    WARN("standby alone: " << r.ms << " ms: " << r.message);
    CHECK(r.connection_error);
    CHECK(r.message.find("recovery") != std::string::npos);
    CHECK(r.message.find(standby) != std::string::npos);
    CHECK(r.ms < 2000);
  }
  SECTION("every host a standby: connection_error naming the hosts tried, within the deadline") {
    std::string conninfo = "host=127.0.0.1,localhost port=" + standby + "," + standby + who;
    auto r = loop.run(try_connect(loop, conninfo));
    WARN("standbys only: " << r.ms << " ms: " << r.message);
    CHECK(r.connection_error);
    CHECK(r.message.find("127.0.0.1") != std::string::npos);
    CHECK(r.message.find("localhost") != std::string::npos);
    CHECK(r.message.find(standby) != std::string::npos);
    CHECK(r.ms < 2000);
    // pubsub::connect() likewise (its reconnect loop is exercised by [promote]).
    pgiplock::pubsub_options o;
    o.conninfo = conninfo;
    pubsub ps(loop, o);
    std::string what;
    auto t0 = clock::now();
    try {
      loop.run(ps.connect());
    } catch (const pgiplock::connection_error& e) {
      what = e.what();
    }
    CHECK(what.find(standby) != std::string::npos);
    CHECK(ms_since(t0) < 2000);
  }
  SECTION("the standby first: the primary is found (target_session_attrs=read-write by default)") {
    double ms = 0;
    auto r = loop.run(reached(loop, "host=127.0.0.1,127.0.0.1 port=" + standby + "," + primary + who, ms));
    WARN("standby, primary: " << ms << " ms: " << r);
    CHECK(r == "port " + primary + ", in recovery f");
    auto uri = "postgresql://127.0.0.1:" + standby + ",127.0.0.1:" + primary + "/postgres?user=postgres";
    r = loop.run(reached(loop, uri, ms));
    WARN("the URI form: " << ms << " ms: " << r);
    CHECK(r == "port " + primary + ", in recovery f");
  }
  SECTION("a closed port first: the primary is found") {
    std::string closed = std::to_string(closed_port());
    double ms = 0;
    auto r = loop.run(
        reached(loop, "host=127.0.0.1,127.0.0.1,127.0.0.1 port=" + closed + "," + standby + "," + primary + who, ms));
    WARN("closed port, standby, primary: " << ms << " ms: " << r);
    CHECK(r == "port " + primary + ", in recovery f");
    CHECK(ms < 2000);
  }
  SECTION("more hosts than ports: a clear error before anything is sent") {
    auto r = loop.run(
        try_connect(loop, "host=127.0.0.1,127.0.0.1,127.0.0.1 port=" + primary + "," + standby + who));
    WARN("3 hosts, 2 ports: " << r.ms << " ms: " << r.message);
    CHECK(r.invalid_argument);
    CHECK(r.message.find("3 hosts and 2 port values") != std::string::npos);
    CHECK(r.ms < 500);
  }
}

// libpq's connect_timeout is per host, and PQconnectPoll ignores it (the
// application is to enforce it): a host that takes the TCP connection and
// never answers (a hung server, a dead machine behind a load balancer, a
// firewall that drops) must not use up the whole connect deadline while a
// primary is listed after it.
TEST_CASE("bad input: a host that never answers, listed before the primary", "[bad-input][silent-host]") {
  if (env_or("PGIPLOCK_HA_KIND") != "pair") {
    WARN("needs a primary/replica pair (PGIPLOCK_HA_KIND=pair)");
    return;
  }
  std::string primary = env_or("PGIPLOCK_HA_PRIMARY_PORT");
  event_loop loop;
  silent_listener hung;
  double ms = 0;
  auto r = loop.run(reached(loop,
                            "host=127.0.0.1,127.0.0.1 port=" + std::to_string(hung.port) + "," + primary +
                                " user=postgres dbname=postgres connect_timeout=2",
                            ms));
  WARN("silent host, then the primary (connect_timeout=2): " << ms << " ms: " << r);
  CHECK(r == "port " + primary + ", in recovery f");
  CHECK(ms < 2000 + 500);  // one deadline for the list, each host its share
}
