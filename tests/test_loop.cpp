// event_loop: timers, fd readiness, cancellation, stop, spawn — on the
// backend named by PGIPLOCK_BACKEND (meson runs this program once per backend).
#include "support.hpp"

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <cstddef>
#include <random>

extern const bool test_needs_database = false;

using namespace test;
using pgiplock::cancel_source;

namespace {

struct pipe_fds {
  int r = -1, w = -1;
  pipe_fds() {
    int fds[2];
    REQUIRE(::pipe2(fds, O_NONBLOCK | O_CLOEXEC) == 0);
    r = fds[0];
    w = fds[1];
  }
  ~pipe_fds() {
    ::close(r);
    ::close(w);
  }
};

task<void> sleeper(event_loop& loop, clock::time_point when, int index, std::vector<int>& order) {
  co_await loop.sleep_until(when);
  order.push_back(index);
}

task<void> spawn_timers(event_loop& loop, std::vector<clock::time_point>& when, std::vector<int>& order) {
  for (int i = 0; i < static_cast<int>(when.size()); ++i) loop.spawn(sleeper(loop, when[i], i, order));
  co_await wait_until(loop, [&] { return order.size() == when.size(); }, 10s);
}

task<pgiplock::poll_result> poll_read(event_loop& loop, int fd, cancel_source* cancel) {
  co_return co_await loop.poll(fd, POLLIN, std::nullopt, cancel);
}

task<void> cancel_after(event_loop& loop, cancel_source& cancel, std::chrono::milliseconds d) {
  co_await loop.sleep(d);
  cancel.cancel();
}

task<bool> cancelled_read_then_data(event_loop& loop, pipe_fds& p) {
  cancel_source cancel;
  loop.spawn(cancel_after(loop, cancel, 20ms));
  auto t0 = clock::now();
  auto r = co_await poll_read(loop, p.r, &cancel);
  REQUIRE(r.cancelled);
  CHECK_FALSE(r.timed_out);
  CHECK(r.revents == 0);
  CHECK(ms_since(t0) >= 15);
  // The cancelled poll must be gone: a new one sees new data.
  REQUIRE(::write(p.w, "x", 1) == 1);
  auto r2 = co_await loop.poll(p.r, POLLIN, clock::now() + 2s);
  co_return (r2.revents & POLLIN) != 0;
}

task<void> stop_soon(event_loop& loop, int& after) {
  co_await loop.sleep(5ms);
  loop.stop();
  ++after;  // stop() returns; the task finishes this step
}

task<void> forever(event_loop& loop) {
  for (;;) co_await loop.sleep(1h);
}

task<void> throws_later(event_loop& loop) {
  co_await loop.sleep(1ms);
  throw std::runtime_error("spawned failure");
}

task<void> hold_and_poll(event_loop& loop, int fd, std::shared_ptr<int> keep) {
  co_await loop.poll(fd, POLLIN);
  ++*keep;
}

task<void> loop_sleep(event_loop& loop, std::chrono::milliseconds d) { co_await loop.sleep(d); }

task<int> loop_value(event_loop& loop) {
  co_await loop.sleep(1ms);
  co_await loop.yield();
  co_return 9;
}

task<int> survives_failing_spawn(event_loop& loop) {
  loop.spawn(throws_later(loop));
  co_await loop.sleep(20ms);
  co_return 5;
}

}  // namespace

TEST_CASE("10,000 timers fire in deadline order", "[loop]") {
  event_loop loop;
  std::mt19937 rng(12345);
  std::vector<clock::time_point> when(10000);
  auto base = clock::now() + 20ms;
  for (auto& w : when) w = base + std::chrono::microseconds(rng() % 300000);
  std::vector<int> order;
  loop.run(spawn_timers(loop, when, order));
  REQUIRE(order.size() == when.size());
  bool sorted = true;
  for (std::size_t i = 1; i < order.size(); ++i) {
    if (when[static_cast<std::size_t>(order[i])] < when[static_cast<std::size_t>(order[i - 1])]) sorted = false;
  }
  CHECK(sorted);
}

TEST_CASE("a sleep lasts at least its duration", "[loop]") {
  event_loop loop;
  auto t0 = clock::now();
  loop.run([](event_loop& l) -> task<void> { co_await l.sleep(30ms); }(loop));
  CHECK(ms_since(t0) >= 30);
}

TEST_CASE("cancelling a pending read on a pipe resumes it as cancelled", "[loop]") {
  event_loop loop;
  pipe_fds p;
  CHECK(loop.run(cancelled_read_then_data(loop, p)));
}

TEST_CASE("a poll with a deadline times out", "[loop]") {
  event_loop loop;
  pipe_fds p;
  auto t0 = clock::now();
  auto r = loop.run([](event_loop& l, int fd) -> task<pgiplock::poll_result> {
    co_return co_await l.poll(fd, POLLIN, clock::now() + 30ms);
  }(loop, p.r));
  CHECK(r.timed_out);
  CHECK(ms_since(t0) >= 30);
  CHECK(ms_since(t0) < 1000);
}

TEST_CASE("stop() from inside a task ends run()", "[loop]") {
  event_loop loop;
  int after = 0;
  loop.spawn(stop_soon(loop, after));
  loop.spawn(forever(loop));
  loop.run();  // returns only because of stop()
  CHECK(after == 1);
  CHECK(loop.stopped());

  // run(task) that is stopped first says so instead of returning garbage.
  loop.spawn(stop_soon(loop, after));
  CHECK_THROWS_AS(loop.run(forever(loop)), pgiplock::error);
}

TEST_CASE("a failing spawned task is logged and the loop goes on", "[loop]") {
  std::vector<std::string> logged;
  pgiplock::event_loop_options opt;
  opt.logger = [&](pgiplock::log_level, std::string_view m) { logged.emplace_back(m); };
  event_loop loop(opt);
  CHECK(loop.run(survives_failing_spawn(loop)) == 5);
  bool found = false;
  for (auto& m : logged) found = found || m.find("spawned failure") != std::string::npos;
  CHECK(found);
}

TEST_CASE("destroying a loop with suspended tasks destroys their frames", "[loop]") {
  pipe_fds p;
  auto alive = std::make_shared<int>(0);
  {
    event_loop loop;
    loop.spawn(hold_and_poll(loop, p.r, alive));
    loop.spawn(hold_and_poll(loop, p.r, alive));
    loop.run(loop_sleep(loop, 5ms));
    CHECK(alive.use_count() == 3);  // both frames suspended, holding a copy
  }
  CHECK(alive.use_count() == 1);
}

// Docker's and Kubernetes' default seccomp profiles refuse io_uring_setup;
// a child process installs the same kind of filter.
TEST_CASE("where io_uring is refused the loop falls back to epoll; forcing io_uring throws why", "[loop][backend]") {
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::unsetenv("PGIPLOCK_BACKEND");
    sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    sock_fprog prog{static_cast<unsigned short>(sizeof filter / sizeof filter[0]), filter};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) ::_exit(10);
    if (::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) ::_exit(11);
    int warnings = 0;
    pgiplock::event_loop_options opt;
    opt.logger = [&](pgiplock::log_level lvl, std::string_view m) {
      if (lvl == pgiplock::log_level::warn && m.find("io_uring") != std::string_view::npos) ++warnings;
    };
    {
      event_loop loop(opt);
      if (std::string(loop.backend_name()) != "epoll") ::_exit(12);
      if (warnings != 1) ::_exit(13);
      if (loop.run(loop_value(loop)) != 9) ::_exit(14);
    }
    opt.backend = pgiplock::backend_kind::io_uring;
    try {
      event_loop forced(opt);
      ::_exit(15);
    } catch (const std::system_error& e) {
      if (std::string(e.what()).find("io_uring") == std::string::npos) ::_exit(16);
      if (e.code().value() != EPERM) ::_exit(17);
    }
    ::_exit(0);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("PGIPLOCK_BACKEND picks the backend; a bad value is named", "[loop][backend]") {
  std::string want = env_or("PGIPLOCK_BACKEND", "io_uring");
  event_loop loop;
  CHECK(std::string(loop.backend_name()) == want);
  std::string saved = want;
  ::setenv("PGIPLOCK_BACKEND", "kqueue", 1);
  CHECK_THROWS_WITH(event_loop(), Catch::Contains("kqueue"));
  ::setenv("PGIPLOCK_BACKEND", saved.c_str(), 1);
}
