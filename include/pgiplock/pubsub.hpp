// ==== pubsub =================================================================
//
// The seed system's PgPubSub: LISTEN/NOTIFY with reconnects, single-listener
// mode (one ip_lock per channel: only the holder delivers), filtering of our
// own notifications, and an execution lock that processes each message once.
#pragma once

#include "detail/claims.hpp"
#include "detail/notify_batch.hpp"
#include "ip_lock.hpp"

namespace pgiplock {

struct pubsub_options {
  std::string conninfo;
  std::chrono::milliseconds retry_delay{100};
  std::size_t retry_limit = unlimited;  // reconnect attempts before giving up
  std::chrono::milliseconds acquire_interval{30000};
  bool single_listener = true;
  bool filtered = false;  // drop notifications this connection sent
  bool execution_lock = detail::env_flag("PG_PUBSUB_EXECUTION_LOCK");
  bool handle_signals = false;  // enable_graceful_shutdown(loop) at construction
  log_handler logger;
  // Execution lock: the identity of a message. Default: a hash of (sender
  // pid, channel, payload), so two identical payloads from one sender within
  // the TTL count as one message; return a message id to tell them apart.
  std::function<std::string(std::string_view channel, std::string_view payload)> execution_key;
  std::chrono::seconds execution_ttl{3600};  // how long a claimed key stays claimed
  // Crash takeover in milliseconds (see ip_lock_options::fast_failover):
  // costs one extra connection per channel while this instance stands by.
  bool fast_failover = true;
  // Lossless graceful handover (see ip_lock_options::handover_timeout).
  std::chrono::milliseconds handover_timeout{500};
  // Dead-link detection and holder self-demotion (see connect_options and
  // ip_lock_options); 0 disables.
  std::chrono::milliseconds liveness_timeout{10000};
};

// Handlers for one channel each: pubsub::channels().on(ch, fn).
class channel_emitter {
 public:
  using handler = std::function<void(std::string_view payload)>;
  void on(std::string channel, handler fn) { handlers_[std::move(channel)].push_back(std::move(fn)); }
  void off(std::string_view channel);
  void emit(std::string_view channel, std::string_view payload) const;

 private:
  std::map<std::string, std::vector<handler>, std::less<>> handlers_;
};

void enable_graceful_shutdown(event_loop& loop);

class pubsub {
 public:
  pubsub(event_loop& loop, pubsub_options options);
  pubsub(const pubsub&) = delete;
  pubsub& operator=(const pubsub&) = delete;
  ~pubsub();

  // Connects once; throws connection_error (or std::invalid_argument for a
  // bad conninfo). Reconnects after a lost link are automatic.
  task<void> connect();
  // Releases every lock, closes the connection; no reconnect after this.
  task<void> close();
  // Unlistens everything (releasing the locks, so standbys take over at
  // once), then closes.
  task<void> destroy();

  // In single-listener mode: returns once the lock attempt settled and, if
  // this instance holds the channel, once LISTEN has committed. A standby
  // starts delivering by itself when it wins later (on_listen says so).
  task<void> listen(std::string_view channel);
  task<void> unlisten(std::string_view channel);
  task<void> unlisten_all();
  // Sends `payload` on `channel`; completes when its transaction has
  // committed. Calls in flight together share one statement and one
  // transaction (at most one copy of each identical (channel, payload) per
  // transaction, since PostgreSQL would fold them into one delivery).
  task<void> notify(std::string_view channel, std::string_view payload);

  [[nodiscard]] std::vector<std::string> all_channels() const;
  [[nodiscard]] std::vector<std::string> active_channels() const;
  [[nodiscard]] std::vector<std::string> inactive_channels() const;
  // This instance delivers `ch` now: connected, LISTEN committed and, in
  // single-listener mode, holding the channel's lock.
  [[nodiscard]] bool is_active(std::string_view ch) const;
  [[nodiscard]] bool is_active() const;
  // The fencing token of this instance's current tenure on `ch` (0 when it
  // does not hold it, and outside single-listener mode).
  [[nodiscard]] std::int64_t token(std::string_view ch) const;

  [[nodiscard]] std::shared_ptr<connection> client() const { return client_; }  // replaced on reconnect
  [[nodiscard]] const pubsub_options& options() const noexcept { return options_; }
  [[nodiscard]] channel_emitter& channels() noexcept { return emitter_; }

  // Events: each call adds a handler.
  void on_connect(std::function<void()> fn) { on_connect_.push_back(std::move(fn)); }
  void on_end(std::function<void()> fn) { on_end_.push_back(std::move(fn)); }
  void on_close(std::function<void()> fn) { on_close_.push_back(std::move(fn)); }
  void on_reconnect(std::function<void(std::size_t retries)> fn) { on_reconnect_.push_back(std::move(fn)); }
  void on_error(std::function<void(const std::exception&)> fn) { on_error_.push_back(std::move(fn)); }
  void on_listen(std::function<void(std::string_view ch)> fn) { on_listen_.push_back(std::move(fn)); }
  void on_unlisten(std::function<void(const std::vector<std::string>& chs)> fn) { on_unlisten_.push_back(std::move(fn)); }
  void on_notify(std::function<void(std::string_view ch, std::string_view payload)> fn) {
    on_notify_.push_back(std::move(fn));
  }
  void on_message(std::function<void(std::string_view ch, std::string_view payload)> fn) {
    on_message_.push_back(std::move(fn));
  }

 private:
  struct channel_state {
    std::unique_ptr<ip_lock> lock;  // single-listener mode only
    bool listening = false;         // LISTEN committed on the current connection
    bool listen_started = false;
    std::shared_ptr<async_event> listened;  // set when the LISTEN in progress settles
  };

  bool locked() const { return options_.single_listener && !options_.execution_lock; }
  bool active(const channel_state& st) const;
  bool deliverable(const channel_state& st) const;
  bool connected() const { return client_ && client_->is_open(); }
  std::vector<std::string> channels_where(bool want_active) const;
  void report(const std::exception& e);
  template <class Handlers, class... Args>
  static void fire(const Handlers& handlers, const Args&... args);
  void attach(std::shared_ptr<connection> c);
  void detach();
  task<void> after_connect();
  std::unique_ptr<ip_lock> make_lock(const std::string& ch);
  task<void> subscribe_channel(std::string ch, channel_state& st);
  task<void> subscribe_all();
  task<void> start_listening(std::string ch);
  task<void> listen_statement(std::shared_ptr<connection> c, std::string ch, bool announce);
  void on_lock_won(std::string ch);
  void on_lock_lost(std::string ch);
  static task<void> unlisten_quietly(std::shared_ptr<connection> c, std::string ch);
  void on_notification(const notification& n);
  void deliver(std::string_view ch, std::string_view payload);
  void on_link_lost(const connection_error& e);
  task<void> reconnect(std::shared_ptr<connection> dead);
  task<std::size_t> connect_again();

  event_loop* loop_;
  pubsub_options options_;
  std::shared_ptr<connection> client_;
  std::uint64_t notify_sub_ = 0, lost_sub_ = 0;
  std::map<std::string, channel_state, std::less<>> channels_;
  channel_emitter emitter_;
  detail::notify_batcher batcher_;
  detail::claim_queue claims_;
  bool closing_ = false;
  std::string last_connect_error_;
  std::vector<std::function<void()>> on_connect_, on_end_, on_close_;
  std::vector<std::function<void(std::size_t)>> on_reconnect_;
  std::vector<std::function<void(const std::exception&)>> on_error_;
  std::vector<std::function<void(std::string_view)>> on_listen_;
  std::vector<std::function<void(const std::vector<std::string>&)>> on_unlisten_;
  std::vector<std::function<void(std::string_view, std::string_view)>> on_notify_, on_message_;
  task<void> reconnector_;  // last: destroyed first
};

// ---- implementation ---------------------------------------------------------

inline void channel_emitter::off(std::string_view channel) {
  auto it = handlers_.find(channel);
  if (it != handlers_.end()) handlers_.erase(it);
}

inline void channel_emitter::emit(std::string_view channel, std::string_view payload) const {
  auto it = handlers_.find(channel);
  if (it == handlers_.end()) return;
  for (std::size_t i = 0; i < it->second.size(); ++i) it->second[i](payload);
}

inline pubsub::pubsub(event_loop& loop, pubsub_options options)
    : loop_(&loop),
      options_(std::move(options)),
      batcher_(loop),
      claims_(loop,
              detail::claim_queue::hooks{
                  [this] { return client_; },
                  [this](std::string_view ch, std::string_view payload) { deliver(ch, payload); },
                  [this](const std::exception& e) { report(e); }},
              options_.execution_key, options_.execution_ttl) {
  if (options_.retry_delay.count() < 0) throw std::invalid_argument("pgiplock: retry_delay is negative");
  if (options_.handle_signals) enable_graceful_shutdown(loop);
}

inline pubsub::~pubsub() {
  reconnector_ = task<void>{};
  channels_.clear();
  detach();
}

inline task<void> pubsub::connect() {
  closing_ = false;
  auto opts = detail::derived_options(options_.logger, options_.liveness_timeout, true);
  auto c = co_await connection::connect(*loop_, options_.conninfo, opts);
  attach(std::move(c));
  co_await after_connect();
}

// On every (re)connect: the claim table, on_connect, then every channel
// given to listen() so far.
inline task<void> pubsub::after_connect() {
  if (options_.execution_lock) co_await claims_.prepare(client_);
  fire(on_connect_);
  co_await subscribe_all();
}

inline task<void> pubsub::close() {
  if (closing_ && !client_) co_return;
  closing_ = true;
  reconnector_ = task<void>{};
  for (auto& [name, st] : channels_) {
    if (st.lock) co_await st.lock->destroy();
    st.listening = false;
  }
  auto c = client_;
  detach();
  if (c) co_await c->close();
  fire(on_close_);
}

inline task<void> pubsub::destroy() {
  if (connected()) {
    try {
      co_await unlisten_all();
    } catch (const std::exception& e) {
      report(e);
    }
  }
  co_await close();
}

inline task<void> pubsub::listen(std::string_view channel_view) {
  std::string ch(channel_view);
  detail::validate_channel(ch, locked() ? detail::channel_use::locked : detail::channel_use::plain);
  auto& st = channels_[ch];
  if (!client_) co_return;  // remembered; subscribed on (re)connect
  co_await subscribe_channel(ch, st);
}

inline task<void> pubsub::unlisten(std::string_view channel_view) {
  std::string ch(channel_view);
  auto it = channels_.find(ch);
  if (it == channels_.end()) co_return;
  // The lock goes first: while it drains, this instance still delivers.
  if (it->second.lock) co_await it->second.lock->destroy();
  it = channels_.find(ch);
  if (it == channels_.end()) co_return;
  bool was_listening = it->second.listening;
  auto lock = std::move(it->second.lock);
  channels_.erase(it);
  if (connected() && was_listening) co_await client_->unlisten(ch);
  std::vector<std::string> chs{ch};
  fire(on_unlisten_, chs);
}

inline task<void> pubsub::unlisten_all() {
  std::vector<std::string> chs = all_channels();
  for (auto& ch : chs) {  // the locks first: each drains while it hands over
    auto it = channels_.find(ch);
    if (it != channels_.end() && it->second.lock) co_await it->second.lock->destroy();
  }
  channels_.clear();
  if (connected()) co_await client_->query(std::string(detail::sql::unlisten_all));
  fire(on_unlisten_, chs);
}

inline task<void> pubsub::notify(std::string_view channel_view, std::string_view payload_view) {
  std::string ch(channel_view), payload(payload_view);
  detail::validate_channel(ch, detail::channel_use::plain);
  detail::validate_payload(payload);
  if (!connected()) throw connection_error("pgiplock: notify: not connected");
  auto b = batcher_.join(client_, ch, payload);
  co_await b->done.wait();
  if (b->failure) std::rethrow_exception(b->failure);
  fire(on_notify_, std::string_view(ch), std::string_view(payload));
}

inline std::vector<std::string> pubsub::channels_where(bool want_active) const {
  std::vector<std::string> out;
  for (auto& [name, st] : channels_) {
    if (active(st) == want_active) out.push_back(name);
  }
  return out;
}

inline std::vector<std::string> pubsub::all_channels() const {
  std::vector<std::string> out;
  for (auto& [name, st] : channels_) out.push_back(name);
  return out;
}
inline std::vector<std::string> pubsub::active_channels() const { return channels_where(true); }
inline std::vector<std::string> pubsub::inactive_channels() const { return channels_where(false); }

inline bool pubsub::is_active(std::string_view ch) const {
  auto it = channels_.find(ch);
  return it != channels_.end() && active(it->second);
}

inline bool pubsub::is_active() const {
  return std::any_of(channels_.begin(), channels_.end(), [this](const auto& c) { return active(c.second); });
}

inline std::int64_t pubsub::token(std::string_view ch) const {
  auto it = channels_.find(ch);
  return (it != channels_.end() && it->second.lock) ? it->second.lock->token() : 0;
}

inline bool pubsub::active(const channel_state& st) const {
  if (!st.listening || !connected()) return false;
  return !st.lock || st.lock->is_acquired() || st.lock->is_draining();
}

// Whether a notification that reached this connection is ours to deliver.
// Once our LISTEN is on its way, whatever arrives for the channel was
// committed after it; a fresh tenure leaves what precedes its own
// announcement to the draining predecessor (see ip_lock::past_handover_cut).
inline bool pubsub::deliverable(const channel_state& st) const {
  if (!st.listen_started || !connected()) return false;
  if (!st.lock) return true;
  return (st.lock->is_acquired() && st.lock->past_handover_cut()) || st.lock->is_draining();
}

inline void pubsub::report(const std::exception& e) {
  if (on_error_.empty()) {
    detail::log(options_.logger, log_level::error, e.what());
    return;
  }
  fire(on_error_, e);
}

// By index: a handler may add handlers.
template <class Handlers, class... Args>
void pubsub::fire(const Handlers& handlers, const Args&... args) {
  for (std::size_t i = 0; i < handlers.size(); ++i) handlers[i](args...);
}

inline void pubsub::attach(std::shared_ptr<connection> c) {
  client_ = std::move(c);
  notify_sub_ = client_->subscribe("", [this](const notification& n) { on_notification(n); });
  lost_sub_ = client_->on_lost([this](const connection_error& e) { on_link_lost(e); });
}

inline void pubsub::detach() {
  if (!client_) return;
  client_->unsubscribe(notify_sub_);
  client_->remove_on_lost(lost_sub_);
  client_.reset();
}

inline std::unique_ptr<ip_lock> pubsub::make_lock(const std::string& ch) {
  ip_lock_options lo;
  lo.client = client_;
  lo.logger = options_.logger;
  lo.acquire_interval = options_.acquire_interval;
  lo.fast_failover = options_.fast_failover;
  lo.handover_timeout = options_.handover_timeout;
  lo.listen_on_acquire = ch;
  // 0 disables the demotion: a day stands for "never" in the heartbeat.
  lo.liveness_timeout = options_.liveness_timeout.count() > 0 ? options_.liveness_timeout
                                                              : std::chrono::milliseconds(std::chrono::hours(24));
  auto lock = std::make_unique<ip_lock>(ch, std::move(lo));
  lock->on_acquire([this](std::string_view c) { on_lock_won(std::string(c)); });
  lock->on_lose([this](std::string_view c) { on_lock_lost(std::string(c)); });
  return lock;
}

// Lock (single-listener mode) and LISTEN for one channel on the current
// connection.
inline task<void> pubsub::subscribe_channel(std::string ch, channel_state& st) {
  if (!locked()) {
    co_await start_listening(ch);
    co_return;
  }
  if (!st.lock) {
    st.lock = make_lock(ch);
    co_await st.lock->init();
  }
  (void)co_await st.lock->acquire();  // a win LISTENs in the same statement (on_lock_won)
}

inline task<void> pubsub::subscribe_all() {
  for (auto& ch : all_channels()) {
    auto it = channels_.find(ch);
    if (it != channels_.end()) co_await subscribe_channel(ch, it->second);
  }
}

// LISTEN once per connection; concurrent callers wait for the first.
inline task<void> pubsub::start_listening(std::string ch) {
  auto it = channels_.find(ch);
  if (it == channels_.end() || !client_) co_return;
  if (it->second.listen_started) {
    auto settled = it->second.listened;
    if (settled) co_await settled->wait();
    co_return;
  }
  it->second.listen_started = true;
  auto settled = std::make_shared<async_event>(*loop_);
  it->second.listened = settled;
  auto c = client_;
  bool ok = true;
  try {
    co_await listen_statement(c, ch, static_cast<bool>(it->second.lock));
  } catch (const std::exception& e) {
    ok = false;
    report(e);
  }
  settled->set();
  it = channels_.find(ch);  // the map may have changed while we waited
  if (it == channels_.end()) co_return;
  if (!ok) it->second.listen_started = false;
  if (!ok || c != client_) co_return;
  it->second.listening = true;
  fire(on_listen_, std::string_view(ch));
}

// With a lock, LISTEN and "listening" on the lock channel commit together:
// the exact cut of a handover.
inline task<void> pubsub::listen_statement(std::shared_ptr<connection> c, std::string ch, bool announce) {
  if (!announce) {
    co_await c->listen(ch);
    co_return;
  }
  auto sql = detail::sql::in_schema(detail::sql::listen_and_announce, c->quote_identifier(ip_lock::schema_name()));
  co_await c->query(sql, ch, std::string(detail::lock_prefix) + ch);
}

// The winning statement also LISTENed: deliver from now on. Synchronous,
// since notifications may follow in the very read that brought the win.
inline void pubsub::on_lock_won(std::string ch) {
  auto it = channels_.find(ch);
  if (it == channels_.end()) return;
  if (!it->second.lock || !it->second.lock->listens_on_acquire()) {
    loop_->spawn(start_listening(ch));
    return;
  }
  it->second.listen_started = it->second.listening = true;
  fire(on_listen_, std::string_view(ch));
}

inline void pubsub::on_lock_lost(std::string ch) {
  auto it = channels_.find(ch);
  if (it == channels_.end()) return;
  bool was = it->second.listening;
  it->second.listening = false;
  it->second.listen_started = false;
  if (was && connected()) loop_->spawn(unlisten_quietly(client_, ch));
  // A demotion is a fault the application should hear of; a release is not.
  if (was && it->second.lock && !it->second.lock->demotion_reason().empty()) {
    report(error("pgiplock: stopped delivering channel " + ch + ": " + it->second.lock->demotion_reason()));
  }
}

inline task<void> pubsub::unlisten_quietly(std::shared_ptr<connection> c, std::string ch) {
  try {
    co_await c->unlisten(ch);
  } catch (const connection_error&) {
    // the session is gone, and its LISTEN with it
  }
}

inline void pubsub::on_notification(const notification& n) {
  if (detail::is_lock_channel(n.channel)) return;
  if (options_.filtered && n.sender_pid == client_->backend_pid()) return;
  auto it = channels_.find(n.channel);
  if (options_.execution_lock) {
    if (it != channels_.end() && it->second.listen_started) claims_.add(n);
    return;
  }
  if (it == channels_.end() || !deliverable(it->second)) return;
  deliver(n.channel, n.payload);
}

inline void pubsub::deliver(std::string_view ch, std::string_view payload) {
  fire(on_message_, ch, payload);
  emitter_.emit(ch, payload);
}

inline void pubsub::on_link_lost(const connection_error& e) {
  for (auto& [name, st] : channels_) {
    st.listening = false;
    st.listen_started = false;
  }
  fire(on_end_);
  if (closing_) return;
  report(e);
  reconnector_ = reconnect(client_);
  loop_->start(reconnector_);
}

// `dead` keeps the lost connection alive until its locks (bound to it) are
// gone and we have left its lost-link callback.
inline task<void> pubsub::reconnect(std::shared_ptr<connection> dead) {
  co_await loop_->yield();  // leave the dead connection's callback first
  for (auto& [name, st] : channels_) st.lock.reset();
  detach();
  dead.reset();
  std::size_t attempts = co_await connect_again();
  if (!client_) {
    closing_ = true;
    report(error("pgiplock: reconnect failed after " + std::to_string(attempts) +
                 " attempts; last error: " + last_connect_error_));
    fire(on_close_);
    co_return;
  }
  try {
    co_await after_connect();
  } catch (const std::exception& e) {
    report(e);
  }
  fire(on_reconnect_, attempts);
}

// Tries every retry_delay, at most retry_limit times; yields the attempts.
inline task<std::size_t> pubsub::connect_again() {
  auto opts = detail::derived_options(options_.logger, options_.liveness_timeout, true);
  std::size_t attempts = 0;
  while (attempts < options_.retry_limit) {
    ++attempts;
    co_await loop_->sleep(options_.retry_delay);
    try {
      auto c = co_await connection::connect(*loop_, options_.conninfo, opts);
      attach(std::move(c));
      break;
    } catch (const std::exception& e) {
      last_connect_error_ = e.what();
    }
  }
  co_return attempts;
}

}  // namespace pgiplock
