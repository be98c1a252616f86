// ==== graceful shutdown =====================================================
//
// Opt-in, never at include time. SIGINT, SIGTERM and SIGABRT are blocked in
// the calling thread (call it before starting threads, so they inherit the
// mask and the signals reach the signalfd) and read through the loop; on the
// first one every lock on the loop is released within
// PG_PUBSUB_SHUTDOWN_TIMEOUT ms (default 1000), so standbys elsewhere take
// over at once, then the process ends the way the signal would have ended
// it. A second signal during shutdown ends it at once.
#pragma once

#include "ip_lock.hpp"

namespace pgiplock {

// Idempotent per loop (pubsub_options::handle_signals calls it too). Throws
// std::system_error if the signalfd cannot be made.
void enable_graceful_shutdown(event_loop& loop);

namespace detail {
// PG_PUBSUB_SHUTDOWN_TIMEOUT, read at each shutdown.
PGIPLOCK_INLINE std::chrono::milliseconds shutdown_timeout();
}  // namespace detail

// ---- implementation ---------------------------------------------------------

namespace detail {

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE sigset_t shutdown_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGABRT);
  return set;
}

[[noreturn]] PGIPLOCK_INLINE void die_by(int sig) {
  ::signal(sig, SIG_DFL);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
  ::raise(sig);
  ::_exit(128 + sig);  // only if the signal was somehow ignored
}

// 0: exit at once, as in the seed.
PGIPLOCK_INLINE std::chrono::milliseconds shutdown_timeout() {
  return env_milliseconds("PG_PUBSUB_SHUTDOWN_TIMEOUT", std::chrono::milliseconds(1000));
}

PGIPLOCK_INLINE int read_signal(int fd) {
  signalfd_siginfo info{};
  ssize_t n = ::read(fd, &info, sizeof info);
  return n == static_cast<ssize_t>(sizeof info) ? static_cast<int>(info.ssi_signo) : 0;
}

PGIPLOCK_INLINE task<void> release_all_then_set(async_event& done) {
  try {
    co_await ip_lock::destroy_all();
  } catch (...) {
  }
  done.set();
}

PGIPLOCK_INLINE task<void> die_on_second_signal(event_loop& loop, int fd) {
  for (;;) {
    co_await loop.poll(fd, POLLIN);
    if (int sig = read_signal(fd)) die_by(sig);
  }
}

PGIPLOCK_INLINE task<void> await_shutdown_signal(event_loop& loop, int fd) {
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
  loop.spawn(release_all_then_set(done));
  bool released = co_await done.wait_for(shutdown_timeout());
  if (!released) {
    detail::log(loop.logger(), log_level::warn, "shutdown timeout: exiting with locks not released");
  }
  die_by(sig);
}

PGIPLOCK_INLINE std::vector<std::uint64_t>& shutdown_loops() {
  static std::vector<std::uint64_t> serials;
  return serials;
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace detail

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE void enable_graceful_shutdown(event_loop& loop) {
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
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock
