// The silent partition: the holder's packets are dropped, no FIN, no RST.
// A user-space proxy cannot fake this (its kernel still answers
// keepalives), so the holder runs in a network namespace of its own, joined
// to this one by a veth pair, and an nftables table inside that namespace
// drops everything but loopback. The test builds all of it per run, with
// its own names and addresses, and removes it whatever happens.
//
// Targets (the failover issue): the holder demotes itself (is_active()
// false, on_error) within liveness_timeout of the drop; a standby delivers
// within liveness_timeout + 2 s; tenures never overlap; nothing twice.
// Messages sent while nobody delivers are lost by design: not asserted.
// On a durable channel (the second test case) they are not: every message
// whose notify() returned is delivered, by the standby, from the journal.
//
// Needs root, `ip` (iproute2) and `nft` (nftables), and a server that
// accepts TCP from 10.213.0.0/16 on the veth's host-side address (tools/check
// sets that up, see tools/lib/common.sh); otherwise it skips (77) and says why.
#include "fleet.hpp"
#include "../system.hpp"

#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <sstream>
#include <string>

extern const bool test_needs_database = true;

using namespace test;

namespace {

constexpr auto liveness = 3000ms;
constexpr int runs_wanted = 7;
constexpr int durable_runs_wanted = 2;

// One run's namespace "pgipl-<pid>-<run>" with veth "pgph<pid>x<run>" (host
// side) / "pgpn<pid>x<run>" (inside; at most 15 characters each, as the
// kernel wants), a /30 of 10.213.0.0/16 that no interface here uses yet, and
// the table inet pgiplock_partition that passes everything until partition().
// Deleting the namespace takes its veth end and its table with it; the host
// end is deleted explicitly, since the namespace lingers while a process
// still runs in it.
class test_network {
 public:
  explicit test_network(int run) {
    ip_ = find_tool("ip");
    nft_ = find_tool("nft");
    std::string id = std::to_string(::getpid()) + "x" + std::to_string(run);
    name_ = "pgipl-" + std::to_string(::getpid()) + "-" + std::to_string(run);
    host_if_ = "pgph" + id;
    ns_if_ = "pgpn" + id;
    if (!step(ip_ + " netns add " + name_)) return;
    created_ = true;
    if (!step(ip_ + " link add " + host_if_ + " type veth peer name " + ns_if_ + " netns " + name_)) return;
    if (!pick_addresses(run)) return;
    if (!step(ip_ + " link set " + host_if_ + " up")) return;
    if (!step(ip_ + " -n " + name_ + " addr add " + ns_addr_ + "/30 dev " + ns_if_)) return;
    if (!step(ip_ + " -n " + name_ + " link set " + ns_if_ + " up")) return;
    if (!step(ip_ + " -n " + name_ + " link set lo up")) return;
    step(in_namespace(nft_) + " " +
         shell_quote("add table inet pgiplock_partition; "
                     "add chain inet pgiplock_partition input { type filter hook input priority 0; policy accept; }; "
                     "add chain inet pgiplock_partition output { type filter hook output priority 0; policy accept; }; "
                     "add rule inet pgiplock_partition input iif lo accept; "
                     "add rule inet pgiplock_partition output oif lo accept"));
  }
  test_network(const test_network&) = delete;
  test_network& operator=(const test_network&) = delete;
  ~test_network() {
    if (!created_) return;
    run_command(ip_ + " link del " + host_if_);
    run_command(ip_ + " netns del " + name_);
  }

  // Empty when the network is up.
  const std::string& failure() const { return failure_; }
  const std::string& name() const { return name_; }
  const std::string& host_addr() const { return host_addr_; }

  // The command prefix that runs a program inside the namespace.
  std::vector<std::string> exec_prefix() const { return {ip_, "netns", "exec", name_}; }

  // Drops every packet in and out of the namespace but loopback's, from
  // now on: both rules in one nft transaction.
  bool partition() {
    return step(in_namespace(nft_) + " " +
                shell_quote("add rule inet pgiplock_partition input drop; "
                            "add rule inet pgiplock_partition output drop"));
  }

  // The test server's conninfo, aimed at the host side of the veth.
  std::string conninfo() const {
    std::vector<std::pair<std::string, std::string>> add{{"host", host_addr_}};
    std::string port = env_or("PGIPLOCK_TEST_PORT");
    if (port.empty()) port = conninfo_field(dsn(), "port").value_or("");
    if (!port.empty()) add.emplace_back("port", port);
    return conninfo_with(dsn(), {"host", "hostaddr", "port"}, add);
  }

 private:
  std::string in_namespace(const std::string& program) const { return ip_ + " netns exec " + name_ + " " + program; }

  bool step(const std::string& cmd) {
    auto r = run_command(cmd);
    if (!r.ok()) failure_ = "`" + cmd + "` failed (" + std::to_string(r.status) + "): " + r.output;
    return r.ok();
  }

  // A /30 derived from the pid and the run, skipping any that an interface
  // here already has an address in (another test's, or a real network's).
  bool pick_addresses(int run) {
    for (int attempt = 0; attempt < 64; ++attempt) {
      int s = (static_cast<int>(::getpid()) * 16 + run + attempt * 977) % 16384;
      std::string net = "10.213." + std::to_string(s / 64) + ".";
      int base = (s % 64) * 4;
      auto used = run_command(ip_ + " -o addr show to " + net + std::to_string(base) + "/30");
      if (!used.ok() || !used.output.empty()) continue;
      host_addr_ = net + std::to_string(base + 1);
      ns_addr_ = net + std::to_string(base + 2);
      return step(ip_ + " addr add " + host_addr_ + "/30 dev " + host_if_);
    }
    failure_ = "no free /30 in 10.213.0.0/16";
    return false;
  }

  std::string ip_, nft_;
  std::string name_, host_if_, ns_if_, host_addr_, ns_addr_;
  std::string failure_;
  bool created_ = false;
};

// A run killed outright (a meson timeout, SIGKILL) leaves its namespace and
// veth behind: remove those whose test process is gone before building ours.
void remove_stale_networks() {
  std::string ip = find_tool("ip");
  auto list = run_command(ip + " netns list");
  std::istringstream in(list.output);
  std::string line;
  while (std::getline(in, line)) {
    int pid = 0, run = 0;
    char tail = 0;
    if (std::sscanf(line.c_str(), "pgipl-%d-%d%c", &pid, &run, &tail) < 2 || pid <= 0) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // its test still runs
    run_command(ip + " link del pgph" + std::to_string(pid) + "x" + std::to_string(run));
    run_command(ip + " netns del pgipl-" + std::to_string(pid) + "-" + std::to_string(run));
  }
}

struct run_result {
  double demote_ms = -1;    // the drop .. the holder's LOSE (is_active() false)
  double error_ms = -1;     // the drop .. the holder's first on_error
  double takeover_ms = -1;  // the drop .. a standby's first delivery
  double gap_ms = 0;        // LOSE .. the standby's first delivery: > 0, no overlap
  long late_by_old = 0;     // deliveries by the old holder after its LOSE
  long lost = 0, duplicated = 0;
  int changes = 0;
  fleet::durable_tally durable;  // durable runs: what the journal promises
  bool drained = false;          // durable runs: every confirmed message delivered in the end
  double replay_ms = -1;         // durable runs: the standby's first delivery .. it reached the last message
  long replayed = 0;             //   confirmed before that first delivery, and how many it delivered until then
  std::string transcript;   // the old holder's lines but MSG, for a failing CHECK
};

// Whether the standbys' waiters are waiting, server-side, for the holder's
// advisory lock (how pg_locks shows a bigint key: high half, low half).
// Whether the ring watches the holder: a member's watcher waits for the
// holder's member lock (the one whose backend is `holder_pid`).
task<bool> holder_watched(event_loop& loop, pubsub& pub, int holder_pid) {
  auto c = pub.client();
  std::string members = c->quote_identifier(pgiplock::ip_lock::schema_name()) + ".pgiplock_member";
  auto deadline = clock::now() + 10s;
  for (;;) {
    auto r = co_await c->query(
        "SELECT count(*) FROM " + members + " m JOIN pg_locks l ON l.locktype = 'advisory' AND NOT l.granted "
        "AND l.objsubid = 1 AND l.classid = ((m.key >> 32) & 4294967295)::oid "
        "AND l.objid = (m.key & 4294967295)::oid WHERE m.pid = $1",
        holder_pid);
    if (std::stoi(std::string(r.get(0, 0))) >= 1) co_return true;
    if (clock::now() >= deadline) co_return false;
    co_await loop.sleep(5ms);
  }
}

double ms_between(long long from, long long to) { return static_cast<double>(to - from) / 1e6; }

// `phase` (0..1): where in the holder's heartbeat period the drop falls.
task<run_result> partition_run(event_loop& loop, int run, double phase, bool durable) {
  run_result out;
  test_network net(run);
  if (!net.failure().empty()) FAIL("run " << run << ": cannot build the test network: " << net.failure());
  fleet fl(loop, fresh_channel(durable ? "partition_durable" : "partition"));
  std::vector<std::string> extra{"--interval", "30000", "--liveness", std::to_string(liveness.count()), "--watch-active"};
  if (durable) extra.push_back("--durable");
  // The holder first, inside the namespace; then two standbys out here.
  fl.start(1, extra, net.exec_prefix(), net.conninfo());
  bool holding = co_await wait_until(loop, [&] { return !fl.holds[0].empty(); }, 20s);
  REQUIRE(holding);
  fl.start(2, extra);
  bool up = co_await fl.ready(20s);
  REQUIRE(up);
  auto po = pubsub_opts();
  po.durable = durable;
  pubsub pub(loop, po);
  co_await pub.connect();
  bool watched = co_await holder_watched(loop, pub, fl.backend_pid[0]);
  REQUIRE(watched);
  loop.spawn(durable ? fleet::publish_durable(fl, pub) : fleet::publish(fl, pub));
  bool flowing = co_await wait_until(loop, [&] { return fl.deliveries.size() >= 100; }, 5s);
  REQUIRE(flowing);
  REQUIRE(fl.holder() == 0);
  // When the drop falls in the holder's heartbeat period (liveness / 4)
  // decides how soon it demotes: up to liveness / 4 + liveness / 2 after
  // the drop, its worst case, against the server's fixed liveness * 4 / 5.
  // Left alone, every run hits about the same phase; spread them over one
  // period instead. A deliberate delay, not a wait for a condition.
  co_await loop.sleep(std::chrono::duration_cast<std::chrono::milliseconds>(liveness / 4 * phase));

  // Stamped before nft starts: the rules are in force at some instant
  // during the command, so every figure below errs on the long side.
  long long t0 = now_ns();
  bool dropped = net.partition();
  if (!dropped) FAIL("run " << run << ": cannot drop the traffic: " << net.failure());
  if (std::getenv("PGIPLOCK_MEMBER_TRACE")) {
    std::fprintf(stderr, "test %lld: partition (nft took %.1f ms)\n", t0 / 1000000, ms_between(t0, now_ns()));
  }
  auto lose_after = [&]() -> std::optional<long long> {
    for (auto t : fl.loses[0]) {
      if (t > t0) return t;
    }
    return std::nullopt;
  };
  auto error_after = [&]() -> std::optional<long long> {
    for (auto t : fl.errors[0]) {
      if (t > t0) return t;
    }
    return std::nullopt;
  };
  co_await wait_until(loop, [&] {
    return lose_after() && error_after() && fl.first_delivery_after(t0, 0).has_value();
  }, liveness + 5s);
  auto lose = lose_after();
  auto err = error_after();
  auto first = fl.first_delivery_after(t0, 0);
  if (lose) out.demote_ms = ms_between(t0, *lose);
  if (err) out.error_ms = ms_between(t0, *err);
  if (first) out.takeover_ms = ms_between(t0, *first);
  if (lose && first) out.gap_ms = ms_between(*lose, *first);

  long target = fl.sent + 200;
  co_await wait_until(loop, [&] { return fl.sent >= target; }, 5s);
  fl.publishing = false;
  if (durable) {
    co_await wait_until(loop, [&] { return fl.publishers == 0; }, 5s);
    long last = fl.last_confirmed();
    out.drained = co_await wait_until(loop, [&] { return fl.all_confirmed_delivered(last); }, 10s);
    co_await loop.sleep(50ms);  // a late redelivery still in a pipe
    out.durable = fl.count_durable();
    if (first) {
      long backlog = -1;
      for (std::size_t n = 0; n < fl.confirmed_at.size(); ++n) {
        if (fl.confirmed_at[n] && fl.confirmed_at[n] < *first) backlog = static_cast<long>(n);
      }
      for (auto& d : fl.deliveries) {
        if (d.member == 0 || d.t < *first || out.replay_ms >= 0) continue;
        ++out.replayed;
        if (d.n >= backlog) out.replay_ms = ms_between(*first, d.t);
      }
    }
  } else {
    long last = fl.sent - 1;
    co_await wait_until(loop, [&] { return fl.delivered(last); }, 3s);
  }
  for (auto& d : fl.deliveries) {
    if (d.member == 0 && lose && d.t > *lose) ++out.late_by_old;
  }
  auto t = fl.count();
  out.lost = t.lost;
  out.duplicated = t.duplicated;
  out.changes = fl.deliverer_changes();
  for (auto& l : fl.members[0]->lines()) {
    if (l.rfind("MSG ", 0) != 0) out.transcript += l + "\n";
  }
  co_await fl.stop();
  co_await pub.close();
  co_return out;  // members reaped (fl), then the network removed (net)
}

task<std::vector<run_result>> partition_runs(event_loop& loop, int n, bool durable = false, int first = 0) {
  std::vector<run_result> out;
  for (int i = 0; i < n; ++i) out.push_back(co_await partition_run(loop, first + i, double(i) / n, durable));
  co_return out;
}

}  // namespace

// Run by main() before any test: a reason not to run here at all (77).
std::string test_skip_reason() {
  if (::geteuid() != 0) {
    return "the partition test needs root (a network namespace, a veth pair, nftables rules); "
           "tools/check runs it when started as root";
  }
  if (find_tool("ip").empty()) return "`ip` (iproute2) is not installed; tools/check installs it when root";
  if (find_tool("nft").empty()) return "`nft` (nftables) is not installed; tools/check installs it when root";
  if (env_or("PGIPLOCK_FAULT_MEMBER").empty()) return "PGIPLOCK_FAULT_MEMBER is not set (meson test sets it)";
  remove_stale_networks();
  test_network net(99);
  if (!net.failure().empty()) return "cannot build the test network: " + net.failure();
  auto probe = run_command(shell_quote(net.exec_prefix()[0]) + " netns exec " + net.name() + " " +
                           shell_quote(env_or("PGIPLOCK_FAULT_MEMBER")) + " " + shell_quote(net.conninfo()) +
                           " --probe");
  if (!probe.ok()) {
    return "the server is not reachable from the test's network namespace at " + net.host_addr() + " (" +
           probe.output +
           "); it must listen on all addresses and pg_hba.conf must admit 10.213.0.0/16, as the server "
           "tools/check starts does";
  }
  return {};
}

TEST_CASE("holder silently partitioned: it demotes itself within liveness_timeout, a standby delivers within "
          "liveness_timeout + 2 s, tenures never overlap, nothing twice",
          "[fault][partition]") {
  event_loop loop;
  auto rs = loop.run(partition_runs(loop, runs_wanted));
  stats demote, error, takeover, gap;
  long lost = 0;
  double live = static_cast<double>(liveness.count());
  for (auto& r : rs) {
    INFO("old holder said:\n" << r.transcript);
    CHECK(r.demote_ms >= 0);
    CHECK(r.demote_ms <= live);
    CHECK(r.error_ms >= 0);
    CHECK(r.error_ms <= live);
    CHECK(r.takeover_ms >= 0);
    CHECK(r.takeover_ms <= live + 2000);
    CHECK(r.gap_ms > 0);  // the old holder stopped before the new one delivered
    CHECK(r.late_by_old == 0);
    CHECK(r.duplicated == 0);
    CHECK(r.changes == 1);
    demote.values.push_back(r.demote_ms);
    error.values.push_back(r.error_ms);
    takeover.values.push_back(r.takeover_ms);
    gap.values.push_back(r.gap_ms);
    lost += r.lost;
  }
  WARN(describe("partition: holder demoted (is_active false) after", demote));
  WARN(describe("partition: holder's on_error after", error));
  WARN(describe("partition: standby delivered after", takeover) << "; lost " << lost << " in total (sent while nobody listened)");
  double smallest = gap.values.empty() ? 0 : *std::min_element(gap.values.begin(), gap.values.end());
  WARN("partition: margin between the old tenure's end and the new one's first delivery: smallest "
       << smallest << " ms, median " << gap.median() << " ms (liveness_timeout " << liveness.count() << " ms)");
}

TEST_CASE("durable channel, holder silently partitioned: nothing confirmed is lost across the partition",
          "[fault][partition][durable]") {
  event_loop loop;
  // Run numbers of their own: each names its namespace, veth and /30.
  auto rs = loop.run(partition_runs(loop, durable_runs_wanted, true, runs_wanted));
  stats takeover, replay;
  long confirmed = 0, replayed = 0;
  std::ostringstream redelivered;
  double live = static_cast<double>(liveness.count());
  for (auto& r : rs) {
    INFO("old holder said:\n" << r.transcript);
    CHECK(r.drained);
    CHECK(r.durable.lost == 0);
    CHECK(r.durable.id_mismatch == 0);
    CHECK(r.takeover_ms >= 0);
    CHECK(r.takeover_ms <= live + 2000);
    CHECK(r.late_by_old == 0);
    CHECK(r.replay_ms >= 0);
    takeover.values.push_back(r.takeover_ms);
    replay.values.push_back(r.replay_ms);
    replayed += r.replayed;
    confirmed += r.durable.confirmed;
    redelivered << " " << r.durable.redelivered;
  }
  WARN(describe("durable partition: standby delivered after", takeover)
       << "; " << confirmed << " confirmed, 0 lost allowed; redelivered (same id) per run:" << redelivered.str());
  WARN(describe("durable partition: the standby's replay of the journal (first delivery .. caught up)", replay)
       << "; " << replayed << " messages replayed in all");
}
