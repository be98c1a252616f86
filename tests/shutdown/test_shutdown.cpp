// Graceful shutdown (design section 5): a child process holding a channel
// gets SIGTERM, SIGINT or SIGABRT; a standby here must hold the channel
// within 50 ms and the child must end by that signal within
// PG_PUBSUB_SHUTDOWN_TIMEOUT. A child whose release cannot complete (its
// backend is paused with SIGSTOP) still ends in time. Without
// enable_graceful_shutdown nothing about signals changes.
#include "../child_process.hpp"

#include <sys/wait.h>

#include <sstream>

extern const bool test_needs_database = true;

using namespace test;
using pgiplock::ip_lock;

namespace {

std::string lock_holder_path() {
  char self[4096] = "";
  ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  std::string dir(self, n > 0 ? static_cast<std::size_t>(n) : 0);
  return dir.substr(0, dir.rfind('/')) + "/lock_holder";
}

std::vector<std::string> words(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) return std::string("killed by SIG") + ::sigabbrev_np(WTERMSIG(status));
  if (WIFEXITED(status)) return "exit code " + std::to_string(WEXITSTATUS(status));
  return "status " + std::to_string(status);
}

// A standby in this process: its own connection and lock on `ch`.
struct standby {
  conn_ptr conn;
  std::unique_ptr<ip_lock> lock;
};
task<standby> make_standby(event_loop& loop, std::string ch, std::chrono::milliseconds interval) {
  standby s;
  s.conn = co_await open(loop);
  s.lock = std::make_unique<ip_lock>(ch, lock_opts(s.conn, interval));
  co_await s.lock->init();
  co_return s;
}

task<void> close_standby(standby& s) {
  co_await s.lock->destroy();
  co_await s.conn->close();
}

struct signal_result {
  bool standby_before = true, standby_after = false, exited = false;
  double standby_ms = -1, exit_ms = -1;
  int status = 0;
  std::string transcript;
};

task<signal_result> signal_holder(event_loop& loop, int sig) {
  signal_result out;
  std::string ch = fresh_channel("shutdown");
  child_process holder(std::vector<std::string>{lock_holder_path(), dsn(), ch},
                       std::vector<std::string>{"PG_PUBSUB_SHUTDOWN_TIMEOUT=1000"});
  auto held = co_await holder.expect(loop, "HOLD", 10s);
  out.transcript = holder.transcript();
  REQUIRE(held);
  auto s = co_await make_standby(loop, ch, 30s);  // 30 s: only the release event can hand over in time
  out.standby_before = co_await s.lock->acquire();
  auto t0 = clock::now();
  holder.signal(sig);
  out.standby_after = co_await wait_until(loop, [&] { return s.lock->is_acquired(); }, 2s);
  out.standby_ms = ms_since(t0);
  auto status = co_await holder.wait_exit(loop, 3s);
  out.exit_ms = ms_since(t0);
  out.exited = status.has_value();
  out.status = status.value_or(0);
  co_await close_standby(s);
  co_return out;
}

void check_signal(int sig) {
  event_loop loop;
  auto r = loop.run(signal_holder(loop, sig));
  WARN("SIG" << ::sigabbrev_np(sig) << ": standby holds after " << r.standby_ms << " ms, child gone after "
             << r.exit_ms << " ms");
  INFO("child said:\n" << r.transcript);
  INFO("standby holds " << r.standby_ms << " ms after SIG" << ::sigabbrev_np(sig) << "; child gone after "
                        << r.exit_ms << " ms, " << describe(r.status));
  CHECK_FALSE(r.standby_before);
  CHECK(r.standby_after);
  CHECK(r.standby_ms < 50);
  REQUIRE(r.exited);
  CHECK(WIFSIGNALED(r.status));
  CHECK(WTERMSIG(r.status) == sig);
  CHECK(r.exit_ms < 1000);
}

// Resumes a paused backend on every path out of the test.
struct resume_on_exit {
  pid_t pid = 0;
  ~resume_on_exit() { resume(); }
  void resume() {
    if (pid > 0) ::kill(pid, SIGCONT);
    pid = 0;
  }
};

char process_state(pid_t pid) {
  std::string stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  auto paren = stat.rfind(')');
  return paren == std::string::npos || paren + 2 >= stat.size() ? '?' : stat[paren + 2];
}

struct paused_result {
  int backend_from_activity = 0, backend_from_child = 0;
  bool paused = false, standby_while_paused = true, exited = false, standby_after_resume = false;
  double exit_ms = -1;
  int status = 0;
  std::string transcript;
};

task<paused_result> paused_backend(event_loop& loop) {
  paused_result out;
  std::string ch = fresh_channel("paused");
  child_process holder(std::vector<std::string>{lock_holder_path(), dsn(), ch},
                       std::vector<std::string>{"PG_PUBSUB_SHUTDOWN_TIMEOUT=500"});
  auto held = co_await holder.expect(loop, "HOLD", 10s);
  out.transcript = holder.transcript();
  REQUIRE(held);
  auto w = words(*held);  // HOLD <application_name> <backend pid>
  REQUIRE(w.size() == 3);
  out.backend_from_child = std::stoi(w[2]);
  auto s = co_await make_standby(loop, ch, 200ms);
  auto r = co_await s.conn->query("SELECT pid FROM pg_stat_activity WHERE application_name = $1", w[1]);
  REQUIRE(r.rows() == 1);
  out.backend_from_activity = std::stoi(std::string(r.get(0, 0)));
  resume_on_exit guard;
  REQUIRE(::kill(out.backend_from_activity, SIGSTOP) == 0);
  guard.pid = out.backend_from_activity;
  pid_t backend = out.backend_from_activity;
  out.paused = co_await wait_until(loop, [&] { return process_state(backend) == 'T'; }, 2s);
  auto t0 = clock::now();
  holder.signal(SIGTERM);
  auto status = co_await holder.wait_exit(loop, 3s);
  out.exit_ms = ms_since(t0);
  out.exited = status.has_value();
  out.status = status.value_or(0);
  out.standby_while_paused = s.lock->is_acquired();
  guard.resume();
  // The session ends once its backend runs again and finds the socket
  // closed; the standby's retry (every 200 ms) then takes the channel.
  out.standby_after_resume = co_await wait_until(loop, [&] { return s.lock->is_acquired(); }, 3s);
  co_await close_standby(s);
  co_return out;
}

std::uint64_t bits(const std::string& hex) { return std::stoull(hex, nullptr, 16); }
std::uint64_t bit(int sig) { return std::uint64_t{1} << (sig - 1); }

// This process's signal mask, dispositions and signalfds, as text.
std::string signal_state() {
  std::ostringstream out;
  sigset_t mask;
  ::pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  for (int sig = 1; sig < NSIG; ++sig) {
    struct sigaction sa {};
    int rc = ::sigaction(sig, nullptr, &sa);
    out << sig << ':' << ::sigismember(&mask, sig) << ',' << rc << ','
        << reinterpret_cast<void*>(sa.sa_handler) << ',' << sa.sa_flags << ' ';
  }
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (dirent* e = ::readdir(d)) {
      char target[256] = "";
      std::string path = std::string("/proc/self/fd/") + e->d_name;
      if (::readlink(path.c_str(), target, sizeof target - 1) > 0 && std::string(target).find("signalfd") !=
                                                                         std::string::npos) {
        out << " signalfd";
      }
    }
    ::closedir(d);
  }
  return out.str();
}

struct no_signals_result {
  std::vector<std::string> before, during;
  std::string here_before, here_during, transcript;
  bool exited = false;
  int status = 0;
};

task<no_signals_result> without_graceful_shutdown(event_loop& loop) {
  no_signals_result out;
  std::string ch = fresh_channel("nosig");
  child_process holder(std::vector<std::string>{lock_holder_path(), dsn(), ch, "--no-signals"});
  auto first = co_await holder.expect(loop, "SIG", 10s);
  auto second = co_await holder.expect(loop, "SIG", 10s);
  auto held = co_await holder.expect(loop, "HOLD", 10s);
  out.transcript = holder.transcript();
  REQUIRE(first);
  REQUIRE(second);
  REQUIRE(held);
  out.before = words(*first);
  out.during = words(*second);
  // This process too: a pubsub and an ip_lock, without graceful shutdown.
  out.here_before = signal_state();
  pgiplock::pubsub ps(loop, pubsub_opts());
  co_await ps.connect();
  co_await ps.listen(ch + "_here");
  auto s = co_await make_standby(loop, ch, 30s);
  bool won = co_await s.lock->acquire();
  CHECK_FALSE(won);
  out.here_during = signal_state();
  // SIGTERM takes its default action: the child ends at once.
  holder.signal(SIGTERM);
  auto status = co_await holder.wait_exit(loop, 3s);
  out.exited = status.has_value();
  out.status = status.value_or(0);
  co_await close_standby(s);
  co_await ps.destroy();
  co_return out;
}

}  // namespace

TEST_CASE("SIGTERM: the holder releases, a standby holds within 50 ms, the child ends by SIGTERM", "[shutdown]") {
  check_signal(SIGTERM);
}

TEST_CASE("SIGINT: the holder releases, a standby holds within 50 ms, the child ends by SIGINT", "[shutdown]") {
  check_signal(SIGINT);
}

TEST_CASE("SIGABRT: the holder releases, a standby holds within 50 ms, the child ends by SIGABRT", "[shutdown]") {
  check_signal(SIGABRT);
}

TEST_CASE("a release that cannot complete (backend paused by SIGSTOP) still ends the child by the signal in time",
          "[shutdown]") {
  event_loop loop;
  auto r = loop.run(paused_backend(loop));
  WARN("paused backend: child gone " << r.exit_ms << " ms after SIGTERM (timeout 500 ms)");
  INFO("child said:\n" << r.transcript);
  INFO("child gone " << r.exit_ms << " ms after SIGTERM (timeout 500 ms), " << describe(r.status));
  CHECK(r.backend_from_activity == r.backend_from_child);
  CHECK(r.paused);
  REQUIRE(r.exited);
  CHECK(WIFSIGNALED(r.status));
  CHECK(WTERMSIG(r.status) == SIGTERM);
  CHECK(r.exit_ms >= 450);        // it did wait for the release...
  CHECK(r.exit_ms < 500 + 250);   // ...but no longer than the timeout (plus process exit)
  CHECK_FALSE(r.standby_while_paused);
  CHECK(r.standby_after_resume);
}

TEST_CASE("without enable_graceful_shutdown the library changes no signal mask, disposition or fd", "[shutdown]") {
  event_loop loop;
  auto r = loop.run(without_graceful_shutdown(loop));
  INFO("child said:\n" << r.transcript);
  REQUIRE(r.before.size() == 4);
  REQUIRE(r.during.size() == 4);
  CHECK(r.before == r.during);
  for (std::size_t i = 1; i < 4; ++i) {
    for (int sig : {SIGINT, SIGTERM, SIGABRT}) {
      INFO("mask " << r.during[0] << " " << r.during[i] << ", signal " << sig);
      CHECK((bits(r.during[i]) & bit(sig)) == 0);
    }
  }
  CHECK(r.here_before == r.here_during);
  CHECK(r.here_during.find("signalfd") == std::string::npos);
  REQUIRE(r.exited);
  CHECK(WIFSIGNALED(r.status));
  CHECK(WTERMSIG(r.status) == SIGTERM);
}
