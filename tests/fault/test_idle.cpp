// The fault-suite row "idle standbys", counted by the server: one holder and
// standbys that sit idle while it lives. The reference sends one failing
// INSERT per standby per interval, each an ERROR line in the server log; the
// target is at most one statement per standby per wait slice and no ERROR.
//
// The standbys log in as a role of their own with log_statement = 'all' set
// on the role, so the server logs their statements and nobody else's; the
// test reads what the log gained during an idle window and counts them.
#include "fleet.hpp"

#include <sys/stat.h>

#include <set>

extern const bool test_needs_database = true;

using namespace test;

namespace {

// The server under test as another user: what the standbys use.
std::string with_user(const std::string& user) { return conninfo_with(dsn(), {"user"}, {{"user", user}}); }

// A login role for the standbys, whose statements (and only theirs) the
// server logs. Set up and dropped by blocking calls: the destructor runs
// while a failed REQUIRE unwinds. Dropped by drop(), or by the destructor
// when a check failed first; a role that is left behind would log every
// later session of it.
struct logged_role {
  std::string name = "pgiplock_idle_" + std::to_string(::getpid());
  bool dropped = false;

  logged_role() {
    auto failure = exec_blocking(dsn(), "CREATE ROLE " + name + " LOGIN; ALTER ROLE " + name +
                                            " SET log_statement = 'all'");
    if (!failure.empty()) dropped = true;
    REQUIRE(failure.empty());
  }
  logged_role(const logged_role&) = delete;
  logged_role& operator=(const logged_role&) = delete;
  ~logged_role() {
    if (!dropped) drop();
  }

  // What a member needs on an existing lock schema: the rows (channels,
  // members and their tenures), the tenure sequence (a win draws a token); the functions are
  // executable by PUBLIC.
  std::string grant_lock_schema(const pgiplock::connection& c) const {
    std::string s = lock_schema(c);
    return exec_blocking(dsn(), "GRANT USAGE ON SCHEMA " + s + " TO " + name + "; GRANT SELECT, INSERT, UPDATE, "
                                "DELETE ON " + s + ".lock, " + s + ".pgiplock_member, " + s + ".pgiplock_holder TO " + name +
                                "; GRANT USAGE, UPDATE ON SEQUENCE " + s + ".pgiplock_tenure TO " + name);
  }

  // Ends the role's sessions (members killed by SIGKILL may still have
  // backends), revokes its grants (DROP OWNED: it owns nothing, but the
  // grants depend on it) and drops it. Empty, or the error.
  std::string drop() {
    dropped = true;
    return exec_blocking(dsn(), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '" + name +
                                    "'; DROP OWNED BY " + name + "; DROP ROLE " + name);
  }
};

long file_size(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<long>(st.st_size) : -1;
}

// One line of the server log, with log_line_prefix '%m [%p] '.
struct log_line {
  int pid = 0;
  std::string level, message;
  bool statement() const {
    // Simple protocol: "statement: ...". Extended (libpq's pipeline mode,
    // every parameterised query here): Parse and Bind log nothing under
    // log_statement, Execute logs "execute <name>: ...": one line either way.
    return level == "LOG" && (message.rfind("statement: ", 0) == 0 || message.rfind("execute ", 0) == 0);
  }
};

// What the log gained between two offsets. Continuation lines (a
// statement's later lines, begun with a tab) carry no prefix and are skipped.
std::vector<log_line> read_log(const std::string& path, long from, long to) {
  std::vector<log_line> out;
  std::string text = read_file(path);
  if (to > static_cast<long>(text.size())) to = static_cast<long>(text.size());
  if (from >= to) return out;
  std::istringstream in(text.substr(static_cast<std::size_t>(from), static_cast<std::size_t>(to - from)));
  std::string line;
  while (std::getline(in, line)) {
    auto open = line.find(" [");
    auto close = line.find("] ", open == std::string::npos ? 0 : open);
    if (open == std::string::npos || close == std::string::npos || line[0] == '\t') continue;
    auto colon = line.find(":  ", close);
    if (colon == std::string::npos) continue;
    log_line l;
    l.pid = std::atoi(line.substr(open + 2, close - open - 2).c_str());
    l.level = line.substr(close + 2, colon - close - 2);
    l.message = line.substr(colon + 3);
    if (l.pid > 0) out.push_back(std::move(l));
  }
  return out;
}

bool is_error(const log_line& l) { return l.level == "ERROR" || l.level == "FATAL" || l.level == "PANIC"; }

// The role's backends, from the server: each standby's main connection and,
// with fast failover, its waiter.
task<std::set<int>> role_pids(std::shared_ptr<pgiplock::connection> c, std::string role) {
  auto r = co_await c->query("SELECT pid FROM pg_stat_activity WHERE usename = $1", role);
  std::set<int> out;
  for (int i = 0; i < r.rows(); ++i) out.insert(std::atoi(std::string(r.get(i, 0)).c_str()));
  co_return out;
}

// The members' acquire_interval; pubsub leaves ip_lock's wait_slice at 0,
// which makes the slice the interval too.
constexpr int slice_ms = 500;

struct window_result {
  double window_ms = 0;
  int standbys = 0;
  std::size_t connections = 0;
  long statements = 0;
  std::vector<std::string> errors;   // ERROR/FATAL lines of anyone, in the window
  std::map<std::string, long> texts;  // what the standbys sent, by statement
  double per_standby_per_slice() const { return static_cast<double>(statements) / (standbys * (window_ms / slice_ms)); }
  // Each wait lasts at least one slice (its lock_timeout), so a standby
  // starts at most one statement per slice; a window of w ms then holds at
  // most floor(w / slice) + 1 starts per standby (the +1: the window need
  // not begin on a slice boundary, so one started just after its opening
  // and one just before its close can both fall inside).
  long bound() const { return standbys * (static_cast<long>(window_ms / slice_ms) + 1); }
};

// Starts `standbys` members as `role` on the fleet's channel, waits until
// each has sent its steady statement (the one containing `steady`) twice,
// then measures an idle window of `window`.
task<window_result> idle_window(event_loop& loop, fleet& fl, std::shared_ptr<pgiplock::connection> c,
                                const logged_role& role, std::string log, int standbys,
                                std::vector<std::string> extra, std::string steady,
                                std::chrono::milliseconds window) {
  window_result out;
  out.standbys = standbys;
  std::size_t first = fl.members.size();
  long started = file_size(log);
  fl.start(standbys, extra, {}, with_user(role.name));
  bool ready = co_await wait_until(loop, [&] {
    for (std::size_t i = first; i < fl.members.size(); ++i) {
      if (fl.backend_pid[i] == 0) return false;
    }
    return true;
  }, 20s);
  REQUIRE(ready);
  // Before that, start-up traffic: connecting, subscribing, the first
  // acquire attempt; with fast failover also one retry-timer attempt, made
  // before the waiter's first slice has run out and shown a live holder
  // there (the retry timer skips its attempts from then on).
  bool settled = co_await wait_until(loop, [&] {
    std::map<int, int> n;
    for (auto& l : read_log(log, started, file_size(log))) {
      if (l.statement() && l.message.find(steady) != std::string::npos) ++n[l.pid];
    }
    int busy = 0;
    for (auto& [pid, count] : n) busy += count >= 2;
    return busy >= standbys;
  }, 10s);
  REQUIRE(settled);
  auto pids = co_await role_pids(c, role.name);
  long from = file_size(log);
  auto t0 = clock::now();
  co_await loop.sleep(window);  // the idle window: what is measured
  long to = file_size(log);
  out.window_ms = ms_since(t0);
  auto later = co_await role_pids(c, role.name);
  out.connections = pids.size();
  pids.insert(later.begin(), later.end());
  for (auto& l : read_log(log, from, to)) {
    if (is_error(l)) out.errors.push_back("[" + std::to_string(l.pid) + "] " + l.level + ": " + l.message);
    if (l.statement() && pids.count(l.pid)) {
      ++out.statements;
      ++out.texts[l.message.substr(0, 100)];
    }
  }
  co_return out;
}

std::string describe(const window_result& r) {
  std::ostringstream o;
  o << r.statements << " statements from " << r.standbys << " standbys (" << r.connections << " connections) in "
    << static_cast<long>(r.window_ms) << " ms; at most " << r.bound() << " allowed; what they sent:";
  for (auto& [text, n] : r.texts) o << "\n  " << n << " x " << text;
  for (auto& e : r.errors) o << "\n  server: " << e;
  return o.str();
}

struct idle_result {
  window_result fast, naive;
  bool holder_held = false;
  int standby_holds = 0, losses = 0, member_errors = 0;
  std::string drop_failure;
};

task<idle_result> idle_run(event_loop& loop, std::string log) {
  idle_result out;
  logged_role role;  // before the fleet: its members die first, then the role goes
  fleet fl(loop, fresh_channel("idle"));
  const std::string interval = std::to_string(slice_ms);
  fl.start(1, {"--interval", interval, "--watch-active"});
  bool up = co_await fl.ready(20s);
  REQUIRE(up);
  REQUIRE(fl.holder() == 0);
  auto c = co_await open(loop);
  auto granted = role.grant_lock_schema(*c);  // the holder has created the lock schema
  INFO(granted);
  REQUIRE(granted.empty());

  // Fast failover (the default): a main connection and a watcher each; the
  // watcher's one statement per slice waits for the next member in the ring.
  // GCC 12 miscompiles braced lists and string literals inside a co_await
  // expression: the arguments are locals first.
  std::vector<std::string> fast_args{"--interval", interval};
  std::string fast_steady = "pgiplock_watch";
  out.fast = co_await idle_window(loop, fl, c, role, log, 3, fast_args, fast_steady, 5000ms);
  for (std::size_t i = 1; i < fl.members.size(); ++i) {
    fl.members[i]->signal(SIGKILL);
    fl.alive[i] = false;
  }
  // Their backends too: a waiter's notices the closed socket only when its
  // slice ends.
  auto deadline = clock::now() + 5s;
  for (;;) {
    auto left = co_await role_pids(c, role.name);
    if (left.empty() && fl.readers == 1) break;
    REQUIRE(clock::now() < deadline);
    co_await loop.sleep(10ms);
  }
  // For comparison, standbys without the watcher: the retry timer only, one
  // claim per interval.
  std::vector<std::string> naive_args{"--interval", interval, "--no-fast-failover"};
  std::string naive_steady = "pgiplock_claim";
  out.naive = co_await idle_window(loop, fl, c, role, log, 2, naive_args, naive_steady, 3000ms);

  out.holder_held = fl.holder() == 0 && fl.holds[0].size() == 1 && fl.loses[0].empty();
  for (std::size_t i = 0; i < fl.members.size(); ++i) {
    if (i > 0) out.standby_holds += static_cast<int>(fl.holds[i].size());
    out.losses += static_cast<int>(fl.loses[i].size());
    out.member_errors += static_cast<int>(fl.errors[i].size());
  }
  co_await fl.stop();
  co_await c->close();
  out.drop_failure = role.drop();
  co_return out;
}

}  // namespace

TEST_CASE("idle standbys: at most one statement per standby per wait slice, no ERROR in the server log",
          "[fault][idle]") {
  std::string log = env_or("PGIPLOCK_TEST_LOG");
  if (log.empty() || file_size(log) < 0) {
    WARN("PGIPLOCK_TEST_LOG is not set or unreadable (a server given by DSN): cannot count in its log");
    return;
  }
  event_loop loop;
  auto r = loop.run(idle_run(loop, log));
  WARN("idle standbys, fast failover: " << r.fast.per_standby_per_slice() << " statements per standby per "
                                        << slice_ms << " ms wait slice, " << r.fast.errors.size() << " ERROR lines ("
                                        << describe(r.fast) << ")");
  WARN("idle standbys, no fast failover (retry timer only): "
       << r.naive.per_standby_per_slice() << " statements per standby per " << slice_ms << " ms interval, "
       << r.naive.errors.size() << " ERROR lines (" << describe(r.naive) << ")");
  INFO(describe(r.fast) << "\n" << describe(r.naive));
  CHECK(r.fast.connections == 6);  // 3 standbys, a main connection and a watcher each: all counted
  CHECK(r.fast.statements <= r.fast.bound());
  CHECK(r.fast.errors.empty());
  CHECK(r.naive.statements <= r.naive.bound());
  CHECK(r.naive.errors.empty());
  CHECK(r.holder_held);
  CHECK(r.standby_holds == 0);
  CHECK(r.losses == 0);
  CHECK(r.member_errors == 0);
  INFO(r.drop_failure);
  CHECK(r.drop_failure.empty());
}
