// Helpers shared by the test programs: the server under test and what they
// do with it (connections, options, schemas of their own), waiting for a
// condition with a deadline, and counting what a process holds.
#pragma once

#include "clock.hpp"
#include "pgiplock.hpp"

#include <catch2/catch.hpp>

#include <dirent.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace test {

using namespace std::chrono_literals;
using pgiplock::event_loop;
using pgiplock::task;
using conn_ptr = std::shared_ptr<pgiplock::connection>;

// Built with AddressSanitizer (GCC defines the macro, clang the feature).
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool sanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool sanitized = true;
#else
inline constexpr bool sanitized = false;
#endif
#else
inline constexpr bool sanitized = false;
#endif

// AddressSanitizer keeps freed memory in quarantine, so RSS says nothing
// there; LeakSanitizer checks for leaks in that build instead.
inline constexpr bool rss_is_meaningful = !sanitized;

// The server under test (tools/check exports it).
inline std::string dsn() {
  const char* d = std::getenv("PGIPLOCK_DSN");
  return d ? d : "";
}

// A channel name of its own for each test, so rows left by one never meet
// another (the server is shared by the whole suite).
inline std::string fresh_channel(const std::string& stem) {
  static int n = 0;
  return stem + "_" + std::to_string(::getpid()) + "_" + std::to_string(++n);
}

inline std::string env_or(const char* name, std::string fallback = {}) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

inline std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Polls `pred` every millisecond on the loop until it holds or `limit`
// passes; returns whether it held.
template <class Pred>
task<bool> wait_until(event_loop& loop, Pred pred, std::chrono::milliseconds limit) {
  auto deadline = clock::now() + limit;
  while (!pred()) {
    if (clock::now() >= deadline) co_return false;
    co_await loop.sleep(1ms);
  }
  co_return true;
}

// ==== what a process holds ====

inline int open_fd_count() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d)) ++n;
    ::closedir(d);
  }
  return n;
}

inline long rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string key;
  long value = 0;
  while (f >> key) {
    if (key == "VmRSS:") {
      f >> value;
      return value;
    }
    f.ignore(4096, '\n');
  }
  return -1;
}

// ==== the server under test ====

inline task<conn_ptr> open(event_loop& loop, std::string conninfo = dsn()) {
  co_return co_await pgiplock::connection::connect(loop, std::move(conninfo));
}

// What connect() made of a conninfo, and how long it took (a connection
// it made is closed again).
struct connect_outcome {
  std::string message;  // what it threw, or "(connected)"
  double ms = 0;
  bool connection_error = false;
  bool invalid_argument = false;  // libpq could not parse the conninfo
};
inline task<connect_outcome> try_connect(event_loop& loop, std::string conninfo) {
  auto t0 = clock::now();
  try {
    auto c = co_await pgiplock::connection::connect(loop, conninfo);
    co_await c->close();
  } catch (const pgiplock::connection_error& e) {
    co_return connect_outcome{e.what(), ms_since(t0), true, false};
  } catch (const std::invalid_argument& e) {
    co_return connect_outcome{e.what(), ms_since(t0), false, true};
  }
  co_return connect_outcome{"(connected)", ms_since(t0), false, false};
}

// The first field of the first row, or "(none)" without a row.
template <class... Params>
task<std::string> scalar(conn_ptr c, std::string sql, Params... params) {
  auto r = co_await c->query(std::move(sql), std::move(params)...);
  co_return r.rows() ? std::string(r.get(0, 0)) : std::string("(none)");
}

// An ip_lock on `c` that retries every `interval`.
inline pgiplock::ip_lock_options lock_opts(conn_ptr c, std::chrono::milliseconds interval = 30s) {
  pgiplock::ip_lock_options o;
  o.client = std::move(c);
  o.acquire_interval = interval;
  return o;
}

// A pubsub on the server under test that retries every `interval`.
inline pgiplock::pubsub_options pubsub_opts(std::chrono::milliseconds interval = 30s) {
  pgiplock::pubsub_options o;
  o.conninfo = dsn();
  o.acquire_interval = interval;
  return o;
}

// The lock schema of this run (PG_PUBSUB_SCHEMA_NAME, or the default), as
// an identifier for `c`'s SQL: the name may hold any character.
inline std::string lock_schema(const pgiplock::connection& c) {
  return c.quote_identifier(pgiplock::ip_lock::schema_name());
}

// The fields a conninfo (key=value or URI) gives, as libpq parses it.
// Throws std::invalid_argument, with libpq's reason, when it cannot.
inline std::vector<std::pair<std::string, std::string>> conninfo_fields(const std::string& conninfo) {
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (!opts) {
    std::string why = err ? err : "out of memory";
    PQfreemem(err);
    throw std::invalid_argument("cannot parse the conninfo '" + conninfo + "': " + why);
  }
  std::vector<std::pair<std::string, std::string>> out;
  for (PQconninfoOption* o = opts; o->keyword; ++o) {
    if (o->val) out.emplace_back(o->keyword, o->val);
  }
  PQconninfoFree(opts);
  return out;
}

inline std::optional<std::string> conninfo_field(const std::string& conninfo, const std::string& key) {
  for (auto& [k, v] : conninfo_fields(conninfo)) {
    if (k == key) return v;
  }
  return std::nullopt;
}

// `conninfo` as key='value' pairs without the fields named in `drop`, with
// `add` after them: the test server reached as another user, or by
// another address.
inline std::string conninfo_with(const std::string& conninfo, const std::vector<std::string>& drop,
                                 const std::vector<std::pair<std::string, std::string>>& add) {
  auto quoted = [](const std::string& key, const std::string& value) {
    std::string v;
    for (char c : value) {
      if (c == '\'' || c == '\\') v.push_back('\\');
      v.push_back(c);
    }
    return key + "='" + v + "'";
  };
  std::string out;
  for (auto& [k, v] : conninfo_fields(conninfo)) {
    if (std::find(drop.begin(), drop.end(), k) == drop.end()) out += quoted(k, v) + " ";
  }
  for (auto& [k, v] : add) out += quoted(k, v) + " ";
  if (!out.empty()) out.pop_back();
  return out;
}

// libpq, blocking, on a session of its own: for set-up and clean-up where
// nothing can be awaited (a destructor that runs while a failed REQUIRE
// unwinds). failure() is empty once connected.
class blocking_session {
 public:
  explicit blocking_session(const std::string& conninfo) : c_(PQconnectdb(conninfo.c_str())) {
    if (PQstatus(c_) != CONNECTION_OK) failure_ = PQerrorMessage(c_);
  }
  blocking_session(const blocking_session&) = delete;
  blocking_session& operator=(const blocking_session&) = delete;
  ~blocking_session() { PQfinish(c_); }

  const std::string& failure() const { return failure_; }

  // As connection::quote_identifier, which has no blocking counterpart.
  std::string quote_identifier(const std::string& name) const {
    char* q = PQescapeIdentifier(c_, name.data(), name.size());
    if (!q) return {};
    std::string out = q;
    PQfreemem(q);
    return out;
  }

  // Runs a simple-protocol query string (several statements may go in one).
  // Empty, or the error.
  std::string exec(const std::string& sql) {
    if (!failure_.empty()) return failure_;
    PGresult* r = PQexec(c_, sql.c_str());
    auto st = PQresultStatus(r);
    std::string failure;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) failure = PQresultErrorMessage(r);
    PQclear(r);
    return failure;
  }

 private:
  PGconn* c_;
  std::string failure_;
};

inline std::string exec_blocking(const std::string& conninfo, const std::string& sql) {
  blocking_session s(conninfo);
  return s.exec(sql);
}

// A lock schema of the test's own, named after this run's with `stem` and
// the pid: an "empty database" for bootstrap tests, and, in a run with an
// odd schema name, an odd name too. PG_PUBSUB_SCHEMA_NAME names it while the
// guard lives (the library and the Node package read it there); then the
// variable is as it was and the schema is dropped, with the execution
// lock's "_unique" beside it. Nothing else: other programs share the server.
class schema_guard {
 public:
  explicit schema_guard(const std::string& stem)
      : name_(pgiplock::ip_lock::schema_name() + "_" + stem + "_" + std::to_string(::getpid())) {
    if (const char* v = std::getenv(variable)) saved_ = v;
    ::setenv(variable, name_.c_str(), 1);
  }
  schema_guard(const schema_guard&) = delete;
  schema_guard& operator=(const schema_guard&) = delete;
  ~schema_guard() {
    if (saved_) ::setenv(variable, saved_->c_str(), 1);
    else ::unsetenv(variable);
    blocking_session s(dsn());
    // Bounded: a session a failed test left behind may hold a lock in it.
    // Quiet: what CASCADE drops is no news.
    auto failure = s.exec("SET lock_timeout = '10s'; SET client_min_messages = warning; "
                          "DROP SCHEMA IF EXISTS " + s.quote_identifier(name_) +
                          " CASCADE; DROP SCHEMA IF EXISTS " + s.quote_identifier(name_ + "_unique") + " CASCADE");
    // No REQUIRE here: it may run while one unwinds.
    if (!failure.empty()) std::fprintf(stderr, "cannot drop the test's schema %s: %s\n", name_.c_str(), failure.c_str());
  }

  const std::string& name() const { return name_; }

 private:
  static constexpr const char* variable = "PG_PUBSUB_SCHEMA_NAME";
  std::string name_;
  std::optional<std::string> saved_;
};

// A TCP port on 127.0.0.1 that takes connections (the kernel completes the
// handshake) and never says a word: a hung server, a dead machine behind a
// balancer, a black-holing firewall, as a client sees them.
struct silent_listener {
  int fd = -1, port = 0;
  silent_listener() {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, 16) != 0) {
      throw std::runtime_error("silent_listener: cannot listen on 127.0.0.1");
    }
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
  }
  silent_listener(const silent_listener&) = delete;
  silent_listener& operator=(const silent_listener&) = delete;
  ~silent_listener() { ::close(fd); }
};

}  // namespace test
