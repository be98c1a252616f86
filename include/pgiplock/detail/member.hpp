// ==== detail: a fleet member, the single-listener engine of pubsub ===========
//
// What a pubsub in single-listener mode costs the server does not grow with
// its channels (section 7 of DESIGN.md): one listening connection, one
// watching connection, one session advisory lock.
//
// - Channel ownership stays the Node-format rows of <schema>.lock.
// - Liveness is per member: a member holds one session advisory lock (its
//   key) and has a row in <schema>.pgiplock_member. Members form a ring
//   ordered by app; each waits, on its watching connection and in bounded
//   slices, for the next one's lock. A member that sees a death takes the
//   dead member's channels it wants and frees the rest, in one statement
//   (pgiplock_claim); the ring closes around the gap. Any claim also sweeps
//   every member whose lock is free, so a watcher that died with the member
//   it watched is covered by whoever watched the watcher.
// - Releases and sweeps say 'free' on the fleet channel; standbys then claim
//   everything they lack in one statement. A successor announces its LISTEN
//   there too ("listening:<channel>", in the claim's transaction), which is
//   the cut of a lossless graceful handover.
// - Channels held by a Node peer (or anyone not a member) are judged by their
//   session, as the Node package does; for those alone the member LISTENs the
//   lock channel, to hear the Node trigger's release event, and retries them
//   every acquire_interval.
#pragma once

#include "lock_schema.hpp"
#include "../ip_lock.hpp"
#include "../stats.hpp"

namespace pgiplock::detail {

// One per lock schema, so lock groups in other schemas do not hear it.
inline std::string fleet_channel(std::string_view schema) {
  fnv1a f;
  f.feed(schema);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(f.h));
  return std::string(fleet_prefix) + hex;
}

struct member_options {
  std::chrono::milliseconds acquire_interval{30000};
  std::chrono::milliseconds liveness_timeout{10000};  // the holder's heartbeat; see ip_lock_options
  std::chrono::milliseconds handover_timeout{500};
  bool fast_failover = true;  // off: no watcher; crashes are seen by the retry timer
  // Spread the channels over the members (pubsub_options::balance): hold a
  // fair share, hand the excess over gracefully, claim up to the share.
  bool balance = false;
  log_handler logger;
};

class member final : public lock_holder {
 public:
  struct win {
    std::int64_t token = 0;
    bool fresh = false;  // a free row (a graceful handover, or the first holder), not a dead holder's
    std::chrono::microseconds took{0};  // the claim round that won it
  };
  struct hooks {
    // LISTEN committed with the win; yields where to count its deliveries.
    std::function<delivery_count*(const std::string& channel, const win& w)> won;
    // Stopped delivering: released (reason empty) or demoted (the reason).
    std::function<void(const std::string& channel, const std::string& reason)> lost;
    // Optional: awaited before held channels are released (a durable
    // channel acknowledges what it delivered, so the successor resumes there).
    std::function<task<void>(std::vector<std::string> channels)> releasing;
    // Optional: the liveness check found every held row still this
    // member's; `sent_ms` (steady_coarse_ms) is when the check went out.
    std::function<void(std::int64_t sent_ms)> confirmed;
  };

  member(std::shared_ptr<connection> client, member_options options, hooks h);
  member(const member&) = delete;
  member& operator=(const member&) = delete;
  // Without leave(): the loops stop; while the connection is open, its rows
  // and its member row are deleted in the background.
  ~member() override;

  // The schema, the member row and its lock, LISTEN on the fleet channel.
  task<void> start();
  // Adds channels and claims every lacking one in one statement; returns
  // when that claim settled. Lacking ones are claimed again when freed.
  task<void> want(std::vector<std::string> channels);
  // Gives channels up: held ones are released in one statement and keep
  // delivering until their successors announce (or handover_timeout).
  task<void> release(std::vector<std::string> channels);
  // Releases everything and leaves the fleet.
  task<void> leave();

  [[nodiscard]] bool delivering(std::string_view ch) const;   // holding or draining
  // Holding or draining and past the handover cut: where to count the
  // delivery; nullptr when this notification is not ours to deliver.
  [[nodiscard]] delivery_count* deliverable(std::string_view ch);
  [[nodiscard]] std::chrono::system_clock::time_point since(std::string_view ch) const;
  [[nodiscard]] std::int64_t token(std::string_view ch) const;
  [[nodiscard]] std::size_t held() const;
  [[nodiscard]] const std::string& app() const noexcept { return app_; }
  // The fleet channel and lock channels, handed over by pubsub, whose own
  // subscription sees every notification: one handler per notification.
  void on_internal(const notification& n);

  event_loop& holder_loop() const override { return client_->loop(); }
  task<void> release_for_shutdown() override { return leave(); }

 private:
  struct tenure {
    lock_state state = lock_state::standby;  // standby, holding, draining or releasing
    std::int64_t token = 0;
    bool fresh = false;          // won a released row: the predecessor may be draining
    bool cut_seen = false;       // our own announcement came back
    bool lock_listened = false;  // LISTENing its lock channel: a non-member holds it
    delivery_count* count = nullptr;  // the pubsub's, per channel (it outlives reconnects)
    std::chrono::system_clock::time_point since{};
  };
  struct claim_result {
    std::vector<std::string> won, orphans, listen_locks, unlisten_locks;
  };

  void note(log_level level, std::string_view message) const;
  std::vector<std::string> lacking() const;
  bool needs_timer() const;
  void schedule_claim();
  task<void> claim_now();
  task<void> claim_loop();
  task<void> claim_once();
  task<std::optional<std::size_t>> fair_share();
  std::vector<std::string> excess(std::size_t share) const;
  task<void> claim_chunk(std::vector<std::string> channels, std::optional<std::string> gone, bool sweep,
                         std::optional<std::size_t> quota, std::shared_ptr<int> left,
                         std::shared_ptr<async_event> done);
  claim_result take_claim(const result& r);
  task<void> record(std::vector<std::string> won);
  // `keep`: still wanted afterwards (a balanced member's excess).
  task<void> release_impl(std::vector<std::string> channels, bool leaving, bool keep = false);
  task<void> wait_for_successors(long others);
  task<void> listen_many(std::vector<std::string> listen, std::vector<std::string> unlisten);
  static task<void> release_quietly(std::shared_ptr<connection> c, std::string sql, std::string app,
                                    std::string channels, std::string fleet, std::string unlock, std::int64_t key,
                                    bool registered);
  void demote(const std::vector<std::string>& channels, const std::string& why);
  void superseded(const std::string& channel);
  task<void> settle_superseded();
  task<void> demote_and_free(std::vector<std::string> channels, std::string why);
  void on_fleet_event(const notification& n);
  task<void> watch_loop();
  task<void> open_watcher();
  task<void> heartbeat_loop();
  task<void> check_rows(std::chrono::milliseconds limit);
  task<void> retry_loop();
  void stop_loops();

  std::shared_ptr<connection> client_;
  member_options options_;
  hooks hooks_;
  std::string app_;
  std::int64_t key_ = 0;
  std::string schema_;  // quoted
  std::string fleet_;
  std::string claim_sql_, record_sql_, heartbeat_sql_, rows_sql_, release_sql_, watch_sql_, listen_many_sql_;
  std::map<std::string, tenure, std::less<>> tenures_;
  bool registered_ = false;  // holds the member lock and row
  bool left_ = false;
  bool claim_requested_ = false;
  bool claiming_ = false;
  cancel_source claim_wake_;
  std::shared_ptr<async_event> next_claim_done_;  // set when the next claim round has run
  std::optional<std::string> gone_;  // a member the watcher found dead: the next claim sweeps it
  std::vector<std::string> superseded_;  // cut by another member's claim: the next round settles them
  std::size_t won_in_round_ = 0;
  event_loop::clock::time_point round_started_{};
  delivery_count uncounted_;  // where deliveries count when the hook gives no place
  std::shared_ptr<async_event> drained_;  // set when no channel is draining any more
  bool watcher_failing_ = false;          // said once, until it works again
  std::uint64_t lost_sub_ = 0;
  std::shared_ptr<connection> watcher_;
  // Last: destroyed first. Every coroutine bound to this member is one of
  // these (or awaited by one), so none outlives it.
  task<void> claim_task_;
  task<void> watch_task_;
  task<void> heartbeat_task_;
  task<void> retry_task_;
};

// ---- implementation ---------------------------------------------------------

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE member::member(std::shared_ptr<connection> client, member_options options, hooks h)
    : client_(std::move(client)), options_(std::move(options)), hooks_(std::move(h)), app_(client_->app_name()) {
  key_ = advisory_key(app_);
  auto schema = lock_schema_name();
  fleet_ = fleet_channel(schema);
  schema_ = client_->quote_identifier(schema);
  claim_sql_ = sql::in_schema(sql::member_claim, schema_);
  record_sql_ = sql::in_schema(sql::member_record, schema_);
  heartbeat_sql_ = sql::in_schema(sql::member_heartbeat, schema_);
  rows_sql_ = sql::in_schema(sql::member_rows, schema_);
  release_sql_ = sql::in_schema(sql::member_release, schema_);
  watch_sql_ = sql::in_schema(sql::member_watch, schema_);
  listen_many_sql_ = sql::in_schema(sql::listen_many, schema_);
}

PGIPLOCK_INLINE member::~member() {
  forget_lock_holder(this);
  stop_loops();
  if (lost_sub_) client_->remove_on_lost(lost_sub_);
  if (left_ || !client_->is_open()) return;
  text_array all;
  for (auto& [ch, t] : tenures_) {
    if (t.state == lock_state::holding) all.add(ch);
  }
  client_->loop().spawn(release_quietly(client_, release_sql_, app_, all.literal(), fleet_,
                                        std::string(sql::member_unlock), key_, registered_));
}

PGIPLOCK_INLINE void member::note(log_level level, std::string_view message) const {
  if (level == log_level::debug && !options_.logger) return;
  log(options_.logger, level, "member " + app_ + ": " + std::string(message));
}

PGIPLOCK_INLINE task<void> member::start() {
  co_await ensure_lock_schema(client_, lock_schema_name());
  lock_holders().push_back(this);
  lost_sub_ = client_->on_lost([this](const connection_error&) {
    std::vector<std::string> all;
    for (auto& [ch, t] : tenures_) all.push_back(ch);
    demote(all, "");  // the session is gone: nothing to say beyond the lost link
  });
  co_await client_->listen(fleet_);
  if (options_.fast_failover || options_.balance) {  // watched by the ring, counted by balanced members
    auto r = co_await client_->query(sql::in_schema(sql::member_join, schema_), app_, key_, fleet_);
    registered_ = r.get(0, 0) == "1";
    if (!registered_) throw error("pgiplock: member " + app_ + " could not take its member lock");
  }
  auto& loop = client_->loop();
  next_claim_done_ = std::make_shared<async_event>(loop);
  claim_task_ = claim_loop();
  loop.start(claim_task_);
  heartbeat_task_ = heartbeat_loop();
  loop.start(heartbeat_task_);
  retry_task_ = retry_loop();
  loop.start(retry_task_);
  if (options_.fast_failover) {
    watch_task_ = watch_loop();
    loop.start(watch_task_);
  }
}

PGIPLOCK_INLINE task<void> member::want(std::vector<std::string> channels) {
  for (auto& ch : channels) tenures_.try_emplace(ch);
  co_await claim_now();
}

PGIPLOCK_INLINE task<void> member::release(std::vector<std::string> channels) {
  co_await release_impl(std::move(channels), false);
}

PGIPLOCK_INLINE task<void> member::leave() {
  if (left_) co_return;
  left_ = true;
  forget_lock_holder(this);
  stop_loops();
  if (auto w = std::move(watcher_)) client_->loop().spawn(connection::close_quietly(w));
  std::vector<std::string> all;
  for (auto& [ch, t] : tenures_) all.push_back(ch);
  if (!client_->is_open()) {
    demote(all, "");
    co_return;
  }
  co_await release_impl(std::move(all), true);
  if (registered_) co_await client_->query(std::string(sql::member_unlock), key_);
  registered_ = false;
}

PGIPLOCK_INLINE bool member::delivering(std::string_view ch) const {
  auto it = tenures_.find(ch);
  return it != tenures_.end() && (it->second.state == lock_state::holding || it->second.state == lock_state::draining);
}

// Whether a notification that reached the connection is ours to deliver: a
// fresh tenure leaves what precedes its own announcement to the draining
// predecessor (see ip_lock::past_handover_cut); a draining one delivers
// until its successor's announcement.
PGIPLOCK_INLINE delivery_count* member::deliverable(std::string_view ch) {
  auto it = tenures_.find(ch);
  if (it == tenures_.end()) return nullptr;
  auto& t = it->second;
  bool ours = (t.state == lock_state::holding && (!t.fresh || t.cut_seen)) || t.state == lock_state::draining;
  if (!ours) return nullptr;
  return t.count ? t.count : &uncounted_;
}

PGIPLOCK_INLINE std::chrono::system_clock::time_point member::since(std::string_view ch) const {
  auto it = tenures_.find(ch);
  return (it != tenures_.end() && it->second.state == lock_state::holding) ? it->second.since
                                                                            : std::chrono::system_clock::time_point{};
}

PGIPLOCK_INLINE std::int64_t member::token(std::string_view ch) const {
  auto it = tenures_.find(ch);
  return (it != tenures_.end() && it->second.state == lock_state::holding) ? it->second.token : 0;
}

PGIPLOCK_INLINE std::size_t member::held() const {
  return static_cast<std::size_t>(std::count_if(tenures_.begin(), tenures_.end(), [](const auto& t) {
    return t.second.state == lock_state::holding;
  }));
}

PGIPLOCK_INLINE std::vector<std::string> member::lacking() const {
  std::vector<std::string> out;
  for (auto& [ch, t] : tenures_) {
    if (t.state == lock_state::standby) out.push_back(ch);
  }
  return out;
}

// The retry timer is for what the ring cannot see: channels a non-member
// holds, and every crash when this member does not watch.
PGIPLOCK_INLINE bool member::needs_timer() const {
  return std::any_of(tenures_.begin(), tenures_.end(), [this](const auto& t) {
    return t.second.state == lock_state::standby && (t.second.lock_listened || !options_.fast_failover);
  });
}

PGIPLOCK_INLINE void member::schedule_claim() {
  claim_requested_ = true;
  claim_wake_.cancel();
}

// Waits for a claim round that starts after this call.
PGIPLOCK_INLINE task<void> member::claim_now() {
  if (!next_claim_done_) co_return;  // not started
  auto done = next_claim_done_;
  schedule_claim();
  co_await done->wait();
}

// One claim round at a time; requests made meanwhile coalesce into one more.
PGIPLOCK_INLINE task<void> member::claim_loop() {
  for (;;) {
    if (!claim_requested_) {
      if (!co_await client_->loop().sleep(std::chrono::hours(24), &claim_wake_)) claim_wake_.reset();
      continue;
    }
    claim_requested_ = false;
    auto done = std::exchange(next_claim_done_, std::make_shared<async_event>(client_->loop()));
    claiming_ = true;
    if (client_->is_open() && !left_) co_await settle_superseded();
    if (client_->is_open() && !left_) co_await claim_once();
    claiming_ = false;
    done->set();
  }
}
#endif  // PGIPLOCK_DEFINITIONS

// At most this many channels per statement: the chunks go out pipelined,
// so the first channels of a large takeover deliver while the rest are
// still being claimed.
inline constexpr std::size_t claim_chunk_size = 256;

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE task<void> member::claim_once() {
  auto want = lacking();
  auto gone = std::exchange(gone_, std::nullopt);
  std::optional<std::size_t> quota;
  if (options_.balance && !gone && registered_) {
    auto share = co_await fair_share();
    if (share && held() >= *share) {
      auto extra = excess(*share);
      if (!extra.empty()) co_await release_impl(std::move(extra), false, true);
      co_return;
    }
    if (share) quota = *share - held();
  }
  if (want.empty() && !gone) co_return;
  round_started_ = event_loop::clock::now();
  for (auto& ch : want) tenures_[ch].cut_seen = false;  // our announcement may come back before the result
  won_in_round_ = 0;
  std::size_t chunks = quota ? 1 : std::max<std::size_t>(1, (want.size() + claim_chunk_size - 1) / claim_chunk_size);
  auto left = std::make_shared<int>(static_cast<int>(chunks));
  auto done = std::make_shared<async_event>(client_->loop());
  std::vector<task<void>> running(chunks);  // owned here: they die with this frame
  for (std::size_t i = 0; i < chunks; ++i) {
    auto from = want.begin() + static_cast<std::ptrdiff_t>(std::min(want.size(), i * claim_chunk_size));
    auto to = quota ? want.end()
                    : want.begin() + static_cast<std::ptrdiff_t>(std::min(want.size(), (i + 1) * claim_chunk_size));
    running[i] = claim_chunk(std::vector<std::string>(from, to), gone, i + 1 == chunks, quota, left, done);
    client_->loop().start(running[i]);
  }
  co_await done->wait();
  note(log_level::debug, "claimed " + std::to_string(want.size()) + " in " + std::to_string(chunks) + " statement(s)");
  if (gone && options_.balance) schedule_claim();  // a sweep takes all first; then the excess goes back
  // Members short of their share pick free channels at random and may pick
  // the same ones: while a round makes progress and room is left, go on.
  if (quota && won_in_round_ > 0 && won_in_round_ < *quota) schedule_claim();
}

// This member's fair share of its channels: even over the members, the
// first (count mod members) of them in app order holding one more.
PGIPLOCK_INLINE task<std::optional<std::size_t>> member::fair_share() {
  try {
    auto r = co_await client_->query_prepared(sql::in_schema(sql::member_census, schema_), app_,
                                              balanced_member_prefix);
    auto members = static_cast<std::size_t>(std::strtoull(std::string(r.get(0, 0)).c_str(), nullptr, 10));
    auto rank = static_cast<std::size_t>(std::strtoull(std::string(r.get(0, 1)).c_str(), nullptr, 10));
    if (members == 0) co_return std::nullopt;
    auto all = tenures_.size();
    co_return all / members + (rank < all % members ? 1 : 0);
  } catch (const std::exception& e) {
    note(log_level::debug, std::string("census failed: ") + e.what());
  }
  co_return std::nullopt;
}

// What is held beyond the share: the last channels in name order, so the
// choice is stable.
PGIPLOCK_INLINE std::vector<std::string> member::excess(std::size_t share) const {
  std::vector<std::string> held_now;
  for (auto& [ch, t] : tenures_) {
    if (t.state == lock_state::holding) held_now.push_back(ch);
  }
  if (held_now.size() <= share) return {};
  return std::vector<std::string>(held_now.begin() + static_cast<std::ptrdiff_t>(share), held_now.end());
}

PGIPLOCK_INLINE task<void> member::claim_chunk(std::vector<std::string> channels, std::optional<std::string> gone, bool sweep,
                                      std::optional<std::size_t> quota, std::shared_ptr<int> left,
                                      std::shared_ptr<async_event> done) {
  struct settle {
    std::shared_ptr<int> left;
    std::shared_ptr<async_event> done;
    ~settle() {
      if (--*left == 0) done->set();
    }
  } guard{left, done};
  text_array list;
  for (auto& ch : channels) list.add(ch);
  result r;
  try {
    std::optional<long long> limit;
    if (quota) limit = static_cast<long long>(*quota);
    r = co_await client_->query_prepared(claim_sql_, app_, list.literal(), fleet_, lock_prefix, gone, sweep, limit);
  } catch (const sql_error& e) {
    // Two members' claims can still cross (a Node peer's inserts, a TRUNCATE):
    // the server picks one to fail; it tries again at once.
    bool crossed = e.sqlstate() == sqlstate::deadlock_detected;
    note(crossed ? log_level::debug : log_level::warn, std::string("claiming channels failed: ") + e.what());
    if (crossed) schedule_claim();
    co_return;
  } catch (const std::exception& e) {
    note(client_->is_open() ? log_level::warn : log_level::debug, std::string("claiming channels failed: ") + e.what());
    co_return;
  }
  auto got = take_claim(r);
  won_in_round_ += got.won.size();
  // Synchronous up to here: the won channels deliver from the next
  // notification on, which may sit in the very read that brought the result.
  auto took = std::chrono::duration_cast<std::chrono::microseconds>(event_loop::clock::now() - round_started_);
  for (auto& ch : got.won) {
    auto& t = tenures_[ch];
    t.since = std::chrono::system_clock::now();
    t.count = hooks_.won(ch, win{t.token, t.fresh, took});
  }
  if (!got.won.empty()) co_await record(got.won);
  if (!got.listen_locks.empty() || !got.unlisten_locks.empty()) {
    co_await listen_many(std::move(got.listen_locks), std::move(got.unlisten_locks));
  }
  if (!got.orphans.empty()) co_await release_impl(std::move(got.orphans), false);
}

// The won tenures, for pgiplock status (sql::member_record): after the claim
// has committed, not in it; the claims still in flight went out before it.
// A failure (a schema without the table) costs only the record.
PGIPLOCK_INLINE task<void> member::record(std::vector<std::string> won) {
  text_array chs, toks;
  for (auto& ch : won) {
    auto it = tenures_.find(ch);
    if (it == tenures_.end() || it->second.state != lock_state::holding) continue;
    chs.add(ch);
    toks.add(std::to_string(it->second.token));
  }
  try {
    co_await client_->query_prepared(record_sql_, app_, chs.literal(), lock_prefix, toks.literal());
  } catch (const std::exception& e) {
    note(log_level::debug, std::string("recording tenures failed: ") + e.what());
  }
}

// Reads a claim's rows into the tenures: won channels (a token each), and
// for the others whether a non-member holds them (then its lock channel is
// LISTENed, for the Node trigger's release event).
PGIPLOCK_INLINE member::claim_result member::take_claim(const result& r) {
  claim_result out;
  for (int i = 0; i < r.rows(); ++i) {
    std::string ch(r.get(i, 0));
    bool won = !r.is_null(i, 1);
    auto it = tenures_.find(ch);
    if (it == tenures_.end()) {  // released while the claim was in flight: release it again
      if (won) {
        tenures_[ch].state = lock_state::holding;
        out.orphans.push_back(ch);
      }
      continue;
    }
    auto& t = it->second;
    if (won) {
      t.state = lock_state::holding;
      t.token = std::strtoll(std::string(r.get(i, 1)).c_str(), nullptr, 10);
      t.fresh = r.get(i, 2) == "t";
      if (std::exchange(t.lock_listened, false)) out.unlisten_locks.push_back(std::string(lock_prefix) + ch);
      out.won.push_back(ch);
    } else if (r.get(i, 4) != "t" && !t.lock_listened) {
      t.lock_listened = true;
      out.listen_locks.push_back(std::string(lock_prefix) + ch);
    } else if (r.get(i, 4) == "t" && t.lock_listened) {
      // A member holds it now (it took a dead Node peer's row): its release
      // says 'free', and the Node trigger's event must not wake us early.
      t.lock_listened = false;
      out.unlisten_locks.push_back(std::string(lock_prefix) + ch);
    }
  }
  return out;
}

PGIPLOCK_INLINE task<void> member::listen_many(std::vector<std::string> listen, std::vector<std::string> unlisten) {
  text_array on, off;
  for (auto& c : listen) on.add(c);
  for (auto& c : unlisten) off.add(c);
  try {
    co_await client_->query(listen_many_sql_, on.literal(), off.literal());
  } catch (const std::exception& e) {
    note(log_level::warn, std::string("LISTEN/UNLISTEN failed: ") + e.what());
  }
}

PGIPLOCK_INLINE task<void> member::release_impl(std::vector<std::string> channels, bool leaving, bool keep) {
  text_array held;
  std::vector<std::string> data, locks;
  for (auto& ch : channels) {
    auto it = tenures_.find(ch);
    if (it == tenures_.end()) continue;
    if (it->second.state == lock_state::holding) {
      it->second.state = lock_state::draining;  // delivers until the successor announces
      held.add(ch);
      data.push_back(ch);
    }
    if (it->second.lock_listened) locks.push_back(std::string(lock_prefix) + ch);
  }
  long others = 0;
  if (hooks_.releasing && !data.empty() && client_->is_open()) co_await hooks_.releasing(data);
  if (client_->is_open() && (held.size() || leaving)) {
    try {
      auto r = co_await client_->query(release_sql_, app_, held.literal(), lock_prefix, fleet_, leaving,
                                       std::string(member_prefix) + "%");
      others = std::strtol(std::string(r.get(0, 2)).c_str(), nullptr, 10);
    } catch (const std::exception& e) {
      note(log_level::warn, std::string("release failed: ") + e.what());
    }
  }
  if (held.size()) co_await wait_for_successors(others);
  for (auto& ch : channels) {
    auto it = tenures_.find(ch);
    if (it == tenures_.end()) continue;
    if (keep) {
      it->second = tenure{};
    } else {
      tenures_.erase(it);
    }
    hooks_.lost(ch, "");
  }
  for (auto& l : locks) data.push_back(std::move(l));
  std::vector<std::string> none;
  if (client_->is_open() && !data.empty()) co_await listen_many(std::move(none), std::move(data));
}

// A drain: deliver until every released channel's successor announced, or
// handover_timeout. Nobody can announce when no other member exists.
PGIPLOCK_INLINE task<void> member::wait_for_successors(long others) {
  auto draining = [this] {
    return std::any_of(tenures_.begin(), tenures_.end(),
                       [](const auto& t) { return t.second.state == lock_state::draining; });
  };
  if (others <= 0 || options_.handover_timeout.count() <= 0 || !draining() || !client_->is_open()) co_return;
  auto drained = std::make_shared<async_event>(client_->loop());
  drained_ = drained;
  (void)co_await drained->wait_for(options_.handover_timeout);
  drained_.reset();
}

PGIPLOCK_INLINE task<void> member::release_quietly(std::shared_ptr<connection> c, std::string sql, std::string app,
                                          std::string channels, std::string fleet, std::string unlock,
                                          std::int64_t key, bool registered) {
  try {
    co_await c->query(sql, app, channels, lock_prefix, fleet, registered, std::string(member_prefix) + "%");
    if (registered) co_await c->query(unlock, key);
  } catch (const std::exception&) {
    // gone with the session
  }
}

// Stops delivering at once (the lost link, a failed heartbeat, rows gone).
PGIPLOCK_INLINE void member::demote(const std::vector<std::string>& channels, const std::string& why) {
  for (auto& ch : channels) {
    auto it = tenures_.find(ch);
    if (it == tenures_.end()) continue;
    bool was = it->second.state != lock_state::standby;
    it->second = tenure{};
    if (was) hooks_.lost(ch, why);
  }
}

// Rows gone under us: stop delivering those, stop listening, and say
// 'free' so the others claim them now rather than at their timer.
PGIPLOCK_INLINE task<void> member::demote_and_free(std::vector<std::string> channels, std::string why) {
  note(log_level::warn, "giving up " + std::to_string(channels.size()) + " channel(s): " + why);
  demote(channels, why);
  if (!client_->is_open()) co_return;
  std::vector<std::string> none;
  co_await listen_many(std::move(none), std::move(channels));
  try {
    co_await client_->query(std::string(sql::fleet_free), fleet_);
  } catch (const std::exception&) {
    // the others' timers and watchers still cover it
  }
}

PGIPLOCK_INLINE void member::on_internal(const notification& n) {
  if (n.channel == fleet_) {
    on_fleet_event(n);
    return;
  }
  if (!is_lock_channel(n.channel) || n.payload != release_payload) return;
  auto it = tenures_.find(n.channel.substr(lock_prefix.size()));
  if (it != tenures_.end() && it->second.state == lock_state::standby) schedule_claim();
}

PGIPLOCK_INLINE void member::on_fleet_event(const notification& n) {
  static constexpr std::string_view listening = "listening:";
  if (n.payload == "free") {
    if (!lacking().empty()) schedule_claim();
    return;
  }
  if (n.payload == "join") {
    if (options_.balance && n.sender_pid != client_->backend_pid()) schedule_claim();  // make room
    return;
  }
  if (n.payload.substr(0, listening.size()) != listening) return;
  auto it = tenures_.find(n.payload.substr(listening.size()));
  if (it == tenures_.end()) return;
  if (n.sender_pid == client_->backend_pid()) {
    it->second.cut_seen = true;
    return;
  }
  if (it->second.state == lock_state::holding) {
    superseded(it->first);
    return;
  }
  // The successor's LISTEN has committed: everything after this in the
  // stream is its to deliver. Cut here, before the next notification.
  if (it->second.state != lock_state::draining) return;
  it->second.state = lock_state::releasing;
  bool still = std::any_of(tenures_.begin(), tenures_.end(),
                           [](const auto& t) { return t.second.state == lock_state::draining; });
  if (!still && drained_) drained_->set();
}

// Another member claimed a free row of a channel we hold: ours was deleted
// under us (a DELETE by hand, a TRUNCATE) and our heartbeat has not seen it
// yet. Its LISTEN committed with this announcement, so this is the cut of a
// handover, exactly as in a drain: we stop before the next notification and
// nothing is delivered twice. The next claim round settles the rest.
PGIPLOCK_INLINE void member::superseded(const std::string& channel) {
  note(log_level::warn, "channel " + channel + " claimed by another member: its lock row was deleted");
  demote({channel}, "another member claimed it: its lock row was deleted");
  superseded_.push_back(channel);
  schedule_claim();
}

// Runs at the start of a claim round, so no claim of ours is in flight: the
// superseded channels we did not win back meanwhile are UNLISTENed, and a
// row still ours is released ('free' then tells everyone). Such a row can
// only be an announcement that committed before our own win and reached us
// after it; holding it without delivering would leave the channel unheard.
PGIPLOCK_INLINE task<void> member::settle_superseded() {
  text_array rows;
  std::vector<std::string> data, none;
  for (auto& ch : std::exchange(superseded_, {})) {
    auto it = tenures_.find(ch);
    if (it != tenures_.end() && it->second.state != lock_state::standby) continue;  // won back meanwhile
    rows.add(ch);
    data.push_back(ch);
  }
  if (data.empty()) co_return;
  try {
    co_await client_->query(release_sql_, app_, rows.literal(), lock_prefix, fleet_, false,
                            std::string(member_prefix) + "%");
  } catch (const std::exception& e) {
    note(log_level::warn, std::string("release failed: ") + e.what());
  }
  co_await listen_many(std::move(none), std::move(data));
}

// The ring: wait for the next member's lock, one bounded slice per
// statement; a member found dead is swept at once by a claim.
PGIPLOCK_INLINE task<void> member::watch_loop() {
  auto slice = options_.acquire_interval;
  auto step = std::min<std::chrono::milliseconds>(slice, std::chrono::seconds(1));
  for (;;) {
    if (!client_->is_open()) co_return;
    if (!watcher_ || !watcher_->is_open()) {
      co_await open_watcher();
      continue;
    }
    std::optional<std::string> dead;
    try {
      auto w = watcher_;
      auto r = co_await w->query_prepared(watch_sql_, app_, static_cast<long long>(slice.count()),
                                          static_cast<long long>(step.count()));
      dead = r.is_null(0, 0) ? std::string() : std::string(r.get(0, 0));
    } catch (const std::exception& e) {
      note(log_level::debug, std::string("watch failed: ") + e.what());
    }
    if (!dead) {
      co_await client_->loop().sleep(std::chrono::milliseconds(100));
    } else if (!dead->empty()) {
      note(log_level::debug, "member " + *dead + " is gone");
      gone_ = *dead;
      co_await claim_now();
    }
  }
}

// Said once when the watching connection cannot be had, and once when it
// can again; meanwhile one attempt per acquire_interval.
PGIPLOCK_INLINE task<void> member::open_watcher() {
  auto opts = derived_options(client_->logger(), options_.liveness_timeout, false);
  try {
    watcher_ = co_await connection::connect(client_->loop(), client_->conninfo(), opts);
    if (std::exchange(watcher_failing_, false)) note(log_level::info, "fast failover available again");
    co_return;
  } catch (const std::exception& e) {
    if (!std::exchange(watcher_failing_, true)) {
      note(log_level::warn, std::string("fast failover unavailable for now (still delivering what it holds): ") +
                                e.what());
    }
    watcher_.reset();
  }
  co_await client_->loop().sleep(options_.acquire_interval);
}

// The holder's liveness check, for all its channels, every liveness / 4.
PGIPLOCK_INLINE task<void> member::heartbeat_loop() {
  auto& loop = client_->loop();
  auto live = options_.liveness_timeout;
  auto every = std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10), live / 4);
  auto limit = std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10), live / 2);
  for (;;) {
    co_await loop.sleep(every);
    if (held() > 0 && client_->is_open() && !claiming_) co_await check_rows(limit);
  }
}

PGIPLOCK_INLINE task<void> member::check_rows(std::chrono::milliseconds limit) {
  std::optional<result> r;
  std::string failure;
  auto sent = steady_coarse_ms();
  try {
    r = co_await within(client_->loop(), client_->query_prepared(heartbeat_sql_, app_, key_), limit);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  std::vector<std::string> holding;
  for (auto& [ch, t] : tenures_) {
    if (t.state == lock_state::holding) holding.push_back(ch);
  }
  if (holding.empty() || claiming_) co_return;  // released or claiming meanwhile: counts would not match
  if (!failure.empty() || !r) {
    auto why = failure.empty() ? "the liveness check got no answer within " + std::to_string(limit.count()) + " ms"
                               : "the liveness check failed: " + failure;
    co_await demote_and_free(std::move(holding), why);
    co_return;
  }
  if (std::strtoll(std::string(r->get(0, 0)).c_str(), nullptr, 10) >= static_cast<long long>(holding.size())) {
    if (hooks_.confirmed) hooks_.confirmed(sent);
    co_return;
  }
  auto rows = co_await client_->query(rows_sql_, app_, lock_prefix);
  std::set<std::string, std::less<>> still;
  for (int i = 0; i < rows.rows(); ++i) still.emplace(rows.get(i, 0));
  std::vector<std::string> gone;
  for (auto& ch : holding) {
    if (!still.count(ch)) gone.push_back(ch);
  }
  if (!gone.empty()) co_await demote_and_free(std::move(gone), "its lock row was deleted");
}

PGIPLOCK_INLINE task<void> member::retry_loop() {
  for (;;) {
    co_await client_->loop().sleep(options_.acquire_interval);
    if (client_->is_open() && needs_timer()) co_await claim_now();
  }
}

PGIPLOCK_INLINE void member::stop_loops() {
  claim_task_ = task<void>{};
  watch_task_ = task<void>{};
  heartbeat_task_ = task<void>{};
  retry_task_ = task<void>{};
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock::detail
