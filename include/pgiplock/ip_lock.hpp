// ==== ip_lock ================================================================
//
// The seed's PgIpLock: an inter-process lock over an existing connection for
// one LISTEN channel, on the lock schema shared with @imqueue/pg-pubsub:
//   <schema>.lock(channel varchar PRIMARY KEY, app varchar NOT NULL)
// A row's channel is the lock channel "__PgIpLock__:<channel>", its app the
// holder connection's application_name. A holder is alive while a session
// with that application_name exists. Releasing deletes the row; a deferred
// constraint trigger then NOTIFYs the lock channel at commit, and standbys
// listening there acquire at once. Standbys also retry every
// acquire_interval, which covers holders (Node ones) that died.
//
// Beyond the reference: the holder also holds a session advisory lock for
// the channel, so its death frees that lock the moment the server sees the
// socket close. Each standby waits for it server-side, on a second
// connection, in bounded slices, and takes over milliseconds after the
// holder dies. Every tenure gets a fencing token from a sequence, strictly
// increasing across the lock group.
//
// Its states (lock_state) and every transition, all made by ip_lock::enter():
//
//   created --init()--> standby --won--> holding --release()--> draining
//                         ^  ^             |                      |  |
//                         |  +-- demoted --+       the successor  |  |
//                         |      or link lost      announced      |  |
//                         |                                       v  |
//                         +------ release done ------------- releasing
//                         +------ release done, handover timeout, ---+
//                                 or link lost
//   (a release that fails goes back from draining to holding)
//   any state --destroy() done--> destroyed
//
// on_acquire fires on entering holding; on_lose on leaving holding,
// draining or releasing for standby or destroyed. While draining, the old
// holder still delivers: until its successor announces that its LISTEN has
// committed (both see one commit order, so the cut is exact).
#pragma once

#include "connection.hpp"
#include "stats.hpp"
#include "detail/lock_schema.hpp"

namespace pgiplock {

struct ip_lock_options {
  std::shared_ptr<connection> client;  // the seed's pgClient; the lock opens no connection of its own for it
  log_handler logger;                  // optional; falls back to the client's
  std::chrono::milliseconds acquire_interval{30000};
  // Crash takeover in milliseconds: a second connection (from
  // client->conninfo(), its own application_name) waits for the holder's
  // advisory lock. Off: release events and the retry timer only.
  bool fast_failover = true;
  // Longest single server-side wait of that connection; 0: acquire_interval.
  std::chrono::milliseconds wait_slice{0};
  // The holder checks its row every liveness_timeout / 4 and demotes itself
  // (stops holding, on_lose) when the row is gone or the check gets no
  // answer within liveness_timeout / 2.
  std::chrono::milliseconds liveness_timeout{10000};
  // Lossless graceful handover, for locks whose successors announce their
  // LISTEN (pubsub's do; it sets 500 ms): after releasing, a holder that had
  // C++ standbys waiting keeps delivering (is_draining()) until the
  // successor's announcement, or this long. 0: release at once.
  std::chrono::milliseconds handover_timeout{0};
  // A data channel to LISTEN in the very transaction that wins the lock,
  // announcing it on the lock channel (what pubsub uses): a new holder
  // delivers one round trip sooner. Empty: none.
  std::string listen_on_acquire;
};

namespace detail {
// Besides ip_locks, graceful shutdown releases what else holds channels: the
// fleet members that pubsub runs. ip_lock::destroy_all() and has_instances()
// count them too.
class lock_holder {
 public:
  virtual ~lock_holder() = default;
  virtual event_loop& holder_loop() const = 0;
  virtual task<void> release_for_shutdown() = 0;  // leaves the registry first
};
inline std::vector<lock_holder*>& lock_holders() {
  static std::vector<lock_holder*> all;
  return all;
}
inline void forget_lock_holder(lock_holder* h) {
  auto& all = lock_holders();
  all.erase(std::remove(all.begin(), all.end(), h), all.end());
}
}  // namespace detail

// See the diagram above.
enum class lock_state : std::uint8_t { created, standby, holding, draining, releasing, destroyed };

class ip_lock {
 public:
  using channel_handler = std::function<void(std::string_view channel)>;

  // Throws std::invalid_argument for an empty, NUL-containing or too long
  // channel name (at most 50 bytes), a missing client, or a lock schema name
  // (PG_PUBSUB_SCHEMA_NAME) the server would truncate.
  ip_lock(std::string channel, ip_lock_options options);
  ip_lock(const ip_lock&) = delete;
  ip_lock& operator=(const ip_lock&) = delete;
  // Without destroy(): the background coroutines are cancelled, the lock is
  // unregistered and stops listening; a row it holds is deleted in the
  // background while the connection is open (standbys get the release
  // event), otherwise it is freed with the session and a standby takes over.
  ~ip_lock();

  [[nodiscard]] const std::string& channel() const noexcept { return channel_; }
  [[nodiscard]] const std::string& lock_channel() const noexcept { return lock_channel_; }
  [[nodiscard]] const ip_lock_options& options() const noexcept { return options_; }
  // "pgip_lock", or $PG_PUBSUB_SCHEMA_NAME, as the Node package reads it.
  [[nodiscard]] static std::string schema_name() { return detail::lock_schema_name(); }

  // Creates the lock storage if missing (idempotent, safe when many fresh
  // processes start at once), listens for release events and starts the
  // background coroutines. Calling it again does nothing.
  task<void> init();
  // True when this lock holds the channel now (also when it already did:
  // then its row is checked), false when a live holder has it. Never raises
  // an error on the server, so a standby's attempt leaves nothing in the log.
  // Needs init() first (std::logic_error otherwise).
  task<bool> acquire();
  // Deletes our own row, if we hold one (someone else's row is never
  // touched), and frees the advisory lock. Other instances get the release
  // event at commit and the advisory waiters wake. If C++ standbys were
  // waiting, this one keeps delivering until the winner announces that its
  // LISTEN has committed, or handover_timeout passes; on_lose fires then.
  task<void> release();
  // Releases, stops listening and the background coroutines, unregisters.
  // Safe to call twice and on a dead connection; never throws for a lost link.
  task<void> destroy();

  [[nodiscard]] lock_state state() const noexcept { return state_; }
  [[nodiscard]] bool is_acquired() const noexcept;
  // Released, but still delivering until the successor's LISTEN commits.
  [[nodiscard]] bool is_draining() const noexcept;
  // The holder's LISTEN of options().listen_on_acquire committed with its
  // win (true from on_acquire on, while holding).
  [[nodiscard]] bool listens_on_acquire() const noexcept;
  // For a holder that announces its LISTEN (pubsub): whether the stream has
  // passed the cut. A LISTEN can start receiving slightly before its own
  // commit (PostgreSQL's queue position is set at pre-commit); what comes
  // before our own announcement is the draining predecessor's to deliver.
  // Not waited for after a crash takeover: nobody drains then.
  [[nodiscard]] bool past_handover_cut() const noexcept;
  // The fencing token of the current tenure: strictly increasing across the
  // lock group (a sequence), 0 when not holding.
  [[nodiscard]] std::int64_t token() const noexcept;
  // A snapshot: role (holder or standby), token, tenure start, and the
  // tenures won by takeover and by handover, each with how long its
  // winning attempt took (stats.hpp). delivered stays 0: a lock delivers
  // nothing itself.
  [[nodiscard]] channel_stats stats() const;
  // Why the last tenure ended without a release (the liveness check failed,
  // the row was deleted); empty after a release or a new win. Set before
  // on_lose runs.
  [[nodiscard]] const std::string& demotion_reason() const noexcept { return demotion_reason_; }

  // Called after a release event from another instance (having tried to
  // acquire first). Only one handler, as in the seed: a second throws.
  void on_release(channel_handler fn);
  // Whenever this lock becomes the holder, by any path.
  void on_acquire(channel_handler fn) { on_acquire_.push_back(std::move(fn)); }
  // Whenever it stops being the holder (release, lost link, lost row).
  void on_lose(channel_handler fn) { on_lose_.push_back(std::move(fn)); }

  // Destroys every lock of this process that runs on the calling thread's
  // event loop (all of them when called outside a loop).
  static task<void> destroy_all();
  // Whether any lock exists (from construction until destroy() or destruction).
  [[nodiscard]] static bool has_instances() { return !registry().empty() || !detail::lock_holders().empty(); }

 private:
  struct outcome {
    bool got_advisory = false;
    bool won = false;
  };

  static std::vector<ip_lock*>& registry();
  static void registry_remove(ip_lock* l);
  const log_handler& logger() const;
  void note(log_level level, std::string_view message) const;
  void enter(lock_state next, std::string_view why);
  const detail::lock_statements& statements();
  bool announces() const noexcept { return !options_.listen_on_acquire.empty(); }
  std::pair<std::int32_t, std::int32_t> presence_key() const noexcept { return detail::split_key(key_); }
  void detach_from_client();
  void stop_background();
  void start_background();

  task<outcome> take();
  task<outcome> attempt(std::shared_ptr<connection> client);
  void count_win(bool fresh, event_loop::clock::duration took);
  task<bool> holds_row(std::shared_ptr<connection> client);
  task<void> demote(std::string why);
  task<void> wait_for_successor();
  void on_lock_channel(const notification& n);
  static task<void> release_in_background(std::shared_ptr<connection> client, detail::lock_statements sql,
                                          std::string lock_channel, std::int64_t key, bool advisory_held);
  static task<void> leave_quietly(std::shared_ptr<connection> client, std::string lock_channel, bool present,
                                  std::pair<std::int32_t, std::int32_t> presence);

  task<void> retry_loop();
  task<void> heartbeat_loop();
  task<std::string> check_liveness(std::chrono::milliseconds limit);
  task<void> waiter_loop();
  bool waiter_idle() const;
  task<void> rest_waiter();
  task<void> open_waiter();
  task<std::optional<bool>> wait_one_slice();
  task<void> take_over();

  std::string channel_;
  std::string lock_channel_;
  ip_lock_options options_;
  std::int64_t key_ = 0;
  std::optional<detail::lock_statements> sql_;  // built on first use: quoting needs the connection
  lock_state state_ = lock_state::created;
  bool destroy_requested_ = false;  // destroy() under way: a second call returns at once
  struct {
    bool advisory = false;  // the channel's session advisory lock, on the client connection
    bool presence = false;  // the shared presence lock (announces())
  } held_;
  struct {
    bool fresh_tenure = false;           // won a row the predecessor released
    bool own_announcement_seen = false;  // our announcement has come back to us
  } cut_;
  bool release_pending_ = false;      // a release event came; the retry loop reports it
  bool waiter_sees_holder_ = false;   // the last wait slice timed out: a live holder holds it
  std::shared_ptr<async_event> attempt_done_;  // set while an attempt is in flight: one at a time
  std::shared_ptr<async_event> announced_;     // the successor announced (while draining)
  std::optional<std::int64_t> token_;
  channel_stats wins_;  // the counters of stats(), kept for the lock's life
  event_loop::clock::time_point passive_until_{};
  std::uint64_t notify_sub_ = 0, lost_sub_ = 0;
  channel_handler on_release_;
  std::vector<channel_handler> on_acquire_, on_lose_;
  std::string demotion_reason_;
  cancel_source wake_;          // release events wake the retry loop
  cancel_source standby_wake_;  // losing the lock wakes the waiter loop
  std::shared_ptr<connection> waiter_;
  // Last: destroyed first.
  task<void> heartbeat_;
  task<void> waiter_task_;
  task<void> background_;
};

// ---- implementation ---------------------------------------------------------

namespace detail {

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE const char* state_name(lock_state s) {
  switch (s) {
    case lock_state::created: return "created";
    case lock_state::standby: return "standby";
    case lock_state::holding: return "holding";
    case lock_state::draining: return "draining";
    case lock_state::releasing: return "releasing";
    case lock_state::destroyed: return "destroyed";
  }
  return "?";
}

// Holding the channel, or handing it over.
PGIPLOCK_INLINE bool tenured(lock_state s) {
  return s == lock_state::holding || s == lock_state::draining || s == lock_state::releasing;
}

PGIPLOCK_INLINE bool allowed(lock_state from, lock_state to) {
  using enum lock_state;
  switch (to) {
    case standby: return from != destroyed;  // from created: init(); else lost, demoted or released
    case holding: return from == standby || from == draining;  // won; a failed release
    case draining: return from == holding;
    case releasing: return from == draining;
    case destroyed: return true;
    case created: return false;
  }
  return false;
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace detail

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE ip_lock::ip_lock(std::string channel, ip_lock_options options)
    : channel_(std::move(channel)), options_(std::move(options)) {
  detail::validate_channel(channel_, detail::channel_use::locked);
  if (!options_.client) throw std::invalid_argument("pgiplock: ip_lock needs options.client");
  if (options_.acquire_interval.count() <= 0) {
    throw std::invalid_argument("pgiplock: ip_lock acquire_interval must be positive");
  }
  (void)schema_name();  // a bad PG_PUBSUB_SCHEMA_NAME is refused here, not at the first acquire
  lock_channel_ = std::string(detail::lock_prefix) + channel_;
  key_ = detail::advisory_key(lock_channel_);
  registry().push_back(this);
}

PGIPLOCK_INLINE ip_lock::~ip_lock() {
  registry_remove(this);
  stop_background();
  detach_from_client();
  auto client = options_.client;
  if (!client->is_open()) return;
  auto& loop = client->loop();
  if (detail::tenured(state_)) {
    loop.spawn(release_in_background(client, statements(), lock_channel_, key_, held_.advisory));
  }
  if (!destroy_requested_ && state_ != lock_state::created) {
    loop.spawn(leave_quietly(client, lock_channel_, held_.presence, presence_key()));
  }
}

// The one place the state changes; see the diagram at the top.
PGIPLOCK_INLINE void ip_lock::enter(lock_state next, std::string_view why) {
  lock_state was = state_;
  if (was == next) return;
  if (!detail::allowed(was, next)) {
    note(log_level::warn, std::string("ignored a transition from ") + detail::state_name(was) + " to " +
                              detail::state_name(next) + " (" + std::string(why) + ")");
    return;
  }
  state_ = next;
  note(log_level::debug, std::string(detail::state_name(was)) + " -> " + detail::state_name(next) + ": " +
                             std::string(why));
  if (next == lock_state::holding && !detail::tenured(was)) {
    demotion_reason_.clear();
    for (std::size_t i = 0; i < on_acquire_.size(); ++i) on_acquire_[i](channel_);
  }
  if (detail::tenured(was) && !detail::tenured(next)) {
    standby_wake_.cancel();  // the waiter has work again
    for (std::size_t i = 0; i < on_lose_.size(); ++i) on_lose_[i](channel_);
  }
}

PGIPLOCK_INLINE bool ip_lock::is_acquired() const noexcept {
  return state_ == lock_state::holding && options_.client->is_open();
}

PGIPLOCK_INLINE bool ip_lock::is_draining() const noexcept {
  return state_ == lock_state::draining && options_.client->is_open();
}

PGIPLOCK_INLINE bool ip_lock::listens_on_acquire() const noexcept {
  return detail::tenured(state_) && !options_.listen_on_acquire.empty();
}

PGIPLOCK_INLINE bool ip_lock::past_handover_cut() const noexcept { return !cut_.fresh_tenure || cut_.own_announcement_seen; }

PGIPLOCK_INLINE std::int64_t ip_lock::token() const noexcept { return is_acquired() && token_ ? *token_ : 0; }

PGIPLOCK_INLINE channel_stats ip_lock::stats() const {
  channel_stats s = wins_;
  s.channel = channel_;
  s.token = token();
  s.role = s.token ? channel_role::holder : channel_role::standby;
  if (!s.token) s.tenure_since = {};
  return s;
}

PGIPLOCK_INLINE void ip_lock::count_win(bool fresh, event_loop::clock::duration took) {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(took);
  wins_.tenure_since = std::chrono::system_clock::now();
  if (fresh) {
    ++wins_.handovers;
    wins_.last_handover = us;
  } else {
    ++wins_.takeovers;
    wins_.last_takeover = us;
  }
}

PGIPLOCK_INLINE void ip_lock::on_release(channel_handler fn) {
  if (on_release_) throw std::logic_error("pgiplock: ip_lock '" + channel_ + "' already has an on_release handler");
  on_release_ = std::move(fn);
}

PGIPLOCK_INLINE task<void> ip_lock::init() {
  if (state_ != lock_state::created) co_return;
  auto client = options_.client;
  co_await detail::ensure_lock_schema(client, schema_name());
  (void)statements();
  notify_sub_ = client->subscribe(lock_channel_, [this](const notification& n) { on_lock_channel(n); });
  lost_sub_ = client->on_lost([this](const connection_error&) {
    held_.advisory = false;
    if (detail::tenured(state_)) enter(lock_state::standby, "the connection was lost");
  });
  co_await client->listen(lock_channel_);
  if (announces()) {
    // Seen by a releasing holder: an announcing successor may take over, so
    // it drains until the announcement (see release()).
    auto presence = presence_key();
    co_await client->query(std::string(detail::sql::presence_lock), presence.first, presence.second);
    held_.presence = true;
  }
  enter(lock_state::standby, "initialized");
  start_background();
}

PGIPLOCK_INLINE task<bool> ip_lock::acquire() {
  auto o = co_await take();
  co_return o.won;
}

PGIPLOCK_INLINE task<void> ip_lock::release() {
  auto client = options_.client;
  bool was = state_ == lock_state::holding;
  demotion_reason_.clear();
  token_.reset();
  if (was) {
    // Our own waiter would otherwise grab the lock straight back, before the
    // standby the release was for: stay passive for an interval.
    passive_until_ = event_loop::clock::now() + options_.acquire_interval;
    enter(lock_state::draining, "release");
  }
  int waiting = 0;
  if (client->is_open()) {
    bool advisory = std::exchange(held_.advisory, false);
    try {
      waiting = co_await detail::release_row(client, statements(), lock_channel_, key_, advisory);
    } catch (const connection_error&) {
      // The session is gone, and its row with it as far as standbys can tell.
    } catch (...) {
      held_.advisory = advisory;
      if (state_ == lock_state::draining) enter(lock_state::holding, "the release failed");
      throw;
    }
  }
  note(log_level::debug, "released; " + std::to_string(waiting) + " announcing standby(s)" +
                             (state_ == lock_state::releasing ? "; the successor has already announced" : ""));
  if (was && waiting > 0 && client->is_open() && state_ == lock_state::draining) co_await wait_for_successor();
  if (state_ == lock_state::draining || state_ == lock_state::releasing) enter(lock_state::standby, "released");
}

// A drain: deliver until the successor announces, or handover_timeout.
PGIPLOCK_INLINE task<void> ip_lock::wait_for_successor() {
  if (options_.handover_timeout.count() <= 0) co_return;
  auto announced = std::make_shared<async_event>(options_.client->loop());
  announced_ = announced;
  co_await announced->wait_for(options_.handover_timeout);
  announced_.reset();
}

PGIPLOCK_INLINE task<void> ip_lock::destroy() {
  if (destroy_requested_ || state_ == lock_state::destroyed) co_return;
  destroy_requested_ = true;
  registry_remove(this);
  stop_background();
  auto client = options_.client;
  if (auto w = std::move(waiter_)) client->loop().spawn(connection::close_quietly(w));
  bool listening = state_ != lock_state::created;
  if (client->is_open()) {
    try {
      co_await release();  // still listening: the successor's announcement ends the drain
    } catch (const std::exception& e) {
      note(log_level::warn, std::string("destroy: ") + e.what());
    }
  }
  detach_from_client();
  if (listening && client->is_open()) {
    client->loop().spawn(leave_quietly(client, lock_channel_, std::exchange(held_.presence, false), presence_key()));
  }
  enter(lock_state::destroyed, "destroyed");
}

PGIPLOCK_INLINE task<void> ip_lock::destroy_all() {
  event_loop* here = event_loop::current();
  for (;;) {
    auto& all = registry();
    auto next = std::find_if(all.begin(), all.end(),
                             [here](ip_lock* l) { return !here || &l->options_.client->loop() == here; });
    if (next == all.end()) break;
    co_await (*next)->destroy();
  }
  for (;;) {
    auto& all = detail::lock_holders();
    auto next = std::find_if(all.begin(), all.end(),
                             [here](detail::lock_holder* h) { return !here || &h->holder_loop() == here; });
    if (next == all.end()) break;
    co_await (*next)->release_for_shutdown();
  }
}

PGIPLOCK_INLINE std::vector<ip_lock*>& ip_lock::registry() {
  static std::vector<ip_lock*> all;
  return all;
}

PGIPLOCK_INLINE void ip_lock::registry_remove(ip_lock* l) {
  auto& r = registry();
  r.erase(std::remove(r.begin(), r.end(), l), r.end());
}

PGIPLOCK_INLINE const log_handler& ip_lock::logger() const {
  return options_.logger ? options_.logger : options_.client->logger();
}

PGIPLOCK_INLINE void ip_lock::note(log_level level, std::string_view message) const {
  if (level == log_level::debug && !logger()) return;  // nobody reads it: skip building the line
  detail::log(logger(), level, "ip_lock " + channel_ + ": " + std::string(message));
}

PGIPLOCK_INLINE const detail::lock_statements& ip_lock::statements() {
  if (!sql_) sql_ = detail::lock_statements::for_schema(options_.client->quote_identifier(schema_name()));
  return *sql_;
}

PGIPLOCK_INLINE void ip_lock::detach_from_client() {
  if (notify_sub_) options_.client->unsubscribe(notify_sub_);
  if (lost_sub_) options_.client->remove_on_lost(lost_sub_);
  notify_sub_ = lost_sub_ = 0;
}

PGIPLOCK_INLINE void ip_lock::stop_background() {
  background_ = task<void>{};
  waiter_task_ = task<void>{};
  heartbeat_ = task<void>{};
}

PGIPLOCK_INLINE void ip_lock::start_background() {
  auto& loop = options_.client->loop();
  background_ = retry_loop();
  loop.start(background_);
  heartbeat_ = heartbeat_loop();
  loop.start(heartbeat_);
  if (options_.fast_failover) {
    waiter_task_ = waiter_loop();
    loop.start(waiter_task_);
  }
}

// acquire(), with what the waiter needs to know: whether the advisory lock
// was free. One attempt at a time per lock: the statement takes the session
// advisory lock, which counts re-entries.
PGIPLOCK_INLINE task<ip_lock::outcome> ip_lock::take() {
  if (state_ == lock_state::created) {
    throw std::logic_error("pgiplock: ip_lock '" + channel_ + "': acquire() before init() completed");
  }
  auto client = options_.client;
  while (attempt_done_) {
    auto busy = attempt_done_;
    (void)co_await busy->wait();
  }
  attempt_done_ = std::make_shared<async_event>(client->loop());
  struct settle {
    ip_lock* self;
    std::shared_ptr<async_event> done;
    ~settle() {
      self->attempt_done_.reset();
      done->set();
    }
  } guard{this, attempt_done_};
  try {
    if (state_ == lock_state::draining || state_ == lock_state::releasing) co_return outcome{};  // handing over
    if (state_ == lock_state::holding) {
      bool still = co_await holds_row(client);
      if (still) co_return outcome{true, true};
      co_await demote("its lock row is gone");
    }
    co_return co_await attempt(client);
  } catch (const connection_error&) {
    held_.advisory = false;
    if (detail::tenured(state_)) enter(lock_state::standby, "the connection was lost");
    throw;
  }
}

PGIPLOCK_INLINE task<ip_lock::outcome> ip_lock::attempt(std::shared_ptr<connection> client) {
  // Our announcement can be dispatched before this result is processed
  // (both arrive in one read): forget earlier ones before sending.
  cut_.own_announcement_seen = false;
  const auto& sql = statements();
  auto t0 = event_loop::clock::now();
  auto r = co_await client->query_prepared(sql.acquire, lock_channel_, client->app_name(), key_,
                                           options_.listen_on_acquire, sql.tenure_sequence, sql.app_pattern);
  outcome out{r.get(0, 0) == "t", r.get(0, 1) == "t"};
  note(log_level::debug, std::string("attempt: advisory ") + (out.got_advisory ? "got" : "busy") +
                             (out.won ? ", won" : ", lost"));
  if (out.won) {
    held_.advisory = true;
    token_ = std::strtoll(std::string(r.get(0, 2)).c_str(), nullptr, 10);
    // A fresh row: the previous holder released it and may be draining
    // until our announcement. A row taken over: its holder is dead.
    cut_.fresh_tenure = r.get(0, 3) == "t";
    count_win(cut_.fresh_tenure, event_loop::clock::now() - t0);
    enter(lock_state::holding, cut_.fresh_tenure ? "won a released row" : "took over a dead holder's row");
  } else if (out.got_advisory) {
    // The advisory lock was free but the row is a live holder's: a Node
    // peer (it takes no advisory lock), or one whose session is still
    // visible for a moment after its death.
    co_await client->query(std::string(detail::sql::advisory_unlock), key_);
  }
  co_return out;
}

PGIPLOCK_INLINE task<bool> ip_lock::holds_row(std::shared_ptr<connection> client) {
  auto r = co_await client->query_prepared(statements().holds_row, lock_channel_, client->app_name());
  co_return r.get(0, 0) == "t";
}

// Stops holding at once; frees the advisory lock so a standby can win.
PGIPLOCK_INLINE task<void> ip_lock::demote(std::string why) {
  if (state_ != lock_state::holding) co_return;
  note(log_level::warn, "giving up the lock: " + why);
  demotion_reason_ = why;
  token_.reset();
  enter(lock_state::standby, why);
  auto client = options_.client;
  if (std::exchange(held_.advisory, false) && client->is_open()) {
    try {
      co_await client->query(std::string(detail::sql::advisory_unlock), key_);
    } catch (const std::exception&) {
      // a lost link frees it anyway
    }
  }
}

PGIPLOCK_INLINE task<void> ip_lock::release_in_background(std::shared_ptr<connection> client, detail::lock_statements sql,
                                                 std::string lock_channel, std::int64_t key, bool advisory_held) {
  try {
    (void)co_await detail::release_row(client, std::move(sql), std::move(lock_channel), key, advisory_held);
  } catch (const connection_error&) {
    // gone with the session
  }
}

// Stops listening for release events and leaves the presence group.
PGIPLOCK_INLINE task<void> ip_lock::leave_quietly(std::shared_ptr<connection> client, std::string lock_channel, bool present,
                                         std::pair<std::int32_t, std::int32_t> presence) {
  try {
    co_await client->unlisten(lock_channel);
    if (present) co_await client->query(std::string(detail::sql::presence_unlock), presence.first, presence.second);
  } catch (const std::exception&) {
    // a dead session listens to nothing and holds no lock
  }
}

PGIPLOCK_INLINE void ip_lock::on_lock_channel(const notification& n) {
  if (n.sender_pid == options_.client->backend_pid()) {  // our own release or announcement
    if (n.payload == detail::announce_payload) cut_.own_announcement_seen = true;
    return;
  }
  if (n.payload == detail::announce_payload) {
    // The successor's LISTEN has committed: everything after this in the
    // stream is its to deliver. Cut here, before the next notification.
    if (state_ == lock_state::draining) {
      enter(lock_state::releasing, "the successor announced its LISTEN; handover done");
      if (announced_) announced_->set();
    }
    return;
  }
  if (n.payload != detail::release_payload) return;
  release_pending_ = true;
  wake_.cancel();
}

// Release events and the periodic retry. While the advisory waiter knows a
// live holder holds the advisory lock, the periodic attempt is skipped: an
// idle standby then sends one statement per wait slice, nothing more.
PGIPLOCK_INLINE task<void> ip_lock::retry_loop() {
  auto& loop = options_.client->loop();
  for (;;) {
    bool elapsed = co_await loop.sleep(options_.acquire_interval, &wake_);
    if (!elapsed) wake_.reset();
    bool released = std::exchange(release_pending_, false);
    bool pointless = elapsed && waiter_sees_holder_;
    if (state_ == lock_state::standby && options_.client->is_open() && !pointless) {
      try {
        (void)co_await acquire();
      } catch (const std::exception& e) {
        note(log_level::warn, std::string("acquire failed: ") + e.what());
      }
    }
    if (released && on_release_) on_release_(channel_);
    if (!options_.client->is_open()) co_return;
  }
}

// The holder's liveness check, every liveness_timeout / 4.
PGIPLOCK_INLINE task<void> ip_lock::heartbeat_loop() {
  auto& loop = options_.client->loop();
  auto every = std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10), options_.liveness_timeout / 4);
  auto limit = std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10), options_.liveness_timeout / 2);
  // A release deletes the row while still draining: not a fault.
  auto holding = [this] { return state_ == lock_state::holding && options_.client->is_open() && !attempt_done_; };
  for (;;) {
    co_await loop.sleep(every);
    if (!holding()) continue;
    auto problem = co_await check_liveness(limit);
    if (holding() && !problem.empty()) co_await demote(problem);  // unless released or lost meanwhile
  }
}

// What is wrong with our tenure, if anything: the row must still be there
// (a DELETE or TRUNCATE fires no release event), answered in time.
PGIPLOCK_INLINE task<std::string> ip_lock::check_liveness(std::chrono::milliseconds limit) {
  std::optional<bool> held;
  std::string failure;  // co_await is not allowed inside a handler
  try {
    held = co_await detail::within(options_.client->loop(), holds_row(options_.client), limit);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (!failure.empty()) co_return "the liveness check failed: " + failure;
  if (!held) co_return "the liveness check got no answer within " + std::to_string(limit.count()) + " ms";
  if (!*held) co_return "its lock row was deleted";
  co_return std::string();
}

// The fast path of a standby: wait, server-side and in bounded slices, for
// the holder's advisory lock; when it comes free, take over.
PGIPLOCK_INLINE task<void> ip_lock::waiter_loop() {
  for (;;) {
    // Re-checked after every await: the connect and the wait take time, in
    // which this lock may win, or release and turn passive.
    if (waiter_idle()) {
      co_await rest_waiter();
      continue;
    }
    if (!waiter_ || !waiter_->is_open()) {
      co_await open_waiter();
      continue;
    }
    auto free = co_await wait_one_slice();
    if (free && *free && !waiter_idle()) co_await take_over();
  }
}

PGIPLOCK_INLINE bool ip_lock::waiter_idle() const {
  return state_ != lock_state::standby || !options_.client->is_open() ||
         event_loop::clock::now() < passive_until_;
}

// Nothing to wait for: a holder gives its waiting connection back; a lock
// that just released stays passive until passive_until_.
PGIPLOCK_INLINE task<void> ip_lock::rest_waiter() {
  waiter_sees_holder_ = false;
  if (detail::tenured(state_) && waiter_) {
    auto w = std::move(waiter_);
    co_await w->close();
  }
  bool passive = state_ == lock_state::standby && options_.client->is_open();
  auto until = passive ? passive_until_ : event_loop::clock::now() + options_.acquire_interval;
  if (!co_await options_.client->loop().sleep_until(until, &standby_wake_)) standby_wake_.reset();
}

PGIPLOCK_INLINE task<void> ip_lock::open_waiter() {
  auto client = options_.client;
  auto opts = detail::derived_options(client->logger(), options_.liveness_timeout, false);
  try {
    waiter_ = co_await connection::connect(client->loop(), client->conninfo(), opts);
  } catch (const std::exception& e) {
    note(log_level::warn, std::string("fast failover unavailable for now: ") + e.what());
    waiter_.reset();
  }
  if (!waiter_) {
    waiter_sees_holder_ = false;
    co_await client->loop().sleep(options_.acquire_interval);
  }
}

// One bounded server-side wait for the advisory lock: whether it came free;
// nothing when the wait itself failed (then after a short pause).
PGIPLOCK_INLINE task<std::optional<bool>> ip_lock::wait_one_slice() {
  auto slice = options_.wait_slice.count() > 0 ? options_.wait_slice : options_.acquire_interval;
  auto w = waiter_;
  std::optional<bool> free;
  try {
    auto r = co_await w->query_prepared(statements().wait_free, key_, static_cast<long long>(slice.count()));
    free = r.get(0, 0) == "t";
  } catch (const std::exception& e) {
    note(log_level::debug, std::string("advisory wait failed: ") + e.what());
  }
  waiter_sees_holder_ = free && !*free;
  if (!free) co_await options_.client->loop().sleep(std::chrono::milliseconds(100));
  co_return free;
}

// The holder's advisory lock came free: take over, retrying briefly (the
// dead holder's application_name can stay visible in pg_stat_activity for a
// moment after its lock is freed).
PGIPLOCK_INLINE task<void> ip_lock::take_over() {
  note(log_level::debug, "the holder's advisory lock is free");
  auto client = options_.client;
  bool won = false;
  for (int i = 0; i < 25 && !won && client->is_open(); ++i) {
    try {
      auto o = co_await take();
      won = o.won;
      note(log_level::debug, "takeover attempt " + std::to_string(i + 1) + (won ? ": won" : ": lost"));
      if (!o.got_advisory) break;  // another standby holds it now
    } catch (const std::exception& e) {
      note(log_level::debug, std::string("takeover attempt failed: ") + e.what());
      break;
    }
    if (!won) co_await client->loop().sleep(std::chrono::milliseconds(2));
  }
  // The advisory lock was free but the holder lives: it takes no advisory
  // lock (a Node peer). Release events and the retry timer cover it;
  // waiting again now would spin.
  if (!won && state_ == lock_state::standby && client->is_open()) {
    co_await client->loop().sleep(options_.acquire_interval, &wake_);
  }
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock
