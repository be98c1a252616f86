// failover_demo: three listeners share one channel; exactly one delivers.
//
// Runs the same fleet twice: first on a plain channel, then on a durable
// one (pubsub_options::durable). Each run starts three listener processes
// (A, B, C) and a publisher sending numbered messages, all on one channel;
// shows live who holds it; stops the holder with SIGTERM (graceful: it
// releases its lock), later kills the next holder with SIGKILL (a crash);
// then both runs side by side: takeover times, and the messages delivered
// once, delivered again, lost. About 15 seconds.
//
//   failover_demo DSN              (tools/demo builds it and starts a server)
//
// The plain run uses the `listener` and `publisher` examples that sit next
// to this program. The durable run uses this program itself in those two
// roles (`failover_demo --role=listener|publisher --durable ...`, the same
// code with durable = true): notify() journals every message, and a new
// holder replays from the journal whatever its predecessor had not
// acknowledged, so a crash loses nothing; a message the crashed holder had
// delivered but not yet acknowledged comes again, with the same id.
// Everything is read from the children's output lines ("HOLD <ms> ...",
// "MSG <ms> <n> [id=<id>]", "SENT <ms> <n>").
//
// Exit status: 0 when both runs went through (every takeover happened, the
// publisher finished) and the durable run lost nothing and gave no message
// two ids; 1 otherwise. The plain run may lose what was sent during the
// crash takeover: that is what durable channels are for.
#include "pgiplock.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace {

constexpr int rate = 100, count = 500, interval_ms = 500;  // 5 s of messages; standby retry every 500 ms
long long now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}
const long long t0 = now_ms();

// ---- the roles of the durable run (this program as listener / publisher) ----

void say(const char* word, std::string_view details) {
  std::printf("%s %lld %.*s\n", word, now_ms(), static_cast<int>(details.size()), details.data());
  std::fflush(stdout);
}

pgiplock::task<void> listen_role(pgiplock::pubsub& ps, std::string channel) {
  co_await ps.connect();
  auto c = ps.client();
  say("START", "pid=" + std::to_string(::getpid()) + " backend=" + std::to_string(c->backend_pid()));
  co_await ps.listen(channel);
  if (!ps.is_active(channel)) say("STANDBY", "waiting for " + channel);
}

// As examples/listener.cpp, on a durable channel; MSG lines carry the id.
int listener_role(const std::string& dsn, const std::string& channel, bool durable) {
  pgiplock::event_loop_options lo;
  lo.logger = [](pgiplock::log_level level, std::string_view m) {
    if (level == pgiplock::log_level::debug) return;
    say("LOG", std::string(level >= pgiplock::log_level::warn ? "warn: " : "info: ") + std::string(m));
  };
  pgiplock::event_loop loop(lo);
  pgiplock::pubsub_options o;
  o.conninfo = dsn;
  o.acquire_interval = std::chrono::milliseconds(interval_ms);
  o.handle_signals = true;  // SIGTERM: release the lock, then exit by that signal
  o.durable = durable;
  o.logger = lo.logger;
  pgiplock::pubsub ps(loop, o);
  ps.on_listen([](std::string_view ch) { say("HOLD", "now holding " + std::string(ch)); });
  ps.on_delivery([](const pgiplock::delivery& d) {
    say("MSG", std::string(d.payload) + (d.id ? " id=" + std::to_string(d.id) : std::string()));
  });
  ps.on_error([](const std::exception& e) { say("ERROR", e.what()); });
  try {
    loop.run(listen_role(ps, channel));
  } catch (const std::exception& e) {
    say("ERROR", e.what());
    return 1;
  }
  loop.run();  // until a signal ends the process
  return 0;
}

pgiplock::task<void> publish_role(pgiplock::event_loop& loop, pgiplock::pubsub& ps, std::string channel) {
  co_await ps.connect();
  auto period = std::chrono::nanoseconds(1'000'000'000 / rate);
  auto start = pgiplock::event_loop::clock::now();
  for (long n = 1; n <= count; ++n) {
    co_await loop.sleep_until(start + period * (n - 1));
    co_await ps.notify(channel, std::to_string(n));  // journaled and nudged in one transaction
    say("SENT", std::to_string(n));
  }
  say("DONE", "sent=" + std::to_string(count));
  co_await ps.close();
}

// As examples/publisher.cpp (message n's payload is n), on a durable channel.
int publisher_role(const std::string& dsn, const std::string& channel, bool durable) {
  pgiplock::event_loop loop;
  pgiplock::pubsub_options o;
  o.conninfo = dsn;
  o.durable = durable;
  pgiplock::pubsub ps(loop, o);
  try {
    loop.run(publish_role(loop, ps, channel));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "publisher: %s\n", e.what());
    return 1;
  }
  return 0;
}

// ---- the driver ----

struct child {
  std::string name;
  pid_t pid = -1;
  int out = -1, delivered = 0, status = -1;  // status: from waitpid, once it has exited
  std::string buf;
  bool ready = false;                        // it said HOLD or STANDBY
};

// One run of the fleet, and what it saw.
struct fleet_run {
  std::string kind;                 // "plain" or "durable"
  std::vector<child> kids = std::vector<child>(4);  // A, B, C, publisher
  child* holder = nullptr;
  long long signalled_at = 0, takeover_ms = -1;
  std::string signal_name;
  std::map<int, std::vector<long long>> got;  // message number -> the id of each delivery (0: plain)
  std::map<int, long long> sent_at;           // message number -> committed at
  std::vector<std::pair<int, long long>> crash_holder_got;  // after the SIGKILL: the new holder's (n, at)
  child* crash_holder = nullptr;
  long long crash_hold_at = 0;
  bool published = false;
  std::vector<std::string> timeline;
  long long next_status = 0;
  // The outcome.
  long long graceful = -1, crash = -1;
  int once = 0, again = 0, lost = 0, two_ids = 0;
  // Replayed: what the crash holder delivered that was committed before it
  // held the channel (what a plain channel loses, what the crashed holder
  // delivered but had not acknowledged).
  int caught_up = 0, caught_first = 0, caught_last = 0;
  bool ok = true;  // every step happened

  void note(long long at, const std::string& what) {
    char line[512];
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
    long long at = 0, id = 0;
    int n = 0, used = 0;
    if (std::sscanf(line.c_str(), "%15s %lld %n", word, &at, &used) < 2) return;
    std::string w = word, rest = line.substr(static_cast<std::size_t>(used));
    c.ready = c.ready || w == "HOLD" || w == "STANDBY";
    if (w == "HOLD") {
      holder = &c;
      std::string how;
      if (signalled_at && signal_name == "SIGKILL") crash_holder = &c, crash_hold_at = at;
      if (signalled_at) takeover_ms = at - std::exchange(signalled_at, 0);
      if (takeover_ms >= 0) how = ": takeover " + std::to_string(takeover_ms) + " ms after the " + signal_name;
      note(at, c.name + " holds the channel and delivers" + how);
    } else if (w == "MSG" && std::sscanf(rest.c_str(), "%d id=%lld", &n, &id) >= 1) {
      auto& ids = got[n];
      if (!ids.empty() && id != 0 && ids.size() == 1) {
        note(at, c.name + " delivers #" + std::to_string(n) + " again (id " + std::to_string(id) +
                     "): delivered before the crash, not yet acknowledged");
      }
      ids.push_back(id);
      ++c.delivered;
      if (&c == crash_holder) crash_holder_got.emplace_back(n, at);
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
  void pump_for(long long ms) {
    pump(ms, [] { return false; });
  }

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

  // The whole run: start, SIGTERM, SIGKILL, the end; then the tally.
  void run(const std::string& self, const std::string& dir, const std::string& dsn, const std::string& channel) {
    bool durable = kind == "durable";
    std::printf("\n==== %s run: 3 listener processes on %s channel \"%s\" ====\n", kind.c_str(),
                durable ? "durable" : "plain", channel.c_str());
    for (int i = 0; i < 3; ++i) {  // one at a time, so that A is the first holder
      kids[i].name = std::string(1, static_cast<char>('A' + i));
      std::string interval = "--acquire-interval=" + std::to_string(interval_ms);
      if (durable) spawn(kids[i], {self, "--role=listener", "--durable", dsn, channel});
      else spawn(kids[i], {dir + "/listener", interval, dsn, channel});
      if (!pump(10000, [&] { return kids[i].ready; })) {
        std::fprintf(stderr, "failover_demo: listener %s did not start\n", kids[i].name.c_str());
        ok = false;
        return;
      }
    }
    kids[3].name = "publisher";
    if (durable) spawn(kids[3], {self, "--role=publisher", "--durable", dsn, channel});
    else spawn(kids[3], {dir + "/publisher", "--rate=" + std::to_string(rate), "--count=" + std::to_string(count), dsn, channel});
    note(now_ms(), "publisher starts sending messages 1.." + std::to_string(count) + " (" + std::to_string(rate) +
                       " per second)");
    pump_for(1500);
    graceful = stop_holder(SIGTERM, "graceful stop: it releases its lock, then exits");
    pump_for(1500);
    crash = stop_holder(SIGKILL, "a crash: nothing is released");
    if (!pump(15000, [&] { return published; })) ok = false;
    pump_for(500);  // the last messages in flight
    note(now_ms(), "end of the " + kind + " run: SIGTERM to the listeners still running");
    for (auto& c : kids) if (c.status == -1) ::kill(c.pid, SIGTERM);
    pump(3000, [&] { return kids[0].status != -1 && kids[1].status != -1 && kids[2].status != -1; });
    for (auto& c : kids) if (c.status == -1) ::kill(c.pid, SIGKILL), ::waitpid(c.pid, nullptr, 0);
    for (auto& c : kids) if (c.out >= 0) ::close(std::exchange(c.out, -1));
    ok = ok && graceful >= 0 && crash >= 0 && static_cast<int>(sent_at.size()) == count;
    for (auto [n, at] : sent_at) {
      auto it = got.find(n);
      std::size_t k = it == got.end() ? 0 : it->second.size();
      once += k == 1, again += k > 1, lost += k == 0;
      if (k > 1 && std::set<long long>(it->second.begin(), it->second.end()).size() > 1) ++two_ids;
    }
    for (auto [n, at] : crash_holder_got) {
      auto sent = sent_at.find(n);
      if (sent == sent_at.end() || sent->second > crash_hold_at) continue;
      if (!caught_up++) caught_first = n;
      caught_last = n;
    }
  }

  // Runs of lost messages: first, last.
  void print_lost() {
    std::vector<std::pair<int, int>> gaps;
    for (auto [n, at] : sent_at) {
      if (got.count(n)) continue;
      if (!gaps.empty() && gaps.back().second == n - 1) gaps.back().second = n;
      else gaps.emplace_back(n, n);
    }
    for (auto [first, last] : gaps)
      std::printf("  %s run, lost: #%d%s, sent %.3f..%.3f s (while no one was listening)\n", kind.c_str(), first,
                  last == first ? "" : ("..#" + std::to_string(last)).c_str(), (sent_at[first] - t0) / 1000.0,
                  (sent_at[last] - t0) / 1000.0);
  }
};

std::string ms_or_dash(long long ms) { return ms >= 0 ? std::to_string(ms) : std::string("-"); }

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc >= 2 && std::string_view(argv[1]).starts_with("--role=")) {  // a child of the durable run
    std::string_view role = argv[1] + 7;
    bool durable = argc == 5 && std::string_view(argv[2]) == "--durable";
    if (argc != 5 && argc != 4) return std::fprintf(stderr, "usage: %s --role=ROLE [--durable] DSN CHANNEL\n", argv[0]), 2;
    std::string dsn = argv[argc - 2], channel = argv[argc - 1];
    if (role == "listener") return listener_role(dsn, channel, durable);
    if (role == "publisher") return publisher_role(dsn, channel, durable);
    return std::fprintf(stderr, "%s: unknown role %.*s\n", argv[0], static_cast<int>(role.size()), role.data()), 2;
  }
  if (argc != 2) return std::fprintf(stderr, "usage: %s DSN\n", argv[0]), 2;
  char self[4096] = "";
  ssize_t len = ::readlink("/proc/self/exe", self, sizeof self - 1);  // the examples sit next to it
  std::string exe(self, len > 0 ? static_cast<std::size_t>(len) : 0), dir = exe, dsn = argv[1];
  dir.erase(std::min(dir.size(), dir.rfind('/')));
  std::printf("pgiplock failover demo: 3 listener processes on one channel, a publisher sending %d numbered\n"
              "messages per second. Only the holder of the channel's lock delivers. The same fleet runs\n"
              "twice: on a plain channel, then on a durable one.\n",
              rate);

  fleet_run plain, durable;
  plain.kind = "plain";
  durable.kind = "durable";
  plain.run(exe, dir, dsn, "failover_demo_" + std::to_string(::getpid()));
  durable.run(exe, dir, dsn, "failover_demo_durable_" + std::to_string(::getpid()));

  for (fleet_run* r : {&plain, &durable}) {
    std::printf("\n==== %s run: timeline (seconds since start) ====\n", r->kind.c_str());
    for (auto& l : r->timeline) std::printf("%s\n", l.c_str());
  }
  std::printf("\n==== result ====\n"
              "                                          plain    durable\n"
              "  takeover after SIGTERM (graceful), ms  %7s    %7s\n"
              "  takeover after SIGKILL (crash), ms     %7s    %7s\n"
              "  messages sent                          %7zu    %7zu\n"
              "  delivered once                         %7d    %7d\n"
              "  redelivered (same id)                  %7s    %7d\n"
              "  replayed after the crash               %7s    %7d\n"
              "  delivered twice (plain)                %7d    %7s\n"
              "  lost                                   %7d    %7d\n",
              ms_or_dash(plain.graceful).c_str(), ms_or_dash(durable.graceful).c_str(),
              ms_or_dash(plain.crash).c_str(), ms_or_dash(durable.crash).c_str(), plain.sent_at.size(),
              durable.sent_at.size(), plain.once, durable.once, "-", durable.again, "-", durable.caught_up,
              plain.again, "-", plain.lost,
              durable.lost);
  plain.print_lost();
  durable.print_lost();
  if (durable.caught_up) {
    std::printf("  durable run, replayed: #%d..#%d by %s, from the journal, after the SIGKILL: sent before it held\n"
                "  the channel, after what the crashed holder had acknowledged\n",
                durable.caught_first, durable.caught_last, durable.crash_holder->name.c_str());
  }
  if (durable.two_ids) std::printf("  durable run: %d messages came again under another id\n", durable.two_ids);
  std::printf("\n  A takeover is the time from the signal to the new holder's HOLD line. A crash is noticed\n"
              "  at once: the standbys wait on the holder's member lock, which the server frees the moment\n"
              "  its connection drops. On the plain channel, what is sent in those milliseconds reaches no\n"
              "  one. On the durable one, the new holder replays the journal from the channel's cursor:\n"
              "  nothing is lost, and what the crashed holder delivered but had not yet acknowledged\n"
              "  (acknowledgements go every 5 ms) is delivered again, with the same id, so a handler can\n"
              "  skip it (or use on_delivery_in_transaction for exactly-once effects).\n\n");
  std::printf("  plain:   %zu sent, %d delivered once, %d delivered twice, %d lost\n", plain.sent_at.size(),
              plain.once, plain.again, plain.lost);
  std::printf("  durable: %zu sent, %d delivered (%d once, %d again with the same id), %d lost\n",
              durable.sent_at.size(), durable.once + durable.again, durable.once, durable.again, durable.lost);
  bool ok = plain.ok && durable.ok && durable.lost == 0 && durable.two_ids == 0;
  if (!ok) {
    std::printf("\n  FAILED:%s%s%s%s\n", plain.ok ? "" : " the plain run did not go through;",
                durable.ok ? "" : " the durable run did not go through;",
                durable.lost ? " the durable run lost messages;" : "",
                durable.two_ids ? " a durable message came under two ids;" : "");
  }
  return ok ? 0 : 1;
}
