// ==== detail: notify() batching ===============================================
//
// Every notify() of one turn of the loop goes out in one statement, one
// transaction, one commit: the server's cost per message is then a row of an
// unnest(), not a round trip. PostgreSQL folds identical (channel, payload)
// pairs of one transaction into one delivery, so a repeat starts a new batch.
#pragma once

#include "../connection.hpp"

namespace pgiplock::detail {

class notify_batcher {
 public:
  struct batch {
    explicit batch(event_loop& loop) : done(loop) {}
    text_array channels, payloads;
    std::size_t bytes = 0;
    std::unordered_set<std::string> pairs;  // channel NUL payload, to spot repeats
    bool sealed = false;                    // sent (or being sent): joins go to a new batch
    async_event done;
    std::exception_ptr failure;
  };

  explicit notify_batcher(event_loop& loop) : loop_(&loop) {}
  // The statement that sends a batch: pg_notify, or the journal's publish,
  // whose nudges carry ids, so repeats are not folded and need no new batch.
  void use(std::string statement, bool folds) {
    statement_ = std::move(statement);
    folds_ = folds;
  }

  // Adds the message to the open batch (opening one if needed); wait on the
  // batch's `done`, then look at its `failure`.
  std::shared_ptr<batch> join(const std::shared_ptr<connection>& client, std::string_view channel,
                              std::string_view payload) {
    std::string pair;
    if (folds_) {
      pair.assign(channel);
      pair.push_back('\0');
      pair.append(payload);
    }
    if (!open_ || open_->sealed || full(*open_) || (folds_ && open_->pairs.count(pair))) {
      open_ = std::make_shared<batch>(*loop_);
      loop_->spawn(send(open_, client, statement_, *loop_));
    }
    open_->channels.add(channel);
    open_->payloads.add(payload);
    open_->bytes += channel.size() + payload.size();
    if (folds_) open_->pairs.insert(std::move(pair));
    return open_;
  }

 private:
  static constexpr std::size_t max_count = 10000;
  static constexpr std::size_t max_bytes = 4u << 20;
  static bool full(const batch& b) { return b.channels.size() >= max_count || b.bytes >= max_bytes; }

  // Runs after the notifying coroutines of this turn of the loop have joined.
  static task<void> send(std::shared_ptr<batch> b, std::shared_ptr<connection> c, std::string statement,
                         event_loop& loop) {
    co_await loop.yield();
    b->sealed = true;
    b->pairs.clear();
    try {
      co_await c->query(statement, b->channels.literal(), b->payloads.literal());
    } catch (...) {
      b->failure = std::current_exception();
    }
    b->done.set();
  }

  event_loop* loop_;
  std::string statement_{sql::notify_many};
  bool folds_ = true;
  std::shared_ptr<batch> open_;
};

}  // namespace pgiplock::detail
