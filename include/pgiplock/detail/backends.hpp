// ==== detail: the kernel interfaces behind event_loop ========================
//
// Two ways to wait for sockets and time: io_uring, and epoll where io_uring
// is refused (the default seccomp profiles of Docker and Kubernetes,
// sysctl kernel.io_uring_disabled). Both report one completion per armed
// poll, so the loop above them cannot tell which one it runs on.
#pragma once

#include "../errors.hpp"

namespace pgiplock::detail {

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

}  // namespace pgiplock::detail
