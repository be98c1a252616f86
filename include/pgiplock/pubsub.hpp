// ==== pubsub =================================================================
//
// The seed system's PgPubSub: LISTEN/NOTIFY with reconnects, single-listener
// mode (only the holder of a channel delivers it; the member engine in
// detail/member.hpp holds the channels, at a server cost per member, not per
// channel), filtering of our own notifications, and an execution lock that
// processes each message once.
#pragma once

#include "detail/claims.hpp"
#include "detail/echo_probe.hpp"
#include "detail/journal.hpp"
#include "detail/member.hpp"
#include "detail/notify_batch.hpp"

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
  // Crash takeover in milliseconds: a second connection that watches the
  // next member of the fleet (one per instance, whatever its channels).
  // Off: crashes are noticed by the acquire_interval timer only.
  bool fast_failover = true;
  // Lossless graceful handover (see ip_lock_options::handover_timeout).
  std::chrono::milliseconds handover_timeout{500};
  // Single-listener mode: spread the channels over the members of the
  // fleet (each holds its fair share, +-1), moving them by lossless
  // graceful handovers when a member joins or leaves. Assumes the members
  // listen to the same channels.
  bool balance = false;
  // Dead-link detection and holder self-demotion (see connect_options and
  // ip_lock_options); 0 disables.
  std::chrono::milliseconds liveness_timeout{10000};
  // Durable channels (docs/durable.md): notify() journals each message and
  // nudges its channel in one transaction; the holder of a channel delivers
  // from the journal, resuming at the channel's cursor on every takeover,
  // so nothing is lost, at least once, in id order. Needs single_listener
  // (and no execution_lock) to listen. Payloads of any size up to 1 GiB.
  bool durable = false;
  // How long messages of a durable channel that nobody acknowledges are kept.
  std::chrono::milliseconds durable_retention{std::chrono::hours(24 * 7)};
  // The end-to-end probe of a listening connection: this often it notifies
  // itself and expects the echo within liveness_timeout; a missing echo is
  // a LISTEN that hears nothing: reported on on_error, then a reconnect.
  // Unset: 10 s, or liveness_timeout when shorter. 0 disables. At least
  // 100 ms and at most liveness_timeout.
  std::optional<std::chrono::milliseconds> probe_interval;
  // The probe also samples the server's NOTIFY queue; from this usage up a
  // warning is logged, once per crossing.
  double queue_warning = 0.5;
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
  // listen() for many channels at once: in single-listener mode one claim
  // (one statement) for all of them, however many.
  task<void> listen(std::vector<std::string> channels);
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
  // A snapshot of what this instance did and holds (stats.hpp); cheap.
  [[nodiscard]] pubsub_stats stats() const;

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
  // Every delivered message with its id (durable channels; 0 on plain ones),
  // for handlers that deduplicate redeliveries.
  void on_delivery(std::function<void(const delivery&)> fn) { on_delivery_.push_back(std::move(fn)); }
  // Durable channels, exactly-once effects: `fn` runs for each message in a
  // transaction on a connection of its own, in delivery order; what it
  // writes on that connection commits together with the message's
  // acknowledgement, or not at all (a throw, a crash, a replaced tenure
  // roll it back; the message then comes again, to this or the next
  // holder). With it, only these transactions move the cursor. One handler.
  void on_delivery_in_transaction(std::function<task<void>(const delivery&, connection&)> fn);

 private:
  // What stats() counts per channel: kept when the channel is unlistened
  // and given back if it is listened again (counters never go back).
  struct channel_counts {
    detail::delivery_count count;  // its address is handed to the member and the journal
    std::uint64_t takeovers = 0, handovers = 0;
    std::chrono::microseconds last_takeover{0}, last_handover{0};
  };
  struct channel_state : channel_counts {
    bool listening = false;  // LISTEN committed on the current connection
    bool listen_started = false;
    std::shared_ptr<async_event> listened;  // set when the LISTEN in progress settles
  };

  bool locked() const { return options_.single_listener && !options_.execution_lock; }
  void add_channel(const std::string& ch);
  void drop_channel(std::map<std::string, channel_state, std::less<>>::iterator it);
  bool active(std::string_view ch, const channel_state& st) const;
  bool connected() const { return client_ && client_->is_open(); }
  std::vector<std::string> channels_where(bool want_active) const;
  void report(const std::exception& e);
  template <class Handlers, class... Args>
  static void fire(const Handlers& handlers, const Args&... args);
  void attach(std::shared_ptr<connection> c);
  void detach();
  task<void> after_connect();
  connect_options main_options() const;
  task<void> ensure_member();
  std::unique_ptr<detail::member> make_member();
  task<void> subscribe_all();
  task<void> start_listening(std::string ch);
  void on_won(const std::string& ch);
  void on_lost(const std::string& ch, const std::string& reason);
  void on_notification(const notification& n);
  void deliver(std::string_view ch, std::string_view payload);
  void deliver_durable(const delivery& d);
  void make_journal();
  static void validate(const pubsub_options& o);
  detail::delivery_count* won(const std::string& ch, const detail::member::win& w);
  channel_stats channel_stats_of(const std::string& name, const channel_state& st) const;
  std::chrono::milliseconds probe_every() const;
  void keep_probe_sample();  // before the probe goes with its connection
  void ensure_probe();
  static bool journal_gone(const std::exception_ptr& failure);
  task<void> settle_durable(std::vector<std::string> channels);
  void on_link_lost(const connection_error& e);
  task<void> reconnect(std::shared_ptr<connection> dead);
  task<std::size_t> connect_again();

  event_loop* loop_;
  pubsub_options options_;
  std::shared_ptr<connection> client_;
  // Single-listener mode, from the first listen() while connected: a pubsub
  // that only notifies costs one connection, and is no member of the fleet.
  std::unique_ptr<detail::member> member_;
  std::unique_ptr<detail::journal> journal_;  // durable: beside member_, bound to the same connection
  std::unique_ptr<detail::echo_probe> probe_;  // per listening connection
  std::chrono::microseconds last_probe_round_trip_{0};  // the last sample of a previous connection's probe
  double last_queue_usage_ = 0;
  std::uint64_t reconnects_ = 0, notify_sent_ = 0, notify_failed_ = 0, probes_failed_ = 0;
  std::function<task<void>(const delivery&, connection&)> tx_handler_;
  std::shared_ptr<async_event> member_started_;  // set once member_ has started (or failed to)
  std::uint64_t notify_sub_ = 0, lost_sub_ = 0;
  std::map<std::string, channel_state, std::less<>> channels_;
  std::map<std::string, channel_counts, std::less<>> unlistened_;
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
  std::vector<std::function<void(const delivery&)>> on_delivery_;
  task<void> reconnector_;  // last: destroyed first
};

// ---- implementation ---------------------------------------------------------

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE void channel_emitter::off(std::string_view channel) {
  auto it = handlers_.find(channel);
  if (it != handlers_.end()) handlers_.erase(it);
}

PGIPLOCK_INLINE void channel_emitter::emit(std::string_view channel, std::string_view payload) const {
  auto it = handlers_.find(channel);
  if (it == handlers_.end()) return;
  for (std::size_t i = 0; i < it->second.size(); ++i) it->second[i](payload);
}

PGIPLOCK_INLINE pubsub::pubsub(event_loop& loop, pubsub_options options)
    : loop_(&loop),
      options_(std::move(options)),
      batcher_(loop),
      claims_(loop,
              detail::claim_queue::hooks{
                  [this] { return client_; },
                  [this](std::string_view ch, std::string_view payload) {
                    if (auto it = channels_.find(ch); it != channels_.end()) it->second.count.tick();
                    deliver(ch, payload);
                  },
                  [this](const std::exception& e) { report(e); }},
              options_.execution_key, options_.execution_ttl) {
  validate(options_);
  if (options_.handle_signals) enable_graceful_shutdown(loop);
}

PGIPLOCK_INLINE void pubsub::validate(const pubsub_options& o) {
  if (o.retry_delay.count() < 0) throw std::invalid_argument("pgiplock: retry_delay is negative");
  if (o.durable && o.filtered) {
    // A durable channel delivers every message of its journal, whoever sent it.
    throw std::invalid_argument("pgiplock: filtered cannot be combined with durable");
  }
  if (o.durable_retention.count() <= 0) {
    throw std::invalid_argument("pgiplock: durable_retention must be positive (it is " +
                                std::to_string(o.durable_retention.count()) + " ms)");
  }
  auto probe = o.probe_interval.value_or(std::chrono::milliseconds(0)).count();
  auto live = o.liveness_timeout.count();
  if (probe != 0 && (probe < 100 || (live > 0 && probe > live))) {
    throw std::invalid_argument("pgiplock: probe_interval is " + std::to_string(probe) +
                                " ms; it must be at least 100 ms and at most liveness_timeout (" +
                                std::to_string(live) + " ms), or 0 to disable the probe");
  }
  if (!(o.queue_warning > 0 && o.queue_warning <= 1)) {
    throw std::invalid_argument("pgiplock: queue_warning is " + std::to_string(o.queue_warning) +
                                "; it is a share of the NOTIFY queue, in (0, 1]");
  }
}

PGIPLOCK_INLINE pubsub::~pubsub() {
  reconnector_ = task<void>{};
  member_.reset();
  journal_.reset();
  channels_.clear();
  detach();
}

PGIPLOCK_INLINE task<void> pubsub::connect() {
  closing_ = false;
  auto opts = main_options();
  auto c = co_await connection::connect(*loop_, options_.conninfo, opts);
  attach(std::move(c));
  co_await after_connect();
}

// On every (re)connect: the claim table, on_connect, then every channel
// given to listen() so far.
PGIPLOCK_INLINE task<void> pubsub::after_connect() {
  if (options_.execution_lock) co_await claims_.prepare(client_);
  if (options_.durable) {
    co_await detail::ensure_journal(client_);
    batcher_.use(detail::sql::in_schema(detail::sql::publish_many,
                                        client_->quote_identifier(detail::lock_schema_name())),
                 false);
  }
  fire(on_connect_);
  co_await subscribe_all();
}

PGIPLOCK_INLINE task<void> pubsub::close() {
  if (closing_ && !client_) co_return;
  closing_ = true;
  reconnector_ = task<void>{};
  if (member_) co_await member_->leave();
  member_.reset();
  journal_.reset();
  member_started_.reset();
  for (auto& [name, st] : channels_) st.listening = false;
  auto c = client_;
  detach();
  if (c) co_await c->close();
  fire(on_close_);
}

PGIPLOCK_INLINE task<void> pubsub::destroy() {
  if (connected()) {
    try {
      co_await unlisten_all();
    } catch (const std::exception& e) {
      report(e);
    }
  }
  co_await close();
}

PGIPLOCK_INLINE task<void> pubsub::listen(std::string_view channel) {
  std::vector<std::string> one{std::string(channel)};
  co_await listen(std::move(one));
}

PGIPLOCK_INLINE task<void> pubsub::listen(std::vector<std::string> channels) {
  if (options_.durable && !locked()) {
    throw std::invalid_argument("pgiplock: durable channels are delivered by their holder: listen() needs "
                                "single_listener = true and execution_lock = false");
  }
  for (auto& ch : channels) {  // all or nothing: every name is checked before any is remembered
    detail::validate_channel(ch, locked() ? detail::channel_use::locked : detail::channel_use::plain);
  }
  for (auto& ch : channels) add_channel(ch);
  if (!client_) co_return;  // remembered; subscribed on (re)connect
  ensure_probe();
  if (!locked()) {
    for (auto& ch : channels) co_await start_listening(ch);
    co_return;
  }
  co_await ensure_member();
  if (member_) co_await member_->want(std::move(channels));  // a win LISTENs in the same statement (on_won)
}

PGIPLOCK_INLINE void pubsub::add_channel(const std::string& ch) {
  auto [it, added] = channels_.try_emplace(ch);
  if (!added) return;
  if (auto kept = unlistened_.find(ch); kept != unlistened_.end()) {
    static_cast<channel_counts&>(it->second) = kept->second;
    unlistened_.erase(kept);
  }
}

PGIPLOCK_INLINE void pubsub::drop_channel(std::map<std::string, channel_state, std::less<>>::iterator it) {
  unlistened_[it->first] = static_cast<const channel_counts&>(it->second);
  channels_.erase(it);
}

PGIPLOCK_INLINE task<void> pubsub::unlisten(std::string_view channel_view) {
  std::string ch(channel_view);
  if (channels_.find(ch) == channels_.end()) co_return;
  // The lock goes first: while it drains, this instance still delivers.
  if (member_) {
    std::vector<std::string> one{ch};
    co_await member_->release(std::move(one));  // also UNLISTENs
  }
  auto it = channels_.find(ch);
  if (it == channels_.end()) co_return;
  bool was_listening = it->second.listening && !locked();
  drop_channel(it);
  if (connected() && was_listening) co_await client_->unlisten(ch);
  std::vector<std::string> chs{ch};
  fire(on_unlisten_, chs);
}

PGIPLOCK_INLINE task<void> pubsub::unlisten_all() {
  std::vector<std::string> chs = all_channels();
  if (member_) co_await member_->release(chs);  // the locks first: they drain while they hand over
  while (!channels_.empty()) drop_channel(channels_.begin());
  if (connected()) co_await client_->query(std::string(detail::sql::unlisten_all));
  fire(on_unlisten_, chs);
}

PGIPLOCK_INLINE task<void> pubsub::notify(std::string_view channel_view, std::string_view payload_view) {
  std::string ch(channel_view), payload(payload_view);
  detail::validate_channel(ch, detail::channel_use::plain);
  if (options_.durable) {
    detail::validate_durable_payload(payload);
  } else {
    detail::validate_payload(payload);
  }
  if (!connected()) {
    ++notify_failed_;
    throw connection_error("pgiplock: notify: not connected");
  }
  detail::validate_encoding(payload, client_->client_encoding());
  for (int attempt = 0;; ++attempt) {
    auto b = batcher_.join(client_, ch, payload);
    co_await b->done.wait();
    if (!b->failure) break;
    // Nothing of a failed batch committed: after the journal's tables are
    // put back (someone dropped them), sending it once more is safe.
    if (attempt > 0 || !options_.durable || !journal_gone(b->failure) || !connected()) {
      ++notify_failed_;
      std::rethrow_exception(b->failure);
    }
    report(error("pgiplock: the durable journal's tables or functions are gone or from another pgiplock version "
                 "(dropped? an older member started?): re-creating what is missing"));
    co_await detail::ensure_journal(client_);
  }
  ++notify_sent_;
  fire(on_notify_, std::string_view(ch), std::string_view(payload));
}

PGIPLOCK_INLINE std::vector<std::string> pubsub::channels_where(bool want_active) const {
  std::vector<std::string> out;
  for (auto& [name, st] : channels_) {
    if (active(name, st) == want_active) out.push_back(name);
  }
  return out;
}

PGIPLOCK_INLINE std::vector<std::string> pubsub::all_channels() const {
  std::vector<std::string> out;
  for (auto& [name, st] : channels_) out.push_back(name);
  return out;
}
PGIPLOCK_INLINE std::vector<std::string> pubsub::active_channels() const { return channels_where(true); }
PGIPLOCK_INLINE std::vector<std::string> pubsub::inactive_channels() const { return channels_where(false); }

PGIPLOCK_INLINE bool pubsub::is_active(std::string_view ch) const {
  auto it = channels_.find(ch);
  return it != channels_.end() && active(it->first, it->second);
}

PGIPLOCK_INLINE bool pubsub::is_active() const {
  return std::any_of(channels_.begin(), channels_.end(), [this](const auto& c) { return active(c.first, c.second); });
}

PGIPLOCK_INLINE std::int64_t pubsub::token(std::string_view ch) const { return member_ ? member_->token(ch) : 0; }

PGIPLOCK_INLINE bool pubsub::active(std::string_view ch, const channel_state& st) const {
  if (!st.listening || !connected()) return false;
  return !locked() || (member_ && member_->delivering(ch));
}

PGIPLOCK_INLINE void pubsub::report(const std::exception& e) {
  if (on_error_.empty()) {
    detail::log(options_.logger, log_level::error, e.what());
    return;
  }
  fire(on_error_, e);
}
#endif  // PGIPLOCK_DEFINITIONS

// By index: a handler may add handlers.
template <class Handlers, class... Args>
void pubsub::fire(const Handlers& handlers, const Args&... args) {
  for (std::size_t i = 0; i < handlers.size(); ++i) handlers[i](args...);
}

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE void pubsub::attach(std::shared_ptr<connection> c) {
  client_ = std::move(c);
  notify_sub_ = client_->subscribe("", [this](const notification& n) { on_notification(n); });
  lost_sub_ = client_->on_lost([this](const connection_error& e) { on_link_lost(e); });
  ensure_probe();
}

PGIPLOCK_INLINE void pubsub::detach() {
  keep_probe_sample();
  probe_.reset();
  if (!client_) return;
  client_->unsubscribe(notify_sub_);
  client_->remove_on_lost(lost_sub_);
  client_.reset();
}

// The listening connection; in single-listener mode its application_name
// is the member's identity in the fleet.
PGIPLOCK_INLINE connect_options pubsub::main_options() const {
  auto o = detail::derived_options(options_.logger, options_.liveness_timeout, true);
  if (locked()) {
    auto prefix = options_.balance ? detail::balanced_member_prefix : detail::member_prefix;
    o.application_name = std::string(prefix) + detail::random_uuid();
  }
  return o;
}

// Starts the member once per connection; concurrent callers wait for it.
PGIPLOCK_INLINE task<void> pubsub::ensure_member() {
  if (member_started_) {
    auto started = member_started_;
    co_await started->wait();
    co_return;
  }
  auto started = std::make_shared<async_event>(*loop_);
  member_started_ = started;
  struct settle {
    std::shared_ptr<async_event> e;
    ~settle() { e->set(); }
  } guard{started};
  auto m = make_member();
  co_await m->start();
  if (member_started_ == started) member_ = std::move(m);
}

PGIPLOCK_INLINE std::unique_ptr<detail::member> pubsub::make_member() {
  detail::member_options mo;
  mo.acquire_interval = options_.acquire_interval;
  mo.fast_failover = options_.fast_failover;
  // A durable holder does not drain: it stopped delivering and acknowledged
  // before its release (settle_durable), and the successor resumes from the
  // cursor, so waiting for its announcement would only delay the release.
  mo.handover_timeout = options_.durable ? std::chrono::milliseconds(0) : options_.handover_timeout;
  mo.balance = options_.balance;
  mo.logger = options_.logger;
  // 0 disables the demotion: a day stands for "never" in the heartbeat.
  mo.liveness_timeout = options_.liveness_timeout.count() > 0 ? options_.liveness_timeout
                                                              : std::chrono::milliseconds(std::chrono::hours(24));
  detail::member::hooks h{[this](const std::string& ch, const detail::member::win& w) { return won(ch, w); },
                          [this](const std::string& ch, const std::string& why) {
                            if (journal_) journal_->end_tenure(ch);
                            on_lost(ch, why);
                          },
                          {},
                          {}};
  if (options_.durable) {
    make_journal();
    h.releasing = [this](std::vector<std::string> chs) { return settle_durable(std::move(chs)); };
    h.confirmed = [this](std::int64_t sent_ms) {
      if (journal_) journal_->confirmed(sent_ms);
    };
  }
  return std::make_unique<detail::member>(client_, std::move(mo), std::move(h));
}

// After a (re)connect: every channel given to listen() so far, in one claim
// in single-listener mode.
PGIPLOCK_INLINE task<void> pubsub::subscribe_all() {
  if (!locked()) {
    for (auto& ch : all_channels()) co_await start_listening(ch);
    co_return;
  }
  if (channels_.empty()) co_return;
  co_await ensure_member();
  if (member_) co_await member_->want(all_channels());
}

// LISTEN once per connection; concurrent callers wait for the first.
PGIPLOCK_INLINE task<void> pubsub::start_listening(std::string ch) {
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
    co_await c->listen(ch);
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

// The winning statement also LISTENed: deliver from now on. Synchronous,
// since notifications may follow in the very read that brought the win.
PGIPLOCK_INLINE void pubsub::on_won(const std::string& ch) {
  auto it = channels_.find(ch);
  if (it == channels_.end()) return;
  it->second.listen_started = it->second.listening = true;
  fire(on_listen_, std::string_view(ch));
}

// The member has UNLISTENed (or the session is gone). A demotion is a fault
// the application should hear of; a release is not.
PGIPLOCK_INLINE void pubsub::on_lost(const std::string& ch, const std::string& reason) {
  auto it = channels_.find(ch);
  if (it == channels_.end()) return;
  bool was = std::exchange(it->second.listening, false);
  it->second.listen_started = false;
  if (was && !reason.empty()) report(error("pgiplock: stopped delivering channel " + ch + ": " + reason));
}

// The hot path: one map lookup per notification in every mode.
PGIPLOCK_INLINE void pubsub::on_notification(const notification& n) {
  if (detail::is_internal_channel(n.channel)) {
    if (member_) member_->on_internal(n);
    return;
  }
  if (options_.filtered && n.sender_pid == client_->backend_pid()) return;
  if (locked()) {  // the member's tenures are a subset of channels_
    if (journal_) {
      journal_->on_nudge(n);
    } else if (auto* count = member_ ? member_->deliverable(n.channel) : nullptr) {
      count->tick();
      deliver(n.channel, n.payload);
    }
    return;
  }
  auto it = channels_.find(n.channel);
  if (it == channels_.end() || !it->second.listen_started) return;
  if (options_.execution_lock) {
    claims_.add(n);
    return;
  }
  it->second.count.tick();
  deliver(n.channel, n.payload);
}

PGIPLOCK_INLINE void pubsub::deliver(std::string_view ch, std::string_view payload) {
  fire(on_message_, ch, payload);
  emitter_.emit(ch, payload);
  if (!on_delivery_.empty()) fire(on_delivery_, delivery{ch, payload, 0, 0});
}

PGIPLOCK_INLINE void pubsub::deliver_durable(const delivery& d) {
  fire(on_message_, d.channel, d.payload);
  emitter_.emit(d.channel, d.payload);
  fire(on_delivery_, d);
}

// A tenure began (its LISTEN committed with the win): counted, and the
// journal follows it on a durable channel. Yields where deliveries count.
PGIPLOCK_INLINE detail::delivery_count* pubsub::won(const std::string& ch, const detail::member::win& w) {
  auto it = channels_.find(ch);
  if (it == channels_.end()) return nullptr;
  auto& st = it->second;
  if (w.fresh) {
    ++st.handovers;
    st.last_handover = w.took;
  } else {
    ++st.takeovers;
    st.last_takeover = w.took;
  }
  on_won(ch);
  if (journal_) journal_->begin_tenure(ch, w.token, &st.count);
  return &st.count;
}

PGIPLOCK_INLINE pubsub_stats pubsub::stats() const {
  pubsub_stats out;
  out.member = client_ ? std::string(client_->app_name()) : std::string();
  out.reconnects = reconnects_;
  out.notify_sent = notify_sent_;
  out.notify_failed = notify_failed_;
  out.probes_failed = probes_failed_;
  // The last sample, also across a reconnect (the probe is per connection):
  // a gauge that fell to 0 would read as an empty NOTIFY queue.
  out.probe_round_trip = last_probe_round_trip_;
  out.queue_usage = last_queue_usage_;
  if (probe_ && probe_->last_round_trip().count() > 0) {
    out.probe_round_trip = probe_->last_round_trip();
    out.queue_usage = probe_->queue_usage();
  }
  out.channels.reserve(channels_.size());
  for (auto& [name, st] : channels_) out.channels.push_back(channel_stats_of(name, st));
  return out;
}

PGIPLOCK_INLINE channel_stats pubsub::channel_stats_of(const std::string& name, const channel_state& st) const {
  channel_stats c;
  c.channel = name;
  c.token = token(name);
  c.role = !locked() ? channel_role::plain : (c.token ? channel_role::holder : channel_role::standby);
  if (member_) c.tenure_since = member_->since(name);
  c.delivered = st.count.n;
  c.last_delivery = std::chrono::system_clock::time_point(std::chrono::milliseconds(st.count.last_ms));
  c.takeovers = st.takeovers;
  c.handovers = st.handovers;
  c.last_takeover = st.last_takeover;
  c.last_handover = st.last_handover;
  c.durable = options_.durable;
  if (auto lag = journal_ ? journal_->lag_of(name) : std::nullopt) {
    c.backlog = lag->backlog;
    c.oldest_unacknowledged = lag->oldest;
  }
  return c;
}

// Unset: every 10 s, or every liveness_timeout when that is shorter.
PGIPLOCK_INLINE std::chrono::milliseconds pubsub::probe_every() const {
  if (options_.probe_interval) return *options_.probe_interval;
  std::chrono::milliseconds standard{10000}, floor{100};  // the floor a given probe_interval has
  auto live = options_.liveness_timeout;
  return live.count() > 0 ? std::max(floor, std::min(standard, live)) : standard;
}

PGIPLOCK_INLINE void pubsub::keep_probe_sample() {
  if (!probe_ || probe_->last_round_trip().count() <= 0) return;
  last_probe_round_trip_ = probe_->last_round_trip();
  last_queue_usage_ = probe_->queue_usage();
}

// Once the connection listens (a pubsub that only notifies has nothing to
// prove); one per connection.
PGIPLOCK_INLINE void pubsub::ensure_probe() {
  auto every = probe_every();
  if (probe_ || !connected() || channels_.empty() || every.count() <= 0) return;
  detail::echo_probe::options o;
  o.every = every;
  o.limit = options_.liveness_timeout.count() > 0 ? options_.liveness_timeout : every;
  o.queue_threshold = options_.queue_warning;
  detail::echo_probe::hooks h{[this](const std::string& why) {
                                ++probes_failed_;
                                report(error("pgiplock: the listening connection is dead: " + why + "; reconnecting"));
                                if (client_) loop_->spawn(connection::close_quietly(client_));
                              },
                              [this](double usage) {
                                detail::log(options_.logger, log_level::warn,
                                            "pgiplock: the server's NOTIFY queue is " +
                                                std::to_string(static_cast<int>(usage * 100)) +
                                                "% full: a session somewhere in this database LISTENs and does not "
                                                "read (stuck, or idle in a transaction); when the queue is full, "
                                                "every NOTIFY fails");
                              }};
  probe_ = std::make_unique<detail::echo_probe>(client_, o, std::move(h));
}

// Bound to the connection, as the member is: made with it, gone with it.
PGIPLOCK_INLINE void pubsub::make_journal() {
  detail::journal_options jo;
  jo.retention = options_.durable_retention;
  jo.retry_delay = options_.retry_delay;
  jo.liveness_timeout = options_.liveness_timeout;
  jo.logger = options_.logger;
  journal_ = std::make_unique<detail::journal>(
      client_, std::move(jo),
      detail::journal::hooks{[this](const delivery& d) { deliver_durable(d); },
                             [this](const std::exception& e) { report(e); }});
  if (tx_handler_) journal_->set_transaction_handler(tx_handler_);
}

PGIPLOCK_INLINE bool pubsub::journal_gone(const std::exception_ptr& failure) {
  try {
    std::rethrow_exception(failure);
  } catch (const sql_error& e) {
    return detail::sqlstate::journal_missing(e.sqlstate());
  } catch (...) {
    return false;
  }
}

PGIPLOCK_INLINE task<void> pubsub::settle_durable(std::vector<std::string> channels) {
  if (journal_) co_await journal_->settle(std::move(channels));
}

PGIPLOCK_INLINE void pubsub::on_delivery_in_transaction(std::function<task<void>(const delivery&, connection&)> fn) {
  if (!options_.durable) throw std::logic_error("pgiplock: on_delivery_in_transaction needs durable = true");
  tx_handler_ = std::move(fn);
  if (journal_) journal_->set_transaction_handler(tx_handler_);
}

PGIPLOCK_INLINE void pubsub::on_link_lost(const connection_error& e) {
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
PGIPLOCK_INLINE task<void> pubsub::reconnect(std::shared_ptr<connection> dead) {
  co_await loop_->yield();  // leave the dead connection's callback first
  member_.reset();  // bound to the dead connection
  journal_.reset();
  member_started_.reset();
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
  ++reconnects_;
  fire(on_reconnect_, attempts);
}

// Tries every retry_delay, at most retry_limit times; yields the attempts.
PGIPLOCK_INLINE task<std::size_t> pubsub::connect_again() {
  auto opts = main_options();
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
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock
