// ==== detail: durable channels, the holder's side of the journal ==============
//
// DESIGN.md section 8 and docs/durable.md. While this member holds a durable
// channel, one stream per channel: on a new tenure it fences the channel's
// cursor with the tenure's token and reads where the cursor stands
// (resuming), replays the journal after it (catching up), then follows the
// nudges (live). Ids are gap-free and in commit order per channel, so a
// live nudge whose id is the next one, with its payload inline, is
// delivered without a SELECT; anything else (a large payload, a gap) sends
// the stream back to the journal, which also reads every catching-up stream
// in one statement. Deliveries are acknowledged in the background, one
// statement for all channels and one in flight at a time, each channel only
// under its tenure's token. A handler that wants its effects exactly once
// runs in a transaction on a connection of its own that also moves the
// cursor (on_delivery_in_transaction).
//
// A tenure is confirmed by every statement that proves it still stands
// (the cursor taken or acknowledged under its token, the member's liveness
// check). A holder that has not had one for half the liveness timeout was
// paused (SIGSTOP, a frozen VM) or cut off, and a successor may be replaying
// what its socket still holds: it delivers nothing more until a check under
// its token comes back (phase confirming), then reads on from the journal.
#pragma once

#include "lock_schema.hpp"
#include "../stats.hpp"

namespace pgiplock::detail {

// The journal's tables and functions in the lock schema; one check when
// they are there already.
task<void> ensure_journal(std::shared_ptr<connection> client);

struct journal_options {
  std::chrono::milliseconds retention{std::chrono::hours(24 * 7)};
  std::chrono::milliseconds retry_delay{100};
  std::chrono::milliseconds liveness_timeout{10000};
  log_handler logger;
};

class journal {
 public:
  using transaction_handler = std::function<task<void>(const delivery&, connection&)>;
  struct hooks {
    std::function<void(const delivery&)> deliver;  // per channel in id order
    std::function<void(const std::exception&)> report;
  };

  journal(std::shared_ptr<connection> client, journal_options options, hooks h);
  journal(const journal&) = delete;
  journal& operator=(const journal&) = delete;
  ~journal();

  // A tenure began (its LISTEN committed with the win) or ended.
  void begin_tenure(const std::string& channel, std::int64_t token, delivery_count* count);
  void end_tenure(const std::string& channel);
  // Before a release: stop delivering these channels and acknowledge what
  // they delivered, so the successor resumes exactly there.
  task<void> settle(std::vector<std::string> channels);
  // A notification on a channel this member may hold.
  void on_nudge(const notification& n);
  // The member's liveness check found every held row still its own; it was
  // sent at `sent_ms` (steady_coarse_ms).
  void confirmed(std::int64_t sent_ms);
  // From now on the cursor moves only with the handler's transaction.
  void set_transaction_handler(transaction_handler fn);
  // A held channel as of its last acknowledgement: published minus
  // acknowledged, and the age of the oldest unacknowledged message.
  struct lag {
    std::int64_t backlog = 0;
    std::chrono::milliseconds oldest{0};
  };
  [[nodiscard]] std::optional<lag> lag_of(std::string_view channel) const;

 private:
  // confirming: paused deliveries until the tenure is checked again.
  enum class phase { resuming, catching_up, live, confirming, stopped };
  struct nudge {
    std::int64_t id = 0;
    bool has_payload = false;
    std::string payload;
    std::uint64_t seen_at_read = 0;  // reads_ when it arrived
  };
  struct stream {
    std::int64_t token = 0;
    std::int64_t next = 0;  // the id to deliver next
    phase state = phase::resuming;
    std::deque<nudge> backlog;  // arrived while not live
    std::int64_t delivered = 0, acked = 0;
    bool check = false;  // saw an id it had delivered: is the journal still the same?
    delivery_count* count = nullptr;
    lag behind;  // from the last acknowledgement
    bool fenced = false;  // a newer tenure took the cursor: said once
    std::int64_t confirmed_ms = 0;  // steady_coarse_ms when the last check that proved the tenure went out
  };
  struct owned_delivery {
    std::string channel, payload;
    std::int64_t id = 0, token = 0;
  };
  struct read_round {
    std::vector<std::string> channels;
    std::vector<std::int64_t> tokens;
  };

  void note(log_level level, const std::string& message) const;
  void complain(const std::string& message) const;
  static bool names_missing_journal(const std::exception& e);
  void failed(const std::string& what, const std::exception& e);
  task<bool> rebuild();
  struct nudge_text {
    std::int64_t id = 0;
    std::optional<std::string_view> payload;  // none: read it from the journal
  };
  static std::optional<nudge_text> parse(std::string_view payload);
  void wake_reader();
  void wake_acker();
  bool unconfirmed(const stream& s, std::int64_t now_ms) const noexcept;
  void confirm_first(const std::string& channel, stream& s);
  void confirm(stream& s, std::int64_t sent_ms);
  bool deliver(const std::string& channel, stream& s, std::int64_t id, std::string_view payload);
  void drain_backlog(const std::string& channel, std::uint64_t read_no, bool complete);
  void fence(const std::string& channel, std::int64_t token);
  task<void> reader_loop();
  task<void> warm_up();
  task<bool> resume_all();
  task<bool> read_once();
  task<void> confirm_read(const read_round& round);
  void take_rows(const result& r, const read_round& round, std::uint64_t read_no);
  task<void> acker_loop();
  task<void> ack(std::vector<std::string> only);
  struct ack_sent {
    std::string channel;
    std::int64_t token = 0;
    std::int64_t position = 0;  // delivered up to here when the statement went: its snapshot saw at least this
  };
  task<void> take_acks(const result& r, std::vector<ack_sent> sent, std::int64_t sent_ms);
  task<void> restart(std::string channel, std::int64_t token);
  task<void> prune();
  task<void> transaction_loop();
  task<bool> run_transaction(const owned_delivery& d);
  task<void> transact(std::shared_ptr<connection> c, const owned_delivery& d);
  task<void> ensure_tx_connection();

  std::shared_ptr<connection> client_;
  journal_options options_;
  hooks hooks_;
  std::string read_sql_, take_sql_, ack_sql_, ack_one_sql_, prune_sql_, reset_sql_;
  std::map<std::string, stream, std::less<>> streams_;
  std::uint64_t reads_ = 0;  // journal reads sent so far
  std::int64_t unconfirmed_after_ms_ = 0;  // half the liveness timeout; 0: never (no liveness check)
  bool read_requested_ = false, ack_requested_ = false;
  bool rebuild_needed_ = false;  // a statement found the journal's tables gone
  cancel_source reader_wake_, acker_wake_, tx_wake_;
  bool acked_since_prune_ = false;
  bool prune_failed_ = false;  // said once
  transaction_handler tx_handler_;
  std::deque<owned_delivery> tx_queue_;
  std::shared_ptr<connection> tx_conn_;
  // Last: destroyed first.
  task<void> reader_task_;
  task<void> acker_task_;
  task<void> tx_task_;
};

// ---- implementation ---------------------------------------------------------

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE task<void> ensure_journal(std::shared_ptr<connection> client) {
  co_await ensure_lock_schema(client, lock_schema_name());
  std::string s = client->quote_identifier(lock_schema_name());
  auto present = co_await client->query(std::string(sql::journal_present), s + ".pgiplock_channel",
                                        s + ".pgiplock_cursor", s + ".pgiplock_journal",
                                        s + ".pgiplock_publish_many(text[],text[])", s + ".pgiplock_publish(text,text)",
                                        s + ".pgiplock_ack(text,bigint,bigint)", s + ".pgiplock_prune(interval)",
                                        sql::journal_version);
  if (present.get(0, 0) == "t") co_return;
  co_await client->query(std::string(sql::set_bootstrap_schema), sql::journal_version_setting, sql::journal_version);
  co_await run_bootstrap(client, sql::journal_setting, lock_schema_name(), sql::journal_ddl, "the journal");
}
#endif  // PGIPLOCK_DEFINITIONS

inline constexpr int journal_page = 256;  // messages per channel per read (and per shared row: sql.hpp)
inline constexpr long long journal_page_bytes = 16ll << 20;  // and payload bytes, past the first row
inline constexpr std::chrono::milliseconds prune_every{2000};
inline constexpr std::chrono::milliseconds prune_idle_every{30000};  // what passes the retention, unacknowledged
// Acknowledgements go at most once per pace: a crash redelivers at most
// this much more, and the cursor row is not rewritten per message.
inline constexpr std::chrono::milliseconds ack_pace{5};

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE journal::journal(std::shared_ptr<connection> client, journal_options options, hooks h)
    : client_(std::move(client)), options_(std::move(options)), hooks_(std::move(h)) {
  auto schema = client_->quote_identifier(lock_schema_name());
  read_sql_ = sql::in_schema(sql::journal_read, schema);
  take_sql_ = sql::in_schema(sql::cursor_take, schema);
  ack_sql_ = sql::in_schema(sql::cursor_ack, schema);
  ack_one_sql_ = sql::in_schema(sql::ack_one, schema);
  prune_sql_ = sql::in_schema(sql::prune, schema);
  reset_sql_ = sql::in_schema(sql::cursor_reset, schema);
  unconfirmed_after_ms_ = options_.liveness_timeout.count() / 2;
  auto& loop = client_->loop();
  reader_task_ = reader_loop();
  loop.start(reader_task_);
  acker_task_ = acker_loop();
  loop.start(acker_task_);
}

PGIPLOCK_INLINE journal::~journal() {
  tx_task_ = task<void>{};
  acker_task_ = task<void>{};
  reader_task_ = task<void>{};
  if (auto c = std::move(tx_conn_)) client_->loop().spawn(connection::close_quietly(c));
  // What was delivered and not acknowledged is delivered again by the next
  // holder: at-least-once.
}

PGIPLOCK_INLINE void journal::note(log_level level, const std::string& message) const {
  if (level == log_level::debug && !options_.logger) return;
  log(options_.logger, level, "journal: " + message);
}

PGIPLOCK_INLINE void journal::complain(const std::string& message) const { hooks_.report(error("pgiplock: " + message)); }

// Its tables or functions are gone, or an older pgiplock's are in place.
PGIPLOCK_INLINE bool journal::names_missing_journal(const std::exception& e) {
  auto* s = dynamic_cast<const sql_error*>(&e);
  return s && sqlstate::journal_missing(s->sqlstate());
}

// A failed statement of the journal: said (once per kind while it lasts),
// and a journal whose tables are gone is rebuilt by the reader.
PGIPLOCK_INLINE void journal::failed(const std::string& what, const std::exception& e) {
  if (!client_->is_open()) return;
  if (names_missing_journal(e)) {
    if (!std::exchange(rebuild_needed_, true)) {
      complain("the durable journal's tables or functions are gone or from another pgiplock version (dropped? an "
               "older member started?): re-creating what is missing; rows of dropped tables are lost");
    }
    wake_reader();
    return;
  }
  complain(what + " failed: " + e.what());
}

// The tables are back (empty): every stream starts again from its cursor,
// which is where this holder stands (its acknowledgement puts it back).
PGIPLOCK_INLINE task<bool> journal::rebuild() {
  try {
    co_await ensure_journal(client_);
  } catch (const std::exception& e) {
    complain(std::string("re-creating the durable journal failed: ") + e.what());
    co_return false;
  }
  rebuild_needed_ = false;
  for (auto& [ch, s] : streams_) {
    if (s.state == phase::stopped) continue;
    s.state = phase::resuming;
    s.backlog.clear();
  }
  co_return true;
}

PGIPLOCK_INLINE void journal::begin_tenure(const std::string& channel, std::int64_t token, delivery_count* count) {
  stream s;
  s.token = token;
  s.count = count;
  s.confirmed_ms = steady_coarse_ms();  // won just now
  streams_[channel] = std::move(s);
  wake_reader();
}

PGIPLOCK_INLINE void journal::end_tenure(const std::string& channel) {
  auto it = streams_.find(channel);
  if (it != streams_.end()) streams_.erase(it);
  std::erase_if(tx_queue_, [&](const owned_delivery& d) { return d.channel == channel; });
}

PGIPLOCK_INLINE std::optional<journal::lag> journal::lag_of(std::string_view channel) const {
  auto it = streams_.find(channel);
  if (it == streams_.end()) return std::nullopt;
  return it->second.behind;
}

PGIPLOCK_INLINE void journal::set_transaction_handler(transaction_handler fn) {
  tx_handler_ = std::move(fn);
  if (tx_task_.valid()) return;
  tx_task_ = transaction_loop();
  client_->loop().start(tx_task_);
}

PGIPLOCK_INLINE void journal::wake_reader() {
  read_requested_ = true;
  reader_wake_.cancel();
}

// With a transaction handler the transactions move the cursor; the
// acknowledgement statement then only checks (and reads the lag).
PGIPLOCK_INLINE void journal::wake_acker() {
  ack_requested_ = true;
  acker_wake_.cancel();
}

// `now_ms`: the clock of the batch being delivered (dispatch_steady_ms):
// the pause that matters is the one before it.
PGIPLOCK_INLINE bool journal::unconfirmed(const stream& s, std::int64_t now_ms) const noexcept {
  return unconfirmed_after_ms_ > 0 && now_ms - s.confirmed_ms > unconfirmed_after_ms_;
}

// The acknowledgement statement checks the tenure (its token against the
// cursor's); what arrives meanwhile waits in the backlog.
PGIPLOCK_INLINE void journal::confirm_first(const std::string& channel, stream& s) {
  s.state = phase::confirming;
  s.check = true;
  wake_acker();
  note(log_level::debug, "durable channel " + channel + ": no confirmation of tenure " + std::to_string(s.token) +
                             " for " + std::to_string(dispatch_steady_ms - s.confirmed_ms) +
                             " ms (paused?): checking it before delivering more");
}

// The journal, not the nudges held meanwhile, says what comes next: a nudge
// may have been sent before the pause and delivered by nobody yet.
PGIPLOCK_INLINE void journal::confirm(stream& s, std::int64_t sent_ms) {
  s.confirmed_ms = std::max(s.confirmed_ms, sent_ms);
  if (s.state != phase::confirming) return;
  s.state = phase::catching_up;
  wake_reader();
}

PGIPLOCK_INLINE void journal::confirmed(std::int64_t sent_ms) {
  for (auto& [ch, s] : streams_) {
    if (s.state != phase::stopped) confirm(s, sent_ms);
  }
}

// "<id>:<payload>" or "<id>", after nudge_prefix; anything else is not a
// nudge of the journal. Views into the notification: nothing is copied.
PGIPLOCK_INLINE std::optional<journal::nudge_text> journal::parse(std::string_view payload) {
  if (!payload.starts_with(nudge_prefix)) return std::nullopt;
  payload.remove_prefix(nudge_prefix.size());
  nudge_text n;
  auto colon = payload.find(':');
  auto digits = payload.substr(0, colon);
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n.id);
  if (ec != std::errc{} || end != digits.data() + digits.size() || digits.empty() || n.id <= 0) return std::nullopt;
  if (colon != std::string_view::npos) n.payload = payload.substr(colon + 1);
  return n;
}

// The hot path of a durable channel: the next id with its payload inline
// is delivered at once; anything else waits for the journal.
PGIPLOCK_INLINE void journal::on_nudge(const notification& n) {
  auto it = streams_.find(n.channel);
  if (it == streams_.end() || it->second.state == phase::stopped) return;
  auto& s = it->second;
  if (s.state == phase::live && unconfirmed(s, dispatch_steady_ms)) confirm_first(it->first, s);
  auto parsed = parse(n.payload);
  if (!parsed) {
    note(log_level::debug, "ignored a notification on durable channel " + std::string(n.channel) +
                               " that is not a journal nudge: " + std::string(n.payload.substr(0, 64)));
    return;
  }
  if (s.state == phase::live && parsed->id < s.next) {
    s.check = true;  // seen: a late nudge of a replayed message, or a journal that began again
    ack_requested_ = true;
    acker_wake_.cancel();
    return;
  }
  if (s.state == phase::live && parsed->id == s.next && parsed->payload) {
    deliver(it->first, s, parsed->id, *parsed->payload);
    return;
  }
  s.backlog.push_back(nudge{parsed->id, parsed->payload.has_value(), std::string(parsed->payload.value_or("")), reads_});
  if (s.state == phase::live) {
    s.state = phase::catching_up;
    wake_reader();
  }
}

// Delivers one message; false when a handler ended the tenure meanwhile.
PGIPLOCK_INLINE bool journal::deliver(const std::string& channel, stream& s, std::int64_t id, std::string_view payload) {
  auto token = s.token;
  s.next = id + 1;
  s.delivered = id;
  if (s.count) s.count->tick();
  std::string ch = channel;  // a handler may erase the stream and its key
  try {
    hooks_.deliver(delivery{ch, payload, id, token});
  } catch (const std::exception& e) {
    // Not the journal's to undo: the message counts as handled (a poison
    // message must not stop its channel); the handler's failure is said.
    complain("durable channel " + ch + ": the handler of message " + std::to_string(id) + " threw: " + e.what());
  }
  auto it = streams_.find(ch);
  if (it == streams_.end() || it->second.token != token) return false;
  if (tx_handler_) tx_queue_.push_back(owned_delivery{ch, std::string(payload), id, token});
  if (tx_handler_) tx_wake_.cancel();
  wake_acker();
  return true;
}

// After a read of the journal: what arrived meanwhile, in order. A nudge
// the read should have covered (it arrived before the read was sent) but
// did not is gone from the journal: said, and skipped.
PGIPLOCK_INLINE void journal::drain_backlog(const std::string& channel, std::uint64_t read_no, bool complete) {
  for (;;) {
    auto it = streams_.find(channel);
    if (it == streams_.end() || it->second.state != phase::catching_up) return;
    auto& s = it->second;
    if (s.backlog.empty()) {
      if (complete) s.state = phase::live;
      return;
    }
    auto& head = s.backlog.front();
    if (head.id < s.next) {
      s.backlog.pop_front();
      continue;
    }
    bool covered = head.seen_at_read < read_no && complete;
    if (head.id > s.next && !covered) return;  // what lies between may still come
    if (head.id > s.next || (!head.has_payload && covered)) {
      complain("durable channel " + channel + ": messages " + std::to_string(s.next) + ".." +
               std::to_string(head.has_payload ? head.id - 1 : head.id) +
               " are no longer in the journal (past durable_retention, or deleted)");
      s.next = head.has_payload ? head.id : head.id + 1;
      if (!head.has_payload) {
        s.backlog.pop_front();
        continue;
      }
    }
    if (!head.has_payload) return;  // the next read brings it
    auto n = std::move(head);
    s.backlog.pop_front();
    if (!deliver(channel, s, n.id, n.payload)) return;
  }
}

// Another tenure took the cursor: this member must not deliver the channel.
PGIPLOCK_INLINE void journal::fence(const std::string& channel, std::int64_t token) {
  auto it = streams_.find(channel);
  if (it == streams_.end() || it->second.token != token || it->second.fenced) return;
  it->second.fenced = true;
  it->second.state = phase::stopped;
  it->second.backlog.clear();
  complain("durable channel " + channel + ": tenure " + std::to_string(token) +
           " was replaced by a newer one; stopped delivering it");
}

PGIPLOCK_INLINE task<void> journal::reader_loop() {
  co_await warm_up();
  for (;;) {
    if (!read_requested_) {
      if (!co_await client_->loop().sleep(std::chrono::hours(24), &reader_wake_)) reader_wake_.reset();
      continue;
    }
    read_requested_ = false;
    if (!client_->is_open()) co_return;
    bool ok = !rebuild_needed_ || co_await rebuild();
    if (ok) ok = co_await resume_all();
    while (ok) {
      bool more = co_await read_once();
      if (!more) break;
    }
    if (!ok) {
      co_await client_->loop().sleep(options_.retry_delay);
      read_requested_ = true;
    }
  }
}

// A standby's session has never touched the journal: its first takeover
// would pay for opening the partitions and planning the statements (5-10 ms
// measured). Both are prepared and run once, on nothing, beforehand.
PGIPLOCK_INLINE task<void> journal::warm_up() {
  try {
    co_await client_->query_prepared(take_sql_, "{}", "{}");
    co_await client_->query_prepared(read_sql_, "{}", "{}", journal_page, journal_page_bytes);
  } catch (const std::exception& e) {
    note(log_level::debug, std::string("warming up failed: ") + e.what());
  }
}

// Fences the cursor of every new tenure and reads where it stands, in one
// statement; false after a failure (reported; retried).
PGIPLOCK_INLINE task<bool> journal::resume_all() {
  read_round round;
  for (auto& [ch, s] : streams_) {
    if (s.state != phase::resuming) continue;
    round.channels.push_back(ch);
    round.tokens.push_back(s.token);
  }
  if (round.channels.empty()) co_return true;
  text_array chs, toks;
  for (std::size_t i = 0; i < round.channels.size(); ++i) {
    chs.add(round.channels[i]);
    toks.add(std::to_string(round.tokens[i]));
  }
  result r;
  auto sent_ms = steady_coarse_ms();
  try {
    r = co_await client_->query_prepared(take_sql_, chs.literal(), toks.literal());
  } catch (const std::exception& e) {
    failed("reading durable cursors", e);
    co_return false;
  }
  std::map<std::string, std::int64_t, std::less<>> at;
  for (int i = 0; i < r.rows(); ++i) at[std::string(r.get(i, 0))] = std::strtoll(std::string(r.get(i, 1)).c_str(), nullptr, 10);
  for (std::size_t i = 0; i < round.channels.size(); ++i) {
    auto it = streams_.find(round.channels[i]);
    if (it == streams_.end() || it->second.token != round.tokens[i] || it->second.state != phase::resuming) continue;
    auto pos = at.find(round.channels[i]);
    if (pos == at.end()) {
      fence(round.channels[i], round.tokens[i]);
      continue;
    }
    it->second.next = pos->second + 1;
    it->second.acked = it->second.delivered = pos->second;
    it->second.state = phase::catching_up;
    it->second.confirmed_ms = std::max(it->second.confirmed_ms, sent_ms);
  }
  co_return true;
}

// One page of the journal for every catching-up stream; true while some
// stream needs another.
PGIPLOCK_INLINE task<bool> journal::read_once() {
  read_round round;
  text_array chs, from;
  for (auto& [ch, s] : streams_) {
    if (s.state != phase::catching_up) continue;
    round.channels.push_back(ch);
    round.tokens.push_back(s.token);
    chs.add(ch);
    from.add(std::to_string(s.next - 1));
  }
  if (round.channels.empty()) co_return false;
  auto read_no = ++reads_;
  result r;
  bool read_failed = false;
  try {
    r = co_await client_->query_prepared(read_sql_, chs.literal(), from.literal(), journal_page, journal_page_bytes);
  } catch (const std::exception& e) {
    read_failed = true;
    failed("reading the journal", e);
  }
  if (read_failed) {
    co_await client_->loop().sleep(options_.retry_delay);
    co_return client_->is_open();
  }
  co_await confirm_read(round);
  take_rows(r, round, read_no);
  co_return std::any_of(streams_.begin(), streams_.end(),
                        [](const auto& s) { return s.second.state == phase::catching_up; });
}

// A read that came back long after its tenure's last confirmation (large
// rows read slowly, or a pause while it was out) is checked once before its
// rows are delivered; a fresh read after the check could be as slow again.
PGIPLOCK_INLINE task<void> journal::confirm_read(const read_round& round) {
  auto now = steady_coarse_ms();
  std::vector<std::string> doubtful;
  for (std::size_t i = 0; i < round.channels.size(); ++i) {
    auto it = streams_.find(round.channels[i]);
    if (it == streams_.end() || it->second.token != round.tokens[i] || it->second.state != phase::catching_up ||
        !unconfirmed(it->second, now)) {
      continue;
    }
    it->second.check = true;
    doubtful.push_back(it->first);
  }
  if (!doubtful.empty()) co_await ack(std::move(doubtful));
}

// Rows come ordered by channel, then id; a row without its payload says
// that the channel has more than this page. A stream still unconfirmed
// (its check failed) waits for the next check and reads these rows again.
PGIPLOCK_INLINE void journal::take_rows(const result& r, const read_round& round, std::uint64_t read_no) {
  note_dispatch_time();  // the deliveries below are not a connection's notifications
  for (auto& ch : round.channels) {
    auto it = streams_.find(ch);
    if (it != streams_.end() && it->second.state == phase::catching_up && unconfirmed(it->second, dispatch_steady_ms)) {
      confirm_first(it->first, it->second);
    }
  }
  std::set<std::string, std::less<>> more;
  for (int i = 0; i < r.rows(); ++i) {
    std::string ch(r.get(i, 0));
    if (r.get(i, 3) != "t") {
      more.insert(ch);
      continue;
    }
    auto it = streams_.find(ch);
    if (it == streams_.end() || it->second.state != phase::catching_up) continue;
    auto& s = it->second;
    auto id = std::strtoll(std::string(r.get(i, 1)).c_str(), nullptr, 10);
    if (id < s.next) continue;
    if (id > s.next) {
      complain("durable channel " + ch + ": messages " + std::to_string(s.next) + ".." + std::to_string(id - 1) +
               " are no longer in the journal (past durable_retention, or deleted)");
    }
    deliver(ch, s, id, r.get(i, 2));
  }
  for (std::size_t i = 0; i < round.channels.size(); ++i) {
    auto it = streams_.find(round.channels[i]);
    if (it == streams_.end() || it->second.token != round.tokens[i]) continue;
    drain_backlog(round.channels[i], read_no, !more.count(round.channels[i]));
  }
}

// One acknowledgement statement in flight; requests made meanwhile go in
// the next. Retention runs from here too.
PGIPLOCK_INLINE task<void> journal::acker_loop() {
  auto last_prune = event_loop::clock::now();
  for (;;) {
    if (!ack_requested_) {
      if (!co_await client_->loop().sleep(prune_every, &acker_wake_)) acker_wake_.reset();
    }
    if (!client_->is_open()) co_return;
    if (std::exchange(ack_requested_, false)) {
      co_await ack({});
      co_await client_->loop().sleep(ack_pace);  // a statement per pace, not per message
    }
    auto since = event_loop::clock::now() - last_prune;
    if ((acked_since_prune_ && since >= prune_every) || since >= prune_idle_every) {
      last_prune = event_loop::clock::now();
      co_await prune();
    }
  }
}

// Acknowledges what was delivered (on `only`, when given), and checks the
// channels that saw an id they had delivered already: each under its own
// token; a refused one is fenced.
PGIPLOCK_INLINE task<void> journal::ack(std::vector<std::string> only) {
  text_array chs, ids, toks;
  std::vector<ack_sent> sent;
  for (auto& [ch, s] : streams_) {
    bool moves = s.delivered > s.acked && !tx_handler_;
    if (!moves && !s.check && !tx_handler_) continue;
    if (!only.empty() && std::find(only.begin(), only.end(), ch) == only.end()) continue;
    chs.add(ch);
    ids.add(std::to_string(moves ? s.delivered : s.acked));  // s.acked: no move, the lag read from there
    toks.add(std::to_string(s.token));
    sent.push_back(ack_sent{ch, s.token, s.next - 1});
    if (moves) s.acked = s.delivered;  // optimistic: a failure puts it back below
    s.check = false;
  }
  if (sent.empty()) co_return;
  result r;
  auto sent_ms = steady_coarse_ms();
  try {
    r = co_await client_->query(ack_sql_, chs.literal(), ids.literal(), toks.literal());
    acked_since_prune_ = true;
  } catch (const std::exception& e) {
    failed("acknowledging durable messages", e);
    for (auto& a : sent) {
      auto it = streams_.find(a.channel);
      if (it != streams_.end() && it->second.token == a.token) it->second.acked = 0;  // sent again next time
    }
    if (client_->is_open()) ack_requested_ = true;
    co_return;
  }
  co_await take_acks(r, sent, sent_ms);
}

// A last id below what was delivered when the statement went means the
// journal began again (a delivery since then is no sign of it).
PGIPLOCK_INLINE task<void> journal::take_acks(const result& r, std::vector<ack_sent> sent, std::int64_t sent_ms) {
  std::map<std::string, int, std::less<>> row_of;
  for (int i = 0; i < r.rows(); ++i) row_of[std::string(r.get(i, 0))] = i;
  std::vector<ack_sent> restarted;
  for (auto& a : sent) {
    auto row = row_of.find(a.channel);
    if (row == row_of.end()) continue;
    int i = row->second;
    if (r.get(i, 1) != "t") {
      fence(a.channel, a.token);
      continue;
    }
    auto it = streams_.find(a.channel);
    if (it == streams_.end() || it->second.token != a.token) continue;
    confirm(it->second, sent_ms);
    if (r.is_null(i, 2)) continue;
    auto last = std::strtoll(std::string(r.get(i, 2)).c_str(), nullptr, 10);
    it->second.behind.backlog = std::max<std::int64_t>(0, last - it->second.acked);
    it->second.behind.oldest =
        std::chrono::milliseconds(r.is_null(i, 3) ? 0 : std::strtoll(std::string(r.get(i, 3)).c_str(), nullptr, 10));
    if (last < a.position) restarted.push_back(a);
  }
  for (auto& a : restarted) co_await restart(a.channel, a.token);
}

// The channel's ids went back (its journal was dropped and made again):
// what this holder skipped as seen is new. Deliver the new journal from 1.
PGIPLOCK_INLINE task<void> journal::restart(std::string channel, std::int64_t token) {
  complain("durable channel " + channel + ": its journal began again (dropped and re-created?): delivering the "
           "new one from its first message");
  try {
    co_await client_->query(reset_sql_, channel, token);
  } catch (const std::exception& e) {
    failed("resetting a durable cursor", e);
  }
  auto it = streams_.find(channel);
  if (it == streams_.end() || it->second.token != token || it->second.state == phase::stopped) co_return;
  auto& s = it->second;
  s.next = 1;
  s.delivered = s.acked = 0;
  s.backlog.clear();
  s.state = phase::catching_up;
  wake_reader();
}

// Idle members prune too, so a channel nobody listens to still loses what
// is past the retention.
PGIPLOCK_INLINE task<void> journal::prune() {
  try {
    auto keep = std::to_string(options_.retention.count()) + " milliseconds";
    co_await client_->query_prepared(prune_sql_, keep);
    acked_since_prune_ = false;
  } catch (const std::exception& e) {
    // Functions an older pgiplock put back: a holder that only listens calls
    // no other, so this is where it notices and re-creates them.
    if (names_missing_journal(e)) {
      failed("pruning the journal", e);
      co_return;
    }
    // Said once: without it the journal only grows (a missing TRUNCATE grant).
    if (client_->is_open() && !std::exchange(prune_failed_, true)) {
      note(log_level::warn, std::string("pruning the journal failed (it keeps growing until this is fixed): ") +
                                e.what());
    }
  }
}

PGIPLOCK_INLINE task<void> journal::settle(std::vector<std::string> channels) {
  for (auto& ch : channels) {
    auto it = streams_.find(ch);
    if (it != streams_.end()) it->second.state = phase::stopped;
  }
  if (!tx_handler_ && client_->is_open()) co_await ack(std::move(channels));
}

// Exactly-once effects: one transaction per message on a connection of its
// own, in delivery order: the handler's writes, then the cursor, which a
// replaced tenure cannot move (the whole transaction rolls back then).
PGIPLOCK_INLINE task<void> journal::transaction_loop() {
  for (;;) {
    if (tx_queue_.empty()) {
      if (!co_await client_->loop().sleep(std::chrono::hours(24), &tx_wake_)) tx_wake_.reset();
      continue;
    }
    auto d = tx_queue_.front();
    bool done = co_await run_transaction(d);
    if (done) {
      auto it = streams_.find(d.channel);  // committed: where the lag is counted from
      if (it != streams_.end() && it->second.token == d.token) it->second.acked = std::max(it->second.acked, d.id);
      if (!tx_queue_.empty() && tx_queue_.front().id == d.id && tx_queue_.front().channel == d.channel) {
        tx_queue_.pop_front();
      }
      continue;
    }
    co_await client_->loop().sleep(options_.retry_delay);
  }
}

// True when the message is settled (committed, or its tenure is over).
PGIPLOCK_INLINE task<bool> journal::run_transaction(const owned_delivery& d) {
  std::exception_ptr failure;
  try {
    co_await ensure_tx_connection();
    co_await transact(tx_conn_, d);
    co_return true;
  } catch (...) {
    failure = std::current_exception();
  }
  if (tx_conn_ && tx_conn_->is_open()) {  // not from inside the catch: no co_await there
    try {
      co_await tx_conn_->query(std::string(sql::rollback));
    } catch (const std::exception&) {
      tx_conn_.reset();
    }
  }
  try {
    std::rethrow_exception(failure);
  } catch (const sql_error& e) {
    if (e.sqlstate() == sqlstate::fenced) {
      fence(d.channel, d.token);
      std::erase_if(tx_queue_, [&](const owned_delivery& q) { return q.channel == d.channel && q.token == d.token; });
      co_return true;
    }
    complain("durable channel " + d.channel + ": the transaction of message " + std::to_string(d.id) +
             " failed and is retried: " + e.what());
  } catch (const std::exception& e) {
    complain("durable channel " + d.channel + ": the transaction of message " + std::to_string(d.id) +
             " failed and is retried: " + e.what());
  }
  if (tx_conn_ && !tx_conn_->is_open()) tx_conn_.reset();
  co_return false;
}

PGIPLOCK_INLINE task<void> journal::transact(std::shared_ptr<connection> c, const owned_delivery& d) {
  co_await c->query(std::string(sql::begin));
  co_await tx_handler_(delivery{d.channel, d.payload, d.id, d.token}, *c);
  co_await c->query(ack_one_sql_, d.channel, d.id, d.token);
  co_await c->query(std::string(sql::commit));
}

PGIPLOCK_INLINE task<void> journal::ensure_tx_connection() {
  if (tx_conn_ && tx_conn_->is_open()) co_return;
  auto opts = derived_options(client_->logger(), options_.liveness_timeout, false);
  tx_conn_ = co_await connection::connect(client_->loop(), client_->conninfo(), opts);
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock::detail
