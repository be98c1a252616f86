// ==== detail: what connect() checks before it hands a connection out =========
//
// A connection that connects but cannot do its job is worse than one that
// fails: a transaction-pooling PgBouncer passes every LISTEN and then hears
// nothing, and a partitioned link looks healthy until TCP gives up. These
// probes run once per connection, at connect.
#pragma once

#include "../errors.hpp"

namespace pgiplock::detail {

// The server's side of dead-link detection (see liveness_plan); settings it
// does not have (tcp_user_timeout before PostgreSQL 12) are left out.
inline task<void> apply_server_liveness(connection& c, std::chrono::milliseconds live) {
  const char* host = PQhost(c.native_handle());
  if (!host || host[0] == '/' || host[0] == '@') co_return;  // unix socket: nothing to probe
  auto plan = liveness_plan::of(live);
  auto probe_s = std::to_string(plan.server_probe_s);
  if (PQserverVersion(c.native_handle()) >= 120000) {
    co_await c.query(std::string(sql::server_keepalives_and_user_timeout), probe_s,
                     std::to_string(plan.server_user_timeout_ms));
  } else {
    co_await c.query(std::string(sql::server_keepalives), probe_s);
  }
}

// Whether this session keeps its server backend while another session of
// the same pool holds a transaction open (a session pool: yes; a transaction
// pool hands the idle backend to the other session). Nothing when it cannot
// tell within the probe's time (a full pool, a refused second login):
// connect() then goes on, as without a proxy.
inline task<std::optional<bool>> pinned_to(std::shared_ptr<connection> self, int server_pid, std::string channel,
                                           connect_options options) {
  auto limit = options.notify_probe_timeout;
  options.notify_probe_timeout = std::chrono::milliseconds(0);
  options.application_name.clear();
  options.timeout = limit;
  std::shared_ptr<connection> other;
  std::optional<bool> pinned;
  std::string failure;
  try {
    other = co_await connection::connect(self->loop(), self->conninfo(), options);
    auto began = co_await within(self->loop(), other->query(std::string(sql::begin)), limit);
    if (began) {
      auto theirs = co_await other->query(std::string(sql::backend_pid));
      auto mine = co_await self->query(std::string(sql::backend_pid_and_listening), channel);
      pinned = std::atoi(std::string(theirs.get(0, 0)).c_str()) != server_pid &&
               std::atoi(std::string(mine.get(0, 0)).c_str()) == server_pid && mine.get(0, 1) == "t";
    } else {
      failure = "a second connection got no server session within " + std::to_string(limit.count()) + " ms";
    }
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (other) co_await other->close();  // also ends an abandoned BEGIN
  if (!failure.empty()) {
    log(self->logger(), log_level::debug,
        "could not tell whether the pool in front of the server pins sessions: " + failure);
  }
  co_return pinned;
}

struct probe_outcome {
  std::string problem;  // empty: LISTEN/NOTIFY works here
  int server_pid = 0;   // the backend that serves us, when the probe learned it
};

// See connect_options::notify_probe_timeout. Through a proxy the session
// must also be pinned to one server backend: a quiet transaction pool
// reuses the same backend, so the self-notification alone passes there.
inline task<probe_outcome> check_notify_works(std::shared_ptr<connection> c, connect_options options) {
  auto limit = options.notify_probe_timeout;
  std::string channel = "pgiplock-probe-" + random_uuid();
  auto heard = std::make_shared<cancel_source>();  // the handler may outlive a failed probe
  struct unsubscribe_at_exit {
    connection* c;
    std::uint64_t id;
    ~unsubscribe_at_exit() { c->unsubscribe(id); }
  } guard{c.get(), c->subscribe(channel, [heard](const notification&) { heard->cancel(); })};
  try {
    co_await c->listen(channel);
  } catch (const sql_error& e) {
    if (e.sqlstate() != sqlstate::read_only_transaction) throw;
    // A hot standby: nothing can LISTEN here, and nothing pretends to.
    log(c->logger(), log_level::debug, "read-only session (a hot standby?): LISTEN not possible, no probe");
    co_return probe_outcome{};
  }
  auto r = co_await c->query(std::string(sql::probe_notify), channel);
  probe_outcome out{{}, std::atoi(std::string(r.get(0, 0)).c_str())};
  if (co_await c->loop().sleep(limit, heard.get())) {
    if (!c->is_open()) throw connection_error(c->lost_reason().empty() ? "pgiplock: the connection is closed" : c->lost_reason());
    out.problem = "a notification to itself did not arrive within " + std::to_string(limit.count()) + " ms";
    co_return out;
  }
  if (out.server_pid != c->backend_pid()) {  // PQbackendPID() is a proxy's own key
    auto pinned = co_await pinned_to(c, out.server_pid, channel, options);
    if (pinned && !*pinned) {
      out.problem = "a second connection was served by this session's server backend (pid " +
                    std::to_string(out.server_pid) + "), so this session's LISTEN is not its own";
    }
  }
  co_await c->unlisten(channel);
  co_return out;
}

}  // namespace pgiplock::detail
