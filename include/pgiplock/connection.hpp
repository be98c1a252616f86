// ==== connection =============================================================
//
// One non-blocking libpq connection driven by the loop, in pipeline mode with
// a sync after every query: many coroutines can have queries in flight and
// one failing query never aborts its neighbours. One pump coroutine owns the
// socket: readable -> PQconsumeInput -> complete finished queries in order ->
// dispatch notifications.
#pragma once

#include "detail/conninfo.hpp"
#include "detail/names.hpp"
#include "detail/sql.hpp"
#include "event_loop.hpp"
#include "stats.hpp"

namespace pgiplock {

// A notification as delivered; the views are valid during the handler call.
struct notification {
  std::string_view channel;
  std::string_view payload;
  int sender_pid = 0;  // backend pid of the session that sent it
};

// A message as pubsub::on_delivery gives it; the views are valid during the
// handler call. On a durable channel `id` is the message's id in the
// journal (strictly increasing per channel; a redelivery has the same id)
// and `token` the fencing token of the tenure that delivers it; on a plain
// channel both are 0.
struct delivery {
  std::string_view channel;
  std::string_view payload;
  std::int64_t id = 0;
  std::int64_t token = 0;
};

// Owns one PGresult.
class result {
 public:
  result() noexcept = default;
  explicit result(PGresult* r) noexcept : r_(r) {}

  [[nodiscard]] int rows() const noexcept { return r_ ? PQntuples(r_.get()) : 0; }
  [[nodiscard]] int columns() const noexcept { return r_ ? PQnfields(r_.get()) : 0; }
  [[nodiscard]] bool is_null(int row, int col) const { return PQgetisnull(checked(row, col), row, col) != 0; }
  // The text of a field; empty for NULL.
  [[nodiscard]] std::string_view get(int row, int col) const {
    PGresult* r = checked(row, col);
    return {PQgetvalue(r, row, col), static_cast<std::size_t>(PQgetlength(r, row, col))};
  }
  // Rows changed by INSERT/UPDATE/DELETE.
  [[nodiscard]] long affected_rows() const noexcept {
    const char* n = r_ ? PQcmdTuples(r_.get()) : nullptr;
    return (n && *n) ? std::strtol(n, nullptr, 10) : 0;
  }
  [[nodiscard]] PGresult* native_handle() const noexcept { return r_.get(); }

 private:
  PGresult* checked(int row, int col) const {
    if (!r_ || row < 0 || col < 0 || row >= rows() || col >= columns()) {
      throw std::out_of_range("pgiplock: result field (" + std::to_string(row) + ", " + std::to_string(col) +
                              ") is out of range");
    }
    return r_.get();
  }
  struct clear {
    void operator()(PGresult* r) const noexcept { PQclear(r); }
  };
  std::unique_ptr<PGresult, clear> r_;
};

struct connect_options {
  // Applies when the conninfo sets no connect_timeout.
  std::chrono::milliseconds timeout{PGIPLOCK_DEFAULT_CONNECT_TIMEOUT_MS};
  // The session's application_name; empty: "pgiplock-" and a fresh UUID,
  // unique per connection, which is what the lock protocol identifies
  // holders by (keep it unique if you set it).
  std::string application_name;
  log_handler logger;
  // Dead-link detection on both ends (0 disables): this side gives up on a
  // silent partition within half of it, the server within 80% of it, so a
  // partitioned client always gives up before the server frees its session.
  // Conninfo keywords the user gave win. TCP only.
  std::chrono::milliseconds liveness_timeout{10000};
  // At connect, LISTEN a private channel and NOTIFY it; no delivery within
  // this long fails connect(). A transaction-pooling PgBouncer passes every
  // query but hands each transaction to any server session, so a LISTEN
  // there silently hears nothing: better to refuse at once. 0: no probe
  // (one round trip saved, for connections that never LISTEN).
  std::chrono::milliseconds notify_probe_timeout{2000};
};

class connection : public std::enable_shared_from_this<connection> {
  struct private_tag {};

 public:
  using notification_handler = std::function<void(const notification&)>;
  using lost_handler = std::function<void(const connection_error&)>;

  // Connects without blocking the loop. Fails with std::invalid_argument for
  // a conninfo libpq cannot parse, connection_error for everything else,
  // within connect_timeout (from the conninfo) or options.timeout.
  static task<std::shared_ptr<connection>> connect(event_loop& loop, std::string conninfo, connect_options options);
  // An overload, not a defaulted `= {}`: GCC 12 frees a braced default
  // argument inside a co_await expression twice.
  static task<std::shared_ptr<connection>> connect(event_loop& loop, std::string conninfo);

  // Ends the session. Queries still pending fail with connection_error.
  task<void> close();
  // close() for loop.spawn(), when nobody waits for it.
  static task<void> close_quietly(std::shared_ptr<connection> c);

  // Runs one statement with bound parameters ($1, $2...): strings,
  // string_views, numbers, bools, std::nullopt for NULL. The arguments are
  // copied before the first suspension, so temporaries are safe.
  template <class... Args>
  task<result> query(std::string sql, Args&&... args);
  // query(), through a server-side prepared statement this connection makes
  // on first use: for the statements run on every acquire attempt and
  // heartbeat, whose planning would otherwise cost more than their execution.
  template <class... Args>
  task<result> query_prepared(std::string sql, Args&&... args);
  // LISTEN / UNLISTEN one channel (quoted here; any name, case kept).
  task<void> listen(std::string_view channel);
  task<void> unlisten(std::string_view channel);

  // Calls `fn` for each notification on `channel` ("" = every channel).
  // Returns an id for unsubscribe(). Safe to call from inside a handler.
  [[nodiscard]] std::uint64_t subscribe(std::string channel, notification_handler fn);
  void unsubscribe(std::uint64_t id) noexcept;
  // Calls `fn` once when the link is lost or the connection closed.
  [[nodiscard]] std::uint64_t on_lost(lost_handler fn);
  void remove_on_lost(std::uint64_t id) noexcept;

  // Quotes an identifier (a channel, a schema) as libpq does.
  [[nodiscard]] std::string quote_identifier(std::string_view name) const;

  [[nodiscard]] bool is_open() const noexcept { return conn_ && !lost_ && !closing_; }
  [[nodiscard]] int backend_pid() const noexcept { return backend_pid_; }
  // The session's client_encoding as the server reported it ("UTF8"...).
  [[nodiscard]] std::string_view client_encoding() const noexcept {
    const char* e = conn_ ? PQparameterStatus(conn_.get(), "client_encoding") : nullptr;
    return e ? e : "";
  }
  [[nodiscard]] std::string_view app_name() const noexcept { return app_; }
  [[nodiscard]] const std::string& conninfo() const noexcept { return conninfo_; }
  [[nodiscard]] event_loop& loop() const noexcept { return *loop_; }
  [[nodiscard]] const log_handler& logger() const noexcept { return logger_; }
  // Why the link is gone; empty while it is up.
  [[nodiscard]] const std::string& lost_reason() const noexcept { return lost_reason_; }
  [[nodiscard]] PGconn* native_handle() const noexcept { return conn_.get(); }

  // For connect() only (the pass-key keeps it so): a connection is always
  // held by a shared_ptr. Without close(), destruction abandons the pump and
  // closes the socket; a connection must not outlive its event_loop.
  connection(private_tag, event_loop& loop, std::string conninfo, std::string app, log_handler logger);
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;
  ~connection();

 private:
  struct outcome {
    result value;
    std::exception_ptr failure;
    std::string sqlstate;  // of the failure
  };
  struct pending_query {
    std::uint64_t op;  // the waiter's operation; stale once its frame is gone
    outcome* out;
    int discard = 0;           // leading results that are not the query's (a PREPARE's)
    std::string prepared_sql;  // that PREPARE's statement: forgotten if it fails
  };
  struct subscriber {
    std::uint64_t id;
    std::string channel;
    notification_handler fn;
  };
  struct pgconn_finish {
    void operator()(PGconn* c) const noexcept { PQfinish(c); }
  };

  static task<std::shared_ptr<connection>> connect_impl(event_loop& loop, std::string conninfo,
                                                        connect_options options);
  task<void> establish(detail::conninfo_params params, std::chrono::milliseconds limit);
  task<std::string> establish_one(const detail::conninfo_params& host, std::chrono::milliseconds limit);
  task<void> prove_usable(connect_options options);
  connection_error cannot_connect(const detail::conninfo_params& params, const std::string& why) const;
  template <class... Args>
  static std::vector<detail::param> params_of(Args&&... args);
  task<result> run(std::string sql, std::vector<detail::param> params, bool prepare);
  bool send(const std::string& sql, const std::vector<detail::param>& params, bool prepare, int& discard);
  std::string closed_message() const;
  void finish_setup();
  task<void> refuse_standby();
  static void on_notice(void* arg, const PGresult* r);
  void flush_output();
  task<void> pump();
  bool collect_results();
  void take_result(pending_query& q, PGresult* r);
  std::exception_ptr to_error(const PGresult* r) const;
  void dispatch_notifications();
  void prune_subscribers();
  void lose(const std::string& why);

  event_loop* loop_;
  std::string conninfo_;
  std::string app_;
  log_handler logger_;
  std::unique_ptr<PGconn, pgconn_finish> conn_;
  int fd_ = -1;
  int backend_pid_ = 0;
  bool want_write_ = false;
  bool closing_ = false;
  bool lost_ = false;
  std::string lost_reason_;
  std::deque<pending_query> pending_;  // deque: slots stay put while others are added
  std::unordered_map<std::string, std::string> prepared_;  // SQL -> statement name
  std::uint64_t statements_made_ = 0;
  std::vector<subscriber> subs_;
  std::vector<std::pair<std::uint64_t, lost_handler>> lost_handlers_;
  std::uint64_t next_sub_ = 0;
  int dispatching_ = 0;
  cancel_source pump_cancel_;
  async_event pump_done_;
  task<void> pump_;  // last: destroyed first, before the socket closes
};

namespace detail {
// The options of a connection a lock or pubsub opens beside its main one
// (a waiter, a watcher): same logger and liveness, and no notify probe when
// it never LISTENs.
inline connect_options derived_options(log_handler logger, std::chrono::milliseconds liveness, bool listens) {
  connect_options o;
  o.logger = std::move(logger);
  o.liveness_timeout = liveness;
  if (!listens) o.notify_probe_timeout = std::chrono::milliseconds(0);
  return o;
}
}  // namespace detail

}  // namespace pgiplock

// ---- implementation ---------------------------------------------------------

#include "detail/probes.hpp"

namespace pgiplock {

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE task<std::shared_ptr<connection>> connection::connect(event_loop& loop, std::string conninfo,
                                                            connect_options options) {
  return connect_impl(loop, std::move(conninfo), std::move(options));
}

PGIPLOCK_INLINE task<std::shared_ptr<connection>> connection::connect(event_loop& loop, std::string conninfo) {
  return connect_impl(loop, std::move(conninfo), connect_options());
}

PGIPLOCK_INLINE connection::connection(private_tag, event_loop& loop, std::string conninfo, std::string app,
                              log_handler logger)
    : loop_(&loop), conninfo_(std::move(conninfo)), app_(std::move(app)), logger_(std::move(logger)),
      pump_done_(loop) {}

// The pump goes first (its poll abandoned), then the socket (conn_).
PGIPLOCK_INLINE connection::~connection() { pump_ = task<void>{}; }

PGIPLOCK_INLINE task<std::shared_ptr<connection>> connection::connect_impl(event_loop& loop, std::string conninfo,
                                                                  connect_options options) {
  auto params = detail::parse_conninfo(conninfo);
  std::string app = options.application_name.empty() ? std::string(detail::app_prefix) + detail::random_uuid()
                                                     : options.application_name;
  params.set("application_name", app);
  params.set_liveness_defaults(options.liveness_timeout);
  auto limit = params.connect_timeout.value_or(options.timeout);
  auto conn = std::make_shared<connection>(private_tag{}, loop, std::move(conninfo), std::move(app), options.logger);
  co_await conn->establish(std::move(params), limit);
  co_await conn->prove_usable(std::move(options));
  co_return conn;
}

// Each host of the list in turn, within one deadline for the list (the
// conninfo's connect_timeout, or the connect's timeout): each host gets an
// equal share of what is left, so one that never answers cannot keep the
// primary behind it from being reached, and one that refuses at once leaves
// its share to the others.
PGIPLOCK_INLINE task<void> connection::establish(detail::conninfo_params params, std::chrono::milliseconds limit) {
  auto hosts = detail::per_host(params);
  if (hosts.size() == 1) {
    auto why = co_await establish_one(params, limit);
    if (why.empty()) co_return;
    throw cannot_connect(params, why);
  }
  auto deadline = event_loop::clock::now() + limit;
  std::string failures;
  for (std::size_t i = 0; i < hosts.size(); ++i) {
    auto& host = hosts[i];
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - event_loop::clock::now());
    auto share = std::max(left / static_cast<long>(hosts.size() - i), std::chrono::milliseconds(1));
    auto why = co_await establish_one(host, share);
    if (why.empty()) co_return;
    failures += (failures.empty() ? "" : "; ") + host.target + ": " + why;
  }
  throw cannot_connect(params, failures);
}

// libpq's non-blocking connect to one host, driven by the loop, within
// `limit`: empty when connected, else why not.
PGIPLOCK_INLINE task<std::string> connection::establish_one(const detail::conninfo_params& params,
                                                            std::chrono::milliseconds limit) {
  auto deadline = event_loop::clock::now() + limit;
  std::vector<const char*> keys, values;
  for (std::size_t i = 0; i < params.keys.size(); ++i) {
    keys.push_back(params.keys[i].c_str());
    values.push_back(params.values[i].c_str());
  }
  keys.push_back(nullptr);
  values.push_back(nullptr);
  conn_.reset(PQconnectStartParams(keys.data(), values.data(), 0));
  if (!conn_) throw std::bad_alloc();
  auto libpq_error = [this] { return detail::trim_message(PQerrorMessage(conn_.get())); };
  if (PQstatus(conn_.get()) == CONNECTION_BAD) co_return libpq_error();
  PostgresPollingStatusType st = PGRES_POLLING_WRITING;
  while (st != PGRES_POLLING_OK) {
    if (st == PGRES_POLLING_FAILED) co_return libpq_error();
    // libpq may open a new socket per address it tries: read it anew.
    int fd = PQsocket(conn_.get());
    if (fd < 0) co_return "libpq has no socket";
    auto r = co_await loop_->poll(fd, st == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline);
    if (r.timed_out) {
      co_return "no answer within " + std::to_string(limit.count()) +
          " ms (server down, address unreachable, or not a PostgreSQL server)";
    }
    st = PQconnectPoll(conn_.get());
  }
  finish_setup();
  co_return std::string();
}

// The server's side of dead-link detection, then proof that LISTEN/NOTIFY
// works on this session (see connect_options::notify_probe_timeout).
PGIPLOCK_INLINE task<void> connection::prove_usable(connect_options options) {
  co_await refuse_standby();
  auto live = options.liveness_timeout;
  if (live.count() > 0) co_await detail::apply_server_liveness(*this, live);
  if (options.notify_probe_timeout.count() <= 0) co_return;
  auto probe = co_await detail::check_notify_works(shared_from_this(), std::move(options));
  if (probe.server_pid) backend_pid_ = probe.server_pid;  // our notifications carry it; the locks compare
  if (probe.problem.empty()) co_return;
  auto error = cannot_connect(detail::parse_conninfo(conninfo_),
                              "LISTEN/NOTIFY does not work on this connection: " + probe.problem +
                                  ". A transaction-pooling PgBouncer (pool_mode = transaction or statement) does "
                                  "this; connect to PostgreSQL directly or through a session-pooling pool");
  co_await close();
  throw error;
}

// A hot standby takes connections but refuses LISTEN's effect, NOTIFY and
// every write: say so at connect (a single host, a stale DNS name) rather
// than fail later. PostgreSQL 14 on reports it at startup; older ones are asked.
PGIPLOCK_INLINE task<void> connection::refuse_standby() {
  const char* reported = PQparameterStatus(conn_.get(), "in_hot_standby");
  bool standby = reported && std::string_view(reported) == "on";
  if (!reported) {
    auto r = co_await query(std::string(detail::sql::in_recovery));
    standby = r.get(0, 0) == "t";
  }
  if (!standby) co_return;
  auto error = cannot_connect(detail::parse_conninfo(conninfo_),
                              "the server is in recovery (a hot standby): LISTEN, NOTIFY and the locks need the "
                              "primary; give the primary's host too (several hosts get target_session_attrs="
                              "read-write), or the address that follows the primary");
  co_await close();
  throw error;
}

PGIPLOCK_INLINE connection_error connection::cannot_connect(const detail::conninfo_params& params,
                                                   const std::string& why) const {
  // With several hosts libpq's message names each one it tried; ours names the list.
  std::string target = conn_ && params.hosts == 1 ? detail::describe_target(conn_.get()) : std::string();
  if (target.empty()) target = params.target;
  return connection_error("pgiplock: cannot connect to " + target + ": " + why + detail::setting_hint(why));
}

PGIPLOCK_INLINE task<void> connection::close_quietly(std::shared_ptr<connection> c) { co_await c->close(); }

PGIPLOCK_INLINE task<void> connection::close() {
  auto self = shared_from_this();
  if (closing_) {
    co_await pump_done_.wait();
    co_return;
  }
  closing_ = true;
  pump_cancel_.cancel();
  co_await pump_done_.wait();
  lose("the connection was closed by the application");
  conn_.reset();
}
#endif  // PGIPLOCK_DEFINITIONS

template <class... Args>
task<result> connection::query(std::string sql, Args&&... args) {
  return run(std::move(sql), params_of(std::forward<Args>(args)...), false);
}

template <class... Args>
task<result> connection::query_prepared(std::string sql, Args&&... args) {
  return run(std::move(sql), params_of(std::forward<Args>(args)...), true);
}

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE task<void> connection::listen(std::string_view channel) {
  co_await query(std::string(detail::sql::listen) + quote_identifier(channel));
}

PGIPLOCK_INLINE task<void> connection::unlisten(std::string_view channel) {
  co_await query(std::string(detail::sql::unlisten) + quote_identifier(channel));
}
#endif  // PGIPLOCK_DEFINITIONS

template <class... Args>
std::vector<detail::param> connection::params_of(Args&&... args) {
  std::vector<detail::param> params;
  params.reserve(sizeof...(Args));
  (params.push_back(detail::to_param(std::forward<Args>(args))), ...);
  return params;
}

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE task<result> connection::run(std::string sql, std::vector<detail::param> params, bool prepare) {
  auto self = shared_from_this();
  if (!is_open()) throw connection_error(closed_message());
  int discard = 0;
  if (!send(sql, params, prepare, discard) || !PQpipelineSync(conn_.get())) {
    std::string why = detail::trim_message(PQerrorMessage(conn_.get()));
    // A PREPARE already queued would go out with the next segment and be
    // taken for that query's result: the pipeline is beyond repair.
    if (PQstatus(conn_.get()) == CONNECTION_BAD || discard) {
      lose(why);
      throw connection_error(closed_message());
    }
    throw error("pgiplock: cannot send query: " + why);
  }
  outcome out;
  pending_.push_back(pending_query{0, &out, discard, discard ? sql : std::string()});
  std::uint64_t* slot = &pending_.back().op;
  flush_output();
  co_await loop_->wait_for_completion(slot);
  if (out.failure) {
    // Gone from the server (DISCARD ALL, DEALLOCATE): prepare it anew next time.
    if (prepare && out.sqlstate == detail::sqlstate::invalid_statement_name) prepared_.erase(sql);
    std::rethrow_exception(out.failure);
  }
  co_return std::move(out.value);
}

// Queues the statement. A new prepared statement is prepared in the same
// pipeline segment as its first execution: one round trip, and a failed
// PREPARE fails this query (`discard` counts the PREPARE's result).
PGIPLOCK_INLINE bool connection::send(const std::string& sql, const std::vector<detail::param>& params, bool prepare,
                             int& discard) {
  std::vector<const char*> values(params.size());
  std::vector<int> lengths(params.size()), formats(params.size(), 0);
  for (std::size_t i = 0; i < params.size(); ++i) {
    values[i] = params[i] ? params[i]->data() : nullptr;
    lengths[i] = params[i] ? static_cast<int>(params[i]->size()) : 0;
  }
  auto n = static_cast<int>(params.size());
  PGconn* c = conn_.get();
  if (!prepare) return PQsendQueryParams(c, sql.c_str(), n, nullptr, values.data(), lengths.data(), formats.data(), 0);
  auto it = prepared_.find(sql);
  std::string name;
  if (it != prepared_.end()) {
    name = it->second;
  } else {
    // Never reused: a statement whose first run failed after its PREPARE
    // succeeded still exists on the server.
    name = "pgiplock_" + std::to_string(++statements_made_);
    if (!PQsendPrepare(c, name.c_str(), sql.c_str(), n, nullptr)) return false;
    discard = 1;
    prepared_.emplace(sql, name);
  }
  return PQsendQueryPrepared(c, name.c_str(), n, values.data(), lengths.data(), formats.data(), 0);
}

PGIPLOCK_INLINE std::uint64_t connection::subscribe(std::string channel, notification_handler fn) {
  std::uint64_t id = ++next_sub_;
  subs_.push_back(subscriber{id, std::move(channel), std::move(fn)});
  return id;
}

PGIPLOCK_INLINE void connection::unsubscribe(std::uint64_t id) noexcept {
  for (auto& s : subs_) {
    if (s.id == id) s.fn = nullptr;
  }
  prune_subscribers();
}

PGIPLOCK_INLINE std::uint64_t connection::on_lost(lost_handler fn) {
  std::uint64_t id = ++next_sub_;
  lost_handlers_.emplace_back(id, std::move(fn));
  return id;
}

PGIPLOCK_INLINE void connection::remove_on_lost(std::uint64_t id) noexcept {
  for (auto& h : lost_handlers_) {
    if (h.first == id) h.second = nullptr;
  }
}

// libpq's escaping needs the connection (its encoding).
PGIPLOCK_INLINE std::string connection::quote_identifier(std::string_view name) const {
  if (!conn_) throw connection_error(closed_message());
  char* q = PQescapeIdentifier(conn_.get(), name.data(), name.size());
  if (!q) {
    throw std::invalid_argument("pgiplock: cannot quote identifier: " +
                                detail::trim_message(PQerrorMessage(conn_.get())));
  }
  std::string out = q;
  PQfreemem(q);
  return out;
}

PGIPLOCK_INLINE std::string connection::closed_message() const {
  return lost_reason_.empty() ? std::string("pgiplock: the connection is closed") : lost_reason_;
}

PGIPLOCK_INLINE void connection::finish_setup() {
  // Installed before any statement, so no server notice goes to stderr.
  PQsetNoticeReceiver(conn_.get(), &connection::on_notice, this);
  if (PQsetnonblocking(conn_.get(), 1) != 0 || PQenterPipelineMode(conn_.get()) != 1) {
    throw connection_error("pgiplock: cannot switch the connection to non-blocking pipeline mode: " +
                           detail::trim_message(PQerrorMessage(conn_.get())));
  }
  backend_pid_ = PQbackendPID(conn_.get());
  fd_ = PQsocket(conn_.get());
  pump_ = pump();
  loop_->start(pump_);
}

PGIPLOCK_INLINE void connection::on_notice(void* arg, const PGresult* r) {
  auto* self = static_cast<connection*>(arg);
  detail::log(self->logger_, log_level::info, "server notice: " + detail::trim_message(PQresultErrorMessage(r)));
}

// Sends what libpq has buffered; if the socket is full, the pump waits for
// POLLOUT as well (its current poll is cancelled so it re-arms with it).
PGIPLOCK_INLINE void connection::flush_output() {
  if (!conn_ || lost_) return;
  int rc = PQflush(conn_.get());
  if (rc < 0) {
    lose(detail::trim_message(PQerrorMessage(conn_.get())));
  } else if (rc == 1 && !want_write_) {
    want_write_ = true;
    pump_cancel_.cancel();
  } else if (rc == 0) {
    want_write_ = false;
  }
}

PGIPLOCK_INLINE task<void> connection::pump() {
  while (!closing_ && !lost_) {
    unsigned ev = POLLIN | (want_write_ ? POLLOUT : 0u);
    auto r = co_await loop_->poll(fd_, ev, std::nullopt, &pump_cancel_);
    if (closing_) break;
    if (r.cancelled) {
      pump_cancel_.reset();
      continue;
    }
    if (r.revents & POLLOUT) flush_output();
    if (!(r.revents & (POLLIN | POLLERR | POLLHUP))) continue;
    if (!PQconsumeInput(conn_.get())) {
      lose(detail::trim_message(PQerrorMessage(conn_.get())));
      break;
    }
    // Notifications are dispatched after the coroutines whose queries just
    // completed have run: a query result comes before what the server sent
    // after it, so e.g. a LISTEN's first messages find their handler ready.
    if (collect_results()) {
      co_await loop_->yield();
      if (closing_ || lost_) break;
    }
    dispatch_notifications();
    if (PQstatus(conn_.get()) == CONNECTION_BAD) lose(detail::trim_message(PQerrorMessage(conn_.get())));
  }
  pump_done_.set();
}

// In pipeline mode each query yields its results, a NULL, then the
// PGRES_PIPELINE_SYNC of its own sync: that marks it complete. Returns
// whether any query completed.
PGIPLOCK_INLINE bool connection::collect_results() {
  bool completed = false;
  while (!pending_.empty() && !PQisBusy(conn_.get())) {
    PGresult* r = PQgetResult(conn_.get());
    if (!r) continue;
    auto& q = pending_.front();
    if (PQresultStatus(r) != PGRES_PIPELINE_SYNC) {
      take_result(q, r);
      continue;
    }
    PQclear(r);
    if (loop_->alive(q.op)) loop_->complete(q.op, 0);
    pending_.pop_front();
    completed = true;
  }
  return completed;
}

// One result of the query at the head of the pipeline: its value, its
// error, or the result of the PREPARE sent ahead of it.
PGIPLOCK_INLINE void connection::take_result(pending_query& q, PGresult* r) {
  result owned(r);
  bool alive = loop_->alive(q.op);
  switch (PQresultStatus(r)) {
    case PGRES_FATAL_ERROR:
    case PGRES_NONFATAL_ERROR:
    case PGRES_BAD_RESPONSE:
    case PGRES_PIPELINE_ABORTED:
      if (q.discard > 0) {  // the PREPARE failed: no such statement on the server
        --q.discard;
        prepared_.erase(q.prepared_sql);
      }
      if (alive && !q.out->failure) {
        q.out->failure = to_error(r);
        if (const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE)) q.out->sqlstate = state;
      }
      return;
    default:
      if (q.discard > 0) {
        --q.discard;
      } else if (alive && !q.out->value.native_handle()) {
        q.out->value = std::move(owned);
      }
  }
}

PGIPLOCK_INLINE std::exception_ptr connection::to_error(const PGresult* r) const {
  const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  std::string code = state ? state : "";
  std::string msg = detail::trim_message(PQresultErrorMessage(r));
  if (msg.empty()) msg = detail::trim_message(PQerrorMessage(conn_.get()));
  if (detail::sqlstate::ends_session(code)) {
    return std::make_exception_ptr(connection_error("pgiplock: connection lost: " + msg));
  }
  return std::make_exception_ptr(
      sql_error("pgiplock: " + msg + (code.empty() ? "" : " (SQLSTATE " + code + ")") + detail::setting_hint(msg), code));
}

PGIPLOCK_INLINE void connection::dispatch_notifications() {
  bool timed = false;
  while (PGnotify* n = PQnotifies(conn_.get())) {
    if (!std::exchange(timed, true)) detail::note_dispatch_time();
    notification note{n->relname, n->extra ? std::string_view(n->extra) : std::string_view(), n->be_pid};
    ++dispatching_;
    std::size_t count = subs_.size();  // handlers added meanwhile see the next one
    for (std::size_t i = 0; i < count; ++i) {
      auto& s = subs_[i];
      if (s.fn && (s.channel.empty() || s.channel == note.channel)) {
        auto fn = s.fn;  // the handler may unsubscribe itself
        fn(note);
      }
    }
    --dispatching_;
    PQfreemem(n);
    prune_subscribers();
  }
}

PGIPLOCK_INLINE void connection::prune_subscribers() {
  if (dispatching_) return;
  subs_.erase(std::remove_if(subs_.begin(), subs_.end(), [](const subscriber& s) { return !s.fn; }), subs_.end());
}

// The link is gone: every waiter learns it now, with the reason.
PGIPLOCK_INLINE void connection::lose(const std::string& why) {
  if (lost_) return;
  lost_ = true;
  lost_reason_ = closing_ ? "pgiplock: the connection was closed" : "pgiplock: connection lost: " + why;
  connection_error err(lost_reason_);
  for (auto& q : pending_) {
    if (loop_->alive(q.op)) {
      q.out->failure = std::make_exception_ptr(err);
      loop_->complete(q.op, 0);
    }
  }
  pending_.clear();
  pump_cancel_.cancel();
  auto handlers = std::move(lost_handlers_);
  lost_handlers_.clear();
  for (auto& h : handlers) {
    if (h.second) h.second(err);
  }
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock
