// ==== task<T> ================================================================
//
// A lazy coroutine: nothing runs until it is awaited (or given to an
// event_loop). Move-only; destroying it destroys the coroutine frame.
// Symmetric transfer at the end, exceptions stored and rethrown at co_await.
#pragma once

#include "errors.hpp"

namespace pgiplock {

class event_loop;
namespace detail {
template <class T>
struct task_promise;
// Defined with event_loop: forgets a start that was posted but never ran.
void abandon_start(event_loop* loop, std::uint64_t op) noexcept;
}  // namespace detail

template <class T = void>
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
  friend class event_loop;  // starts and reads the frame
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

// ---- implementation ---------------------------------------------------------

namespace detail {

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

namespace detail {
template <class T>
task<T> task_promise<T>::get_return_object() noexcept {
  return task<T>{std::coroutine_handle<task_promise<T>>::from_promise(*this)};
}
#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE task<void> task_promise<void>::get_return_object() noexcept {
  return task<void>{std::coroutine_handle<task_promise<void>>::from_promise(*this)};
}
#endif  // PGIPLOCK_DEFINITIONS
}  // namespace detail

}  // namespace pgiplock
