// ==== event_loop =============================================================
//
// One loop per thread, one io_uring per loop (epoll where io_uring is
// refused). Coroutines await sockets, timers and each other through it.
//
// Every suspension point is an "operation" in the loop's slot table, named
// by an id that carries a generation: a completion for an operation whose
// awaiter has gone away (its frame destroyed) finds a newer generation and
// is dropped. That is what makes it safe to destroy a suspended coroutine at
// any time, and why completions are never resumed while the kernel's
// completion ring is being walked.
#pragma once

#include "detail/env.hpp"
#include "task.hpp"

namespace pgiplock {

enum class backend_kind { automatic, io_uring, epoll };

struct event_loop_options {
  backend_kind backend = backend_kind::automatic;  // env PGIPLOCK_BACKEND overrides automatic
  log_handler logger;
  unsigned queue_depth = 256;
};

// Cancels the operations awaited with it. Sticky: once cancelled, new
// operations started with it complete at once as cancelled, until reset().
class cancel_source {
 public:
  cancel_source() = default;
  cancel_source(const cancel_source&) = delete;
  cancel_source& operator=(const cancel_source&) = delete;
  ~cancel_source();
  void cancel();
  [[nodiscard]] bool cancelled() const noexcept { return cancelled_; }
  void reset() noexcept { cancelled_ = false; }

 private:
  friend class event_loop;
  event_loop* loop_ = nullptr;
  std::vector<std::uint64_t> ops_;
  bool cancelled_ = false;
};

struct poll_result {
  short revents = 0;  // what poll(2) would report; 0 on timeout or cancel
  bool timed_out = false;
  bool cancelled = false;
  explicit operator bool() const noexcept { return revents != 0; }
};

namespace detail {
class backend;
struct completion;
struct spawned_promise;
}  // namespace detail

class event_loop {
 public:
  using clock = std::chrono::steady_clock;

  event_loop();
  explicit event_loop(event_loop_options opt);
  event_loop(const event_loop&) = delete;
  event_loop& operator=(const event_loop&) = delete;
  ~event_loop();

  // Runs the loop until `t` finishes; returns its value or rethrows its
  // exception. If stop() ends the loop first, throws pgiplock::error.
  template <class T>
  T run(task<T> t);
  // Runs the loop until stop() is called.
  void run();
  // Starts `t` on this loop; the loop owns it. What it throws is logged.
  void spawn(task<void> t);
  // Starts `t` on this loop; the caller keeps ownership. Destroying `t`
  // before it finishes cancels it (its pending operation is abandoned).
  void start(task<void>& t);
  void stop() noexcept { stopped_ = true; }
  [[nodiscard]] bool stopped() const noexcept { return stopped_; }

  // The loop running on this thread, if any.
  [[nodiscard]] static event_loop* current() noexcept { return current_ref(); }
  [[nodiscard]] const char* backend_name() const noexcept;
  // Unique per loop in this process, unlike its address, which a later
  // loop may reuse.
  [[nodiscard]] std::uint64_t serial() const noexcept { return serial_; }
  [[nodiscard]] const log_handler& logger() const noexcept { return logger_; }

  // ---- awaitables ----

  // Waits until `fd` reports any of `events` (POLLIN, POLLOUT...), the
  // deadline passes, or `cancel` fires. One-shot, like poll(2).
  auto poll(int fd, unsigned events, std::optional<clock::time_point> deadline = std::nullopt,
            cancel_source* cancel = nullptr) {
    struct awaiter : op_awaiter {
      int fd;
      unsigned events;
      std::optional<clock::time_point> deadline;
      bool await_suspend(std::coroutine_handle<> h) { return this->loop->start_poll(*this, h, fd, events, deadline); }
      poll_result await_resume() {
        int r = this->finish();
        if (r == result_timeout) return poll_result{0, true, false};
        if (r == -ECANCELED) return poll_result{0, false, true};
        if (r < 0) throw std::system_error(-r, std::system_category(), "pgiplock: poll");
        return poll_result{static_cast<short>(r), false, false};
      }
    };
    awaiter a{};
    a.loop = this;
    a.cancel = cancel;
    a.fd = fd;
    a.events = events;
    a.deadline = deadline;
    return a;
  }

  // Suspends until `when`. Yields true when the time came, false when
  // `cancel` fired first.
  auto sleep_until(clock::time_point when, cancel_source* cancel = nullptr) {
    struct awaiter : op_awaiter {
      clock::time_point when;
      bool await_suspend(std::coroutine_handle<> h) { return this->loop->start_timer(*this, h, when); }
      bool await_resume() { return this->finish() == result_timeout; }
    };
    awaiter a{};
    a.loop = this;
    a.cancel = cancel;
    a.when = when;
    return a;
  }

  // Suspends for `d` (any std::chrono duration); as sleep_until.
  template <class Rep, class Period>
  auto sleep(std::chrono::duration<Rep, Period> d, cancel_source* cancel = nullptr) {
    return sleep_until(clock::now() + std::chrono::duration_cast<clock::duration>(d), cancel);
  }

  // Lets every other ready coroutine run first.
  auto yield() {
    struct awaiter : op_awaiter {
      bool await_suspend(std::coroutine_handle<> h) {
        this->id = this->loop->open_op(h, this->cancel);
        this->loop->complete(this->id, 0);
        return true;
      }
      void await_resume() { this->finish(); }
    };
    awaiter a{};
    a.loop = this;
    return a;
  }

 private:
  // The operation table: for awaitables in this header only.
  friend class cancel_source;
  friend class async_event;
  friend class connection;
  friend struct detail::spawned_promise;
  friend void detail::abandon_start(event_loop*, std::uint64_t) noexcept;

  static constexpr int result_timeout = std::numeric_limits<int>::min();

  // Base of every awaiter that suspends through the loop. Its destructor
  // abandons an operation that has not completed, so a destroyed frame is
  // never resumed.
  struct op_awaiter {
    event_loop* loop = nullptr;
    cancel_source* cancel = nullptr;
    std::uint64_t id = 0;
    op_awaiter() = default;
    op_awaiter(op_awaiter&& o) noexcept : loop(o.loop), cancel(o.cancel), id(std::exchange(o.id, 0)) {}
    op_awaiter& operator=(op_awaiter&&) = delete;
    ~op_awaiter() {
      if (id) loop->abandon(id);
    }
    bool await_ready() const noexcept { return false; }
    int finish() {
      int r = loop->close_op(id);
      id = 0;
      return r;
    }
  };

  // A waiter that something else completes with complete(id, result).
  struct manual_awaiter : op_awaiter {
    std::uint64_t* slot = nullptr;  // where the completer finds the id
    bool await_suspend(std::coroutine_handle<> h) {
      this->id = this->loop->open_op(h, this->cancel);
      *slot = this->id;
      if (this->cancel && this->cancel->cancelled()) this->loop->interrupt(this->id, -ECANCELED);
      return true;
    }
    int await_resume() { return this->finish(); }
  };
  // Suspends until complete(*slot, result) (or `cancel`); *slot receives the
  // operation's id at suspension.
  manual_awaiter wait_for_completion(std::uint64_t* slot, cancel_source* cancel = nullptr) {
    manual_awaiter a{};
    a.loop = this;
    a.cancel = cancel;
    a.slot = slot;
    return a;
  }
  // Completes a waiting operation; stale or finished ids are ignored.
  void complete(std::uint64_t id, int result);
  // Whether the awaiter of `id` still exists.
  bool alive(std::uint64_t id) const;

  enum class op_state : std::uint8_t { free, waiting, ready, abandoned };
  struct op {
    std::coroutine_handle<> waiter;
    cancel_source* cancel = nullptr;
    std::uint32_t gen = 1;
    op_state state = op_state::free;
    bool poll_armed = false;
    bool timer_armed = false;
    bool unowned = false;  // a posted handle: no awaiter will close the slot
    int fd = -1;
    int result = 0;
    int pending_result = 0;  // what to report once a cancelled poll has come back
  };
  struct timer_entry {
    clock::time_point when;
    std::uint64_t seq;
    std::uint64_t id;
    bool operator>(const timer_entry& o) const { return when != o.when ? when > o.when : seq > o.seq; }
  };

  static std::uint64_t next_serial() noexcept;
  static event_loop*& current_ref() noexcept;
  op* find(std::uint64_t id);
  std::uint64_t open_op(std::coroutine_handle<> h, cancel_source* cancel);
  void release_slot(op& o);
  int close_op(std::uint64_t id);
  void abandon(std::uint64_t id);
  void make_ready(op& o, std::uint64_t id);
  std::uint64_t post(std::coroutine_handle<> h);
  template <class P>
  void post_task(std::coroutine_handle<P> h);
  op* open_unless_cancelled(op_awaiter& a, std::coroutine_handle<> h);
  bool start_poll(op_awaiter& a, std::coroutine_handle<> h, int fd, unsigned events,
                  std::optional<clock::time_point> deadline);
  bool start_timer(op_awaiter& a, std::coroutine_handle<> h, clock::time_point when);
  void arm_timer(op& o, std::uint64_t id, clock::time_point when);
  void interrupt(std::uint64_t id, int result);
  void on_completion(const detail::completion& c);
  void fire_timers(clock::time_point now);
  std::chrono::nanoseconds next_timeout();
  void run_ready();
  void tick();

  log_handler logger_;
  std::unique_ptr<detail::backend> backend_;
  std::vector<op> ops_;
  std::vector<std::uint32_t> free_;
  std::vector<std::uint64_t> ready_, batch_;
  std::priority_queue<timer_entry, std::vector<timer_entry>, std::greater<>> timers_;
  std::uint64_t timer_seq_ = 0;
  std::vector<detail::completion> completions_;
  std::map<std::uint64_t, std::coroutine_handle<detail::spawned_promise>> spawned_;
  std::uint64_t spawn_seq_ = 0;
  std::uint64_t serial_;
  bool stopped_ = false;
};

// A flag that coroutines can wait on; set() wakes every waiter.
class async_event {
 public:
  explicit async_event(event_loop& loop) : loop_(&loop) {}
  [[nodiscard]] bool is_set() const noexcept { return set_; }
  void set();
  void reset() noexcept { set_ = false; }
  // Resumes once set() has been called (at once if it already was); false
  // when `cancel` fired first.
  task<bool> wait(cancel_source* cancel = nullptr);
  // wait(), for at most `limit`; false when the time ran out.
  task<bool> wait_for(std::chrono::milliseconds limit);

 private:
  event_loop* loop_;
  std::deque<std::uint64_t> waiters_;  // deque: slots stay put; stale ids of abandoned waiters are harmless
  bool set_ = false;
};

}  // namespace pgiplock

// ---- implementation ---------------------------------------------------------

#include "detail/backends.hpp"

namespace pgiplock {
namespace detail {

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE std::unique_ptr<backend> make_backend(const event_loop_options& opt) {
  backend_kind kind = opt.backend;
  if (kind == backend_kind::automatic) {
    if (auto v = env_value("PGIPLOCK_BACKEND")) {
      if (*v == "io_uring") kind = backend_kind::io_uring;
      else if (*v == "epoll") kind = backend_kind::epoll;
      else throw std::invalid_argument("pgiplock: PGIPLOCK_BACKEND must be io_uring or epoll, not '" + *v + "'");
    }
  }
  if (kind == backend_kind::epoll) return std::make_unique<epoll_backend>();
  if (kind == backend_kind::io_uring) return std::make_unique<uring_backend>(opt.queue_depth);
  try {
    return std::make_unique<uring_backend>(opt.queue_depth);
  } catch (const std::system_error& e) {
    log(opt.logger, log_level::warn,
        std::string("io_uring is not available here (") + e.code().message() + "); using the epoll backend");
    return std::make_unique<epoll_backend>();
  }
}
#endif  // PGIPLOCK_DEFINITIONS

// A detached coroutine owned by the loop: runs a spawned task to the end and
// reports what escapes it, so one failing task never ends the process.
struct spawned {
  using promise_type = spawned_promise;
  std::coroutine_handle<spawned_promise> h;
};
struct spawned_promise {
  event_loop* loop = nullptr;
  std::uint64_t key = 0;
  ~spawned_promise() {  // leaves the loop's registry, however the frame ends
    if (loop) loop->spawned_.erase(key);
  }
  spawned get_return_object() noexcept { return spawned{std::coroutine_handle<spawned_promise>::from_promise(*this)}; }
  std::suspend_always initial_suspend() const noexcept { return {}; }
  std::suspend_never final_suspend() const noexcept { return {}; }
  void return_void() const noexcept {}
  void unhandled_exception() const noexcept {}
};

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE spawned drive(task<void> t, const log_handler& logger) {
  try {
    co_await std::move(t);
  } catch (const std::exception& e) {
    log(logger, log_level::error, std::string("spawned task failed: ") + e.what());
  } catch (...) {
    log(logger, log_level::error, "spawned task failed with a non-standard exception");
  }
}

PGIPLOCK_INLINE std::uint64_t make_op_id(std::uint32_t index, std::uint32_t gen) {
  return (static_cast<std::uint64_t>(gen) << 32) | index;
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace detail

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE event_loop::event_loop() : event_loop(event_loop_options{}) {}
PGIPLOCK_INLINE event_loop::event_loop(event_loop_options opt)
    : logger_(opt.logger), backend_(detail::make_backend(opt)), serial_(next_serial()) {}

PGIPLOCK_INLINE event_loop::~event_loop() {
  // Spawned frames may still be suspended; destroying them abandons their
  // operations, which only touches this loop's tables.
  while (!spawned_.empty()) spawned_.begin()->second.destroy();  // erases itself
  if (current_ref() == this) current_ref() = nullptr;
}

PGIPLOCK_INLINE const char* event_loop::backend_name() const noexcept { return backend_->name(); }
#endif  // PGIPLOCK_DEFINITIONS

template <class T>
T event_loop::run(task<T> t) {
  if (!t.valid()) throw std::invalid_argument("pgiplock: event_loop::run of an empty task");
  stopped_ = false;
  post_task(t.h_);
  while (!t.done() && !stopped_) tick();
  if (!t.done()) throw error("pgiplock: event_loop::stop() was called before the task finished");
  return t.h_.promise().take();
}

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE void event_loop::run() {
  stopped_ = false;
  while (!stopped_) tick();
}

PGIPLOCK_INLINE void event_loop::spawn(task<void> t) {
  if (!t.valid()) return;
  auto s = detail::drive(std::move(t), logger_);
  std::uint64_t key = ++spawn_seq_;
  s.h.promise().loop = this;
  s.h.promise().key = key;
  spawned_.emplace(key, s.h);
  post(s.h);
}

PGIPLOCK_INLINE void event_loop::start(task<void>& t) {
  if (t.valid() && !t.done()) post_task(t.h_);
}

PGIPLOCK_INLINE void event_loop::complete(std::uint64_t id, int result) {
  op* o = find(id);
  if (!o || o->state != op_state::waiting) return;
  o->result = result;
  make_ready(*o, id);
}

PGIPLOCK_INLINE bool event_loop::alive(std::uint64_t id) const {
  const op* o = const_cast<event_loop*>(this)->find(id);
  return o && o->state != op_state::abandoned;
}

PGIPLOCK_INLINE std::uint64_t event_loop::next_serial() noexcept {
  static std::uint64_t n = 0;
  return ++n;
}

PGIPLOCK_INLINE event_loop*& event_loop::current_ref() noexcept {
  thread_local event_loop* loop = nullptr;
  return loop;
}

PGIPLOCK_INLINE event_loop::op* event_loop::find(std::uint64_t id) {
  auto index = static_cast<std::uint32_t>(id & 0xffffffffu);
  auto gen = static_cast<std::uint32_t>(id >> 32);
  if (index >= ops_.size()) return nullptr;
  op& o = ops_[index];
  if (o.gen != gen || o.state == op_state::free) return nullptr;
  return &o;
}

PGIPLOCK_INLINE std::uint64_t event_loop::open_op(std::coroutine_handle<> h, cancel_source* cancel) {
  std::uint32_t index;
  if (!free_.empty()) {
    index = free_.back();
    free_.pop_back();
  } else {
    index = static_cast<std::uint32_t>(ops_.size());
    ops_.emplace_back();
  }
  op& o = ops_[index];
  o.waiter = h;
  o.state = op_state::waiting;
  o.cancel = cancel;
  o.result = 0;
  o.pending_result = 0;
  o.poll_armed = o.timer_armed = o.unowned = false;
  std::uint64_t id = detail::make_op_id(index, o.gen);
  if (cancel) {
    cancel->loop_ = this;
    cancel->ops_.push_back(id);
  }
  return id;
}

PGIPLOCK_INLINE void event_loop::release_slot(op& o) {
  auto index = static_cast<std::uint32_t>(&o - ops_.data());
  if (o.cancel) {
    auto& v = o.cancel->ops_;
    auto it = std::find(v.begin(), v.end(), detail::make_op_id(index, o.gen));
    if (it != v.end()) {
      *it = v.back();
      v.pop_back();
    }
  }
  o.state = op_state::free;
  o.cancel = nullptr;
  o.waiter = {};
  ++o.gen;
  if (o.gen == 0) o.gen = 1;
  free_.push_back(index);
}

PGIPLOCK_INLINE int event_loop::close_op(std::uint64_t id) {
  op* o = find(id);
  if (!o) return -ECANCELED;
  int r = o->result;
  release_slot(*o);
  return r;
}

// The frame is gone: forget the waiter, but keep the slot until the kernel
// has reported the poll, so its completion cannot hit a reused id.
PGIPLOCK_INLINE void event_loop::abandon(std::uint64_t id) {
  op* o = find(id);
  if (!o) return;
  o->timer_armed = false;
  o->waiter = {};
  if (o->poll_armed) {
    o->state = op_state::abandoned;
    backend_->cancel_poll(o->fd, id);
  } else {
    release_slot(*o);
  }
}

PGIPLOCK_INLINE void event_loop::make_ready(op& o, std::uint64_t id) {
  o.state = op_state::ready;
  o.timer_armed = false;
  ready_.push_back(id);
}

PGIPLOCK_INLINE std::uint64_t event_loop::post(std::coroutine_handle<> h) {
  std::uint64_t id = open_op(h, nullptr);
  op* o = find(id);
  o->unowned = true;
  make_ready(*o, id);
  return id;
}
#endif  // PGIPLOCK_DEFINITIONS

// A task's owner may destroy it before it starts: the promise remembers the
// start so task::reset() can take it back.
template <class P>
void event_loop::post_task(std::coroutine_handle<P> h) {
  auto& p = h.promise();
  p.start_loop = this;
  p.start_op = post(h);
}

#if PGIPLOCK_DEFINITIONS
// Opens the awaiter's operation; nullptr when its cancel_source has fired
// already (the operation is then ready, as cancelled).
PGIPLOCK_INLINE event_loop::op* event_loop::open_unless_cancelled(op_awaiter& a, std::coroutine_handle<> h) {
  a.id = open_op(h, a.cancel);
  op* o = find(a.id);
  if (!a.cancel || !a.cancel->cancelled_) return o;
  o->result = -ECANCELED;
  make_ready(*o, a.id);
  return nullptr;
}

PGIPLOCK_INLINE bool event_loop::start_poll(op_awaiter& a, std::coroutine_handle<> h, int fd, unsigned events,
                                   std::optional<clock::time_point> deadline) {
  op* o = open_unless_cancelled(a, h);
  if (!o) return true;
  o->fd = fd;
  o->poll_armed = true;
  backend_->arm_poll(fd, events, a.id);
  if (deadline) arm_timer(*o, a.id, *deadline);
  return true;
}

PGIPLOCK_INLINE bool event_loop::start_timer(op_awaiter& a, std::coroutine_handle<> h, clock::time_point when) {
  op* o = open_unless_cancelled(a, h);
  if (!o) return true;
  arm_timer(*o, a.id, when);
  return true;
}

PGIPLOCK_INLINE void event_loop::arm_timer(op& o, std::uint64_t id, clock::time_point when) {
  o.timer_armed = true;
  timers_.push(timer_entry{when, ++timer_seq_, id});
}

// Ends a waiting operation early with `result` (timeout or cancel). A poll
// still in the kernel is cancelled first and the waiter resumes only once
// the kernel has answered, so no completion outlives its awaiter.
PGIPLOCK_INLINE void event_loop::interrupt(std::uint64_t id, int result) {
  op* o = find(id);
  if (!o || o->state != op_state::waiting) return;
  o->timer_armed = false;
  if (o->poll_armed) {
    if (o->pending_result == 0) {
      o->pending_result = result;
      backend_->cancel_poll(o->fd, id);
    }
  } else {
    o->result = result;
    make_ready(*o, id);
  }
}

PGIPLOCK_INLINE void event_loop::on_completion(const detail::completion& c) {
  op* o = find(c.id);
  if (!o || !o->poll_armed) return;
  o->poll_armed = false;
  if (o->state == op_state::abandoned) {
    release_slot(*o);
    return;
  }
  if (o->state != op_state::waiting) return;
  // A poll that fired in the same instant as its cancel reports readiness:
  // the caller would otherwise lose an event.
  o->result = (c.result < 0 && o->pending_result != 0) ? o->pending_result : c.result;
  make_ready(*o, c.id);
}

PGIPLOCK_INLINE void event_loop::fire_timers(clock::time_point now) {
  while (!timers_.empty() && timers_.top().when <= now) {
    std::uint64_t id = timers_.top().id;
    timers_.pop();
    op* o = find(id);
    if (o && o->timer_armed) interrupt(id, result_timeout);
  }
}

PGIPLOCK_INLINE std::chrono::nanoseconds event_loop::next_timeout() {
  if (!ready_.empty()) return std::chrono::nanoseconds(0);
  while (!timers_.empty()) {  // drop timers of operations that ended otherwise
    op* o = find(timers_.top().id);
    if (o && o->timer_armed) break;
    timers_.pop();
  }
  if (timers_.empty()) return std::chrono::nanoseconds(-1);
  auto d = timers_.top().when - clock::now();
  return d.count() < 0 ? std::chrono::nanoseconds(0) : std::chrono::duration_cast<std::chrono::nanoseconds>(d);
}

PGIPLOCK_INLINE void event_loop::run_ready() {
  batch_.swap(ready_);
  for (std::size_t i = 0; i < batch_.size() && !stopped_; ++i) {
    op* o = find(batch_[i]);
    if (!o || o->state != op_state::ready) continue;
    auto h = o->waiter;
    if (o->unowned) release_slot(*o);  // else the awaiter's finish() closes the slot
    h.resume();
  }
  if (stopped_) {  // keep what was not run for the next run()
    for (std::size_t i = 0; i < batch_.size(); ++i) ready_.push_back(batch_[i]);
  }
  batch_.clear();
}

// Gathers what the kernel has finished, then resumes what is ready; the
// caller checks its exit condition between ticks, so the last resumed
// coroutine is never followed by a blocking wait.
PGIPLOCK_INLINE void event_loop::tick() {
  current_ref() = this;
  completions_.clear();
  backend_->wait(next_timeout(), completions_);
  for (auto& c : completions_) on_completion(c);
  fire_timers(clock::now());
  run_ready();
}

PGIPLOCK_INLINE void detail::abandon_start(event_loop* loop, std::uint64_t op) noexcept { loop->abandon(op); }

PGIPLOCK_INLINE cancel_source::~cancel_source() {
  // Operations still waiting with this source keep a pointer to it.
  if (loop_) {
    for (auto id : ops_) {
      if (auto* o = loop_->find(id)) o->cancel = nullptr;
    }
  }
}

PGIPLOCK_INLINE void cancel_source::cancel() {
  cancelled_ = true;
  if (!loop_) return;
  auto ids = ops_;  // interrupting may release slots, which edits ops_
  for (auto id : ids) loop_->interrupt(id, -ECANCELED);
}

PGIPLOCK_INLINE void async_event::set() {
  set_ = true;
  auto ids = std::move(waiters_);
  waiters_.clear();
  for (auto id : ids) loop_->complete(id, 0);
}

PGIPLOCK_INLINE task<bool> async_event::wait(cancel_source* cancel) {
  if (set_) co_return true;
  waiters_.push_back(0);
  int r = co_await loop_->wait_for_completion(&waiters_.back(), cancel);
  co_return r == 0;
}
#endif  // PGIPLOCK_DEFINITIONS

namespace detail {

#if PGIPLOCK_DEFINITIONS
// Cancels `cancel` after `d`. Shared ownership, so a waiter that finishes
// first may go away.
PGIPLOCK_INLINE task<void> cancel_after(event_loop& loop, std::shared_ptr<cancel_source> cancel, std::chrono::milliseconds d) {
  co_await loop.sleep(d);
  cancel->cancel();
}
#endif  // PGIPLOCK_DEFINITIONS

template <class T>
struct within_state {
  explicit within_state(event_loop& l) : done(l) {}
  std::optional<T> value;
  std::exception_ptr failure;
  async_event done;
};

template <class T>
task<void> run_into(std::shared_ptr<within_state<T>> s, task<T> t) {
  try {
    s->value.emplace(co_await std::move(t));
  } catch (...) {
    s->failure = std::current_exception();
  }
  s->done.set();
}

// Runs `t`; yields nothing if it has not finished within `limit` (it is
// then abandoned, and any answer that comes later is dropped).
template <class T>
task<std::optional<T>> within(event_loop& loop, task<T> t, std::chrono::milliseconds limit) {
  auto st = std::make_shared<within_state<T>>(loop);
  loop.spawn(run_into(st, std::move(t)));
  bool finished = co_await st->done.wait_for(limit);
  if (!finished) co_return std::nullopt;
  if (st->failure) std::rethrow_exception(st->failure);
  co_return std::move(st->value);
}

}  // namespace detail

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE task<bool> async_event::wait_for(std::chrono::milliseconds limit) {
  auto deadline = std::make_shared<cancel_source>();
  loop_->spawn(detail::cancel_after(*loop_, deadline, limit));
  co_return co_await wait(deadline.get());
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock
