// ==== detail: the end-to-end probe of a listening connection ==================
//
// A connection can look healthy (its queries answer) while its LISTEN hears
// nothing: a proxy that drops notifications, a LISTEN lost behind the
// library's back. Only an end-to-end check finds that: every interval the
// connection notifies itself on a private channel and expects the echo
// within the limit (the liveness timeout). The same statement samples the
// server's NOTIFY queue (pg_notification_queue_usage()), which one stuck
// listener anywhere in the database fills until every NOTIFY fails.
#pragma once

#include "../connection.hpp"

namespace pgiplock::detail {

class echo_probe {
 public:
  struct hooks {
    std::function<void(const std::string& why)> dead;  // the echo did not come back
    std::function<void(double usage)> queue_high;      // crossed the threshold upwards
  };
  struct options {
    std::chrono::milliseconds every{10000}, limit{10000};
    double queue_threshold = 0.5;
  };

  echo_probe(std::shared_ptr<connection> c, options o, hooks h);
  echo_probe(const echo_probe&) = delete;
  echo_probe& operator=(const echo_probe&) = delete;
  ~echo_probe();

  // The last echo's round trip; 0 before the first.
  [[nodiscard]] std::chrono::microseconds last_round_trip() const noexcept { return rtt_; }
  [[nodiscard]] double queue_usage() const noexcept { return usage_; }
  [[nodiscard]] std::uint64_t failures() const noexcept { return failures_; }

 private:
  task<void> run();
  task<bool> once();
  void note_usage(double usage);

  std::shared_ptr<connection> c_;
  options options_;
  hooks hooks_;
  std::string channel_;
  std::uint64_t sub_ = 0;
  std::shared_ptr<cancel_source> heard_;
  std::chrono::microseconds rtt_{0};
  double usage_ = 0;
  bool above_ = false;
  std::uint64_t failures_ = 0;
  task<void> task_;  // last: destroyed first
};

// ---- implementation ---------------------------------------------------------

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE echo_probe::echo_probe(std::shared_ptr<connection> c, options o, hooks h)
    : c_(std::move(c)), options_(o), hooks_(std::move(h)), channel_("pgiplock-echo-" + random_uuid()) {
  heard_ = std::make_shared<cancel_source>();
  auto heard = heard_;  // the handler may outlive this probe
  sub_ = c_->subscribe(channel_, [heard](const notification&) { heard->cancel(); });
  task_ = run();
  c_->loop().start(task_);
}

PGIPLOCK_INLINE echo_probe::~echo_probe() {
  task_ = task<void>{};
  c_->unsubscribe(sub_);
}

PGIPLOCK_INLINE task<void> echo_probe::run() {
  try {
    co_await c_->listen(channel_);
  } catch (const std::exception& e) {
    log(c_->logger(), log_level::debug, std::string("echo probe: LISTEN failed: ") + e.what());
    co_return;  // the connection is going; its successor has a probe of its own
  }
  for (;;) {
    co_await c_->loop().sleep(options_.every);
    if (!c_->is_open()) co_return;
    if (!co_await once()) co_return;
  }
}

// One probe; false when the echo did not come back (the hook said so).
PGIPLOCK_INLINE task<bool> echo_probe::once() {
  heard_->reset();
  auto t0 = event_loop::clock::now();
  double usage = -1;
  try {
    auto r = co_await c_->query(std::string(sql::echo_probe), channel_);
    usage = std::strtod(std::string(r.get(0, 1)).c_str(), nullptr);
  } catch (const std::exception&) {
    co_return c_->is_open();  // a failed statement says nothing about LISTEN; a lost link has its own path
  }
  note_usage(usage);
  auto left = options_.limit - std::chrono::duration_cast<std::chrono::milliseconds>(event_loop::clock::now() - t0);
  bool timed_out = heard_->cancelled() ? false : co_await c_->loop().sleep(std::max(left, std::chrono::milliseconds(1)), heard_.get());
  if (!c_->is_open()) co_return false;
  if (!timed_out) {
    rtt_ = std::chrono::duration_cast<std::chrono::microseconds>(event_loop::clock::now() - t0);
    co_return true;
  }
  ++failures_;
  hooks_.dead("its probe notification did not come back within " + std::to_string(options_.limit.count()) +
              " ms: LISTEN hears nothing on this connection");
  co_return false;
}

// Said once per crossing upwards, not once per probe while it stays high.
PGIPLOCK_INLINE void echo_probe::note_usage(double usage) {
  if (usage < 0) return;
  usage_ = usage;
  if (usage >= options_.queue_threshold && !above_) {
    above_ = true;
    hooks_.queue_high(usage);
  } else if (usage < options_.queue_threshold) {
    above_ = false;
  }
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock::detail
