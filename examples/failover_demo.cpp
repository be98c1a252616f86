// failover_demo: three listeners share one channel; exactly one delivers.
//
// Starts three `listener` processes (A, B, C) and a `publisher` sending
// numbered messages, all on one channel; shows live who holds it; stops the
// holder with SIGTERM (graceful: it releases its lock), later kills the next
// holder with SIGKILL (a crash), then prints a timeline with the takeover
// times and the messages lost or delivered twice. About 12 seconds.
//
//   failover_demo DSN              (tools/demo builds it and starts a server)
//
// It uses no pgiplock API itself: it runs the example programs that sit next
// to it and reads their output lines ("HOLD <ms> ...", "MSG <ms> <n>").
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int rate = 50, count = 500, interval_ms = 500;  // 10 s of messages; standby retry every 500 ms
long long now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}
const long long t0 = now_ms();

struct child {
  std::string name;
  pid_t pid = -1;
  int out = -1, delivered = 0, status = -1;  // status: from waitpid, once it has exited
  std::string buf;
  bool ready = false;                        // it said HOLD or STANDBY
};
std::vector<child> kids(4);  // A, B, C, publisher
child* holder = nullptr;
long long signalled_at = 0, takeover_ms = -1;
std::string signal_name;
std::map<int, int> got;             // message number -> times delivered
std::map<int, long long> sent_at;   // message number -> committed at
bool published = false;
std::vector<std::string> timeline;

void note(long long at, const std::string& what) {
  char line[256];
  std::snprintf(line, sizeof line, "  %6.3f s  %s", (at - t0) / 1000.0, what.c_str());
  timeline.push_back(line);
  std::printf("%s\n", line);
}

void spawn(child& c, std::vector<std::string> argv) {
  int p[2];
  if (::pipe(p) != 0 || (c.pid = ::fork()) < 0) std::exit((std::perror("failover_demo: pipe/fork"), 1));
  if (c.pid == 0) {
    ::dup2(p[1], 1);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(p[1]);
  c.out = p[0];
}

void on_line(child& c, const std::string& line) {
  char word[16] = "";
  long long at = 0;
  int n = 0, used = 0;
  if (std::sscanf(line.c_str(), "%15s %lld %n", word, &at, &used) < 2) return;
  std::string w = word, rest = line.substr(static_cast<std::size_t>(used));
  c.ready = c.ready || w == "HOLD" || w == "STANDBY";
  if (w == "HOLD") {
    holder = &c;
    std::string how;
    if (signalled_at) takeover_ms = at - std::exchange(signalled_at, 0);
    if (takeover_ms >= 0) how = ": takeover " + std::to_string(takeover_ms) + " ms after the " + signal_name;
    note(at, c.name + " holds the channel and delivers" + how);
  } else if (w == "MSG" && std::sscanf(rest.c_str(), "%d", &n) == 1) {
    ++got[n];
    ++c.delivered;
  } else if (w == "SENT" && std::sscanf(rest.c_str(), "%d", &n) == 1) {
    sent_at[n] = at;
  } else if (w == "DONE") {
    published = true;
    note(at, "publisher done, " + rest);
  } else if (w == "STANDBY" || w == "ERROR" || (w == "LOG" && rest.find("releas") != std::string::npos)) {
    note(at, c.name + ": " + rest);
  }
}

// Reads the children's output for up to `ms` milliseconds, or until `done()`.
long long next_status = 0;
template <class Done>
bool pump(long long ms, Done done) {
  for (long long until = now_ms() + ms; !done();) {
    if (now_ms() >= until) return false;
    std::vector<pollfd> fds;
    for (auto& c : kids) fds.push_back({c.out, POLLIN, 0});
    ::poll(fds.data(), fds.size(), 20);
    for (std::size_t i = 0; i < kids.size(); ++i) {
      child& c = kids[i];
      char b[4096];
      ssize_t r = (fds[i].revents && c.out >= 0) ? ::read(c.out, b, sizeof b) : -1;
      if (r > 0) c.buf.append(b, static_cast<std::size_t>(r));
      if (r == 0) ::close(std::exchange(c.out, -1));  // end of its output
      for (std::size_t nl; (nl = c.buf.find('\n')) != std::string::npos; c.buf.erase(0, nl + 1))
        on_line(c, c.buf.substr(0, nl));
      int st = 0;
      if (c.status == -1 && ::waitpid(c.pid, &st, WNOHANG) == c.pid) c.status = st;
    }
    if (!sent_at.empty() && !published && now_ms() >= next_status) {
      next_status = now_ms() + 1000;
      std::printf("  %6.3f s      [holder %s | sent %zu | delivered by A %d, B %d, C %d]\n",
                  (now_ms() - t0) / 1000.0, holder ? holder->name.c_str() : "-", sent_at.size(),
                  kids[0].delivered, kids[1].delivered, kids[2].delivered);
    }
  }
  return true;
}
bool never() { return false; }

// Signals the holder; returns the takeover time in ms, or -1.
long long stop_holder(int sig, const std::string& why) {
  child* old = holder;
  signal_name = std::string("SIG") + ::sigabbrev_np(sig);
  takeover_ms = -1;
  note(signalled_at = now_ms(), signal_name + " -> " + old->name + " (" + why + ")");
  ::kill(old->pid, sig);
  if (!pump(5000, [&] { return holder != old; })) return -1;
  pump(3000, [&] { return old->status != -1; });
  if (WIFSIGNALED(old->status)) note(now_ms(), old->name + " exited: killed by SIG" + ::sigabbrev_np(WTERMSIG(old->status)));
  return takeover_ms;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return std::fprintf(stderr, "usage: %s DSN\n", argv[0]), 2;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  char self[4096] = "";
  ssize_t len = ::readlink("/proc/self/exe", self, sizeof self - 1);  // the examples sit next to it
  std::string dir(self, len > 0 ? static_cast<std::size_t>(len) : 0), dsn = argv[1];
  dir.erase(std::min(dir.size(), dir.rfind('/')));
  std::string channel = "failover_demo_" + std::to_string(::getpid());
  std::printf("pgiplock failover demo: 3 listener processes on channel \"%s\", a publisher sending %d\n"
              "numbered messages per second. Only the holder of the channel's lock delivers.\n\n",
              channel.c_str(), rate);
  for (int i = 0; i < 3; ++i) {  // one at a time, so that A is the first holder
    kids[i].name = std::string(1, static_cast<char>('A' + i));
    spawn(kids[i], {dir + "/listener", "--acquire-interval=" + std::to_string(interval_ms), dsn, channel});
    if (!pump(10000, [&] { return kids[i].ready; })) return std::fprintf(stderr, "listener did not start\n"), 1;
  }
  kids[3].name = "publisher";
  spawn(kids[3], {dir + "/publisher", "--rate=" + std::to_string(rate), "--count=" + std::to_string(count), dsn, channel});
  note(now_ms(), "publisher starts sending messages 1.." + std::to_string(count));
  pump(3000, never);
  long long graceful = stop_holder(SIGTERM, "graceful stop: it releases its lock, then exits");
  pump(2500, never);
  long long crash = stop_holder(SIGKILL, "a crash: nothing is released");
  pump(15000, [] { return published; });
  pump(500, never);  // the last messages in flight
  note(now_ms(), "end of the demo: SIGTERM to the listeners still running");
  for (auto& c : kids) if (c.status == -1) ::kill(c.pid, SIGTERM);
  pump(3000, [] { return kids[0].status != -1 && kids[1].status != -1 && kids[2].status != -1; });
  for (auto& c : kids) if (c.status == -1) ::kill(c.pid, SIGKILL), ::waitpid(c.pid, nullptr, 0);

  std::printf("\n==== timeline (seconds since start) ====\n");
  for (auto& l : timeline) std::printf("%s\n", l.c_str());
  int once = 0, lost = 0, twice = 0;
  std::vector<std::pair<int, int>> gaps;  // runs of lost messages: first, last
  for (auto [n, at] : sent_at) {
    int k = got.count(n) ? got[n] : 0;
    once += k == 1, twice += k > 1, lost += k == 0;
    if (k == 0 && !gaps.empty() && gaps.back().second == n - 1) gaps.back().second = n;
    else if (k == 0) gaps.emplace_back(n, n);
  }
  std::printf("\n==== result ====\n"
              "  takeover after SIGTERM (graceful release):  %lld ms\n"
              "  takeover after SIGKILL (crash):             %lld ms\n"
              "  messages: %zu sent, %d delivered once, %d lost, %d delivered twice\n",
              graceful, crash, sent_at.size(), once, lost, twice);
  for (auto [first, last] : gaps)
    std::printf("  lost: #%d%s, sent %.3f..%.3f s (while no one was listening)\n", first,
                last == first ? "" : ("..#" + std::to_string(last)).c_str(), (sent_at[first] - t0) / 1000.0,
                (sent_at[last] - t0) / 1000.0);
  if (crash > interval_ms / 2)
    std::printf("\n  A crash is noticed by the standbys' retry timer (every %d ms here, 30 s by default),\n"
                "  so messages sent in that gap reach no one. Crash takeover in milliseconds (standbys\n"
                "  waiting on the holder's advisory lock) is coming in the library.\n", interval_ms);
  else
    std::printf("\n  The crash was noticed at once: the standbys wait on the holder's advisory lock,\n"
                "  which the server frees the moment the holder's connection drops.\n");
  return graceful >= 0 && crash >= 0 ? 0 : 1;
}
