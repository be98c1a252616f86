// pgiplock.hpp — reliable PostgreSQL LISTEN/NOTIFY for Linux, with an
// inter-process lock so that exactly one process of a fleet listens to a
// channel and another takes over when it releases or dies.
//
// One header. Link with -lpq -luring. C++20, Linux only.
// Wire-compatible with the lock schema of the Node.js package
// @imqueue/pg-pubsub (PgIpLock), so C++ and Node processes can share a lock.
//
// Sections, in the order a reader needs them:
//   1. configuration and version
//   2. errors and logging
//   3. task<T>
//   4. event_loop
//   5. connection
//   6. ip_lock
//   7. pubsub
//   8. graceful shutdown
#ifndef PGIPLOCK_HPP
#define PGIPLOCK_HPP

// ==== 1. configuration and version ==========================================

#define PGIPLOCK_VERSION_MAJOR 0
#define PGIPLOCK_VERSION_MINOR 1
#define PGIPLOCK_VERSION_PATCH 0
#define PGIPLOCK_VERSION "0.1.0"

#ifndef PGIPLOCK_DEFAULT_CONNECT_TIMEOUT_MS
#define PGIPLOCK_DEFAULT_CONNECT_TIMEOUT_MS 10000
#endif

// Debian puts libpq's header under postgresql/; pkg-config adds that to the
// include path, a plain `g++ -lpq` does not.
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pgiplock {

// ==== 2. errors and logging =================================================

// Base of the library's own errors. Bad input found before anything is sent
// is reported with std::invalid_argument / std::length_error instead.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Cannot connect, or the link to the server was lost.
class connection_error : public error {
 public:
  using error::error;
};

// The server rejected a statement; sqlstate() is the five-character code.
class sql_error : public error {
 public:
  sql_error(const std::string& message, std::string sqlstate)
      : error(message), sqlstate_(std::move(sqlstate)) {}
  const std::string& sqlstate() const noexcept { return sqlstate_; }

 private:
  std::string sqlstate_;
};

enum class log_level { debug, info, warn, error };
using log_handler = std::function<void(log_level, std::string_view)>;

inline constexpr std::size_t unlimited = std::numeric_limits<std::size_t>::max();

namespace detail {

inline const char* level_name(log_level level) {
  switch (level) {
    case log_level::debug: return "debug";
    case log_level::info: return "info";
    case log_level::warn: return "warn";
    case log_level::error: return "error";
  }
  return "?";
}

// Without a user logger, warnings and errors still reach stderr: a library
// that silently swallows a lost link is worse than a noisy one.
inline void log(const log_handler& logger, log_level level, std::string_view message) {
  if (logger) {
    logger(level, message);
  } else if (level >= log_level::warn) {
    std::fprintf(stderr, "pgiplock %s: %.*s\n", level_name(level),
                 static_cast<int>(message.size()), message.data());
  }
}

// Our sessions' application_name: this prefix and a UUID. A holder whose
// app carries it always holds its channel's advisory lock, so a standby that
// got that lock knows the holder is gone without waiting for its session to
// vanish from pg_stat_activity.
inline constexpr std::string_view app_prefix = "pgiplock-";

inline std::string random_uuid() {
  unsigned char b[16];
  std::size_t got = 0;
  while (got < sizeof b) {
    ssize_t n = ::getrandom(b + got, sizeof b - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::system_category(), "getrandom");
    }
    got += static_cast<std::size_t>(n);
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);  // RFC 4122 variant
  static const char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(36);
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out.push_back('-');
    out.push_back(hex[b[i] >> 4]);
    out.push_back(hex[b[i] & 15]);
  }
  return out;
}

}  // namespace detail

// ==== 3. task<T> ============================================================

template <class T = void>
class task;
class event_loop;

namespace detail {

// Defined with event_loop: forgets a start that was posted but never ran.
void abandon_start(event_loop* loop, std::uint64_t op) noexcept;

// Finishing a task that completed asynchronously jumps straight to its
// awaiter (symmetric transfer). A task that completes synchronously returns
// to the await_suspend that started it instead, which then declines to
// suspend: that keeps a loop of a million synchronous awaits at constant
// stack depth even where the compiler emits no tail call (GCC at -O0).
struct final_awaiter {
  bool await_ready() const noexcept { return false; }
  template <class Promise>
  std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> h) const noexcept {
    auto& p = h.promise();
    if (p.started_inline || !p.continuation) return std::noop_coroutine();
    return p.continuation;
  }
  void await_resume() const noexcept {}
};

struct promise_base {
  std::coroutine_handle<> continuation;
  std::exception_ptr failure;
  bool started_inline = false;  // the awaiter is still inside await_suspend
  event_loop* start_loop = nullptr;  // set when a loop was asked to start this task
  std::uint64_t start_op = 0;
  std::suspend_always initial_suspend() const noexcept { return {}; }
  final_awaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() noexcept { failure = std::current_exception(); }
  void rethrow_if_failed() const {
    if (failure) std::rethrow_exception(failure);
  }
};

template <class T>
struct task_promise : promise_base {
  std::optional<T> value;
  task<T> get_return_object() noexcept;
  template <class U>
  void return_value(U&& v) {
    value.emplace(std::forward<U>(v));
  }
  T take() {
    rethrow_if_failed();
    return std::move(*value);
  }
};

template <>
struct task_promise<void> : promise_base {
  task<void> get_return_object() noexcept;
  void return_void() const noexcept {}
  void take() const { rethrow_if_failed(); }
};

}  // namespace detail

// A lazy coroutine: nothing runs until it is awaited (or given to an
// event_loop). Move-only; destroying it destroys the coroutine frame.
template <class T>
class [[nodiscard]] task {
 public:
  using promise_type = detail::task_promise<T>;
  using handle_type = std::coroutine_handle<promise_type>;

  task() noexcept = default;
  explicit task(handle_type h) noexcept : h_(h) {}
  task(task&& o) noexcept : h_(std::exchange(o.h_, {})) {}
  task& operator=(task&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, {});
    }
    return *this;
  }
  task(const task&) = delete;
  task& operator=(const task&) = delete;
  ~task() { reset(); }

  bool valid() const noexcept { return static_cast<bool>(h_); }
  bool done() const noexcept { return h_ && h_.done(); }

  auto operator co_await() && noexcept {
    struct awaiter {
      handle_type h;
      bool await_ready() const noexcept { return !h || h.done(); }
      bool await_suspend(std::coroutine_handle<> caller) noexcept {
        auto& p = h.promise();
        p.continuation = caller;
        p.started_inline = true;
        h.resume();
        p.started_inline = false;
        return !h.done();  // finished already: the caller goes on without suspending
      }
      T await_resume() {
        if (!h) throw std::logic_error("pgiplock: awaiting an empty task");
        return h.promise().take();
      }
    };
    return awaiter{h_};
  }

 private:
  friend class event_loop;
  friend class connection;
  void reset() noexcept {
    if (h_) {
      auto& p = h_.promise();
      if (p.start_loop) detail::abandon_start(p.start_loop, p.start_op);
      h_.destroy();
    }
    h_ = {};
  }
  handle_type h_;
};

namespace detail {
template <class T>
task<T> task_promise<T>::get_return_object() noexcept {
  return task<T>{std::coroutine_handle<task_promise<T>>::from_promise(*this)};
}
inline task<void> task_promise<void>::get_return_object() noexcept {
  return task<void>{std::coroutine_handle<task_promise<void>>::from_promise(*this)};
}
}  // namespace detail

// ==== 4. event_loop =========================================================
//
// One loop per thread. Every suspension point is an "operation" in the
// loop's slot table, named by an id that carries a generation: a completion
// for an operation whose awaiter has gone away (its frame destroyed) finds a
// newer generation and is dropped. That is what makes it safe to destroy a
// suspended coroutine at any time, and why completions are never resumed
// while the kernel's completion ring is being walked.

enum class backend_kind { automatic, io_uring, epoll };

struct event_loop_options {
  backend_kind backend = backend_kind::automatic;  // env PGIPLOCK_BACKEND overrides automatic
  log_handler logger;
  unsigned queue_depth = 256;
};

class event_loop;

// Cancels the operations awaited with it. Sticky: once cancelled, new
// operations started with it complete at once as cancelled, until reset().
class cancel_source {
 public:
  cancel_source() = default;
  cancel_source(const cancel_source&) = delete;
  cancel_source& operator=(const cancel_source&) = delete;
  ~cancel_source();
  void cancel();
  bool cancelled() const noexcept { return cancelled_; }
  void reset() noexcept { cancelled_ = false; }

 private:
  friend class event_loop;
  event_loop* loop_ = nullptr;
  std::vector<std::uint64_t> ops_;
  bool cancelled_ = false;
};

struct poll_result {
  short revents = 0;       // what poll(2) would report; 0 on timeout or cancel
  bool timed_out = false;
  bool cancelled = false;
  explicit operator bool() const noexcept { return revents != 0; }
};

namespace detail {

using clock = std::chrono::steady_clock;

struct completion {
  std::uint64_t id;
  int result;
};

// What the two kernels interfaces must provide: one-shot readiness polls that
// can be cancelled, and a wait with a timeout.
class backend {
 public:
  virtual ~backend() = default;
  virtual const char* name() const noexcept = 0;
  virtual void arm_poll(int fd, unsigned events, std::uint64_t id) = 0;
  // Every armed poll reports exactly one completion: its revents, or
  // -ECANCELED after cancel_poll().
  virtual void cancel_poll(int fd, std::uint64_t id) = 0;
  // timeout < 0: block until something completes.
  virtual void wait(std::chrono::nanoseconds timeout, std::vector<completion>& out) = 0;
};

class epoll_backend final : public backend {
 public:
  epoll_backend() : epfd_(::epoll_create1(EPOLL_CLOEXEC)) {
    if (epfd_ < 0) throw std::system_error(errno, std::system_category(), "pgiplock: epoll_create1");
  }
  ~epoll_backend() override { ::close(epfd_); }
  const char* name() const noexcept override { return "epoll"; }
  int fd() const noexcept { return epfd_; }
  // Completions that wait() reports without blocking.
  bool has_pending() const noexcept { return !cancelled_.empty(); }

  void arm_poll(int fd, unsigned events, std::uint64_t id) override {
    auto& st = fds_[fd];
    st.waiters.push_back({id, events});
    update(fd, st);
  }
  void cancel_poll(int fd, std::uint64_t id) override {
    auto it = fds_.find(fd);
    if (it == fds_.end()) return;
    auto& w = it->second.waiters;
    auto pos = std::find_if(w.begin(), w.end(), [id](const waiter& x) { return x.id == id; });
    if (pos == w.end()) return;
    w.erase(pos);
    cancelled_.push_back({id, -ECANCELED});
    update(fd, it->second);
    if (it->second.waiters.empty()) fds_.erase(it);
  }
  void wait(std::chrono::nanoseconds timeout, std::vector<completion>& out) override {
    int ms = -1;
    if (!cancelled_.empty()) {
      ms = 0;
    } else if (timeout.count() >= 0) {  // round up: waking early would spin
      ms = static_cast<int>(std::min<long long>((timeout.count() + 999999) / 1000000, 1 << 30));
    }
    epoll_event evs[64];
    int n = ::epoll_wait(epfd_, evs, 64, ms);
    if (n < 0 && errno != EINTR) throw std::system_error(errno, std::system_category(), "pgiplock: epoll_wait");
    out.insert(out.end(), cancelled_.begin(), cancelled_.end());
    cancelled_.clear();
    for (int i = 0; i < n; ++i) {
      int fd = evs[i].data.fd;
      auto it = fds_.find(fd);
      if (it == fds_.end()) continue;
      unsigned got = evs[i].events;
      auto& w = it->second.waiters;
      for (auto x = w.begin(); x != w.end();) {
        unsigned mine = got & (x->events | EPOLLERR | EPOLLHUP);
        if (mine) {
          out.push_back({x->id, static_cast<int>(mine)});
          x = w.erase(x);
        } else {
          ++x;
        }
      }
      update(fd, it->second);
      if (w.empty()) fds_.erase(it);
    }
  }

 private:
  struct waiter {
    std::uint64_t id;
    unsigned events;
  };
  struct fd_state {
    std::vector<waiter> waiters;
    unsigned registered = 0;  // 0: not in the epoll set
  };
  // Level-triggered interest in the union of what the waiters want; one-shot
  // behaviour comes from removing satisfied waiters.
  void update(int fd, fd_state& st) {
    unsigned want = 0;
    for (auto& w : st.waiters) want |= w.events;
    if (want == st.registered) return;
    epoll_event ev{};
    ev.events = want;
    ev.data.fd = fd;
    int rc;
    if (want == 0) {
      rc = ::epoll_ctl(epfd_, EPOLL_CTL_DEL, fd, nullptr);
      if (rc < 0 && (errno == EBADF || errno == ENOENT)) rc = 0;  // fd already closed
    } else if (st.registered == 0) {
      rc = ::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev);
    } else {
      rc = ::epoll_ctl(epfd_, EPOLL_CTL_MOD, fd, &ev);
    }
    if (rc < 0) {
      int e = errno;
      for (auto& w : st.waiters) cancelled_.push_back({w.id, -e});  // report, as io_uring would
      st.waiters.clear();
      st.registered = 0;
      return;
    }
    st.registered = want;
  }
  int epfd_;
  std::unordered_map<int, fd_state> fds_;
  std::vector<completion> cancelled_;
};

// io_uring waits (timeouts, and whatever else gets submitted); descriptor
// readiness comes from an epoll set whose one descriptor the ring polls.
// Not a poll request per socket: a request holds a reference to its socket,
// and when the process is SIGKILLed the kernel drops those references only
// in deferred work about a jiffy later (measured: the server sees the
// connection close 7 ms after the kill instead of 0.3 ms), which is the
// bulk of a crash takeover. The epoll set holds no such reference.
class uring_backend final : public backend {
 public:
  explicit uring_backend(unsigned depth) {
    int rc = ::io_uring_queue_init(depth, &ring_, 0);
    if (rc < 0) {
      throw std::system_error(-rc, std::system_category(),
                              "pgiplock: io_uring_queue_init refused (a seccomp profile such as "
                              "Docker's default, or sysctl kernel.io_uring_disabled, blocks "
                              "io_uring; PGIPLOCK_BACKEND=epoll avoids it)");
    }
  }
  ~uring_backend() override { ::io_uring_queue_exit(&ring_); }
  const char* name() const noexcept override { return "io_uring"; }

  void arm_poll(int fd, unsigned events, std::uint64_t id) override { sockets_.arm_poll(fd, events, id); }
  void cancel_poll(int fd, std::uint64_t id) override { sockets_.cancel_poll(fd, id); }
  void wait(std::chrono::nanoseconds timeout, std::vector<completion>& out) override {
    if (sockets_.has_pending()) timeout = std::chrono::nanoseconds(0);
    if (!sockets_armed_) {
      io_uring_sqe* sqe = next_sqe();
      ::io_uring_prep_poll_add(sqe, sockets_.fd(), POLLIN);
      ::io_uring_sqe_set_data64(sqe, sockets_tag);
      sockets_armed_ = true;
    }
    io_uring_cqe* cqe = nullptr;
    int rc;
    if (timeout.count() < 0) {
      rc = ::io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, nullptr, nullptr);
    } else {
      __kernel_timespec ts{};
      ts.tv_sec = static_cast<long long>(timeout.count() / 1000000000);
      ts.tv_nsec = static_cast<long long>(timeout.count() % 1000000000);
      rc = ::io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
    }
    if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      throw std::system_error(-rc, std::system_category(), "pgiplock: io_uring wait");
    }
    unsigned head;
    unsigned seen = 0;
    bool sockets_ready = sockets_.has_pending();
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      if (cqe->user_data == sockets_tag) {
        sockets_armed_ = false;
        sockets_ready = true;
      }
    }
    ::io_uring_cq_advance(&ring_, seen);
    if (sockets_ready) sockets_.wait(std::chrono::nanoseconds(0), out);
  }

 private:
  static constexpr std::uint64_t sockets_tag = 1;
  io_uring_sqe* next_sqe() {
    io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_);
    if (!sqe) {  // submission queue full: hand what we have to the kernel first
      ::io_uring_submit(&ring_);
      sqe = ::io_uring_get_sqe(&ring_);
      if (!sqe) throw std::runtime_error("pgiplock: io_uring submission queue exhausted");
    }
    return sqe;
  }
  io_uring ring_{};
  epoll_backend sockets_;
  bool sockets_armed_ = false;
};

inline std::unique_ptr<backend> make_backend(const event_loop_options& opt) {
  backend_kind kind = opt.backend;
  if (kind == backend_kind::automatic) {
    if (const char* env = std::getenv("PGIPLOCK_BACKEND"); env && *env) {
      std::string_view v = env;
      if (v == "io_uring") kind = backend_kind::io_uring;
      else if (v == "epoll") kind = backend_kind::epoll;
      else throw std::invalid_argument("pgiplock: PGIPLOCK_BACKEND must be io_uring or epoll, not '" +
                                       std::string(v) + "'");
    }
  }
  if (kind == backend_kind::epoll) return std::make_unique<epoll_backend>();
  if (kind == backend_kind::io_uring) return std::make_unique<uring_backend>(opt.queue_depth);
  try {
    return std::make_unique<uring_backend>(opt.queue_depth);
  } catch (const std::system_error& e) {
    log(opt.logger, log_level::warn,
        std::string("io_uring is not available here (") + e.code().message() +
            "); using the epoll backend");
    return std::make_unique<epoll_backend>();
  }
}

// A detached coroutine owned by the loop: runs a spawned task to the end and
// reports what escapes it, so one failing task never ends the process.
struct spawned {
  struct promise_type {
    event_loop* loop = nullptr;
    std::uint64_t key = 0;
    ~promise_type();  // leaves the loop's registry, however the frame ends
    spawned get_return_object() noexcept {
      return spawned{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    std::suspend_never final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    void unhandled_exception() const noexcept {}
  };
  std::coroutine_handle<promise_type> h;
};

}  // namespace detail

class event_loop {
 public:
  using clock = detail::clock;

  event_loop() : event_loop(event_loop_options{}) {}
  explicit event_loop(event_loop_options opt)
      : logger_(opt.logger), backend_(detail::make_backend(opt)), serial_(next_serial()) {}
  event_loop(const event_loop&) = delete;
  event_loop& operator=(const event_loop&) = delete;

  ~event_loop() {
    // Spawned frames may still be suspended; destroying them abandons their
    // operations, which only touches this loop's tables.
    while (!spawned_.empty()) spawned_.begin()->second.destroy();  // erases itself
    if (current_ref() == this) current_ref() = nullptr;
  }

  const char* backend_name() const noexcept { return backend_->name(); }
  // Unique per loop in this process, unlike its address, which a later
  // loop may reuse.
  std::uint64_t serial() const noexcept { return serial_; }
  const log_handler& logger() const noexcept { return logger_; }

  // Runs the loop until `t` finishes; returns its value or rethrows its
  // exception. If stop() ends the loop first, throws pgiplock::error.
  template <class T>
  T run(task<T> t) {
    if (!t.valid()) throw std::invalid_argument("pgiplock: event_loop::run of an empty task");
    stopped_ = false;
    post_task(t.h_);
    while (!t.done() && !stopped_) tick();
    if (!t.done()) throw error("pgiplock: event_loop::stop() was called before the task finished");
    return t.h_.promise().take();
  }

  // Runs the loop until stop() is called.
  void run() {
    stopped_ = false;
    while (!stopped_) tick();
  }

  // Starts `t` on this loop; the loop owns it. What it throws is logged.
  void spawn(task<void> t) {
    if (!t.valid()) return;
    auto s = drive(std::move(t), this);
    std::uint64_t key = ++spawn_seq_;
    s.h.promise().loop = this;
    s.h.promise().key = key;
    spawned_.emplace(key, s.h);
    post(s.h);
  }

  // Starts `t` on this loop; the caller keeps ownership. Destroying `t`
  // before it finishes cancels it (its pending operation is abandoned).
  void start(task<void>& t) {
    if (t.valid() && !t.done()) post_task(t.h_);
  }

  // The loop running on this thread, if any.
  static event_loop* current() noexcept { return current_ref(); }

  void stop() noexcept { stopped_ = true; }
  bool stopped() const noexcept { return stopped_; }

  // ---- awaitables --------------------------------------------------------

  // Waits until `fd` reports any of `events` (POLLIN, POLLOUT...), the
  // deadline passes, or `cancel` fires. One-shot, like poll(2).
  auto poll(int fd, unsigned events, std::optional<clock::time_point> deadline = std::nullopt,
            cancel_source* cancel = nullptr) {
    struct awaiter : op_awaiter {
      int fd;
      unsigned events;
      std::optional<clock::time_point> deadline;
      bool await_suspend(std::coroutine_handle<> h) {
        return this->loop->start_poll(*this, h, fd, events, deadline);
      }
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

  // Suspends for `d` (any std::chrono duration). Yields true when the time
  // elapsed, false when `cancel` fired first.
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

  // ---- the operation table, used by awaitables in this header -------------

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
  void complete(std::uint64_t id, int result) {
    op* o = find(id);
    if (!o || o->state != op_state::waiting) return;
    o->result = result;
    make_ready(*o, id);
  }
  bool alive(std::uint64_t id) const {
    const op* o = const_cast<event_loop*>(this)->find(id);
    return o && o->state != op_state::abandoned;
  }

 private:
  friend class cancel_source;
  friend class connection;
  friend struct detail::spawned::promise_type;
  friend void detail::abandon_start(event_loop*, std::uint64_t) noexcept;

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
    bool operator>(const timer_entry& o) const {
      return when != o.when ? when > o.when : seq > o.seq;
    }
  };

  static std::uint64_t next_serial() noexcept {
    static std::uint64_t n = 0;
    return ++n;
  }

  static event_loop*& current_ref() noexcept {
    thread_local event_loop* loop = nullptr;
    return loop;
  }

  static detail::spawned drive(task<void> t, event_loop* loop) {
    try {
      co_await std::move(t);
    } catch (const std::exception& e) {
      detail::log(loop->logger_, log_level::error, std::string("spawned task failed: ") + e.what());
    } catch (...) {
      detail::log(loop->logger_, log_level::error, "spawned task failed with a non-standard exception");
    }
  }

  static std::uint64_t make_id(std::uint32_t index, std::uint32_t gen) {
    return (static_cast<std::uint64_t>(gen) << 32) | index;
  }
  op* find(std::uint64_t id) {
    auto index = static_cast<std::uint32_t>(id & 0xffffffffu);
    auto gen = static_cast<std::uint32_t>(id >> 32);
    if (index >= ops_.size()) return nullptr;
    op& o = ops_[index];
    if (o.gen != gen || o.state == op_state::free) return nullptr;
    return &o;
  }

  std::uint64_t open_op(std::coroutine_handle<> h, cancel_source* cancel) {
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
    std::uint64_t id = make_id(index, o.gen);
    if (cancel) {
      cancel->loop_ = this;
      cancel->ops_.push_back(id);
    }
    return id;
  }

  void release_slot(op& o) {
    if (o.cancel) {
      auto& v = o.cancel->ops_;
      std::uint64_t id = make_id(static_cast<std::uint32_t>(&o - ops_.data()), o.gen);
      auto it = std::find(v.begin(), v.end(), id);
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
    free_.push_back(static_cast<std::uint32_t>(&o - ops_.data()));
  }

  int close_op(std::uint64_t id) {
    op* o = find(id);
    if (!o) return -ECANCELED;
    int r = o->result;
    release_slot(*o);
    return r;
  }

  // The frame is gone: forget the waiter, but keep the slot until the
  // kernel has reported the poll, so its completion cannot hit a reused id.
  void abandon(std::uint64_t id) {
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

  void make_ready(op& o, std::uint64_t id) {
    o.state = op_state::ready;
    o.timer_armed = false;
    ready_.push_back(id);
  }

  std::uint64_t post(std::coroutine_handle<> h) {
    std::uint64_t id = open_op(h, nullptr);
    op* o = find(id);
    o->unowned = true;
    make_ready(*o, id);
    return id;
  }
  // A task's owner may destroy it before it starts: the promise remembers
  // the start so task::reset() can take it back.
  template <class P>
  void post_task(std::coroutine_handle<P> h) {
    auto& p = h.promise();
    p.start_loop = this;
    p.start_op = post(h);
  }

  bool start_poll(op_awaiter& a, std::coroutine_handle<> h, int fd, unsigned events,
                  std::optional<clock::time_point> deadline) {
    a.id = open_op(h, a.cancel);
    op* o = find(a.id);
    if (a.cancel && a.cancel->cancelled_) {
      o->result = -ECANCELED;
      make_ready(*o, a.id);
      return true;
    }
    o->fd = fd;
    o->poll_armed = true;
    backend_->arm_poll(fd, events, a.id);
    if (deadline) arm_timer(*o, a.id, *deadline);
    return true;
  }

  bool start_timer(op_awaiter& a, std::coroutine_handle<> h, clock::time_point when) {
    a.id = open_op(h, a.cancel);
    op* o = find(a.id);
    if (a.cancel && a.cancel->cancelled_) {
      o->result = -ECANCELED;
      make_ready(*o, a.id);
      return true;
    }
    arm_timer(*o, a.id, when);
    return true;
  }

  void arm_timer(op& o, std::uint64_t id, clock::time_point when) {
    o.timer_armed = true;
    timers_.push(timer_entry{when, ++timer_seq_, id});
  }

  // Ends a waiting operation early with `result` (timeout or cancel). A poll
  // still in the kernel is cancelled first and the waiter resumes only once
  // the kernel has answered, so no completion outlives its awaiter.
  void interrupt(std::uint64_t id, int result) {
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

  void on_completion(const detail::completion& c) {
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

  void fire_timers(clock::time_point now) {
    while (!timers_.empty() && timers_.top().when <= now) {
      std::uint64_t id = timers_.top().id;
      timers_.pop();
      op* o = find(id);
      if (o && o->timer_armed) interrupt(id, result_timeout);
    }
  }

  std::chrono::nanoseconds next_timeout() {
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

  void run_ready() {
    batch_.swap(ready_);
    for (std::size_t i = 0; i < batch_.size() && !stopped_; ++i) {
      op* o = find(batch_[i]);
      if (!o || o->state != op_state::ready) continue;
      auto h = o->waiter;
      if (o->unowned) {
        release_slot(*o);
        h.resume();
      } else {
        h.resume();  // the awaiter's finish() closes the slot
      }
    }
    if (stopped_) {  // keep what was not run for the next run()
      for (std::size_t i = 0; i < batch_.size(); ++i) ready_.push_back(batch_[i]);
    }
    batch_.clear();
  }

  // Gathers what the kernel has finished, then resumes what is ready; the
  // caller checks its exit condition between ticks, so the last resumed
  // coroutine is never followed by a blocking wait.
  void tick() {
    current_ref() = this;
    completions_.clear();
    backend_->wait(next_timeout(), completions_);
    for (auto& c : completions_) on_completion(c);
    fire_timers(clock::now());
    run_ready();
  }

  log_handler logger_;
  std::unique_ptr<detail::backend> backend_;
  std::vector<op> ops_;
  std::vector<std::uint32_t> free_;
  std::vector<std::uint64_t> ready_, batch_;
  std::priority_queue<timer_entry, std::vector<timer_entry>, std::greater<>> timers_;
  std::uint64_t timer_seq_ = 0;
  std::vector<detail::completion> completions_;
  std::map<std::uint64_t, std::coroutine_handle<detail::spawned::promise_type>> spawned_;
  std::uint64_t spawn_seq_ = 0;
  std::uint64_t serial_;
  bool stopped_ = false;
};

inline void detail::abandon_start(event_loop* loop, std::uint64_t op) noexcept { loop->abandon(op); }

inline detail::spawned::promise_type::~promise_type() {
  if (loop) loop->spawned_.erase(key);
}

inline cancel_source::~cancel_source() {
  // Operations still waiting with this source keep a pointer to it.
  if (loop_) {
    for (auto id : ops_) {
      if (auto* o = loop_->find(id)) o->cancel = nullptr;
    }
  }
}

inline void cancel_source::cancel() {
  cancelled_ = true;
  if (!loop_) return;
  auto ids = ops_;  // interrupting may release slots, which edits ops_
  for (auto id : ids) loop_->interrupt(id, -ECANCELED);
}

// A flag that coroutines can wait on; set() wakes every waiter.
class async_event {
 public:
  explicit async_event(event_loop& loop) : loop_(&loop) {}
  bool is_set() const noexcept { return set_; }
  void set() {
    set_ = true;
    auto ids = std::move(waiters_);
    waiters_.clear();
    for (auto id : ids) loop_->complete(id, 0);
  }
  void reset() noexcept { set_ = false; }
  // Resumes once set() has been called (at once if it already was); false
  // when `cancel` fired first.
  task<bool> wait(cancel_source* cancel = nullptr) {
    if (set_) co_return true;
    waiters_.push_back(0);  // deque: the slot stays put while others are added
    int r = co_await loop_->wait_for_completion(&waiters_.back(), cancel);
    co_return r == 0;
  }

 private:
  event_loop* loop_;
  std::deque<std::uint64_t> waiters_;  // stale ids of abandoned waiters are harmless
  bool set_ = false;
};

namespace detail {

// A deadline for a wait: cancels `cancel` after `d`. Shared ownership, so a
// waiter that finishes first may go away.
inline task<void> cancel_after(event_loop& loop, std::shared_ptr<cancel_source> cancel, std::chrono::milliseconds d) {
  co_await loop.sleep(d);
  cancel->cancel();
}

// Runs `t`; yields nothing if it has not finished within `limit` (it is
// then abandoned, and any answer that comes later is dropped).
template <class T>
task<std::optional<T>> within(event_loop& loop, task<T> t, std::chrono::milliseconds limit) {
  struct state {
    explicit state(event_loop& l) : done(l) {}
    std::optional<T> value;
    std::exception_ptr failure;
    async_event done;
  };
  auto st = std::make_shared<state>(loop);
  struct runner {
    static task<void> run(std::shared_ptr<state> s, task<T> t) {
      try {
        s->value.emplace(co_await std::move(t));
      } catch (...) {
        s->failure = std::current_exception();
      }
      s->done.set();
    }
  };
  auto deadline = std::make_shared<cancel_source>();
  loop.spawn(runner::run(st, std::move(t)));
  loop.spawn(cancel_after(loop, deadline, limit));
  bool finished = co_await st->done.wait(deadline.get());
  if (!finished) co_return std::nullopt;
  if (st->failure) std::rethrow_exception(st->failure);
  co_return std::move(st->value);
}

}  // namespace detail

// ==== 5. connection =========================================================
//
// One non-blocking libpq connection driven by the loop, in pipeline mode with
// a sync after every query: many coroutines can have queries in flight and
// one failing query never aborts its neighbours. One pump coroutine owns the
// socket: readable -> PQconsumeInput -> complete finished queries in order ->
// dispatch notifications.

// A notification as delivered; the views are valid during the handler call.
struct notification {
  std::string_view channel;
  std::string_view payload;
  int sender_pid = 0;  // backend pid of the session that sent it
};

// Owns one PGresult.
class result {
 public:
  result() noexcept = default;
  explicit result(PGresult* r) noexcept : r_(r) {}
  result(result&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
  result& operator=(result&& o) noexcept {
    if (this != &o) {
      clear();
      r_ = std::exchange(o.r_, nullptr);
    }
    return *this;
  }
  ~result() { clear(); }

  int rows() const noexcept { return r_ ? PQntuples(r_) : 0; }
  int columns() const noexcept { return r_ ? PQnfields(r_) : 0; }
  bool is_null(int row, int col) const { return PQgetisnull(checked(row, col), row, col) != 0; }
  // The text of a field; empty for NULL.
  std::string_view get(int row, int col) const {
    PGresult* r = checked(row, col);
    return {PQgetvalue(r, row, col), static_cast<std::size_t>(PQgetlength(r, row, col))};
  }
  // Rows changed by INSERT/UPDATE/DELETE.
  long affected_rows() const noexcept {
    if (!r_) return 0;
    const char* n = PQcmdTuples(r_);
    return (n && *n) ? std::strtol(n, nullptr, 10) : 0;
  }
  PGresult* native_handle() const noexcept { return r_; }

 private:
  PGresult* checked(int row, int col) const {
    if (!r_ || row < 0 || col < 0 || row >= rows() || col >= columns()) {
      throw std::out_of_range("pgiplock: result field (" + std::to_string(row) + ", " +
                              std::to_string(col) + ") is out of range");
    }
    return r_;
  }
  void clear() noexcept {
    if (r_) PQclear(r_);
    r_ = nullptr;
  }
  PGresult* r_ = nullptr;
};

struct connect_options {
  // Applies when the conninfo sets no connect_timeout.
  std::chrono::milliseconds timeout{PGIPLOCK_DEFAULT_CONNECT_TIMEOUT_MS};
  // The session's application_name; empty: "pgiplock-" and a fresh UUID,
  // unique per connection, which is what the lock protocol identifies
  // holders by (keep it unique if you set it).
  std::string application_name;
  log_handler logger;
  // Dead-link detection on both ends (0 disables): libpq keepalives and
  // tcp_user_timeout on this side find a silent partition within half of
  // it; the server's own settings (SET on the session) within 80% of it,
  // so a partitioned client always gives up before the server frees its
  // session. Keepalives alone never fire while a reply is awaited and
  // tcp_user_timeout alone never fires on an idle link: both are set.
  // Conninfo keywords the user gave win. TCP only.
  std::chrono::milliseconds liveness_timeout{10000};
  // At connect, LISTEN a private channel and NOTIFY it; no delivery within
  // this long fails connect(). A transaction-pooling PgBouncer passes every
  // query but hands each transaction to any server session, so a LISTEN
  // there silently hears nothing: better to refuse at once. 0: no probe
  // (one round trip saved, for connections that never LISTEN).
  std::chrono::milliseconds notify_probe_timeout{2000};
};

namespace detail {

using param = std::optional<std::string>;

inline param to_param(std::nullopt_t) { return std::nullopt; }
inline param to_param(std::string s) { return s; }
inline param to_param(std::string_view s) { return std::string(s); }
inline param to_param(const char* s) { return s ? param(s) : std::nullopt; }
inline param to_param(bool b) { return std::string(b ? "t" : "f"); }
template <class T>
  requires std::is_arithmetic_v<T>
inline param to_param(T v) {
  return std::to_string(v);
}
template <class T>
inline param to_param(const std::optional<T>& v) {
  return v ? to_param(*v) : std::nullopt;
}

struct conninfo_params {
  std::vector<std::string> keys, values;
  std::optional<std::chrono::milliseconds> connect_timeout;
  std::string target;  // host/port/dbname/user for messages, never the password

  void set_default(const std::string& key, std::string value) {
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) set(key, std::move(value));
  }
  void set(const std::string& key, std::string value) {
    auto it = std::find(keys.begin(), keys.end(), key);
    if (it != keys.end()) {
      values[static_cast<std::size_t>(it - keys.begin())] = std::move(value);
    } else {
      keys.push_back(key);
      values.push_back(std::move(value));
    }
  }
};

inline std::string without_prefix(std::string m) {
  static constexpr std::string_view prefix = "pgiplock: ";
  if (m.compare(0, prefix.size(), prefix) == 0) m.erase(0, prefix.size());
  return m;
}

inline std::string trim_message(std::string m) {
  while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
  return m;
}

// Parses with libpq itself, so every syntax libpq accepts (key=value and
// postgresql:// URIs) works and nothing else does.
inline conninfo_params parse_conninfo(const std::string& conninfo) {
  if (conninfo.find_first_not_of(" \t\r\n") == std::string::npos) {
    throw std::invalid_argument(
        "pgiplock: the conninfo is empty; give e.g. \"host=localhost dbname=app\" or "
        "\"postgresql://user@host/db\"");
  }
  char* err = nullptr;
  PQconninfoOption* opts = PQconninfoParse(conninfo.c_str(), &err);
  if (!opts) {
    std::string why = err ? trim_message(err) : "out of memory";
    if (err) PQfreemem(err);
    throw std::invalid_argument("pgiplock: cannot parse conninfo: " + why);
  }
  conninfo_params out;
  std::string host, port, db, user;
  for (PQconninfoOption* o = opts; o->keyword; ++o) {
    if (!o->val) continue;
    std::string key = o->keyword;
    if (key == "connect_timeout") {
      long secs = std::strtol(o->val, nullptr, 10);
      if (secs > 0) out.connect_timeout = std::chrono::seconds(std::max(secs, 2L));  // libpq's own floor
    }
    if (key == "host" || key == "hostaddr") host = o->val;
    if (key == "port") port = o->val;
    if (key == "dbname") db = o->val;
    if (key == "user") user = o->val;
    out.keys.push_back(key);
    out.values.emplace_back(o->val);
  }
  PQconninfoFree(opts);
  out.target = "host=" + (host.empty() ? std::string("(default)") : host);
  if (!port.empty()) out.target += " port=" + port;
  if (!db.empty()) out.target += " dbname=" + db;
  if (!user.empty()) out.target += " user=" + user;
  return out;
}

}  // namespace detail

class connection : public std::enable_shared_from_this<connection> {
  struct private_tag {};

 public:
  using notification_handler = std::function<void(const notification&)>;
  using lost_handler = std::function<void(const connection_error&)>;

  // Connects without blocking the loop. Fails with std::invalid_argument for
  // a conninfo libpq cannot parse, connection_error for everything else,
  // within connect_timeout (from the conninfo) or options.timeout.
  static task<std::shared_ptr<connection>> connect(event_loop& loop, std::string conninfo,
                                                   connect_options options) {
    return connect_impl(loop, std::move(conninfo), std::move(options));
  }
  // An overload, not a defaulted `= {}`: GCC 12 frees a braced default
  // argument inside a co_await expression twice.
  static task<std::shared_ptr<connection>> connect(event_loop& loop, std::string conninfo) {
    return connect_impl(loop, std::move(conninfo), connect_options());
  }

  connection(private_tag, event_loop& loop, std::string conninfo, std::string app, log_handler logger)
      : loop_(&loop), conninfo_(std::move(conninfo)), app_(std::move(app)), logger_(std::move(logger)),
        pump_done_(loop) {}
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

 private:
  static task<std::shared_ptr<connection>> connect_impl(event_loop& loop, std::string conninfo,
                                                        connect_options options) {
    auto params = detail::parse_conninfo(conninfo);
    std::string app = options.application_name.empty() ? std::string(detail::app_prefix) + detail::random_uuid()
                                                       : options.application_name;
    params.set("application_name", app);
    auto live = options.liveness_timeout;
    if (live.count() > 0) {
      long probe_s = std::max<long>(1, static_cast<long>(live.count() / 10000));
      params.set_default("keepalives", "1");
      params.set_default("keepalives_idle", std::to_string(probe_s));
      params.set_default("keepalives_interval", std::to_string(probe_s));
      params.set_default("keepalives_count", "3");
      params.set_default("tcp_user_timeout", std::to_string(live.count() / 2));
    }
    auto deadline = event_loop::clock::now() + params.connect_timeout.value_or(options.timeout);

    std::vector<const char*> keys, values;
    for (std::size_t i = 0; i < params.keys.size(); ++i) {
      keys.push_back(params.keys[i].c_str());
      values.push_back(params.values[i].c_str());
    }
    keys.push_back(nullptr);
    values.push_back(nullptr);

    auto conn = std::make_shared<connection>(private_tag{}, loop, std::move(conninfo), std::move(app),
                                             std::move(options.logger));
    conn->conn_ = PQconnectStartParams(keys.data(), values.data(), 0);
    if (!conn->conn_) throw std::bad_alloc();
    // What libpq actually tried (environment defaults included), never the password.
    auto failed = [&](std::string why) {
      std::string target = params.target;
      if (const char* h = PQhost(conn->conn_); h && *h) {
        target = std::string("host=") + h;
        if (const char* p = PQport(conn->conn_); p && *p) target += std::string(" port=") + p;
        if (const char* d = PQdb(conn->conn_); d && *d) target += std::string(" dbname=") + d;
        if (const char* u = PQuser(conn->conn_); u && *u) target += std::string(" user=") + u;
      }
      return connection_error("pgiplock: cannot connect to " + target + ": " + why);
    };
    if (PQstatus(conn->conn_) == CONNECTION_BAD) throw failed(detail::trim_message(PQerrorMessage(conn->conn_)));

    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK) {
      if (st == PGRES_POLLING_FAILED) throw failed(detail::trim_message(PQerrorMessage(conn->conn_)));
      // libpq may open a new socket per host or address it tries: read it anew.
      int fd = PQsocket(conn->conn_);
      if (fd < 0) throw failed("libpq has no socket");
      unsigned ev = st == PGRES_POLLING_READING ? POLLIN : POLLOUT;
      auto r = co_await loop.poll(fd, ev, deadline);
      if (r.timed_out) {
        auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
            params.connect_timeout.value_or(conn->connect_timeout_default()));
        throw failed("no answer within " + std::to_string(ms.count()) +
                     " ms (server down, address unreachable, or not a PostgreSQL server)");
      }
      st = PQconnectPoll(conn->conn_);
    }
    conn->finish_setup();
    if (live.count() > 0) co_await conn->apply_server_liveness(live);
    if (options.notify_probe_timeout.count() > 0) {
      auto problem = co_await conn->check_notify_works(options);
      if (!problem.empty()) {
        auto error = failed("LISTEN/NOTIFY does not work on this connection: " + problem +
                            ". A transaction-pooling PgBouncer (pool_mode = transaction or statement) does this; "
                            "connect to PostgreSQL directly or through a session-pooling pool");
        co_await conn->close();
        throw error;
      }
    }
    co_return conn;
  }

 public:
  // Without close(): the pump is destroyed (its poll abandoned first) and
  // the socket closed. A connection must not outlive its event_loop.
  ~connection() {
    pump_ = task<void>{};
    if (conn_) PQfinish(conn_);
  }

  // close() for loop.spawn(), when nobody waits for it.
  static task<void> close_quietly(std::shared_ptr<connection> c) { co_await c->close(); }

  // Ends the session. Queries still pending fail with connection_error.
  task<void> close() {
    auto self = shared_from_this();
    if (closing_) {
      co_await pump_done_.wait();
      co_return;
    }
    closing_ = true;
    pump_cancel_.cancel();
    co_await pump_done_.wait();
    lose("the connection was closed by the application");
    PQfinish(conn_);
    conn_ = nullptr;
  }

  bool is_open() const noexcept { return conn_ && !lost_ && !closing_; }
  int backend_pid() const noexcept { return backend_pid_; }
  std::string_view app_name() const noexcept { return app_; }
  const std::string& conninfo() const noexcept { return conninfo_; }
  event_loop& loop() const noexcept { return *loop_; }
  const log_handler& logger() const noexcept { return logger_; }
  // Why the link is gone; empty while it is up.
  const std::string& lost_reason() const noexcept { return lost_reason_; }
  PGconn* native_handle() const noexcept { return conn_; }

  // Runs one statement with bound parameters ($1, $2...): strings,
  // string_views, numbers, bools, std::nullopt for NULL. The arguments are
  // copied before the first suspension, so temporaries are safe.
  template <class... Args>
  task<result> query(std::string sql, Args&&... args) {
    return run(std::move(sql), params_of(std::forward<Args>(args)...), false);
  }

  task<result> execute(std::string sql, std::vector<detail::param> params) {
    return run(std::move(sql), std::move(params), false);
  }

  // query(), through a server-side prepared statement this connection makes
  // on first use: for the statements run on every acquire attempt and
  // heartbeat, whose planning would otherwise cost more than their execution.
  template <class... Args>
  task<result> query_prepared(std::string sql, Args&&... args) {
    return run(std::move(sql), params_of(std::forward<Args>(args)...), true);
  }

 private:
  template <class... Args>
  static std::vector<detail::param> params_of(Args&&... args) {
    std::vector<detail::param> params;
    params.reserve(sizeof...(Args));
    (params.push_back(detail::to_param(std::forward<Args>(args))), ...);
    return params;
  }

  task<result> run(std::string sql, std::vector<detail::param> params, bool prepare) {
    auto self = shared_from_this();
    if (!is_open()) throw connection_error(closed_message());
    std::vector<const char*> values(params.size());
    std::vector<int> lengths(params.size()), formats(params.size(), 0);
    for (std::size_t i = 0; i < params.size(); ++i) {
      values[i] = params[i] ? params[i]->data() : nullptr;
      lengths[i] = params[i] ? static_cast<int>(params[i]->size()) : 0;
    }
    auto n = static_cast<int>(params.size());
    // A new statement is prepared in the same pipeline segment as its first
    // execution: one round trip, and a failed PREPARE fails this query.
    int discard = 0;
    std::string name;
    if (prepare) {
      auto it = prepared_.find(sql);
      if (it == prepared_.end()) {
        // Never reused: a statement whose first run failed after its
        // PREPARE succeeded still exists on the server.
        name = "pgiplock_" + std::to_string(++statements_made_);
        if (PQsendPrepare(conn_, name.c_str(), sql.c_str(), n, nullptr)) {
          discard = 1;
          prepared_.emplace(sql, name);
        } else {
          name.clear();
        }
      } else {
        name = it->second;
      }
    }
    bool sent = prepare ? !name.empty() && PQsendQueryPrepared(conn_, name.c_str(), n, values.data(), lengths.data(),
                                                               formats.data(), 0)
                        : PQsendQueryParams(conn_, sql.c_str(), n, nullptr, values.data(), lengths.data(),
                                            formats.data(), 0);
    if (!sent || !PQpipelineSync(conn_)) {
      std::string why = detail::trim_message(PQerrorMessage(conn_));
      // A PREPARE already queued would go out with the next segment and be
      // taken for that query's result: the pipeline is beyond repair.
      if (PQstatus(conn_) == CONNECTION_BAD || discard) {
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
      if (prepare && out.sqlstate == "26000") prepared_.erase(sql);
      std::rethrow_exception(out.failure);
    }
    co_return std::move(out.value);
  }

 public:

  // Quotes a string literal for the few statements that cannot take
  // parameters (DDL, DO blocks).
  std::string quote_literal(std::string_view text) const { return escaped(PQescapeLiteral, text, "literal"); }

  // Quotes an identifier (a channel name for LISTEN) as libpq does.
  std::string quote_identifier(std::string_view name) const {
    return escaped(PQescapeIdentifier, name, "identifier");
  }

  // Calls `fn` for each notification on `channel` ("" = every channel).
  // Returns an id for unsubscribe(). Safe to call from inside a handler.
  std::uint64_t subscribe(std::string channel, notification_handler fn) {
    std::uint64_t id = ++next_sub_;
    subs_.push_back(subscriber{id, std::move(channel), std::move(fn)});
    return id;
  }
  void unsubscribe(std::uint64_t id) noexcept {
    for (auto& s : subs_) {
      if (s.id == id) s.fn = nullptr;
    }
    prune_subscribers();
  }

  // Calls `fn` once when the link is lost or the connection closed.
  std::uint64_t on_lost(lost_handler fn) {
    std::uint64_t id = ++next_sub_;
    lost_handlers_.emplace_back(id, std::move(fn));
    return id;
  }
  void remove_on_lost(std::uint64_t id) noexcept {
    for (auto& h : lost_handlers_) {
      if (h.first == id) h.second = nullptr;
    }
  }

 private:
  struct outcome {
    result value;
    std::exception_ptr failure;
    std::string sqlstate;  // of the failure
  };
  struct pending_query {
    std::uint64_t op;  // the waiter's operation; stale once its frame is gone
    outcome* out;
    int discard = 0;   // leading results that are not the query's (a PREPARE's)
    std::string prepared_sql;  // that PREPARE's statement: forgotten if it fails
  };
  struct subscriber {
    std::uint64_t id;
    std::string channel;
    notification_handler fn;
  };

  std::chrono::milliseconds connect_timeout_default() const {
    return std::chrono::milliseconds(PGIPLOCK_DEFAULT_CONNECT_TIMEOUT_MS);
  }

  // libpq's escaping needs the connection (its encoding).
  std::string escaped(char* (*escape)(PGconn*, const char*, std::size_t), std::string_view text,
                      const char* what) const {
    if (!conn_) throw connection_error(closed_message());
    char* q = escape(conn_, text.data(), text.size());
    if (!q) {
      throw std::invalid_argument(std::string("pgiplock: cannot quote ") + what + ": " +
                                  detail::trim_message(PQerrorMessage(conn_)));
    }
    std::string out = q;
    PQfreemem(q);
    return out;
  }

  std::string closed_message() const {
    return lost_reason_.empty() ? std::string("pgiplock: the connection is closed") : lost_reason_;
  }

  void finish_setup() {
    // Installed before any statement, so no server notice goes to stderr.
    PQsetNoticeReceiver(conn_, &connection::on_notice, this);
    if (PQsetnonblocking(conn_, 1) != 0 || PQenterPipelineMode(conn_) != 1) {
      throw connection_error("pgiplock: cannot switch the connection to non-blocking pipeline mode: " +
                             detail::trim_message(PQerrorMessage(conn_)));
    }
    backend_pid_ = PQbackendPID(conn_);
    fd_ = PQsocket(conn_);
    pump_ = pump();
    loop_->start(pump_);
  }

  // The server's side of dead-link detection; settings it does not have
  // (tcp_user_timeout before PostgreSQL 12) are left out.
  // See connect_options::notify_probe_timeout. Yields what is wrong, or
  // nothing. Through a proxy the session must also be pinned to one server
  // backend: a quiet transaction pool reuses the same backend, so the
  // self-notification alone passes there.
  task<std::string> check_notify_works(connect_options options) {
    auto limit = options.notify_probe_timeout;
    std::string channel = "pgiplock-probe-" + detail::random_uuid();
    auto heard = std::make_shared<cancel_source>();  // the handler may outlive a failed probe
    auto id = subscribe(channel, [heard](const notification&) { heard->cancel(); });
    struct unsubscribe_at_exit {
      connection* self;
      std::uint64_t id;
      ~unsubscribe_at_exit() { self->unsubscribe(id); }
    } guard{this, id};
    bool read_only = false;
    try {
      co_await query("LISTEN " + quote_identifier(channel));
    } catch (const sql_error& e) {
      if (e.sqlstate() != "25006") throw;
      read_only = true;
    }
    if (read_only) {  // a hot standby: nothing can LISTEN here, and nothing pretends to
      detail::log(logger_, log_level::debug, "read-only session (a hot standby?): LISTEN not possible, no probe");
      co_return std::string();
    }
    auto r = co_await query("SELECT pg_backend_pid(), pg_notify($1, '')", channel);
    int server_pid = std::atoi(std::string(r.get(0, 0)).c_str());
    if (co_await loop_->sleep(limit, heard.get())) {
      if (!is_open()) throw connection_error(closed_message());
      co_return "a notification to itself did not arrive within " + std::to_string(limit.count()) + " ms";
    }
    std::string problem;
    if (server_pid != backend_pid_) {  // PQbackendPID() is a proxy's own key
      auto pinned = co_await pinned_to(shared_from_this(), server_pid, channel, options);
      if (pinned && !*pinned) {
        problem = "a second connection was served by this session's server backend (pid " +
                  std::to_string(server_pid) + "), so this session's LISTEN is not its own";
      }
      // Our own notifications carry the server's pid, which the locks
      // compare against.
      if (problem.empty()) backend_pid_ = server_pid;
    }
    co_await query("UNLISTEN " + quote_identifier(channel));
    co_return problem;
  }

  // Whether this session keeps its server backend while another session of
  // the same pool holds a transaction open (a session pool: yes; a
  // transaction pool hands the idle backend to the other session). Nothing
  // when it cannot tell within the probe's time (a full pool, a refused
  // second login): connect() then goes on, as without a proxy.
  static task<std::optional<bool>> pinned_to(std::shared_ptr<connection> self, int server_pid, std::string channel,
                                             connect_options options) {
    auto limit = options.notify_probe_timeout;
    options.notify_probe_timeout = std::chrono::milliseconds(0);
    options.application_name.clear();
    options.timeout = limit;
    std::shared_ptr<connection> other;
    std::optional<bool> pinned;
    std::string failure;
    try {
      other = co_await connect(*self->loop_, self->conninfo_, options);
      auto began = co_await detail::within(*self->loop_, other->query("BEGIN"), limit);
      if (began) {
        auto theirs = co_await other->query("SELECT pg_backend_pid()");
        auto mine = co_await self->query(
            "SELECT pg_backend_pid(), EXISTS (SELECT FROM pg_listening_channels() c WHERE c = $1)", channel);
        pinned = std::atoi(std::string(theirs.get(0, 0)).c_str()) != server_pid &&
                 std::atoi(std::string(mine.get(0, 0)).c_str()) == server_pid && mine.get(0, 1) == "t";
      } else {
        failure = "a second connection got no server session within " + std::to_string(limit.count()) + " ms";
      }
    } catch (const std::exception& e) {
      failure = e.what();
    }
    if (other) co_await other->close();  // also ends an abandoned BEGIN
    if (!failure.empty()) {
      detail::log(self->logger_, log_level::debug,
                  "could not tell whether the pool in front of the server pins sessions: " + failure);
    }
    co_return pinned;
  }

  task<void> apply_server_liveness(std::chrono::milliseconds live) {
    const char* host = PQhost(conn_);
    if (!host || host[0] == '/' || host[0] == '@') co_return;  // unix socket: nothing to probe
    long probe_s = std::max<long>(1, static_cast<long>(live.count() / 5000));
    std::string sql =
        "SELECT set_config('tcp_keepalives_idle', $1, false), set_config('tcp_keepalives_interval', $1, false), "
        "set_config('tcp_keepalives_count', '3', false)";
    if (PQserverVersion(conn_) >= 120000) {
      co_await query(sql + ", set_config('tcp_user_timeout', $2, false)", std::to_string(probe_s),
                     std::to_string(live.count() * 4 / 5));
    } else {
      co_await query(sql, std::to_string(probe_s));
    }
  }

  static void on_notice(void* arg, const PGresult* r) {
    auto* self = static_cast<connection*>(arg);
    detail::log(self->logger_, log_level::info,
                "server notice: " + detail::trim_message(PQresultErrorMessage(r)));
  }

  // Sends what libpq has buffered; if the socket is full, the pump waits for
  // POLLOUT as well (its current poll is cancelled so it re-arms with it).
  void flush_output() {
    if (!conn_ || lost_) return;
    int rc = PQflush(conn_);
    if (rc < 0) {
      lose(detail::trim_message(PQerrorMessage(conn_)));
    } else if (rc == 1 && !want_write_) {
      want_write_ = true;
      pump_cancel_.cancel();
    } else if (rc == 0) {
      want_write_ = false;
    }
  }

  task<void> pump() {
    while (!closing_ && !lost_) {
      unsigned ev = POLLIN | (want_write_ ? POLLOUT : 0u);
      auto r = co_await loop_->poll(fd_, ev, std::nullopt, &pump_cancel_);
      if (closing_) break;
      if (r.cancelled) {
        pump_cancel_.reset();
        continue;
      }
      if (r.revents & POLLOUT) flush_output();
      if (r.revents & (POLLIN | POLLERR | POLLHUP)) {
        if (!PQconsumeInput(conn_)) {
          lose(detail::trim_message(PQerrorMessage(conn_)));
          break;
        }
        // Notifications are dispatched after the coroutines whose queries
        // just completed have run: a query result comes before what the
        // server sent after it, so e.g. a LISTEN's first messages find
        // their handler ready.
        if (collect_results()) {
          co_await loop_->yield();
          if (closing_ || lost_) break;
        }
        dispatch_notifications();
        if (PQstatus(conn_) == CONNECTION_BAD) lose(detail::trim_message(PQerrorMessage(conn_)));
      }
    }
    pump_done_.set();
  }

  // In pipeline mode each query yields its results, a NULL, then the
  // PGRES_PIPELINE_SYNC of its own sync: that marks it complete. Returns
  // whether any query completed.
  bool collect_results() {
    bool completed = false;
    while (!pending_.empty() && !PQisBusy(conn_)) {
      PGresult* r = PQgetResult(conn_);
      if (!r) continue;
      auto& q = pending_.front();
      bool alive = loop_->alive(q.op);
      switch (PQresultStatus(r)) {
        case PGRES_PIPELINE_SYNC:
          PQclear(r);
          if (alive) loop_->complete(q.op, 0);
          pending_.pop_front();
          completed = true;
          break;
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
          PQclear(r);
          break;
        default:
          if (q.discard > 0) {
            --q.discard;
            PQclear(r);
          } else if (alive && !q.out->value.native_handle()) {
            q.out->value = result(r);
          } else {
            PQclear(r);
          }
      }
    }
    return completed;
  }

  std::exception_ptr to_error(const PGresult* r) const {
    const char* state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    std::string code = state ? state : "";
    std::string msg = detail::trim_message(PQresultErrorMessage(r));
    if (msg.empty()) msg = detail::trim_message(PQerrorMessage(conn_));
    // Class 08 (connection exception) and 57P0x (admin shutdown, crash,
    // cannot connect now): the session is over, whatever the statement was.
    if (code.rfind("08", 0) == 0 || code.rfind("57P0", 0) == 0) {
      return std::make_exception_ptr(connection_error("pgiplock: connection lost: " + msg));
    }
    return std::make_exception_ptr(
        sql_error("pgiplock: " + msg + (code.empty() ? "" : " (SQLSTATE " + code + ")"), code));
  }

  void dispatch_notifications() {
    while (PGnotify* n = PQnotifies(conn_)) {
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

  void prune_subscribers() {
    if (dispatching_) return;
    subs_.erase(std::remove_if(subs_.begin(), subs_.end(), [](const subscriber& s) { return !s.fn; }),
                subs_.end());
  }

  // The link is gone: every waiter learns it now, with the reason.
  void lose(const std::string& why) {
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

  event_loop* loop_;
  std::string conninfo_;
  std::string app_;
  log_handler logger_;
  PGconn* conn_ = nullptr;
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

// ==== 6. ip_lock ============================================================
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
// connection, in bounded slices (a waiting statement pins the xmin horizon),
// catching the lock timeout inside the server so nothing is logged; it
// takes over milliseconds after the holder dies. Every tenure gets a fencing
// token from a sequence, strictly increasing across the lock group.

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

inline constexpr std::string_view lock_prefix = "__PgIpLock__:";
inline constexpr std::string_view announce_payload = "listening";  // a new holder's LISTEN committed
inline constexpr std::size_t max_identifier = 63;  // NAMEDATALEN - 1
inline constexpr std::size_t max_channel = max_identifier - lock_prefix.size();

// PostgreSQL silently truncates identifiers (and so NOTIFY channels) to 63
// bytes, so two long names could share one lock: refuse them instead.
inline void validate_channel(std::string_view channel) {
  if (channel.empty()) throw std::invalid_argument("pgiplock: the channel name is empty");
  if (channel.find('\0') != std::string_view::npos) {
    throw std::invalid_argument("pgiplock: the channel name contains a NUL byte");
  }
  if (channel.size() > max_channel) {
    throw std::invalid_argument("pgiplock: channel name '" + std::string(channel.substr(0, 20)) + "...' is " +
                                std::to_string(channel.size()) + " bytes; at most " +
                                std::to_string(max_channel) + " fit, since the lock channel '" +
                                std::string(lock_prefix) + "<channel>' must stay within PostgreSQL's " +
                                std::to_string(max_identifier) + "-byte identifier limit");
  }
  if (channel.substr(0, lock_prefix.size()) == lock_prefix) {
    throw std::invalid_argument("pgiplock: channel names starting with '" + std::string(lock_prefix) +
                                "' are reserved for the locks themselves");
  }
}

// The SQLSTATEs a concurrent bootstrap by another process can raise.
inline bool is_bootstrap_race(const std::string& sqlstate) {
  return sqlstate == "23505" || sqlstate == "42P07" || sqlstate == "42710" || sqlstate == "XX000" ||
         sqlstate == "40P01" || sqlstate == "42P06" || sqlstate == "42723";
}

// The advisory-lock key of a lock channel: the same in every process.
inline std::int64_t advisory_key(std::string_view lock_channel) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : lock_channel) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return static_cast<std::int64_t>(h);
}

}  // namespace detail

class ip_lock {
 public:
  using channel_handler = std::function<void(std::string_view channel)>;

  // Throws std::invalid_argument for an empty, NUL-containing or too long
  // channel name (at most 50 bytes), and for a missing client.
  ip_lock(std::string channel, ip_lock_options options)
      : channel_(std::move(channel)), options_(std::move(options)) {
    detail::validate_channel(channel_);
    if (!options_.client) throw std::invalid_argument("pgiplock: ip_lock needs options.client");
    if (options_.acquire_interval.count() <= 0) {
      throw std::invalid_argument("pgiplock: ip_lock acquire_interval must be positive");
    }
    lock_channel_ = std::string(detail::lock_prefix) + channel_;
    key_ = detail::advisory_key(lock_channel_);
    registry_add(this);
  }
  ip_lock(const ip_lock&) = delete;
  ip_lock& operator=(const ip_lock&) = delete;

  // Without destroy(): the background coroutines are cancelled, the lock is
  // unregistered and stops listening; a row it holds is deleted in the
  // background while the connection is open (standbys get the release
  // event), otherwise it is freed with the session and a standby takes over.
  ~ip_lock() {
    registry_remove(this);
    background_ = task<void>{};
    waiter_task_ = task<void>{};
    heartbeat_ = task<void>{};
    detach_from_client();
    if (acquired_ && options_.client->is_open()) {
      options_.client->loop().spawn(release_in_background(options_.client, schema_, lock_channel_, key_, advisory_held_));
    }
    if (!destroyed_ && initialized_ && options_.client->is_open()) {
      options_.client->loop().spawn(leave_quietly(options_.client, lock_channel_, present_, presence_key()));
    }
  }

  const std::string& channel() const noexcept { return channel_; }
  const std::string& lock_channel() const noexcept { return lock_channel_; }
  const ip_lock_options& options() const noexcept { return options_; }

  // "pgip_lock", or $PG_PUBSUB_SCHEMA_NAME, as the Node package reads it.
  static std::string schema_name() {
    const char* env = std::getenv("PG_PUBSUB_SCHEMA_NAME");
    return (env && *env) ? std::string(env) : std::string("pgip_lock");
  }

  // Creates the lock storage if missing (idempotent, safe when many fresh
  // processes start at once), listens for release events and starts the
  // background coroutines. Calling it again does nothing.
  task<void> init() {
    if (initialized_) co_return;
    auto client = options_.client;
    schema_ = client->quote_identifier(schema_name());
    co_await ensure_schema(client, schema_name());
    notify_sub_ = client->subscribe(lock_channel_, [this](const notification& n) { on_lock_channel(n); });
    lost_sub_ = client->on_lost([this](const connection_error&) {
      advisory_held_ = false;
      set_acquired(false);
    });
    co_await client->query("LISTEN " + client->quote_identifier(lock_channel_));
    if (announces()) {
      // Seen by a releasing holder: an announcing successor may take over,
      // so it drains until the announcement (see release()).
      co_await client->query("SELECT pg_advisory_lock_shared($1::integer, $2::integer)", presence_key().first,
                             presence_key().second);
      present_ = true;
    }
    initialized_ = true;
    auto& loop = client->loop();
    background_ = retry_loop();
    loop.start(background_);
    heartbeat_ = heartbeat_loop();
    loop.start(heartbeat_);
    if (options_.fast_failover) {
      waiter_task_ = waiter_loop();
      loop.start(waiter_task_);
    }
  }

  // True when this lock holds the channel now (also when it already did:
  // then its row is checked), false when a live holder has it. Never raises
  // an error on the server, so a standby's attempt leaves nothing in the log.
  task<bool> acquire() {
    auto o = co_await take();
    co_return o.won;
  }

  // Deletes our own row, if we hold one (someone else's row is never
  // touched), and frees the advisory lock. Other instances get the release
  // event at commit and the advisory waiters wake. If C++ standbys were
  // waiting, this one keeps delivering until the winner announces that its
  // LISTEN has committed (both see one commit order, so no message is lost
  // or delivered twice), or handover_timeout passes; on_lose fires then.
  task<void> release() {
    auto client = options_.client;
    if (schema_.empty()) schema_ = client->quote_identifier(schema_name());
    bool was = acquired_;
    releasing_ = true;
    demotion_reason_.clear();
    // Keep delivering while the release is in flight; whether to go on
    // until a successor announces depends on who was waiting.
    draining_ = was;
    token_.reset();
    // Our own waiter would otherwise grab the lock straight back, before
    // the standby the release was for: stay passive for an interval.
    if (was) passive_until_ = event_loop::clock::now() + options_.acquire_interval;
    int waiting = 0;
    if (client->is_open()) {
      try {
        bool held = std::exchange(advisory_held_, false);
        waiting = co_await release_row(client, schema_, lock_channel_, key_, held);
      } catch (const connection_error&) {
        // The session is gone, and its row with it as far as standbys can tell.
      } catch (...) {
        releasing_ = false;
        draining_ = false;
        throw;
      }
    }
    detail::log(logger(), log_level::debug,
                "ip_lock " + channel_ + ": released; " + std::to_string(waiting) + " announcing standby(s)" +
                    (draining_ ? "" : "; the successor has already announced"));
    if (was && waiting > 0 && options_.handover_timeout.count() > 0 && client->is_open() && draining_) {
      auto announced = std::make_shared<async_event>(client->loop());
      announced_ = announced;
      auto deadline = std::make_shared<cancel_source>();
      client->loop().spawn(detail::cancel_after(client->loop(), deadline, options_.handover_timeout));
      co_await announced->wait(deadline.get());
      announced_.reset();
    }
    draining_ = false;
    releasing_ = false;
    set_acquired(false);
  }

  // Releases, stops listening and the background coroutines, unregisters.
  // Safe to call twice and on a dead connection; never throws for a lost link.
  task<void> destroy() {
    if (destroyed_) co_return;
    destroyed_ = true;
    registry_remove(this);
    background_ = task<void>{};
    waiter_task_ = task<void>{};
    heartbeat_ = task<void>{};
    auto client = options_.client;
    auto waiter = std::move(waiter_);
    bool listening = initialized_;
    if (waiter) client->loop().spawn(connection::close_quietly(waiter));
    if (!client->is_open()) {
      detach_from_client();
      set_acquired(false);
      co_return;
    }
    try {
      co_await release();  // still listening: the successor's announcement ends the drain
    } catch (const std::exception& e) {
      detail::log(logger(), log_level::warn, "ip_lock " + channel_ + ": destroy: " + e.what());
    }
    detach_from_client();
    if (listening) {
      client->loop().spawn(leave_quietly(client, lock_channel_, std::exchange(present_, false), presence_key()));
    }
  }

  bool is_acquired() const noexcept { return acquired_ && !releasing_ && options_.client->is_open(); }
  // The holder's LISTEN of options().listen_on_acquire committed with its
  // win (true from on_acquire on, while holding).
  bool listens_on_acquire() const noexcept { return acquired_ && !options_.listen_on_acquire.empty(); }

  // Released, but still delivering until the successor's LISTEN commits.
  bool is_draining() const noexcept { return draining_ && options_.client->is_open(); }

  // For a holder that announces its LISTEN (pubsub): whether the stream has
  // passed the cut. A LISTEN can start receiving slightly before its own
  // commit (PostgreSQL's queue position is set at pre-commit); what comes
  // before our own announcement is the draining predecessor's to deliver.
  // Not waited for after a crash takeover: nobody drains then.
  bool past_handover_cut() const noexcept { return !fresh_tenure_ || own_announcement_seen_; }

  // The fencing token of the current tenure: strictly increasing across the
  // lock group (a sequence), 0 when not holding.
  std::int64_t token() const noexcept { return is_acquired() && token_ ? *token_ : 0; }

  // Called after a release event from another instance (having tried to
  // acquire first). Only one handler, as in the seed: a second throws.
  void on_release(channel_handler fn) {
    if (on_release_) {
      throw std::logic_error("pgiplock: ip_lock '" + channel_ + "' already has an on_release handler");
    }
    on_release_ = std::move(fn);
  }
  // Whenever this lock becomes the holder, by any path.
  void on_acquire(channel_handler fn) { on_acquire_.push_back(std::move(fn)); }
  // Whenever it stops being the holder (release, lost link, lost row).
  void on_lose(channel_handler fn) { on_lose_.push_back(std::move(fn)); }
  // Why the last tenure ended without a release (the liveness check failed,
  // the row was deleted); empty after a release or a new win. Set before
  // on_lose runs.
  const std::string& demotion_reason() const noexcept { return demotion_reason_; }

  // Destroys every lock of this process that runs on the calling thread's
  // event loop (all of them when called outside a loop).
  static task<void> destroy_all() {
    event_loop* here = event_loop::current();
    for (;;) {
      ip_lock* next = nullptr;
      for (ip_lock* l : registry()) {
        if (!here || &l->options_.client->loop() == here) {
          next = l;
          break;
        }
      }
      if (!next) break;
      co_await next->destroy();
    }
  }

  // Whether any lock exists (from construction until destroy() or destruction).
  static bool has_instances() { return !registry().empty(); }

 private:
  struct outcome {
    bool got_advisory = false;
    bool won = false;
  };

  static std::vector<ip_lock*>& registry() {
    static std::vector<ip_lock*> all;
    return all;
  }
  static void registry_add(ip_lock* l) { registry().push_back(l); }
  static void registry_remove(ip_lock* l) {
    auto& r = registry();
    r.erase(std::remove(r.begin(), r.end(), l), r.end());
  }

  const log_handler& logger() const {
    return options_.logger ? options_.logger : options_.client->logger();
  }

  // Members that announce their LISTEN when they win (options().
  // listen_on_acquire) hold a shared advisory lock on this pair for as long
  // as they take part, so a releasing holder knows whether to drain.
  bool announces() const noexcept { return !options_.listen_on_acquire.empty(); }
  std::pair<std::int32_t, std::int32_t> presence_key() const noexcept {
    auto k = static_cast<std::uint64_t>(key_);
    return {static_cast<std::int32_t>(static_cast<std::uint32_t>(k >> 32)),
            static_cast<std::int32_t>(static_cast<std::uint32_t>(k & 0xffffffffULL))};
  }

  void detach_from_client() {
    if (notify_sub_) options_.client->unsubscribe(notify_sub_);
    if (lost_sub_) options_.client->remove_on_lost(lost_sub_);
    notify_sub_ = lost_sub_ = 0;
  }

  // One statement: take the advisory lock if free; only then insert our
  // row, take over one whose app has no session any more or is one of ours
  // (ours hold the advisory lock for their whole tenure: we got it, so that
  // holder is gone), or keep one that is already ours; a live holder's row
  // is left alone (0 rows, no error, unlike the Node package's deadlock_check). Two takers of one dead row
  // serialise on its row lock; the second re-checks, finds the new app
  // alive and gets 0. A won tenure draws its fencing token.
  std::string acquire_sql() const {
    std::string lock = schema_ + ".lock";
    return "WITH me AS MATERIALIZED (SELECT pg_try_advisory_lock($3::bigint) AS got), "
           "taken AS (INSERT INTO " + lock + " (channel, app) SELECT $1, $2 FROM me WHERE me.got "
           "ON CONFLICT (channel) DO UPDATE SET app = EXCLUDED.app "
           "WHERE " + lock + ".app = EXCLUDED.app "
           "OR " + lock + ".app LIKE '" + std::string(detail::app_prefix) + "%' OR NOT EXISTS ("
           "SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.application_name = " + lock + ".app) "
           "RETURNING (xmax = 0) AS fresh) "
           "SELECT (SELECT got FROM me), EXISTS (SELECT 1 FROM taken), "
           "CASE WHEN EXISTS (SELECT 1 FROM taken) THEN nextval('" + schema_ + ".pgiplock_tenure') END, "
           "coalesce((SELECT bool_or(fresh) FROM taken), false), "
           "CASE WHEN EXISTS (SELECT 1 FROM taken) AND $4 <> '' THEN " + schema_ + ".pgiplock_listen($4, $1) END";
  }

  // acquire(), with what the waiter needs to know: whether the advisory
  // lock was free. One attempt at a time per lock: the statement takes the
  // session advisory lock, which counts re-entries.
  task<outcome> take() {
    auto client = options_.client;
    if (schema_.empty()) schema_ = client->quote_identifier(schema_name());
    while (attempt_in_flight_) co_await attempt_done_->wait();
    attempt_in_flight_ = true;
    attempt_done_ = std::make_shared<async_event>(client->loop());
    struct settle {
      ip_lock* self;
      std::shared_ptr<async_event> done;
      ~settle() {
        self->attempt_in_flight_ = false;
        done->set();
      }
    } guard{this, attempt_done_};
    try {
      if (acquired_) {
        bool still = co_await holds_row(client);
        if (still) co_return outcome{true, true};
        co_await demote("its lock row is gone");
      }
      co_return co_await attempt(client);
    } catch (const connection_error&) {
      advisory_held_ = false;
      set_acquired(false);
      throw;
    }
  }

  task<outcome> attempt(std::shared_ptr<connection> client) {
    // Our announcement can be dispatched before this result is processed
    // (both arrive in one read): forget earlier ones before sending.
    own_announcement_seen_ = false;
    auto r = co_await client->query_prepared(acquire_sql(), lock_channel_, client->app_name(), key_,
                                    options_.listen_on_acquire);
    outcome out;
    out.got_advisory = r.get(0, 0) == "t";
    out.won = r.get(0, 1) == "t";
    detail::log(logger(), log_level::debug,
                "ip_lock " + channel_ + ": attempt: advisory " + (out.got_advisory ? "got" : "busy") +
                    (out.won ? ", won" : ", lost"));
    if (out.won) {
      advisory_held_ = true;
      token_ = std::strtoll(std::string(r.get(0, 2)).c_str(), nullptr, 10);
      // A fresh row: the previous holder released it and may be draining
      // until our announcement. A row taken over: its holder is dead.
      fresh_tenure_ = r.get(0, 3) == "t";
      set_acquired(true);
    } else {
      // The advisory lock was free but the row is a live holder's: a Node
      // peer (it takes no advisory lock), or one whose session is still
      // visible for a moment after its death.
      if (out.got_advisory) co_await client->query("SELECT pg_advisory_unlock($1::bigint)", key_);
      set_acquired(false);
    }
    co_return out;
  }

  task<bool> holds_row(std::shared_ptr<connection> client) {
    auto r = co_await client->query_prepared(
        "SELECT EXISTS (SELECT 1 FROM " + schema_ + ".lock WHERE channel = $1 AND app = $2)", lock_channel_,
        client->app_name());
    co_return r.get(0, 0) == "t";
  }

  // Stops holding at once; frees the advisory lock so a standby can win.
  task<void> demote(std::string why) {
    if (!acquired_) co_return;
    detail::log(logger(), log_level::warn, "ip_lock " + channel_ + ": giving up the lock: " + why);
    demotion_reason_ = std::move(why);
    set_acquired(false);
    token_.reset();
    auto client = options_.client;
    if (std::exchange(advisory_held_, false) && client->is_open()) {
      try {
        co_await client->query("SELECT pg_advisory_unlock($1::bigint)", key_);
      } catch (const std::exception&) {
      }
    }
  }

  static task<void> release_in_background(std::shared_ptr<connection> client, std::string schema,
                                          std::string lock_channel, std::int64_t key, bool advisory_held) {
    try {
      co_await release_row(client, schema, lock_channel, key, advisory_held);
    } catch (const connection_error&) {
      // gone with the session
    }
  }


  // Stops listening for release events and leaves the presence group.
  static task<void> leave_quietly(std::shared_ptr<connection> client, std::string lock_channel, bool present,
                                  std::pair<std::int32_t, std::int32_t> presence) {
    try {
      co_await client->query("UNLISTEN " + client->quote_identifier(lock_channel));
      if (present) {
        co_await client->query("SELECT pg_advisory_unlock_shared($1::integer, $2::integer)", presence.first,
                               presence.second);
      }
    } catch (const std::exception&) {
      // a dead session listens to nothing and holds no lock
    }
  }

  // One statement. The advisory unlock takes effect at once, the release
  // NOTIFY only at commit, so a standby woken by either finds the lock free
  // (and, if it races the commit, its INSERT waits for it). The unlock reads
  // the DELETE's result, so it runs after it: a waiter woken by the unlock
  // must find the row deleted (its INSERT then waits for our commit and
  // starts a fresh tenure), never still ours to take over as if we had died
  // (it would then deliver at once, beside our drain). A data-modifying
  // CTE always runs. Yields how many other members hold the presence lock:
  // announcing C++ standbys, whether or not they wait right now (a waiter
  // between two slices, or one without fast failover, takes over too).
  static task<int> release_row(std::shared_ptr<connection> client, std::string schema, std::string lock_channel,
                               std::int64_t key, bool advisory_held) {
    std::string del = "DELETE FROM " + schema + ".lock WHERE channel = $1 AND app = $2";
    if (!advisory_held) {
      co_await client->query(del, lock_channel, client->app_name());
      co_return 0;
    }
    auto k = static_cast<std::uint64_t>(key);
    auto r = co_await client->query(
        "WITH w AS MATERIALIZED (SELECT count(*) AS n FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
        "AND granted AND classid = $4::oid AND objid = $5::oid AND objsubid = 2 AND pid <> pg_backend_pid() "
        "AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())), "
        "d AS (" + del + " RETURNING 1), "
        "u AS MATERIALIZED (SELECT pg_advisory_unlock($3::bigint) AS ok FROM w, (SELECT count(*) FROM d) gone) "
        "SELECT (SELECT n FROM w), (SELECT ok FROM u)",
        lock_channel, client->app_name(), key, static_cast<long long>(k >> 32),
        static_cast<long long>(k & 0xffffffffULL));
    co_return std::atoi(std::string(r.get(0, 0)).c_str());
  }

  // The DDL the Node package runs, made idempotent and serialised between
  // our own processes by a transaction-level advisory lock (a Node peer
  // racing us can still collide, so a collision is retried), plus what the
  // fast failover needs: the tenure sequence and the bounded waiter.
  static task<void> ensure_schema(std::shared_ptr<connection> client, std::string schema) {
    std::string s = client->quote_identifier(schema);
    std::string lit = client->quote_literal(schema);
    auto present = co_await client->query(
        "SELECT to_regclass($1) IS NOT NULL "
        "AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = 'notify_release_lock_trigger') "
        "AND to_regprocedure($2) IS NOT NULL AND to_regprocedure($3) IS NOT NULL "
        "AND to_regprocedure($4) IS NOT NULL AND to_regclass($5) IS NOT NULL AND to_regprocedure($6) IS NOT NULL",
        s + ".lock", s + ".notify_lock()", s + ".deadlock_check(text,text)",
        s + ".pgiplock_wait_free(bigint,integer)", s + ".pgiplock_tenure", s + ".pgiplock_listen(text,text)");
    if (present.get(0, 0) == "t") co_return;
    auto regproc = [&](const std::string& sig) { return "to_regprocedure(" + client->quote_literal(s + sig) + ")"; };
    std::string ddl =
        "DO $pgiplock$ BEGIN\n"
        "PERFORM pg_advisory_xact_lock(hashtext('pgiplock bootstrap ' || " + lit + "));\n"
        "CREATE SCHEMA IF NOT EXISTS " + s + ";\n"
        "CREATE TABLE IF NOT EXISTS " + s + ".\"lock\" (\n"
        "  \"channel\" CHARACTER VARYING NOT NULL PRIMARY KEY,\n"
        "  \"app\" CHARACTER VARYING NOT NULL);\n"
        "IF " + regproc(".notify_lock()") + " IS NULL THEN\n"
        "  CREATE FUNCTION " + s + ".notify_lock() RETURNS TRIGGER LANGUAGE PLPGSQL AS $f$\n"
        "  BEGIN PERFORM PG_NOTIFY(OLD.channel, '1'); RETURN OLD; END; $f$;\n"
        "END IF;\n"
        "IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = " + client->quote_literal(s + ".lock") +
        "::regclass AND tgname = 'notify_release_lock_trigger') THEN\n"
        "  CREATE CONSTRAINT TRIGGER notify_release_lock_trigger AFTER DELETE ON " + s + ".lock\n"
        "  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE PROCEDURE " + s + ".notify_lock();\n"
        "END IF;\n"
        "IF " + regproc(".deadlock_check(text,text)") + " IS NULL THEN\n"
        "  CREATE FUNCTION " + s + ".deadlock_check(old_app TEXT, new_app TEXT)\n"
        "  RETURNS TEXT LANGUAGE PLPGSQL AS $f$\n"
        "  DECLARE num_apps INTEGER;\n"
        "  BEGIN\n"
        "    SELECT count(query) INTO num_apps FROM pg_stat_activity WHERE application_name = old_app;\n"
        "    IF num_apps > 0 THEN\n"
        "      RAISE EXCEPTION 'Duplicate channel for app %', new_app USING DETAIL = 'LOCKED';\n"
        "    END IF;\n"
        "    RETURN new_app;\n"
        "  END; $f$;\n"
        "END IF;\n"
        "CREATE SEQUENCE IF NOT EXISTS " + s + ".pgiplock_tenure;\n"
        // Waits for the holder's advisory lock for at most timeout_ms; the
        // timeout is caught here, so it never reaches the server log.
        "IF " + regproc(".pgiplock_wait_free(bigint,integer)") + " IS NULL THEN\n"
        "  CREATE FUNCTION " + s + ".pgiplock_wait_free(key bigint, timeout_ms integer)\n"
        "  RETURNS boolean LANGUAGE plpgsql AS $f$\n"
        "  BEGIN\n"
        "    PERFORM set_config('lock_timeout', timeout_ms::text, true);\n"
        "    PERFORM pg_advisory_xact_lock(key);\n"
        "    RETURN true;\n"
        "  EXCEPTION WHEN lock_not_available THEN\n"
        "    RETURN false;\n"
        "  END; $f$;\n"
        "END IF;\n"
        // A new holder's LISTEN and its announcement commit together.
        "IF " + regproc(".pgiplock_listen(text,text)") + " IS NULL THEN\n"
        "  CREATE FUNCTION " + s + ".pgiplock_listen(channel text, lock_channel text)\n"
        "  RETURNS void LANGUAGE plpgsql AS $f$\n"
        "  BEGIN\n"
        "    EXECUTE format('LISTEN %I', channel);\n"
        "    PERFORM pg_notify(lock_channel, '" + std::string(detail::announce_payload) + "');\n"
        "  END; $f$;\n"
        "END IF;\n"
        "END $pgiplock$";
    for (int attempt = 1;; ++attempt) {
      std::string failure;
      try {
        co_await client->query(ddl);
        co_return;
      } catch (const sql_error& e) {
        if (e.sqlstate() == "42501") {
          throw sql_error("pgiplock: cannot create the lock schema " + s +
                              ": permission denied (SQLSTATE 42501). Grant the CREATE privilege on the "
                              "database (GRANT CREATE ON DATABASE ... TO ...) or have a role that has it "
                              "run init() once. Server said: " + detail::without_prefix(e.what()),
                          e.sqlstate());
        }
        if (!detail::is_bootstrap_race(e.sqlstate()) || attempt == 5) throw;
        failure = e.what();
      }
      detail::log(client->logger(), log_level::debug, "lock schema bootstrap collided, retrying: " + failure);
      co_await client->loop().sleep(std::chrono::milliseconds(10 * attempt));
    }
  }

  void on_lock_channel(const notification& n) {
    if (n.sender_pid == options_.client->backend_pid()) {  // our own release or announcement
      if (n.payload == detail::announce_payload) own_announcement_seen_ = true;
      return;
    }
    if (n.payload == detail::announce_payload) {
      // The successor's LISTEN has committed: everything after this in the
      // stream is its to deliver. Cut here, before the next notification.
      if (draining_) {
        draining_ = false;
        detail::log(logger(), log_level::debug, "ip_lock " + channel_ + ": the successor announced; handover done");
        if (announced_) announced_->set();
      }
      return;
    }
    if (n.payload != "1") return;  // not a release event
    release_pending_ = true;
    wake_.cancel();
  }

  // Release events and the periodic retry. While the advisory waiter knows
  // a live holder holds the advisory lock, the periodic attempt is skipped:
  // an idle standby then sends one statement per wait slice, nothing more.
  task<void> retry_loop() {
    auto& loop = options_.client->loop();
    for (;;) {
      bool elapsed = co_await loop.sleep(options_.acquire_interval, &wake_);
      if (!elapsed) wake_.reset();
      bool released = std::exchange(release_pending_, false);
      bool pointless = elapsed && waiter_sees_holder_;
      if (!acquired_ && options_.client->is_open() && !pointless) {
        try {
          co_await acquire();
        } catch (const std::exception& e) {
          detail::log(logger(), log_level::warn, "ip_lock " + channel_ + ": acquire failed: " + e.what());
        }
      }
      if (released && on_release_) on_release_(channel_);
      if (!options_.client->is_open()) co_return;
    }
  }

  // The holder's liveness check: its row must still be there (a DELETE or
  // TRUNCATE under a live holder fires no release event), answered in time.
  task<void> heartbeat_loop() {
    auto& loop = options_.client->loop();
    auto every = std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10), options_.liveness_timeout / 4);
    auto limit = std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10), options_.liveness_timeout / 2);
    for (;;) {
      co_await loop.sleep(every);
      auto client = options_.client;
      // A release deletes the row while still draining: not a fault.
      auto holding = [&] { return acquired_ && !releasing_ && client->is_open() && !attempt_in_flight_; };
      if (!holding()) continue;
      std::optional<bool> held;
      std::string failure;  // co_await is not allowed inside a handler
      try {
        held = co_await detail::within(loop, holds_row(client), limit);
      } catch (const std::exception& e) {
        failure = e.what();
      }
      if (!holding()) continue;  // released or lost meanwhile
      if (!failure.empty()) {
        co_await demote("the liveness check failed: " + failure);
      } else if (!held) {
        co_await demote("the liveness check got no answer within " + std::to_string(limit.count()) + " ms");
      } else if (!*held) {
        co_await demote("its lock row was deleted");
      }
    }
  }

  // The fast path of a standby: wait, server-side and in bounded slices,
  // for the holder's advisory lock; when it comes free, take over (retrying
  // briefly: the dead holder's application_name can stay visible in
  // pg_stat_activity for a moment after its lock is freed).
  task<void> waiter_loop() {
    auto client = options_.client;
    auto& loop = client->loop();
    auto slice = options_.wait_slice.count() > 0 ? options_.wait_slice : options_.acquire_interval;
    // Re-checked after every await: the connect and the wait take time, in
    // which this lock may win, or release and turn passive.
    auto idle = [&] { return acquired_ || !client->is_open() || event_loop::clock::now() < passive_until_; };
    for (;;) {
      if (idle()) {
        waiter_sees_holder_ = false;
        if (acquired_ && waiter_) {  // a holder waits for nobody: give the connection back
          auto w = std::move(waiter_);
          co_await w->close();
        }
        bool passive = !acquired_ && client->is_open();
        auto until = passive ? passive_until_ : event_loop::clock::now() + options_.acquire_interval;
        if (!co_await loop.sleep_until(until, &standby_wake_)) standby_wake_.reset();
        continue;
      }
      if (!waiter_ || !waiter_->is_open()) {
        try {
          connect_options co;
          co.logger = client->logger();
          co.liveness_timeout = options_.liveness_timeout;
          co.notify_probe_timeout = std::chrono::milliseconds(0);  // it never listens
          waiter_ = co_await connection::connect(loop, client->conninfo(), co);
        } catch (const std::exception& e) {
          detail::log(logger(), log_level::warn,
                      "ip_lock " + channel_ + ": fast failover unavailable for now: " + e.what());
          waiter_.reset();
        }
        if (!waiter_) {
          waiter_sees_holder_ = false;
          co_await loop.sleep(options_.acquire_interval);
        }
        continue;
      }
      bool free = false;
      bool failed = false;
      try {
        auto r = co_await waiter_->query_prepared(
            "SELECT " + schema_ + ".pgiplock_wait_free($1::bigint, $2::integer)", key_,
            static_cast<long long>(slice.count()));
        free = r.get(0, 0) == "t";
      } catch (const std::exception& e) {
        failed = true;
        detail::log(logger(), log_level::debug, "ip_lock " + channel_ + ": advisory wait failed: " + e.what());
      }
      if (failed) {
        waiter_sees_holder_ = false;
        co_await loop.sleep(std::chrono::milliseconds(100));
        continue;
      }
      waiter_sees_holder_ = !free;
      if (!free || idle()) continue;
      detail::log(logger(), log_level::debug, "ip_lock " + channel_ + ": the holder's advisory lock is free");
      bool won = false;
      for (int i = 0; i < 25 && !won && client->is_open(); ++i) {
        try {
          auto o = co_await take();
          won = o.won;
          detail::log(logger(), log_level::debug,
                      "ip_lock " + channel_ + ": takeover attempt " + std::to_string(i + 1) + (won ? ": won" : ": lost"));
          if (!o.got_advisory) break;  // another standby holds it now
        } catch (const std::exception& e) {
          detail::log(logger(), log_level::debug, "ip_lock " + channel_ + ": takeover attempt failed: " + e.what());
          break;
        }
        if (!won) co_await loop.sleep(std::chrono::milliseconds(2));
      }
      // The advisory lock was free but the holder lives: it takes no
      // advisory lock (a Node peer). Release events and the retry timer
      // cover it; waiting again now would spin.
      if (!won && !acquired_ && client->is_open()) co_await loop.sleep(options_.acquire_interval, &wake_);
    }
  }

  void set_acquired(bool now) {
    if (now == acquired_) return;
    acquired_ = now;
    if (now) demotion_reason_.clear();
    if (!now) standby_wake_.cancel();  // the waiter has work again
    auto& handlers = now ? on_acquire_ : on_lose_;
    for (std::size_t i = 0; i < handlers.size(); ++i) handlers[i](channel_);
  }

  std::string channel_;
  std::string lock_channel_;
  ip_lock_options options_;
  std::int64_t key_ = 0;
  std::string schema_;  // quoted
  bool initialized_ = false;
  bool destroyed_ = false;
  bool acquired_ = false;
  bool advisory_held_ = false;     // a session advisory lock on the client connection
  bool present_ = false;           // holds the shared presence lock (announces())
  bool waiter_sees_holder_ = false;  // the last wait slice timed out: a live holder holds it
  bool release_pending_ = false;
  bool attempt_in_flight_ = false;
  bool releasing_ = false;  // release() under way: no longer the holder
  bool draining_ = false;   // released, delivering until the successor announces
  bool fresh_tenure_ = false;            // won a row the predecessor released
  bool own_announcement_seen_ = false;   // our announcement has come back to us
  std::shared_ptr<async_event> announced_;
  std::shared_ptr<async_event> attempt_done_;
  std::optional<std::int64_t> token_;
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

// ==== 7. pubsub =============================================================
//
// The seed system's PgPubSub: LISTEN/NOTIFY with reconnects, single-listener
// mode (one ip_lock per channel: only the holder delivers), filtering of our
// own notifications, and an execution lock that processes each message once.

namespace detail {

inline constexpr std::size_t max_payload = 7999;  // the server rejects 8000 bytes

inline void validate_notify_channel(std::string_view channel) {
  if (channel.empty()) throw std::invalid_argument("pgiplock: the channel name is empty");
  if (channel.find('\0') != std::string_view::npos) {
    throw std::invalid_argument("pgiplock: the channel name contains a NUL byte");
  }
  if (channel.size() > max_identifier) {
    throw std::invalid_argument("pgiplock: channel name '" + std::string(channel.substr(0, 20)) + "...' is " +
                                std::to_string(channel.size()) + " bytes; PostgreSQL allows at most " +
                                std::to_string(max_identifier));
  }
}

inline void validate_payload(std::string_view payload) {
  if (payload.size() > max_payload) {
    throw std::length_error("pgiplock: notification payload is " + std::to_string(payload.size()) +
                            " bytes; PostgreSQL accepts at most " + std::to_string(max_payload));
  }
  if (payload.find('\0') != std::string_view::npos) {
    throw std::invalid_argument("pgiplock: notification payload contains a NUL byte at offset " +
                                std::to_string(payload.find('\0')) + "; payloads are text");
  }
}

// Appends `s` as an element of a PostgreSQL text-array literal.
inline void append_array_element(std::string& out, std::string_view s) {
  out.push_back('"');
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  out.push_back('"');
}

// 128 bits from two differently seeded 64-bit FNV-1a passes with a final
// mix: the default execution-lock key; not cryptographic, collisions are
// ~2^-64 for the traffic of a TTL.
inline std::string message_key(int sender_pid, std::string_view channel, std::string_view payload) {
  auto pass = [&](std::uint64_t h) {
    auto feed = [&h](std::string_view s) {
      for (unsigned char c : s) {
        h ^= c;
        h *= 0x100000001b3ULL;
      }
      h ^= s.size();
      h *= 0x100000001b3ULL;
    };
    std::string pid = std::to_string(sender_pid);
    feed(pid);
    feed(channel);
    feed(payload);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
  };
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(pass(0xcbf29ce484222325ULL)),
                static_cast<unsigned long long>(pass(0x84222325cbf29ce4ULL)));
  return buf;
}

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strtol(v, nullptr, 10) != 0;
}

}  // namespace detail

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

void enable_graceful_shutdown(event_loop& loop);

// Handlers for one channel each: pubsub::channels().on(ch, fn).
class channel_emitter {
 public:
  using handler = std::function<void(std::string_view payload)>;
  void on(std::string channel, handler fn) { handlers_[std::move(channel)].push_back(std::move(fn)); }
  void off(std::string_view channel) {
    auto it = handlers_.find(channel);
    if (it != handlers_.end()) handlers_.erase(it);
  }
  void emit(std::string_view channel, std::string_view payload) const {
    auto it = handlers_.find(channel);
    if (it == handlers_.end()) return;
    for (std::size_t i = 0; i < it->second.size(); ++i) it->second[i](payload);
  }

 private:
  std::map<std::string, std::vector<handler>, std::less<>> handlers_;
};

class pubsub {
 public:
  pubsub(event_loop& loop, pubsub_options options)
      : loop_(&loop), options_(std::move(options)) {
    if (options_.retry_delay.count() < 0) throw std::invalid_argument("pgiplock: retry_delay is negative");
    if (options_.handle_signals) enable_graceful_shutdown(loop);
  }
  pubsub(const pubsub&) = delete;
  pubsub& operator=(const pubsub&) = delete;
  ~pubsub() {
    reconnector_ = task<void>{};
    claim_pruner_ = task<void>{};
    channels_.clear();
    detach();
  }

  // Connects once; throws connection_error (or std::invalid_argument for a
  // bad conninfo). Reconnects after a lost link are automatic.
  task<void> connect() {
    closing_ = false;
    auto c = co_await connection::connect(*loop_, options_.conninfo, connect_opts());
    attach(std::move(c));
    if (options_.execution_lock) co_await prepare_claims();
    emit_connect();
    co_await subscribe_all();  // channels given to listen() before connect()
  }

  // Releases every lock, closes the connection; no reconnect after this.
  task<void> close() {
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
    for (auto& h : on_close_) h();
  }

  // In single-listener mode: returns once the lock attempt settled and, if
  // this instance holds the channel, once LISTEN has committed. A standby
  // starts delivering by itself when it wins later (on_listen says so).
  task<void> listen(std::string_view channel_view) {
    std::string ch(channel_view);
    if (options_.single_listener && !options_.execution_lock) detail::validate_channel(ch);
    else detail::validate_notify_channel(ch);
    auto& st = channels_[ch];
    if (!client_) co_return;  // remembered; subscribed on (re)connect
    co_await subscribe_channel(ch, st);
  }

  task<void> unlisten(std::string_view channel_view) {
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
    if (client_ && client_->is_open() && was_listening) {
      co_await client_->query("UNLISTEN " + client_->quote_identifier(ch));
    }
    std::vector<std::string> chs{ch};
    for (auto& h : on_unlisten_) h(chs);
  }

  task<void> unlisten_all() {
    std::vector<std::string> chs = all_channels();
    for (auto& ch : chs) {  // the locks first: each drains while it hands over
      auto it = channels_.find(ch);
      if (it != channels_.end() && it->second.lock) co_await it->second.lock->destroy();
    }
    channels_.clear();
    if (client_ && client_->is_open()) co_await client_->query("UNLISTEN *");
    for (auto& h : on_unlisten_) h(chs);
  }

  // Sends `payload` on `channel`; completes when its transaction has
  // committed. Calls in flight together share one statement and one
  // transaction (at most one copy of each identical (channel, payload) per
  // transaction, since PostgreSQL would fold them into one delivery).
  task<void> notify(std::string_view channel_view, std::string_view payload_view) {
    std::string ch(channel_view), payload(payload_view);
    detail::validate_notify_channel(ch);
    detail::validate_payload(payload);
    if (!client_ || !client_->is_open()) throw connection_error("pgiplock: notify: not connected");
    auto b = join_batch(ch, payload);
    co_await b->done.wait();
    if (b->failure) std::rethrow_exception(b->failure);
    for (auto& h : on_notify_) h(ch, payload);
  }

  std::vector<std::string> all_channels() const {
    std::vector<std::string> out;
    for (auto& [name, st] : channels_) out.push_back(name);
    return out;
  }
  std::vector<std::string> active_channels() const {
    std::vector<std::string> out;
    for (auto& [name, st] : channels_) {
      if (active(st)) out.push_back(name);
    }
    return out;
  }
  std::vector<std::string> inactive_channels() const {
    std::vector<std::string> out;
    for (auto& [name, st] : channels_) {
      if (!active(st)) out.push_back(name);
    }
    return out;
  }
  // This instance delivers `ch` now: connected, LISTEN committed and, in
  // single-listener mode, holding the channel's lock.
  bool is_active(std::string_view ch) const {
    auto it = channels_.find(ch);
    return it != channels_.end() && active(it->second);
  }
  bool is_active() const {
    for (auto& [name, st] : channels_) {
      if (active(st)) return true;
    }
    return false;
  }

  // Unlistens everything (releasing the locks, so standbys take over at
  // once), then closes.
  task<void> destroy() {
    if (client_ && client_->is_open()) {
      try {
        co_await unlisten_all();
      } catch (const std::exception& e) {
        report(e);
      }
    }
    co_await close();
  }

  std::shared_ptr<connection> client() const { return client_; }
  const pubsub_options& options() const noexcept { return options_; }

  // The fencing token of this instance's current tenure on `ch` (0 when it
  // does not hold it, and outside single-listener mode).
  std::int64_t token(std::string_view ch) const {
    auto it = channels_.find(ch);
    return (it != channels_.end() && it->second.lock) ? it->second.lock->token() : 0;
  }
  channel_emitter& channels() noexcept { return emitter_; }

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
  struct batch {
    explicit batch(event_loop& loop) : done(loop) {}
    std::string channels = "{", payloads = "{";
    std::size_t count = 0, bytes = 0;
    std::unordered_map<std::string, int> index;  // (channel NUL payload) pairs already in it
    async_event done;
    std::exception_ptr failure;
  };
  struct claim {
    std::string key, channel, payload;
  };

  connect_options connect_opts() const {
    connect_options o;
    o.logger = options_.logger;
    o.liveness_timeout = options_.liveness_timeout;
    return o;
  }

  bool active(const channel_state& st) const {
    if (!st.listening || !connected()) return false;
    return !st.lock || st.lock->is_acquired() || st.lock->is_draining();
  }

  // Whether a notification that reached this connection is ours to deliver.
  // Once our LISTEN is on its way, whatever arrives for the channel was
  // committed after it; a fresh tenure leaves what precedes its own
  // announcement to the draining predecessor (see ip_lock::past_handover_cut).
  bool deliverable(const channel_state& st) const {
    if (!st.listen_started || !connected()) return false;
    if (!st.lock) return true;
    return (st.lock->is_acquired() && st.lock->past_handover_cut()) || st.lock->is_draining();
  }

  bool connected() const { return client_ && client_->is_open(); }

  void report(const std::exception& e) {
    if (on_error_.empty()) {
      detail::log(options_.logger, log_level::error, e.what());
      return;
    }
    for (auto& h : on_error_) h(e);
  }

  void emit_connect() {
    for (auto& h : on_connect_) h();
  }

  void attach(std::shared_ptr<connection> c) {
    client_ = std::move(c);
    notify_sub_ = client_->subscribe("", [this](const notification& n) { on_notification(n); });
    lost_sub_ = client_->on_lost([this](const connection_error& e) { on_link_lost(e); });
  }

  void detach() {
    if (!client_) return;
    client_->unsubscribe(notify_sub_);
    client_->remove_on_lost(lost_sub_);
    client_.reset();
  }

  // Lock (single-listener mode) and LISTEN for one channel on the current
  // connection.
  task<void> subscribe_channel(std::string ch, channel_state& st) {
    if (options_.single_listener && !options_.execution_lock) {
      if (!st.lock) {
        ip_lock_options lo;
        lo.client = client_;
        lo.logger = options_.logger;
        lo.acquire_interval = options_.acquire_interval;
        lo.fast_failover = options_.fast_failover;
        lo.handover_timeout = options_.handover_timeout;
        lo.listen_on_acquire = ch;
        lo.liveness_timeout = options_.liveness_timeout.count() > 0 ? options_.liveness_timeout
                                                                    : std::chrono::milliseconds(std::chrono::hours(24));
        st.lock = std::make_unique<ip_lock>(ch, std::move(lo));
        st.lock->on_acquire([this](std::string_view c) { on_lock_won(std::string(c)); });
        st.lock->on_lose([this](std::string_view c) { on_lock_lost(std::string(c)); });
        co_await st.lock->init();
      }
      co_await st.lock->acquire();  // a win LISTENs in the same statement (on_lock_won)
    } else {
      co_await start_listening(ch);
    }
  }

  task<void> subscribe_all() {
    for (auto& ch : all_channels()) {
      auto it = channels_.find(ch);
      if (it != channels_.end()) co_await subscribe_channel(ch, it->second);
    }
  }

  // LISTEN once per connection; concurrent callers wait for the first.
  task<void> start_listening(std::string ch) {
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
    bool announce = static_cast<bool>(it->second.lock);
    try {
      if (announce) {  // LISTEN and "listening" on the lock channel commit together: the exact cut
        co_await c->query("SELECT " + c->quote_identifier(ip_lock::schema_name()) + ".pgiplock_listen($1, $2)", ch,
                          it->second.lock->lock_channel());
      } else {
        co_await c->query("LISTEN " + c->quote_identifier(ch));
      }
    } catch (const std::exception& e) {
      auto again = channels_.find(ch);
      if (again != channels_.end()) again->second.listen_started = false;
      settled->set();
      report(e);
      co_return;
    }
    settled->set();
    it = channels_.find(ch);  // the map may have changed while we waited
    if (it == channels_.end() || c != client_) co_return;
    it->second.listening = true;
    for (auto& h : on_listen_) h(ch);
  }

  // The winning statement also LISTENed: deliver from now on. Synchronous,
  // since notifications may follow in the very read that brought the win.
  void on_lock_won(std::string ch) {
    auto it = channels_.find(ch);
    if (it == channels_.end()) return;
    if (!it->second.lock || !it->second.lock->listens_on_acquire()) {
      loop_->spawn(start_listening(ch));
      return;
    }
    it->second.listen_started = it->second.listening = true;
    for (auto& h : on_listen_) h(ch);
  }

  void on_lock_lost(std::string ch) {
    auto it = channels_.find(ch);
    if (it == channels_.end()) return;
    bool was = it->second.listening;
    it->second.listening = false;
    it->second.listen_started = false;
    if (was && client_ && client_->is_open()) loop_->spawn(unlisten_quietly(client_, ch));
    // A demotion is a fault the application should hear of; a release is not.
    if (was && it->second.lock && !it->second.lock->demotion_reason().empty()) {
      report(error("pgiplock: stopped delivering channel " + ch + ": " + it->second.lock->demotion_reason()));
    }
  }

  static task<void> unlisten_quietly(std::shared_ptr<connection> c, std::string ch) {
    try {
      co_await c->query("UNLISTEN " + c->quote_identifier(ch));
    } catch (const connection_error&) {
      // the session is gone, and its LISTEN with it
    }
  }

  void on_notification(const notification& n) {
    if (n.channel.substr(0, detail::lock_prefix.size()) == detail::lock_prefix) return;
    if (options_.filtered && n.sender_pid == client_->backend_pid()) return;
    if (options_.execution_lock) {
      queue_claim(n);
      return;
    }
    auto it = channels_.find(n.channel);
    if (it == channels_.end() || !deliverable(it->second)) return;
    deliver(n.channel, n.payload);
  }

  void deliver(std::string_view ch, std::string_view payload) {
    for (std::size_t i = 0; i < on_message_.size(); ++i) on_message_[i](ch, payload);
    emitter_.emit(ch, payload);
  }

  // ---- notify batching --------------------------------------------------

  std::shared_ptr<batch> join_batch(const std::string& ch, const std::string& payload) {
    static constexpr std::size_t max_batch_count = 10000;
    static constexpr std::size_t max_batch_bytes = 4u << 20;
    std::string pair_key;
    bool fresh = !open_batch_ || open_batch_->count >= max_batch_count || open_batch_->bytes >= max_batch_bytes;
    if (!fresh) {
      pair_key = ch;
      pair_key.push_back('\0');
      pair_key += payload;
      fresh = open_batch_->index.count(pair_key) != 0;
    }
    if (fresh) {
      open_batch_ = std::make_shared<batch>(*loop_);
      loop_->spawn(send_batch(open_batch_, client_));
      pair_key = ch;
      pair_key.push_back('\0');
      pair_key += payload;
    }
    auto& b = *open_batch_;
    if (b.count) {
      b.channels.push_back(',');
      b.payloads.push_back(',');
    }
    detail::append_array_element(b.channels, ch);
    detail::append_array_element(b.payloads, payload);
    b.index.emplace(std::move(pair_key), 1);
    ++b.count;
    b.bytes += ch.size() + payload.size();
    return open_batch_;
  }

  // Runs after the notifying coroutines of this turn of the loop have
  // joined: one statement, one transaction, one commit for all of them.
  task<void> send_batch(std::shared_ptr<batch> b, std::shared_ptr<connection> c) {
    co_await loop_->yield();
    if (open_batch_ == b) open_batch_.reset();
    b->channels.push_back('}');
    b->payloads.push_back('}');
    b->index.clear();
    try {
      co_await c->query("SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                        b->channels, b->payloads);
    } catch (...) {
      b->failure = std::current_exception();
    }
    b->done.set();
  }

  // ---- execution lock ---------------------------------------------------

  std::string claim_schema() const { return ip_lock::schema_name() + "_unique"; }

  task<void> prepare_claims() {
    auto c = client_;
    std::string s = c->quote_identifier(claim_schema());
    std::string present_sql = "SELECT to_regclass($1) IS NOT NULL";
    auto present = co_await c->query(present_sql, s + ".claim");
    if (present.get(0, 0) != "t") {
      for (int attempt = 1;; ++attempt) {
        std::string failure;
        try {
          co_await c->query(
              "DO $pgiplock$ BEGIN\n"
              "PERFORM pg_advisory_xact_lock(hashtext('pgiplock claims ' || " + c->quote_literal(claim_schema()) + "));\n"
              "CREATE SCHEMA IF NOT EXISTS " + s + ";\n"
              "CREATE TABLE IF NOT EXISTS " + s + ".claim (\n"
              "  key text PRIMARY KEY, channel text NOT NULL, app text NOT NULL,\n"
              "  claimed_at timestamptz NOT NULL DEFAULT now());\n"
              "CREATE INDEX IF NOT EXISTS claim_claimed_at ON " + s + ".claim (claimed_at);\n"
              "END $pgiplock$");
          break;
        } catch (const sql_error& e) {
          if (!detail::is_bootstrap_race(e.sqlstate()) || attempt == 5) throw;
          failure = e.what();
        }
        detail::log(options_.logger, log_level::debug, "claim table bootstrap collided, retrying: " + failure);
        co_await loop_->sleep(std::chrono::milliseconds(10 * attempt));
      }
    }
    if (!claim_pruner_.valid()) {
      claim_pruner_ = prune_claims();
      loop_->start(claim_pruner_);
    }
  }

  // Expired markers go in one statement per interval, not per message.
  task<void> prune_claims() {
    auto every = std::max<std::chrono::milliseconds>(std::chrono::seconds(1),
                                                     std::min<std::chrono::milliseconds>(options_.execution_ttl / 4,
                                                                                         std::chrono::minutes(5)));
    for (;;) {
      co_await loop_->sleep(every);
      auto c = client_;
      if (!c || !c->is_open()) continue;
      try {
        co_await c->query("DELETE FROM " + c->quote_identifier(claim_schema()) +
                              ".claim WHERE claimed_at < now() - $1::interval",
                          std::to_string(options_.execution_ttl.count()) + " seconds");
      } catch (const std::exception& e) {
        report(e);
      }
    }
  }

  void queue_claim(const notification& n) {
    auto it = channels_.find(n.channel);
    if (it == channels_.end() || !it->second.listen_started) return;
    std::string key = options_.execution_key ? options_.execution_key(n.channel, n.payload)
                                             : detail::message_key(n.sender_pid, n.channel, n.payload);
    claims_.push_back(claim{std::move(key), std::string(n.channel), std::string(n.payload)});
    if (!claim_flush_scheduled_) {
      claim_flush_scheduled_ = true;
      loop_->spawn(flush_claims(client_));
    }
  }

  // Claims of one turn of the loop go in one statement; what it returns is
  // what this instance won, delivered in arrival order.
  task<void> flush_claims(std::shared_ptr<connection> c) {
    co_await loop_->yield();
    claim_flush_scheduled_ = false;
    std::vector<claim> mine;
    mine.swap(claims_);
    if (mine.empty()) co_return;
    std::string keys = "{", chans = "{";
    for (std::size_t i = 0; i < mine.size(); ++i) {
      if (i) {
        keys.push_back(',');
        chans.push_back(',');
      }
      detail::append_array_element(keys, mine[i].key);
      detail::append_array_element(chans, mine[i].channel);
    }
    keys.push_back('}');
    chans.push_back('}');
    std::vector<bool> won(mine.size(), false);
    try {
      auto r = co_await c->query("INSERT INTO " + c->quote_identifier(claim_schema()) +
                                     ".claim (key, channel, app) SELECT k, ch, $3 FROM unnest($1::text[], $2::text[]) "
                                     "AS t(k, ch) ON CONFLICT (key) DO NOTHING RETURNING key",
                                 keys, chans, c->app_name());
      std::unordered_map<std::string_view, bool> got;
      for (int i = 0; i < r.rows(); ++i) got.emplace(r.get(i, 0), true);
      for (std::size_t i = 0; i < mine.size(); ++i) won[i] = got.count(mine[i].key) != 0;
    } catch (const std::exception& e) {
      report(e);  // unclaimed: another instance may have it; at most once
      co_return;
    }
    for (std::size_t i = 0; i < mine.size(); ++i) {
      if (won[i]) deliver(mine[i].channel, mine[i].payload);
    }
  }

  // ---- reconnect --------------------------------------------------------

  void on_link_lost(const connection_error& e) {
    for (auto& [name, st] : channels_) {
      st.listening = false;
      st.listen_started = false;
    }
    for (auto& h : on_end_) h();
    if (closing_) return;
    report(e);
    reconnector_ = reconnect(client_);
    loop_->start(reconnector_);
  }

  task<void> reconnect(std::shared_ptr<connection> old) {
    co_await loop_->yield();  // leave the dead connection's callback first
    for (auto& [name, st] : channels_) st.lock.reset();  // bound to the dead connection
    detach();
    (void)old;
    std::string last_error;
    std::size_t attempts = 0;
    for (;;) {
      if (attempts >= options_.retry_limit) {
        error failed("pgiplock: reconnect failed after " + std::to_string(attempts) +
                     " attempts; last error: " + last_error);
        closing_ = true;
        report(failed);
        for (auto& h : on_close_) h();
        co_return;
      }
      ++attempts;
      co_await loop_->sleep(options_.retry_delay);
      try {
        auto c = co_await connection::connect(*loop_, options_.conninfo, connect_opts());
        attach(std::move(c));
        break;
      } catch (const std::exception& e) {
        last_error = e.what();
      }
    }
    try {
      if (options_.execution_lock) co_await prepare_claims();
      emit_connect();
      co_await subscribe_all();
    } catch (const std::exception& e) {
      report(e);
    }
    for (auto& h : on_reconnect_) h(attempts);
  }

  event_loop* loop_;
  pubsub_options options_;
  std::shared_ptr<connection> client_;
  std::uint64_t notify_sub_ = 0, lost_sub_ = 0;
  std::map<std::string, channel_state, std::less<>> channels_;
  channel_emitter emitter_;
  std::shared_ptr<batch> open_batch_;
  std::vector<claim> claims_;
  bool claim_flush_scheduled_ = false;
  bool closing_ = false;
  std::vector<std::function<void()>> on_connect_, on_end_, on_close_;
  std::vector<std::function<void(std::size_t)>> on_reconnect_;
  std::vector<std::function<void(const std::exception&)>> on_error_;
  std::vector<std::function<void(std::string_view)>> on_listen_;
  std::vector<std::function<void(const std::vector<std::string>&)>> on_unlisten_;
  std::vector<std::function<void(std::string_view, std::string_view)>> on_notify_, on_message_;
  task<void> claim_pruner_;
  task<void> reconnector_;  // last: destroyed first
};

// ==== 8. graceful shutdown ==================================================
//
// Opt-in, never at include time. SIGINT, SIGTERM and SIGABRT are blocked in
// the calling thread (call it before starting threads, so they inherit the
// mask and the signals reach the signalfd) and read through the loop; on the
// first one every lock on the loop is released within
// PG_PUBSUB_SHUTDOWN_TIMEOUT ms (default 1000), so standbys elsewhere take
// over at once, then the process ends the way the signal would have ended
// it. A second signal during shutdown ends it at once.

namespace detail {

inline sigset_t shutdown_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGABRT);
  return set;
}

[[noreturn]] inline void die_by(int sig) {
  ::signal(sig, SIG_DFL);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
  ::raise(sig);
  ::_exit(128 + sig);  // only if the signal was somehow ignored
}

inline std::chrono::milliseconds shutdown_timeout() {
  const char* v = std::getenv("PG_PUBSUB_SHUTDOWN_TIMEOUT");
  long ms = (v && *v) ? std::strtol(v, nullptr, 10) : 1000;
  return std::chrono::milliseconds(ms >= 0 ? ms : 1000);  // 0: exit at once, as in the seed
}

inline int read_signal(int fd) {
  signalfd_siginfo info{};
  ssize_t n = ::read(fd, &info, sizeof info);
  return n == static_cast<ssize_t>(sizeof info) ? static_cast<int>(info.ssi_signo) : 0;
}

inline task<void> release_all_then_set(async_event& done) {
  try {
    co_await ip_lock::destroy_all();
  } catch (...) {
  }
  done.set();
}

inline task<void> die_on_second_signal(event_loop& loop, int fd) {
  for (;;) {
    co_await loop.poll(fd, POLLIN);
    if (int sig = read_signal(fd)) die_by(sig);
  }
}

inline task<void> await_shutdown_signal(event_loop& loop, int fd) {
  struct closer {  // the loop may end first: its signalfd goes with it
    int fd;
    ~closer() { ::close(fd); }
  } owned{fd};
  int sig = 0;
  while (!sig) {
    co_await loop.poll(fd, POLLIN);
    sig = read_signal(fd);
  }
  detail::log(loop.logger(), log_level::info,
              std::string("received ") + ::strsignal(sig) + ": releasing locks before exiting");
  loop.spawn(die_on_second_signal(loop, fd));
  async_event done(loop);
  auto deadline = std::make_shared<cancel_source>();
  loop.spawn(cancel_after(loop, deadline, shutdown_timeout()));
  loop.spawn(release_all_then_set(done));
  bool released = co_await done.wait(deadline.get());
  if (!released) {
    detail::log(loop.logger(), log_level::warn, "shutdown timeout: exiting with locks not released");
  }
  die_by(sig);
}

inline std::vector<std::uint64_t>& shutdown_loops() {
  static std::vector<std::uint64_t> serials;
  return serials;
}

}  // namespace detail

// Idempotent per loop. Throws std::system_error if the signalfd cannot be made.
inline void enable_graceful_shutdown(event_loop& loop) {
  auto& loops = detail::shutdown_loops();
  if (std::find(loops.begin(), loops.end(), loop.serial()) != loops.end()) return;
  sigset_t set = detail::shutdown_signals();
  if (int rc = ::pthread_sigmask(SIG_BLOCK, &set, nullptr); rc != 0) {
    throw std::system_error(rc, std::system_category(), "pgiplock: blocking the shutdown signals");
  }
  int fd = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::system_category(), "pgiplock: signalfd");
  loops.push_back(loop.serial());
  loop.spawn(detail::await_shutdown_signal(loop, fd));
}

}  // namespace pgiplock

#endif  // PGIPLOCK_HPP
