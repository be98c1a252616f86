// ==== detail: the execution lock's claims =====================================
//
// In execution-lock mode every instance LISTENs, and each message is handled
// by the one instance whose claim on it (a row keyed by the message) wins.
// The claims of one turn of the loop go in one statement; markers expire by
// TTL, pruned in one statement per interval.
#pragma once

#include "lock_schema.hpp"

namespace pgiplock::detail {

class claim_queue {
 public:
  // What the queue needs from its pubsub.
  struct hooks {
    std::function<std::shared_ptr<connection>()> client;  // the current connection
    std::function<void(std::string_view channel, std::string_view payload)> deliver;
    std::function<void(const std::exception&)> report;
  };
  using key_function = std::function<std::string(std::string_view channel, std::string_view payload)>;

  claim_queue(event_loop& loop, hooks h, key_function key, std::chrono::seconds ttl)
      : loop_(&loop), hooks_(std::move(h)), key_(std::move(key)), ttl_(ttl) {}

  // The claim table, made if missing; starts the pruner once.
  task<void> prepare(std::shared_ptr<connection> c) {
    std::string quoted = c->quote_identifier(schema());
    auto present = co_await c->query(std::string(sql::claim_schema_present), quoted + ".claim");
    if (present.get(0, 0) != "t") {
      co_await run_bootstrap(c, sql::claim_schema_setting, schema(), sql::claim_schema_ddl,
                             "the execution-lock schema");
    }
    if (!pruner_.valid()) {
      pruner_ = prune();
      loop_->start(pruner_);
    }
  }

  void add(const notification& n) {
    std::string key = key_ ? key_(n.channel, n.payload) : message_key(n.sender_pid, n.channel, n.payload);
    queued_.push_back(claim{std::move(key), std::string(n.channel), std::string(n.payload)});
    if (flush_scheduled_) return;
    flush_scheduled_ = true;
    loop_->spawn(flush(hooks_.client()));
  }

 private:
  struct claim {
    std::string key, channel, payload;
  };

  static std::string schema() { return lock_schema_name() + std::string(claim_schema_suffix); }

  task<void> prune() {
    auto every = std::clamp<std::chrono::milliseconds>(ttl_ / 4, std::chrono::seconds(1), std::chrono::minutes(5));
    for (;;) {
      co_await loop_->sleep(every);
      auto c = hooks_.client();
      if (!c || !c->is_open()) continue;
      try {
        co_await c->query(sql::in_schema(sql::prune_claims, c->quote_identifier(schema()), "@claims@"),
                          std::to_string(ttl_.count()) + " seconds");
      } catch (const std::exception& e) {
        hooks_.report(e);
      }
    }
  }

  // What the statement returns is what this instance won, delivered in
  // arrival order.
  task<void> flush(std::shared_ptr<connection> c) {
    co_await loop_->yield();
    flush_scheduled_ = false;
    std::vector<claim> mine;
    mine.swap(queued_);
    if (mine.empty()) co_return;
    text_array keys, channels;
    for (auto& m : mine) {
      keys.add(m.key);
      channels.add(m.channel);
    }
    std::unordered_set<std::string> won;
    try {
      auto r = co_await c->query(sql::in_schema(sql::claim_many, c->quote_identifier(schema()), "@claims@"),
                                 keys.literal(), channels.literal(), c->app_name());
      for (int i = 0; i < r.rows(); ++i) won.emplace(r.get(i, 0));
    } catch (const std::exception& e) {
      hooks_.report(e);  // unclaimed: another instance may have it; at most once
      co_return;
    }
    for (auto& m : mine) {
      if (won.count(m.key)) hooks_.deliver(m.channel, m.payload);
    }
  }

  event_loop* loop_;
  hooks hooks_;
  key_function key_;
  std::chrono::seconds ttl_;
  std::vector<claim> queued_;
  bool flush_scheduled_ = false;
  task<void> pruner_;  // last: destroyed first
};

}  // namespace pgiplock::detail
