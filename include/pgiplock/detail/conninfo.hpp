// ==== detail: conninfo, liveness settings and query parameters ===============
//
// What connection::connect() makes of the user's conninfo before libpq sees
// it: parsed by libpq itself (so every syntax libpq accepts works, key=value
// and postgresql:// URIs, and nothing else does), with our application_name
// and dead-link settings added where the user gave none.
#pragma once

#include "../errors.hpp"

namespace pgiplock::detail {

// A query parameter in text format; nullopt is SQL NULL.
using param = std::optional<std::string>;

inline param to_param(std::nullopt_t) { return std::nullopt; }
inline param to_param(std::string s) { return s; }
inline param to_param(std::string_view s) { return std::string(s); }
inline param to_param(const char* s) { return s ? param(s) : std::nullopt; }
inline param to_param(bool b) { return std::string(b ? "t" : "f"); }
template <class T>
  requires std::is_arithmetic_v<T>
inline param to_param(T v) {
  return std::to_string(v);
}
template <class T>
inline param to_param(const std::optional<T>& v) {
  return v ? to_param(*v) : std::nullopt;
}

// Dead-link detection, both ends, from one liveness_timeout. This side
// (libpq keepalives and tcp_user_timeout) gives up within half of it; the
// server's side (SET on the session) within 80%, so a partitioned client
// always gives up before the server frees its session and a standby takes
// over. Keepalives alone never fire while a reply is awaited, and
// tcp_user_timeout alone never fires on an idle link: both are set.
struct liveness_plan {
  long client_probe_s, client_user_timeout_ms;  // keepalives_idle/_interval; tcp_user_timeout
  long server_probe_s, server_user_timeout_ms;
  static constexpr int probes = 3;             // keepalives_count, both ends
  static liveness_plan of(std::chrono::milliseconds live) {
    auto ms = static_cast<long>(live.count());
    return {std::max(1L, ms / 10000), ms / 2, std::max(1L, ms / 5000), ms * 4 / 5};
  }
};

struct conninfo_params {
  std::vector<std::string> keys, values;
  std::optional<std::chrono::milliseconds> connect_timeout;
  std::string target;  // host/port/dbname/user for messages, never the password
  std::size_t hosts = 1;  // in the host (or hostaddr) list

  void set_default(const std::string& key, std::string value) {
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) set(key, std::move(value));
  }
  void set(const std::string& key, std::string value) {
    auto it = std::find(keys.begin(), keys.end(), key);
    if (it != keys.end()) {
      values[static_cast<std::size_t>(it - keys.begin())] = std::move(value);
    } else {
      keys.push_back(key);
      values.push_back(std::move(value));
    }
  }
  // Conninfo keywords the user gave win over these.
  void set_liveness_defaults(std::chrono::milliseconds live) {
    if (live.count() <= 0) return;
    auto plan = liveness_plan::of(live);
    set_default("keepalives", "1");
    set_default("keepalives_idle", std::to_string(plan.client_probe_s));
    set_default("keepalives_interval", std::to_string(plan.client_probe_s));
    set_default("keepalives_count", std::to_string(liveness_plan::probes));
    set_default("tcp_user_timeout", std::to_string(plan.client_user_timeout_ms));
  }
};

inline std::string describe_target(const std::string& host, const std::string& port, const std::string& db,
                                   const std::string& user) {
  std::string out = "host=" + (host.empty() ? std::string("(default)") : host);
  if (!port.empty()) out += " port=" + port;
  if (!db.empty()) out += " dbname=" + db;
  if (!user.empty()) out += " user=" + user;
  return out;
}

// What libpq actually tried (environment defaults included); empty before
// it has picked a host.
inline std::string describe_target(PGconn* conn) {
  auto text = [](const char* s) { return std::string(s ? s : ""); };
  std::string host = text(PQhost(conn));
  if (host.empty()) return {};
  return describe_target(host, text(PQport(conn)), text(PQdb(conn)), text(PQuser(conn)));
}

// The server's limits, named where it only says what ran out: which
// setting to raise. A pgiplock pubsub needs two connections whatever its
// channels (one with fast_failover off), and no lock per channel.
inline std::string setting_hint(const std::string& server_said) {
  auto says = [&](const char* text) { return server_said.find(text) != std::string::npos; };
  if (says("too many clients already") || says("connection slots are reserved")) {
    return " (the server's max_connections is reached: raise max_connections, or use fewer connections)";
  }
  if (says("too many connections for role")) {
    return " (the role's CONNECTION LIMIT is reached: ALTER ROLE ... CONNECTION LIMIT; a pubsub member needs 2)";
  }
  if (says("out of shared memory")) {
    return " (the server's lock table is full: raise max_locks_per_transaction)";
  }
  return {};
}

// One conninfo per host of a list, in order. libpq's non-blocking connect
// leaves connect_timeout to the application, and one deadline for the list
// would let a host that takes the TCP connection and never answers (a hung
// server, a dead machine behind a balancer) use it all up while the primary
// waits further down: the connect gives each host its own.
inline std::vector<conninfo_params> per_host(const conninfo_params& p) {
  if (p.hosts <= 1) return {p};
  auto list = [&](const char* key) {
    std::vector<std::string> out;
    auto it = std::find(p.keys.begin(), p.keys.end(), key);
    if (it == p.keys.end()) return out;
    std::string_view v = p.values[static_cast<std::size_t>(it - p.keys.begin())];
    for (std::size_t from = 0;;) {
      auto comma = v.find(',', from);
      out.emplace_back(v.substr(from, comma == std::string_view::npos ? comma : comma - from));
      if (comma == std::string_view::npos) return out;
      from = comma + 1;
    }
  };
  std::map<std::string, std::vector<std::string>, std::less<>> lists;
  for (const char* key : {"host", "hostaddr", "port"}) {
    auto v = list(key);
    if (v.size() == 1 && std::string_view(key) == "port") v.assign(p.hosts, v[0]);  // one port for all
    if (!v.empty() && v.size() != p.hosts) {
      throw std::invalid_argument("pgiplock: the conninfo lists " + std::to_string(p.hosts) + " hosts and " +
                                  std::to_string(v.size()) + " " + key + " values; give one " + key +
                                  " per host" + (std::string_view(key) == "port" ? " (or one for all)" : ""));
    }
    if (!v.empty()) lists[key] = std::move(v);
  }
  std::vector<conninfo_params> out;
  for (std::size_t i = 0; i < p.hosts; ++i) {
    conninfo_params one = p;
    for (auto& [key, v] : lists) one.set(key, v[i]);
    one.hosts = 1;
    auto given = [&](const char* key) {
      auto it = lists.find(key);
      return it == lists.end() ? std::string() : it->second[i];
    };
    one.target = given("host").empty() ? given("hostaddr") : given("host");
    if (!given("port").empty()) one.target += ":" + given("port");
    out.push_back(std::move(one));
  }
  return out;
}

inline conninfo_params parse_conninfo(const std::string& conninfo) {
  if (conninfo.find_first_not_of(" \t\r\n") == std::string::npos) {
    throw std::invalid_argument(
        "pgiplock: the conninfo is empty; give e.g. \"host=localhost dbname=app\" or "
        "\"postgresql://user@host/db\"");
  }
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (!opts) {
    std::string why = err ? trim_message(err) : "out of memory";
    if (err) PQfreemem(err);
    throw std::invalid_argument("pgiplock: cannot parse conninfo: " + why);
  }
  conninfo_params out;
  std::map<std::string, std::string, std::less<>> given;
  for (PQconninfoOption* o = opts; o->keyword; ++o) {
    if (!o->val) continue;
    given[o->keyword] = o->val;
    out.keys.push_back(o->keyword);
    out.values.emplace_back(o->val);
  }
  PQconninfoFree(opts);
  if (long secs = std::strtol(given["connect_timeout"].c_str(), nullptr, 10); secs > 0) {
    out.connect_timeout = std::chrono::seconds(std::max(secs, 2L));  // libpq's own floor
  }
  std::string host = given.count("host") ? given["host"] : given["hostaddr"];
  out.target = describe_target(host, given["port"], given["dbname"], given["user"]);
  out.hosts = 1 + static_cast<std::size_t>(std::count(host.begin(), host.end(), ','));
  // Several hosts are an HA cluster: LISTEN, the locks and the journal need
  // its primary, so libpq is to skip the standbys (docs/failover.md).
  if (out.hosts > 1) out.set_default("target_session_attrs", "read-write");
  return out;
}

}  // namespace pgiplock::detail
