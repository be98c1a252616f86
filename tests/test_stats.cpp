// Observability against a real PostgreSQL: pubsub::stats() and
// ip_lock::stats() after deliveries, takeovers, handovers, reconnects and
// failed notifies; the durable backlog; prometheus_text() checked line by
// line (and by promtool where Debian's prometheus package is installed); the
// end-to-end probe against a proxy that makes a LISTEN deaf
// (notify_dropping_proxy.py); the NOTIFY queue watch; the metrics_server
// example scraped with curl.
#include "child_process.hpp"
#include "system.hpp"

#include <sys/wait.h>
#include <time.h>

#include <cmath>
#include <map>
#include <set>

extern const bool test_needs_database = true;

using namespace test;
using pgiplock::channel_role;
using pgiplock::channel_stats;
using pgiplock::ip_lock;
using pgiplock::pubsub;
using pgiplock::pubsub_options;
using pgiplock::pubsub_stats;

namespace {

using wall_clock = std::chrono::system_clock;

// ==== helpers ====

// A pubsub that records what it delivered (with the time), its errors and
// its reconnects.
struct instance {
  pubsub ps;
  std::vector<std::string> messages;
  std::vector<clock::time_point> arrivals;
  std::vector<std::string> errors;
  std::vector<clock::time_point> error_times;
  std::size_t reconnects = 0;
  clock::time_point reconnected_at{};
  instance(event_loop& loop, pubsub_options o) : ps(loop, std::move(o)) {
    ps.on_message([this](std::string_view, std::string_view p) {
      messages.emplace_back(p);
      arrivals.push_back(clock::now());
    });
    ps.on_error([this](const std::exception& e) {
      errors.emplace_back(e.what());
      error_times.push_back(clock::now());
    });
    ps.on_reconnect([this](std::size_t) {
      ++reconnects;
      reconnected_at = clock::now();
    });
  }
};

task<void> start(instance& i, std::string ch) {
  co_await i.ps.connect();
  co_await i.ps.listen(ch);
}

// The stats of one channel; a default (empty name) one when it is missing.
channel_stats channel_of(const pubsub_stats& s, std::string_view ch) {
  for (auto& c : s.channels) {
    if (c.channel == ch) return c;
  }
  return {};
}

double ms(std::chrono::microseconds d) { return std::chrono::duration<double, std::milli>(d).count(); }
double ms_apart(wall_clock::time_point a, wall_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(a - b).count();
}
bool is_epoch(wall_clock::time_point t) { return t == wall_clock::time_point{}; }

// The granularity of the clock that stamps deliveries (CLOCK_REALTIME_COARSE).
double coarse_resolution_ms() {
  timespec r{};
  ::clock_getres(CLOCK_REALTIME_COARSE, &r);
  return static_cast<double>(r.tv_sec) * 1000 + static_cast<double>(r.tv_nsec) / 1e6;
}

task<void> notify_counted(pubsub& p, std::string ch, std::string payload, int* done) {
  co_await p.notify(ch, payload);
  ++*done;
}

// This program's build directory: meson puts it at <build>/tests/test_stats
// and hands the compiler the source path relative to <build>, so __FILE__
// leads from there to the sources.
std::string build_root() {
  char self[4096];
  ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return ".";
  std::string p(self, static_cast<std::size_t>(n));
  p = p.substr(0, p.rfind('/'));   // <build>/tests
  return p.substr(0, p.rfind('/'));  // <build>
}

std::string tests_source_dir() {
  std::string f = __FILE__;
  auto slash = f.rfind('/');
  std::string dir = slash == std::string::npos ? "." : f.substr(0, slash);
  return dir.front() == '/' ? dir : build_root() + "/" + dir;
}

std::string proxy_script() { return env_or("PGIPLOCK_NOTIFY_PROXY", tests_source_dir() + "/notify_dropping_proxy.py"); }
std::string metrics_server_exe() {
  return env_or("PGIPLOCK_METRICS_SERVER", build_root() + "/examples/metrics_server");
}

// ==== the Prometheus text format, checked strictly ====
//
// What prometheus_text() must produce, beyond what a scraper tolerates:
// every sample `name{labels} value` (labels always, no timestamp); names
// ^pgiplock_[a-z_]+$; one # HELP and one # TYPE per family, before its
// samples; a family's samples together; counters, and only counters, end in
// _total; a gauge ends in its unit (_seconds, _ratio, _messages) unless it
// has none (a 0/1 state, a fencing token); label values escaped (\\, \",
// \n) and valid UTF-8; values that parse; no sample twice.

struct sample {
  std::string name;
  std::vector<std::pair<std::string, std::string>> labels;  // unescaped
  double value = 0;
  std::string label(std::string_view key) const {
    for (auto& [k, v] : labels) {
      if (k == key) return v;
    }
    return {};
  }
};

struct exposition {
  std::vector<sample> samples;
  std::map<std::string, std::string> types, helps;
  std::vector<std::string> problems;  // empty: the text passed every check
  // The value of `name` for `channel` ("" = the member's sample).
  std::optional<double> value(std::string_view name, std::string_view channel = {}) const {
    for (auto& s : samples) {
      if (s.name == name && s.label("channel") == channel) return s.value;
    }
    return std::nullopt;
  }
  std::size_t count(std::string_view name) const {
    return static_cast<std::size_t>(
        std::count_if(samples.begin(), samples.end(), [&](const sample& s) { return s.name == name; }));
  }
  std::string report() const {
    std::string r;
    for (auto& p : problems) r += p + "\n";
    return r;
  }
};

// Gauges without a unit: a state (1 = delivering) and an identifier.
const std::set<std::string> unitless_gauges{"pgiplock_channel_holder", "pgiplock_channel_token"};
const std::vector<std::string> gauge_units{"_seconds", "_ratio", "_messages"};

bool ends_with(std::string_view s, std::string_view tail) {
  return s.size() >= tail.size() && s.substr(s.size() - tail.size()) == tail;
}

bool valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    std::size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

// Hand-written matchers, not std::regex: GCC 12's <regex> trips
// -Wmaybe-uninitialized under the sanitizers' -O1 (CI's ASan build).
bool is_lower_or_underscore(char c) { return (c >= 'a' && c <= 'z') || c == '_'; }
bool is_label_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

// ^pgiplock_[a-z_]+$
bool metric_name_ok(std::string_view n) {
  constexpr std::string_view prefix = "pgiplock_";
  if (n.size() <= prefix.size() || n.substr(0, prefix.size()) != prefix) return false;
  for (char c : n.substr(prefix.size())) {
    if (!is_lower_or_underscore(c)) return false;
  }
  return true;
}

// ^[a-zA-Z_][a-zA-Z0-9_]*$
bool label_name_ok(std::string_view n) {
  if (n.empty() || !is_label_start(n[0])) return false;
  for (char c : n) {
    if (!is_label_start(c) && !is_digit(c)) return false;
  }
  return true;
}

// The exposition format's float: [-+]? (digits [. digits?] | . digits)
// ([eE] [-+]? digits)?, or NaN, +Inf, -Inf.
bool sample_value_ok(std::string_view v) {
  if (v == "NaN" || v == "+Inf" || v == "-Inf") return true;
  std::size_t i = 0;
  auto digits = [&] {
    std::size_t from = i;
    while (i < v.size() && is_digit(v[i])) ++i;
    return i > from;
  };
  if (i < v.size() && (v[i] == '-' || v[i] == '+')) ++i;
  bool whole = digits();
  bool fraction = false;
  if (i < v.size() && v[i] == '.') {
    ++i;
    fraction = digits();
  }
  if (!whole && !fraction) return false;
  if (i < v.size() && (v[i] == 'e' || v[i] == 'E')) {
    ++i;
    if (i < v.size() && (v[i] == '-' || v[i] == '+')) ++i;
    if (!digits()) return false;
  }
  return i == v.size();
}

// The label set of a sample line from `i` (just past '{') to '}'; the
// first problem, or empty. `i` ends past the '}'.
std::string parse_labels(std::string_view line, std::size_t& i, sample& s) {
  if (i < line.size() && line[i] == '}') return "an empty label set";
  for (;;) {
    auto eq = line.find('=', i);
    if (eq == std::string_view::npos) return "a label without '='";
    std::string key(line.substr(i, eq - i));
    if (!label_name_ok(key)) return "a bad label name '" + key + "'";
    if (!s.label(key).empty()) return "the label " + key + " twice";
    i = eq + 1;
    if (i >= line.size() || line[i] != '"') return "label " + key + ": no opening quote";
    ++i;
    std::string value;
    for (;; ++i) {
      if (i >= line.size()) return "label " + key + ": no closing quote";
      char c = line[i];
      if (c == '"') break;
      if (c != '\\') {
        value.push_back(c);
        continue;
      }
      if (++i >= line.size()) return "label " + key + ": a lone backslash at the end";
      char e = line[i];
      if (e == '\\' || e == '"') value.push_back(e);
      else if (e == 'n') value.push_back('\n');
      else return std::string("label ") + key + ": an unknown escape \\" + e;
    }
    ++i;  // past the closing quote
    if (!valid_utf8(value)) return "label " + key + ": not UTF-8";
    if (value.empty()) return "label " + key + ": empty";
    s.labels.emplace_back(key, value);
    if (i < line.size() && line[i] == ',') {
      ++i;
      if (i < line.size() && line[i] == '}') return "a trailing comma in the label set";
      continue;
    }
    if (i < line.size() && line[i] == '}') {
      ++i;
      return {};
    }
    return "label " + key + ": neither ',' nor '}' after its value";
  }
}

std::string naming_problem(const std::string& name, const std::string& type) {
  if (!metric_name_ok(name) || name.find("__") != std::string::npos || name.back() == '_') {
    return "the name " + name + " is not ^pgiplock_[a-z_]+$ (words joined by single '_')";
  }
  if (type == "counter") return ends_with(name, "_total") ? "" : "the counter " + name + " does not end in _total";
  if (type != "gauge") return "family " + name + " has type " + type + " (counter or gauge expected)";
  if (ends_with(name, "_total")) return "the gauge " + name + " ends in _total";
  if (unitless_gauges.count(name)) return {};
  for (auto& u : gauge_units) {
    if (ends_with(name, u)) return {};
  }
  return "the gauge " + name + " names no unit";
}

void check_comment(exposition& out, std::string_view line, const std::set<std::string>& sampled, int no) {
  auto where = "line " + std::to_string(no) + ": ";
  bool help = line.rfind("# HELP ", 0) == 0, type = line.rfind("# TYPE ", 0) == 0;
  if (!help && !type) return;  // a plain comment: allowed by the format
  auto rest = line.substr(7);
  auto sp = rest.find(' ');
  if (sp == std::string_view::npos || sp == 0 || sp + 1 >= rest.size()) {
    out.problems.push_back(where + "a # HELP or # TYPE without a name and a text");
    return;
  }
  std::string name(rest.substr(0, sp)), text(rest.substr(sp + 1));
  auto& into = help ? out.helps : out.types;
  if (into.count(name)) out.problems.push_back(where + "a second " + (help ? "# HELP" : "# TYPE") + " for " + name);
  if (sampled.count(name)) {
    out.problems.push_back(where + (help ? "# HELP" : "# TYPE") + " of " + name + " after its samples");
  }
  if (help) {
    for (std::size_t k = 0; k < text.size(); ++k) {
      if (text[k] == '\\' && (k + 1 >= text.size() || (text[k + 1] != '\\' && text[k + 1] != 'n'))) {
        out.problems.push_back(where + "HELP of " + name + " has a backslash that escapes nothing");
      }
      if (text[k] == '\\') ++k;
    }
  }
  into[name] = text;
}

exposition parse_exposition(const std::string& text) {
  exposition out;
  if (text.empty() || text.back() != '\n') out.problems.push_back("the text does not end with a newline");
  std::set<std::string> sampled, keys;  // families with samples; name + labels seen
  std::string current;                  // the family of the previous sample
  std::size_t from = 0;
  for (int no = 1; from < text.size(); ++no) {
    auto nl = text.find('\n', from);
    if (nl == std::string::npos) nl = text.size();
    std::string_view line(text.data() + from, nl - from);
    from = nl + 1;
    auto where = "line " + std::to_string(no) + ": ";
    if (line.empty()) {
      out.problems.push_back(where + "empty");
      continue;
    }
    if (line.front() == '#') {
      check_comment(out, line, sampled, no);
      continue;
    }
    sample s;
    auto brace = line.find('{');
    if (brace == std::string_view::npos) {
      out.problems.push_back(where + "a sample without labels: " + std::string(line));
      continue;
    }
    s.name = std::string(line.substr(0, brace));
    std::size_t i = brace + 1;
    auto bad = parse_labels(line, i, s);
    if (!bad.empty()) {
      out.problems.push_back(where + bad + ": " + std::string(line));
      continue;
    }
    if (i >= line.size() || line[i] != ' ') {
      out.problems.push_back(where + "no single space before the value: " + std::string(line));
      continue;
    }
    std::string value(line.substr(i + 1));
    if (!sample_value_ok(value)) {
      out.problems.push_back(where + "the value '" + value + "' is not a number (or has a timestamp)");
      continue;
    }
    s.value = value == "NaN"    ? std::nan("")
              : value == "+Inf" ? HUGE_VAL
              : value == "-Inf" ? -HUGE_VAL
                                : std::strtod(value.c_str(), nullptr);
    if (!out.helps.count(s.name) || !out.types.count(s.name)) {
      out.problems.push_back(where + "a sample of " + s.name + " before its # HELP and # TYPE");
    }
    if (s.name != current && sampled.count(s.name)) {
      out.problems.push_back(where + "the samples of " + s.name + " are not together");
    }
    current = s.name;
    sampled.insert(s.name);
    std::string key = s.name;
    for (auto& [k, v] : s.labels) key += "\x1f" + k + "=" + v;
    if (!keys.insert(key).second) {
      out.problems.push_back(where + "a second sample with the same labels: " + std::string(line));
    }
    if (s.label("member").empty()) out.problems.push_back(where + "no member label: " + std::string(line));
    out.samples.push_back(std::move(s));
  }
  for (auto& [name, type] : out.types) {
    auto bad = naming_problem(name, type);
    if (!bad.empty()) out.problems.push_back(bad);
    if (!out.helps.count(name)) out.problems.push_back("family " + name + " has a # TYPE but no # HELP");
  }
  for (auto& [name, help] : out.helps) {
    if (!out.types.count(name)) out.problems.push_back("family " + name + " has a # HELP but no # TYPE");
  }
  return out;
}

// promtool's verdict when Debian's prometheus package is installed; empty
// when it is not (the strict parser above is the check then).
std::optional<command_result> promtool_check(const std::string& text) {
  std::string promtool = find_tool("promtool");
  if (promtool.empty()) return std::nullopt;
  char path[] = "/tmp/pgiplock-metrics-XXXXXX";
  int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  REQUIRE(::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
  ::close(fd);
  auto r = run_command(shell_quote(promtool) + " check metrics < " + path);
  ::unlink(path);
  return r;
}

// Every check on one exposition: the strict parser, and promtool when present.
void require_valid(const std::string& text) {
  auto e = parse_exposition(text);
  INFO("the exposition:\n" << text);
  INFO("problems:\n" << e.report());
  CHECK(e.problems.empty());
  if (auto verdict = promtool_check(text)) {
    INFO("promtool check metrics: " << verdict->output);
    CHECK(verdict->ok());
  }
}

// A printed value against the one it was printed from: %.17g round-trips a
// double; the slack is for the test's own arithmetic (Catch's default
// epsilon would let a Unix time be off by hours).
Approx near(double v) { return Approx(v).epsilon(1e-12).margin(1e-9); }

// The exposition agrees with the stats it was made from.
void require_matches(const exposition& e, const pubsub_stats& s) {
  for (auto& smp : e.samples) CHECK(smp.label("member") == s.member);
  CHECK(e.value("pgiplock_reconnects_total") == static_cast<double>(s.reconnects));
  CHECK(e.value("pgiplock_notify_sent_total") == static_cast<double>(s.notify_sent));
  CHECK(e.value("pgiplock_notify_failed_total") == static_cast<double>(s.notify_failed));
  CHECK(e.value("pgiplock_probe_failures_total") == static_cast<double>(s.probes_failed));
  CHECK(e.value("pgiplock_probe_round_trip_seconds") ==
        near(std::chrono::duration<double>(s.probe_round_trip).count()));
  CHECK(e.value("pgiplock_notify_queue_usage_ratio") == near(s.queue_usage));
  for (auto& c : s.channels) {
    INFO("channel " << c.channel);
    CHECK(e.value("pgiplock_channel_delivered_total", c.channel) == static_cast<double>(c.delivered));
    CHECK(e.value("pgiplock_channel_holder", c.channel) == (c.role == channel_role::standby ? 0.0 : 1.0));
    CHECK(e.value("pgiplock_channel_token", c.channel) == static_cast<double>(c.token));
    CHECK(e.value("pgiplock_channel_takeovers_total", c.channel) == static_cast<double>(c.takeovers));
    CHECK(e.value("pgiplock_channel_handovers_total", c.channel) == static_cast<double>(c.handovers));
    double since = c.role == channel_role::holder
                       ? std::chrono::duration<double>(c.tenure_since.time_since_epoch()).count()
                       : 0.0;
    CHECK(e.value("pgiplock_channel_tenure_start_seconds", c.channel) == near(since));
    CHECK(e.value("pgiplock_channel_last_delivery_seconds", c.channel) ==
          near(std::chrono::duration<double>(c.last_delivery.time_since_epoch()).count()));
    CHECK(e.value("pgiplock_channel_last_takeover_seconds", c.channel) == near(ms(c.last_takeover) / 1000));
    CHECK(e.value("pgiplock_channel_last_handover_seconds", c.channel) == near(ms(c.last_handover) / 1000));
    auto backlog = e.value("pgiplock_durable_backlog_messages", c.channel);
    CHECK(backlog.has_value() == c.durable);
    if (c.durable) CHECK(*backlog == static_cast<double>(c.backlog));
  }
}

// What the server records of a channel's latest tenure
// (<schema>.pgiplock_holder, which pgiplock status shows): the winner's app
// and token.
struct recorded_tenure {
  std::string app;
  std::int64_t token = 0;
};

task<recorded_tenure> recorded(std::shared_ptr<pgiplock::connection> c, std::string ch) {
  auto r = co_await c->query("SELECT app, token FROM " + lock_schema(*c) + ".pgiplock_holder WHERE channel = $1",
                             "__PgIpLock__:" + ch);
  recorded_tenure out;
  if (r.rows() == 1) {
    out.app = r.get(0, 0);
    out.token = std::strtoll(std::string(r.get(0, 1)).c_str(), nullptr, 10);
  }
  co_return out;
}

// ==== 1. deliveries and roles ====

struct roles_report {
  recorded_tenure recorded;
  pubsub_stats holder, standby, plain, publisher;
  std::int64_t holder_token = 0;
  std::string holder_app;
  wall_clock::time_point listen_began, listen_ended, seen_at;
};

task<roles_report> roles_flow(event_loop& loop, std::string ch) {
  roles_report out;
  auto plain_o = pubsub_opts();
  plain_o.single_listener = false;
  instance a(loop, pubsub_opts()), b(loop, pubsub_opts()), c(loop, plain_o), pub(loop, pubsub_opts());
  out.listen_began = wall_clock::now();
  co_await start(a, ch);
  out.listen_ended = wall_clock::now();
  co_await start(b, ch);
  co_await start(c, ch);
  co_await pub.ps.connect();
  REQUIRE(a.ps.is_active(ch));
  REQUIRE_FALSE(b.ps.is_active(ch));
  REQUIRE(c.ps.is_active(ch));
  for (int i = 0; i < 5; ++i) co_await pub.ps.notify(ch, "m" + std::to_string(i));
  bool all = co_await wait_until(loop, [&] { return a.messages.size() == 5 && c.messages.size() == 5; }, 5s);
  out.seen_at = wall_clock::now();
  REQUIRE(all);
  co_await pub.ps.client()->query("SELECT 1");  // nothing else is on its way
  out.holder = a.ps.stats();
  out.standby = b.ps.stats();
  out.plain = c.ps.stats();
  out.publisher = pub.ps.stats();
  out.holder_token = a.ps.token(ch);
  out.holder_app = std::string(a.ps.client()->app_name());
  out.recorded = co_await recorded(pub.ps.client(), ch);
  for (auto* i : {&a, &b, &c, &pub}) co_await i->ps.destroy();
  co_return out;
}

// ==== 2. takeovers, handovers, reconnects ====

struct takeover_report {
  channel_stats successor, old_holder;
  std::int64_t old_token = 0;
  wall_clock::time_point killed_at;
  double took_ms = 0;
  bool old_still_holder = false;  // when the standby took over
  bool old_link_open = false;
  double old_stepped_down_ms = -1;  // from the kill until the old holder stopped saying holder
};

// The holder's backend is terminated and it stays away (slow reconnect):
// the standby takes the channel over.
task<takeover_report> takeover_flow(event_loop& loop, std::string ch) {
  takeover_report out;
  auto slow = pubsub_opts(200ms);
  slow.retry_delay = 10s;
  instance a(loop, slow), b(loop, pubsub_opts(200ms));
  co_await start(a, ch);
  co_await start(b, ch);
  auto admin = co_await open(loop);
  REQUIRE(a.ps.is_active(ch));
  out.old_token = a.ps.token(ch);
  out.killed_at = wall_clock::now();
  auto t0 = clock::now();
  co_await admin->query("SELECT pg_terminate_backend($1)", a.ps.client()->backend_pid());
  bool taken = co_await wait_until(loop, [&] { return b.ps.is_active(ch); }, 3s);
  out.took_ms = ms_since(t0);
  REQUIRE(taken);
  out.successor = channel_of(b.ps.stats(), ch);
  out.old_still_holder = channel_of(a.ps.stats(), ch).role == channel_role::holder;
  out.old_link_open = a.ps.client() && a.ps.client()->is_open();
  bool stepped_down =
      co_await wait_until(loop, [&] { return channel_of(a.ps.stats(), ch).role != channel_role::holder; }, 3s);
  if (stepped_down) out.old_stepped_down_ms = ms_since(t0);
  out.old_holder = channel_of(a.ps.stats(), ch);
  co_await a.ps.destroy();
  co_await b.ps.destroy();
  co_await admin->close();
  co_return out;
}

struct handover_report {
  channel_stats first, second;  // after unlisten() of the holder, after close() of its successor
  bool first_left = false;      // the holder no longer lists the channel it unlistened
};

task<handover_report> handover_flow(event_loop& loop, std::string ch) {
  handover_report out;
  std::vector<std::unique_ptr<instance>> is;
  for (int i = 0; i < 3; ++i) is.push_back(std::make_unique<instance>(loop, pubsub_opts()));
  for (auto& i : is) co_await start(*i, ch);
  REQUIRE(is[0]->ps.is_active(ch));
  auto holder = [&]() -> instance* {
    for (auto& i : is) {
      if (i->ps.is_active(ch)) return i.get();
    }
    return nullptr;
  };
  co_await is[0]->ps.unlisten(ch);
  bool moved = co_await wait_until(loop, [&] { return holder() != nullptr; }, 3s);
  REQUIRE(moved);
  instance* next = holder();
  out.first = channel_of(next->ps.stats(), ch);
  out.first_left = channel_of(is[0]->ps.stats(), ch).channel.empty();
  co_await next->ps.close();
  moved = co_await wait_until(loop, [&] { return holder() != nullptr; }, 3s);
  REQUIRE(moved);
  out.second = channel_of(holder()->ps.stats(), ch);
  for (auto& i : is) co_await i->ps.destroy();
  co_return out;
}

// `pub` sends n messages tagged `tag` on ch; `a` has delivered `total` in all.
task<void> send_and_deliver(event_loop& loop, instance& a, instance& pub, std::string ch, int n, std::string tag,
                            std::size_t total) {
  for (int i = 0; i < n; ++i) co_await pub.ps.notify(ch, tag + " " + std::to_string(i));
  bool delivered = co_await wait_until(loop, [&] { return a.messages.size() == total; }, 5s);
  REQUIRE(delivered);
}

struct reconnect_report {
  pubsub_stats before, after, later;
  std::int64_t token_before = 0, token_after = 0;
};

// The pubsub's own backend is terminated: it reconnects and takes its
// channel again; what it counted stays.
task<reconnect_report> reconnect_flow(event_loop& loop, std::string ch) {
  reconnect_report out;
  instance a(loop, pubsub_opts()), pub(loop, pubsub_opts());
  co_await start(a, ch);
  co_await pub.ps.connect();
  co_await send_and_deliver(loop, a, pub, ch, 3, "before", 3);
  out.before = a.ps.stats();
  out.token_before = a.ps.token(ch);
  co_await pub.ps.client()->query("SELECT pg_terminate_backend($1)", a.ps.client()->backend_pid());
  bool back = co_await wait_until(loop, [&] { return a.reconnects == 1 && a.ps.is_active(ch); }, 5s);
  REQUIRE(back);
  out.after = a.ps.stats();
  out.token_after = a.ps.token(ch);
  co_await send_and_deliver(loop, a, pub, ch, 2, "after", 5);
  out.later = a.ps.stats();
  co_await a.ps.destroy();
  co_await pub.ps.destroy();
  co_return out;
}

struct relisten_report {
  pubsub_stats before, unlistened, again;
};

// unlisten() then listen() again on the same pubsub: the channel leaves
// stats() meanwhile and comes back with what it had counted.
task<relisten_report> relisten_flow(event_loop& loop, std::string ch) {
  relisten_report out;
  instance a(loop, pubsub_opts()), pub(loop, pubsub_opts());
  co_await start(a, ch);
  co_await pub.ps.connect();
  co_await send_and_deliver(loop, a, pub, ch, 3, "before", 3);
  out.before = a.ps.stats();
  co_await a.ps.unlisten(ch);
  out.unlistened = a.ps.stats();
  co_await a.ps.listen(ch);
  bool back = co_await wait_until(loop, [&] { return a.ps.is_active(ch); }, 5s);
  REQUIRE(back);
  co_await send_and_deliver(loop, a, pub, ch, 1, "again", 4);
  out.again = a.ps.stats();
  co_await a.ps.destroy();
  co_await pub.ps.destroy();
  co_return out;
}

// ==== 3. notify sent and failed ====

struct notify_report {
  pubsub_stats after_sent, after_refused, after_again;
  std::string sqlstate, refusal;
};

// A durable notify() is an INSERT into the journal: a read-only session
// makes the server refuse it (SQLSTATE 25006).
task<notify_report> server_refusal_flow(event_loop& loop, std::string ch) {
  notify_report out;
  auto o = pubsub_opts();
  o.durable = true;
  pubsub pub(loop, o);
  co_await pub.connect();
  for (int i = 0; i < 3; ++i) co_await pub.notify(ch, "ok " + std::to_string(i));
  out.after_sent = pub.stats();
  co_await pub.client()->query("SET default_transaction_read_only = on");
  try {
    co_await pub.notify(ch, "refused");
  } catch (const pgiplock::sql_error& e) {
    out.sqlstate = e.sqlstate();
    out.refusal = e.what();
  }
  out.after_refused = pub.stats();
  co_await pub.client()->query("SET default_transaction_read_only = off");
  co_await pub.notify(ch, "ok again");
  out.after_again = pub.stats();
  co_await pub.close();
  co_return out;
}

task<notify_report> closed_flow(event_loop& loop, std::string ch) {
  notify_report out;
  pubsub pub(loop, pubsub_opts());
  co_await pub.connect();
  co_await pub.notify(ch, "sent");
  out.after_sent = pub.stats();
  co_await pub.close();
  try {
    co_await pub.notify(ch, "after close");
  } catch (const pgiplock::connection_error& e) {
    out.refusal = e.what();
  }
  out.after_refused = pub.stats();
  co_return out;
}

// ==== 4. durable backlog ====

struct backlog_report {
  std::int64_t max_backlog = 0;
  std::chrono::milliseconds max_oldest{0};
  int samples_with_backlog = 0;
  channel_stats settled, live;
  bool settled_in_time = false, live_settled = false;
};

// Samples the holder's stats every millisecond until told to stop.
task<void> watch_backlog(event_loop& loop, const pubsub& ps, std::string ch, backlog_report* out, const bool* stop) {
  while (!*stop) {
    auto c = channel_of(ps.stats(), ch);
    if (c.backlog > 0) ++out->samples_with_backlog;
    out->max_backlog = std::max(out->max_backlog, c.backlog);
    out->max_oldest = std::max(out->max_oldest, c.oldest_unacknowledged);
    co_await loop.sleep(1ms);
  }
}

// Published while nobody holds the channel, then caught up by the first
// holder a page (256) at a time: its first acknowledgements see the rest.
task<backlog_report> backlog_flow(event_loop& loop, std::string ch, int total) {
  backlog_report out;
  auto o = pubsub_opts();
  o.durable = true;
  pubsub pub(loop, o);
  co_await pub.connect();
  int sent = 0;
  for (int i = 0; i < total; ++i) loop.spawn(notify_counted(pub, ch, "m" + std::to_string(i), &sent));
  bool published = co_await wait_until(loop, [&] { return sent == total; }, 30s);
  REQUIRE(published);
  co_await loop.sleep(300ms);  // the oldest unacknowledged message is at least this old
  instance h(loop, o);
  bool stop = false;
  auto watcher = watch_backlog(loop, h.ps, ch, &out, &stop);
  loop.start(watcher);
  co_await start(h, ch);
  auto n = static_cast<std::size_t>(total);
  out.settled_in_time = co_await wait_until(loop, [&] {
    auto c = channel_of(h.ps.stats(), ch);
    return h.messages.size() == n && c.backlog == 0 && c.oldest_unacknowledged.count() == 0;
  }, 15s);
  stop = true;
  co_await loop.sleep(2ms);
  out.settled = channel_of(h.ps.stats(), ch);
  for (int i = 0; i < 5; ++i) co_await pub.notify(ch, "live " + std::to_string(i));
  out.live_settled = co_await wait_until(loop, [&] {
    return h.messages.size() == n + 5 && channel_of(h.ps.stats(), ch).backlog == 0;
  }, 5s);
  out.live = channel_of(h.ps.stats(), ch);
  co_await h.ps.destroy();
  co_await pub.close();
  co_return out;
}

task<void> wait_at_gate(pgiplock::async_event* gate, int* calls) {
  ++*calls;
  co_await gate->wait();
}

struct stuck_report {
  std::int64_t backlog_while_stuck = 0;
  std::chrono::milliseconds oldest_while_stuck{0};
  int calls_while_stuck = 0, calls_after = 0;
};

// A transactional handler stuck on its first message while 20 are
// published: the channel is 19 or 20 behind, and stats() should say so.
task<stuck_report> stuck_handler_flow(event_loop& loop, std::string ch) {
  stuck_report out;
  auto o = pubsub_opts();
  o.durable = true;
  pubsub h(loop, o), pub(loop, o);
  pgiplock::async_event gate(loop);
  int calls = 0;
  h.on_delivery_in_transaction(
      [&gate, &calls](const pgiplock::delivery&, pgiplock::connection&) { return wait_at_gate(&gate, &calls); });
  co_await h.connect();
  co_await h.listen(ch);
  co_await pub.connect();
  for (int i = 0; i < 20; ++i) co_await pub.notify(ch, "t" + std::to_string(i));
  bool stuck = co_await wait_until(loop, [&] { return calls == 1; }, 5s);
  REQUIRE(stuck);
  // Several acknowledgement paces and a prune interval: time enough for any
  // refresh of the numbers.
  co_await wait_until(loop, [&] { return channel_of(h.stats(), ch).backlog >= 19; }, 3s);
  auto c = channel_of(h.stats(), ch);
  out.backlog_while_stuck = c.backlog;
  out.oldest_while_stuck = c.oldest_unacknowledged;
  out.calls_while_stuck = calls;
  gate.set();
  co_await wait_until(loop, [&] { return calls == 20; }, 10s);
  out.calls_after = calls;
  co_await h.destroy();
  co_await pub.close();
  co_return out;
}

// ==== 5. ip_lock ====

struct lock_report {
  channel_stats a_holding, b_waiting, b_after_handover, a_after_release, c_after_takeover;
  recorded_tenure a_recorded, b_recorded, c_recorded, after_release;
  std::string a_app, b_app, c_app;
  std::int64_t a_token = 0, b_token = 0, c_token = 0;
  wall_clock::time_point acquire_began, acquire_ended;
  double takeover_ms = 0;
};

task<lock_report> lock_flow(event_loop& loop, std::string ch) {
  lock_report out;
  auto ca = co_await open(loop);
  auto cb = co_await open(loop);
  auto cc = co_await open(loop);
  auto admin = co_await open(loop);
  ip_lock a(ch, lock_opts(ca, 200ms)), b(ch, lock_opts(cb, 200ms)), c(ch, lock_opts(cc, 200ms));
  co_await a.init();
  out.acquire_began = wall_clock::now();
  bool a_won = co_await a.acquire();
  out.acquire_ended = wall_clock::now();
  co_await b.init();
  bool b_won = co_await b.acquire();
  REQUIRE(a_won);
  REQUIRE_FALSE(b_won);
  out.a_holding = a.stats();
  out.b_waiting = b.stats();
  out.a_token = a.token();
  out.a_recorded = co_await recorded(admin, ch);
  out.a_app = std::string(ca->app_name());
  // A graceful release: b wins by the release event.
  co_await a.release();
  bool b_holds = co_await wait_until(loop, [&] { return b.is_acquired(); }, 3s);
  REQUIRE(b_holds);
  out.b_after_handover = b.stats();
  out.b_token = b.token();
  out.b_recorded = co_await recorded(admin, ch);
  out.b_app = std::string(cb->app_name());
  out.a_after_release = a.stats();
  co_await a.destroy();  // out of the race for the takeover below
  // A crash: b's session ends; c, waiting, takes over.
  co_await c.init();
  bool c_won = co_await c.acquire();
  REQUIRE_FALSE(c_won);
  auto t0 = clock::now();
  co_await admin->query("SELECT pg_terminate_backend($1)", cb->backend_pid());
  bool c_holds = co_await wait_until(loop, [&] { return c.is_acquired(); }, 3s);
  out.takeover_ms = ms_since(t0);
  REQUIRE(c_holds);
  out.c_after_takeover = c.stats();
  out.c_token = c.token();
  out.c_recorded = co_await recorded(admin, ch);
  out.c_app = std::string(cc->app_name());
  co_await c.destroy();
  out.after_release = co_await recorded(admin, ch);
  co_await b.destroy();
  co_await ca->close();
  co_await cc->close();
  co_await admin->close();
  co_return out;
}

// ==== 6. prometheus_text of a live pubsub ====

struct exposition_report {
  std::string text;
  pubsub_stats stats;
};

task<exposition_report> exposition_flow(event_loop& loop, std::vector<std::string> channels) {
  exposition_report out;
  instance a(loop, pubsub_opts()), pub(loop, pubsub_opts());
  co_await a.ps.connect();
  co_await a.ps.listen(channels);
  co_await pub.ps.connect();
  for (auto& ch : channels) co_await pub.ps.notify(ch, "x");
  co_await pub.ps.notify(channels.front(), "y");
  bool all = co_await wait_until(loop, [&] { return a.messages.size() == channels.size() + 1; }, 5s);
  REQUIRE(all);
  out.stats = a.ps.stats();
  out.text = pgiplock::prometheus_text(out.stats);
  co_await a.ps.destroy();
  co_await pub.ps.destroy();
  co_return out;
}

// ==== 7. the end-to-end probe ====

struct probe_report {
  bool warmed = false;
  pubsub_stats healthy, recovered, calm;
  std::string deaf_line, dead_error;
  double error_ms = -1, reconnect_ms = -1, recovery_ms = -1;
  std::size_t heard_while_deaf = 0;
};

task<void> publish_ticks(event_loop& loop, pubsub& pub, std::string ch, const bool* stop) {
  for (int i = 0; !*stop; ++i) {
    co_await pub.notify(ch, "tick " + std::to_string(i));
    co_await loop.sleep(10ms);
  }
}

// The pubsub reaches the server through the proxy; at t0 the proxy stops
// passing notifications on its connections (new ones hear): queries still
// answer, LISTEN hears nothing. Only the probe can tell.
task<probe_report> probe_flow(event_loop& loop, child_process& proxy, std::string via_proxy, std::string ch) {
  probe_report out;
  auto o = pubsub_opts();
  o.conninfo = via_proxy;
  o.liveness_timeout = 1s;
  o.probe_interval = 300ms;
  instance a(loop, o), pub(loop, pubsub_opts());
  co_await start(a, ch);
  co_await pub.ps.connect();
  REQUIRE(a.ps.is_active(ch));
  co_await pub.ps.notify(ch, "hello");
  auto warm = [&] { return !a.messages.empty() && a.ps.stats().probe_round_trip.count() > 0; };
  out.warmed = co_await wait_until(loop, warm, 3s);
  REQUIRE(out.warmed);
  out.healthy = a.ps.stats();
  bool stop = false;
  auto ticks = publish_ticks(loop, pub.ps, ch, &stop);
  loop.start(ticks);
  std::size_t errors_before = a.errors.size();
  proxy.signal(SIGUSR1);
  auto t0 = clock::now();
  auto deaf = co_await proxy.expect(loop, "DEAF", 2s);
  REQUIRE(deaf);
  out.deaf_line = *deaf;
  auto is_dead = [&](const std::string& e) { return e.find("the listening connection is dead") != std::string::npos; };
  auto dead_reported = [&] {
    return std::any_of(a.errors.begin() + static_cast<long>(errors_before), a.errors.end(), is_dead);
  };
  bool reported = co_await wait_until(loop, dead_reported, 5s);
  REQUIRE(reported);
  for (std::size_t k = errors_before; k < a.errors.size(); ++k) {
    if (is_dead(a.errors[k])) {
      out.dead_error = a.errors[k];
      out.error_ms = std::chrono::duration<double, std::milli>(a.error_times[k] - t0).count();
      break;
    }
  }
  auto reported_at =
      t0 + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double, std::milli>(out.error_ms));
  auto delivering_again = [&] {
    return a.reconnects == 1 && !a.arrivals.empty() && a.arrivals.back() > reported_at;
  };
  bool recovered = co_await wait_until(loop, delivering_again, 10s);
  REQUIRE(recovered);
  out.reconnect_ms = std::chrono::duration<double, std::milli>(a.reconnected_at - t0).count();
  for (auto& at : a.arrivals) {
    if (at > reported_at) {
      out.recovery_ms = std::chrono::duration<double, std::milli>(at - t0).count();
      break;
    }
  }
  // Deaf from 50 ms after t0 (the proxy has long taken the signal) until the report.
  for (auto& at : a.arrivals) {
    if (at > t0 + 50ms && at < reported_at) ++out.heard_while_deaf;
  }
  out.recovered = a.ps.stats();
  co_await loop.sleep(1s);  // three more probes on the new connection
  out.calm = a.ps.stats();
  stop = true;
  co_await loop.sleep(20ms);
  co_await a.ps.destroy();
  co_await pub.ps.destroy();
  co_return out;
}

struct cadence_report {
  pubsub_stats disabled, defaulted, fast;
};

// probe_interval 0, unset (= liveness_timeout 1 s here) and 100 ms.
task<cadence_report> cadence_flow(event_loop& loop, std::string ch) {
  cadence_report out;
  auto base = pubsub_opts();
  base.liveness_timeout = 1s;
  auto off = base, fast = base;
  off.probe_interval = std::chrono::milliseconds(0);
  fast.probe_interval = 100ms;
  instance d(loop, off), u(loop, base), f(loop, fast);
  for (auto* i : {&d, &u, &f}) co_await start(*i, ch);
  co_await loop.sleep(300ms);
  out.fast = f.ps.stats();
  co_await wait_until(loop, [&] { return u.ps.stats().probe_round_trip.count() > 0; }, 1500ms);
  co_await loop.sleep(200ms);
  out.defaulted = u.ps.stats();
  out.disabled = d.ps.stats();
  for (auto* i : {&d, &u, &f}) co_await i->ps.destroy();
  co_return out;
}

// ==== 8. the NOTIFY queue watch ====

struct queue_report {
  std::vector<double> highs;  // usage at each probe that saw it at or above the threshold
  std::vector<std::string> warnings;
  double peak = 0, after_release = -1;
  std::string version;
};

// A session that LISTENs and sits in an open transaction reads nothing, so
// the queue's tail stays where it is; 40 notifications of 7999 bytes fill
// 40 of its 8 KB pages (PostgreSQL 15: 2^20 pages count as full). A
// threshold of 2e-5 (about 21 pages) lies above the tail's own lag (the
// server advances it every 4 pages) and below what the stuck session holds.
task<queue_report> queue_flow(event_loop& loop, std::string ch, double threshold) {
  queue_report out;
  auto o = pubsub_opts();
  o.liveness_timeout = 1s;
  o.probe_interval = 100ms;
  o.queue_warning = threshold;
  o.logger = [&out](pgiplock::log_level level, std::string_view line) {
    if (level == pgiplock::log_level::warn && line.find("NOTIFY queue") != std::string_view::npos) {
      out.warnings.emplace_back(line);
    }
  };
  instance a(loop, o), pub(loop, pubsub_opts());
  co_await start(a, ch);
  co_await pub.ps.connect();
  std::string filler_channel = fresh_channel("filler");
  std::string big(7990, 'q');  // with a number: under 7999 bytes, one entry per 8 KB page
  for (int round = 0; round < 2; ++round) {
    {
      blocking_session stuck(dsn());
      REQUIRE(stuck.failure().empty());
      REQUIRE(stuck.exec("LISTEN " + stuck.quote_identifier(fresh_channel("stuck"))).empty());
      REQUIRE(stuck.exec("BEGIN").empty());
      REQUIRE(stuck.exec("SELECT 1").empty());
      auto warned = out.warnings.size();
      for (int i = 0; i < 40; ++i) co_await pub.ps.notify(filler_channel, big + std::to_string(i));
      bool seen = co_await wait_until(loop, [&] { return out.warnings.size() > warned; }, 2s);
      CHECK(seen);
      co_await loop.sleep(350ms);  // three more probes while it stays high: no more warnings
      out.peak = std::max(out.peak, a.ps.stats().queue_usage);
      out.highs.push_back(a.ps.stats().queue_usage);
      CHECK(out.warnings.size() == warned + 1);
    }  // the stuck session ends: its transaction is rolled back
    // The tail moves when a commit crosses the next 4-page boundary.
    for (int i = 0; i < 8; ++i) co_await pub.ps.notify(filler_channel, big + "x" + std::to_string(i));
    bool low = co_await wait_until(loop, [&] { return a.ps.stats().queue_usage < threshold; }, 3s);
    CHECK(low);
    out.after_release = a.ps.stats().queue_usage;
    co_await loop.sleep(150ms);  // a probe below the threshold: the next crossing warns again
  }
  co_await a.ps.destroy();
  co_await pub.ps.destroy();
  co_return out;
}

task<int> server_version_num(event_loop& loop) {
  auto c = co_await open(loop);
  auto v = co_await scalar(c, "SHOW server_version_num");
  co_await c->close();
  co_return std::atoi(v.c_str());
}

// ==== 9. the metrics_server example ====

struct scrape_report {
  std::string text, not_found_code, metrics_line;
  bool delivered = false;
  std::optional<int> exit_status;
};

command_result curl(const std::string& tool, const std::string& args) {
  return run_command(shell_quote(tool) + " -sS --max-time 5 " + args);
}

task<scrape_report> scrape_flow(event_loop& loop, std::string curl_tool, std::string exe,
                                std::vector<std::string> channels) {
  scrape_report out;
  std::vector<std::string> argv{exe, dsn(), "0"};
  argv.insert(argv.end(), channels.begin(), channels.end());
  child_process server(argv);
  auto line = co_await server.expect(loop, "METRICS ", 20s);
  if (!line) FAIL("metrics_server did not start serving; it said:\n" << server.transcript());
  out.metrics_line = *line;
  std::string url = line->substr(8);
  pubsub pub(loop, pubsub_opts());
  co_await pub.connect();
  for (int i = 0; i < 3; ++i) co_await pub.notify(channels.front(), "m" + std::to_string(i));
  auto deadline = clock::now() + 5s;
  while (clock::now() < deadline) {
    auto r = curl(curl_tool, shell_quote(url));
    REQUIRE(r.ok());
    out.text = r.output + "\n";  // run_command strips the trailing newline
    auto e = parse_exposition(out.text);
    if (e.value("pgiplock_channel_delivered_total", channels.front()) == 3.0) {
      out.delivered = true;
      break;
    }
    co_await loop.sleep(50ms);
  }
  std::string base = url.substr(0, url.rfind('/'));
  out.not_found_code = curl(curl_tool, "-o /dev/null -w '%{http_code}' " + shell_quote(base + "/nope")).output;
  co_await pub.close();
  server.signal(SIGTERM);
  out.exit_status = co_await server.wait_exit(loop, 5s);
  co_return out;
}

}  // namespace

// ==== the test cases ====

TEST_CASE("stats after deliveries: per channel counts, last delivery, roles holder/standby/plain, token, tenure",
          "[stats]") {
  event_loop loop;
  std::string ch = fresh_channel("roles");
  auto r = loop.run(roles_flow(loop, ch));
  double res = coarse_resolution_ms();

  auto h = channel_of(r.holder, ch);
  CHECK(r.holder.member == r.holder_app);
  CHECK(r.holder.channels.size() == 1);
  CHECK(h.role == channel_role::holder);
  CHECK(h.token == r.holder_token);
  CHECK(h.token > 0);
  CHECK(r.recorded.app == r.holder_app);  // the member's claim recorded its tenure server-side
  CHECK(r.recorded.token == r.holder_token);
  CHECK(ms_apart(h.tenure_since, r.listen_began) >= -1);
  CHECK(ms_apart(r.listen_ended, h.tenure_since) >= -1);
  CHECK(h.delivered == 5);
  INFO("last delivery " << ms_apart(r.seen_at, h.last_delivery) << " ms before it was seen; coarse clock "
                        << res << " ms");
  CHECK(ms_apart(r.seen_at, h.last_delivery) >= -res);
  CHECK(ms_apart(r.seen_at, h.last_delivery) <= 20 + res);
  CHECK(h.handovers == 1);  // the first holder of a free channel
  CHECK(h.takeovers == 0);
  CHECK(h.last_handover.count() > 0);
  CHECK(h.last_handover < 2s);
  CHECK(h.last_takeover.count() == 0);
  CHECK_FALSE(h.durable);
  CHECK(h.backlog == 0);
  CHECK(r.holder.reconnects == 0);
  CHECK(r.holder.notify_sent == 0);
  CHECK(r.holder.probes_failed == 0);

  auto s = channel_of(r.standby, ch);
  CHECK(s.role == channel_role::standby);
  CHECK(s.token == 0);
  CHECK(is_epoch(s.tenure_since));
  CHECK(s.delivered == 0);
  CHECK(is_epoch(s.last_delivery));
  CHECK(s.handovers + s.takeovers == 0);
  CHECK(r.standby.member != r.holder.member);

  auto p = channel_of(r.plain, ch);
  CHECK(p.role == channel_role::plain);
  CHECK(p.token == 0);
  CHECK(is_epoch(p.tenure_since));
  CHECK(p.delivered == 5);
  CHECK(ms_apart(r.seen_at, p.last_delivery) >= -res);
  CHECK(ms_apart(r.seen_at, p.last_delivery) <= 20 + res);
  CHECK(p.handovers + p.takeovers == 0);

  CHECK(r.publisher.notify_sent == 5);
  CHECK(r.publisher.notify_failed == 0);
  CHECK(r.publisher.channels.empty());

  for (auto* st : {&r.holder, &r.standby, &r.plain, &r.publisher}) {
    auto text = pgiplock::prometheus_text(*st);
    require_valid(text);
    require_matches(parse_exposition(text), *st);
  }
  auto e = parse_exposition(pgiplock::prometheus_text(r.standby));
  CHECK(e.value("pgiplock_channel_holder", ch) == 0.0);
  CHECK(e.value("pgiplock_channel_tenure_start_seconds", ch) == 0.0);
}

TEST_CASE("a standby that takes over from a terminated holder counts a takeover", "[stats][takeover]") {
  event_loop loop;
  std::string ch = fresh_channel("takeover");
  auto r = loop.run(takeover_flow(loop, ch));
  INFO("taken over " << r.took_ms << " ms after pg_terminate_backend; the claim took "
                     << ms(r.successor.last_takeover) << " ms; the old holder said holder then: "
                     << r.old_still_holder << " (its link open: " << r.old_link_open << "), and stopped "
                     << r.old_stepped_down_ms << " ms after the kill");
  CHECK(r.successor.role == channel_role::holder);
  CHECK(r.successor.token > r.old_token);
  CHECK(r.successor.takeovers == 1);
  CHECK(r.successor.handovers == 0);
  CHECK(r.successor.last_takeover.count() > 0);
  CHECK(ms(r.successor.last_takeover) <= r.took_ms + 2);
  CHECK(ms_apart(r.successor.tenure_since, r.killed_at) >= -1);
  CHECK(ms_apart(r.successor.tenure_since, r.killed_at) <= r.took_ms + 5);
  // The old holder, reconnecting slowly, is a standby and keeps what it counted.
  CHECK(r.old_stepped_down_ms >= 0);
  CHECK(r.old_holder.role == channel_role::standby);
  CHECK(r.old_holder.token == 0);
  CHECK(is_epoch(r.old_holder.tenure_since));
  CHECK(r.old_holder.handovers == 1);
}

TEST_CASE("after a graceful unlisten or close of the holder, the successor counts a handover", "[stats][handover]") {
  event_loop loop;
  std::string ch = fresh_channel("handover");
  auto r = loop.run(handover_flow(loop, ch));
  for (auto* c : {&r.first, &r.second}) {
    CHECK(c->role == channel_role::holder);
    CHECK(c->handovers == 1);
    CHECK(c->takeovers == 0);
    CHECK(c->last_handover.count() > 0);
    CHECK(c->last_handover < 2s);
  }
  CHECK(r.second.token > r.first.token);
  CHECK(r.first_left);
}

TEST_CASE("counters never go down across a reconnect of the same pubsub", "[stats][reconnect]") {
  event_loop loop;
  std::string ch = fresh_channel("reconnect");
  auto r = loop.run(reconnect_flow(loop, ch));
  auto b = channel_of(r.before, ch), a = channel_of(r.after, ch), l = channel_of(r.later, ch);
  CHECK(r.before.reconnects == 0);
  CHECK(r.after.reconnects == 1);
  CHECK(b.delivered == 3);
  CHECK(a.delivered == 3);
  CHECK(l.delivered == 5);
  CHECK(a.takeovers + a.handovers == b.takeovers + b.handovers + 1);  // it took its channel again
  CHECK(a.role == channel_role::holder);
  CHECK(r.token_after > r.token_before);
  CHECK(a.token == r.token_after);
  CHECK(a.last_delivery >= b.last_delivery);
  CHECK(l.last_delivery >= a.last_delivery);
  for (auto [x, y] : {std::pair{&r.before, &r.after}, std::pair{&r.after, &r.later}}) {
    CHECK(y->reconnects >= x->reconnects);
    CHECK(y->notify_sent >= x->notify_sent);
    CHECK(y->notify_failed >= x->notify_failed);
    CHECK(y->probes_failed >= x->probes_failed);
    auto cx = channel_of(*x, ch), cy = channel_of(*y, ch);
    CHECK(cy.delivered >= cx.delivered);
    CHECK(cy.takeovers >= cx.takeovers);
    CHECK(cy.handovers >= cx.handovers);
  }
}

TEST_CASE("counters never go down across unlisten() and listen() of the same channel", "[stats][relisten]") {
  event_loop loop;
  std::string ch = fresh_channel("relisten");
  auto r = loop.run(relisten_flow(loop, ch));
  auto b = channel_of(r.before, ch), g = channel_of(r.again, ch);
  CHECK(channel_of(r.unlistened, ch).channel.empty());
  CHECK(b.delivered == 3);
  CHECK(g.delivered == 4);
  CHECK(g.takeovers + g.handovers == b.takeovers + b.handovers + 1);  // it took its channel again
  CHECK(g.last_delivery >= b.last_delivery);
}

TEST_CASE("notify_sent and notify_failed count notify() calls; a refusal by the server is a failure",
          "[stats][notify]") {
  event_loop loop;
  auto r = loop.run(server_refusal_flow(loop, fresh_channel("refused")));
  CHECK(r.after_sent.notify_sent == 3);
  CHECK(r.after_sent.notify_failed == 0);
  INFO("the refusal: " << r.refusal);
  CHECK(r.sqlstate == "25006");  // read_only_sql_transaction
  CHECK(r.after_refused.notify_sent == 3);
  CHECK(r.after_refused.notify_failed == 1);
  CHECK(r.after_again.notify_sent == 4);
  CHECK(r.after_again.notify_failed == 1);
  auto e = parse_exposition(pgiplock::prometheus_text(r.after_again));
  CHECK(e.value("pgiplock_notify_sent_total") == 4.0);
  CHECK(e.value("pgiplock_notify_failed_total") == 1.0);
}

TEST_CASE("a notify() refused because the pubsub is closed counts as failed", "[stats][notify]") {
  event_loop loop;
  auto r = loop.run(closed_flow(loop, fresh_channel("closed")));
  CHECK(r.after_sent.notify_sent == 1);
  CHECK_THAT(r.refusal, Catch::Contains("not connected"));
  CHECK(r.after_refused.notify_sent == 1);
  // stats.hpp: notify_failed counts "notify() calls that failed"; this one did.
  CHECK(r.after_refused.notify_failed == 1);
}

TEST_CASE("durable: backlog and oldest unacknowledged age move as messages are published and acknowledged",
          "[stats][durable]") {
  event_loop loop;
  std::string ch = fresh_channel("backlog");
  const int total = 3000;
  auto r = loop.run(backlog_flow(loop, ch, total));
  INFO("largest backlog seen " << r.max_backlog << " (in " << r.samples_with_backlog
                               << " samples); oldest unacknowledged up to " << r.max_oldest.count() << " ms");
  CHECK(r.max_backlog > 0);
  CHECK(r.max_backlog < total);  // acknowledged a page at least before it was first measured
  CHECK(r.max_oldest >= 250ms);  // published 300 ms before the holder came
  CHECK(r.max_oldest < 30s);
  CHECK(r.settled_in_time);
  CHECK(r.settled.durable);
  CHECK(r.settled.role == channel_role::holder);
  CHECK(r.settled.delivered == static_cast<std::uint64_t>(total));
  CHECK(r.settled.backlog == 0);
  CHECK(r.settled.oldest_unacknowledged.count() == 0);
  CHECK(r.live_settled);
  CHECK(r.live.delivered == static_cast<std::uint64_t>(total + 5));
  CHECK(r.live.backlog == 0);
}

TEST_CASE("durable with a transactional handler: the backlog of a stuck handler shows in stats",
          "[stats][durable]") {
  event_loop loop;
  auto r = loop.run(stuck_handler_flow(loop, fresh_channel("stuck")));
  CHECK(r.calls_while_stuck == 1);
  CHECK(r.calls_after == 20);
  INFO("stats() while the handler was stuck on message 1 of 20: backlog " << r.backlog_while_stuck
                                                                          << ", oldest unacknowledged "
                                                                          << r.oldest_while_stuck.count() << " ms");
  CHECK(r.backlog_while_stuck >= 19);
  CHECK(r.oldest_while_stuck.count() > 0);
}

TEST_CASE("ip_lock::stats(): holder and standby, a handover and a takeover", "[stats][ip_lock]") {
  event_loop loop;
  std::string ch = fresh_channel("lock");
  auto r = loop.run(lock_flow(loop, ch));
  CHECK(r.a_holding.channel == ch);
  CHECK(r.a_holding.role == channel_role::holder);
  CHECK(r.a_holding.token == r.a_token);
  CHECK(r.a_token > 0);
  CHECK(ms_apart(r.a_holding.tenure_since, r.acquire_began) >= -1);
  CHECK(ms_apart(r.acquire_ended, r.a_holding.tenure_since) >= -1);
  CHECK(r.a_holding.handovers == 1);
  CHECK(r.a_holding.takeovers == 0);
  CHECK(r.a_holding.last_handover.count() > 0);
  CHECK(r.a_holding.last_handover < 2s);
  CHECK(r.a_holding.delivered == 0);

  CHECK(r.b_waiting.channel == ch);
  CHECK(r.b_waiting.role == channel_role::standby);
  CHECK(r.b_waiting.token == 0);
  CHECK(is_epoch(r.b_waiting.tenure_since));
  CHECK(r.b_waiting.handovers + r.b_waiting.takeovers == 0);

  CHECK(r.b_after_handover.role == channel_role::holder);
  CHECK(r.b_after_handover.token == r.b_token);
  CHECK(r.b_token > r.a_token);
  CHECK(r.b_after_handover.handovers == 1);
  CHECK(r.b_after_handover.takeovers == 0);
  CHECK(r.a_after_release.role == channel_role::standby);
  CHECK(r.a_after_release.token == 0);
  CHECK(is_epoch(r.a_after_release.tenure_since));
  CHECK(r.a_after_release.handovers == 1);  // counters stay

  INFO("takeover " << r.takeover_ms << " ms after pg_terminate_backend; the winning attempt took "
                   << ms(r.c_after_takeover.last_takeover) << " ms");
  CHECK(r.c_after_takeover.role == channel_role::holder);
  CHECK(r.c_after_takeover.token == r.c_token);
  CHECK(r.c_token > r.b_token);
  CHECK(r.c_after_takeover.takeovers == 1);
  CHECK(r.c_after_takeover.handovers == 0);
  CHECK(r.c_after_takeover.last_takeover.count() > 0);
  CHECK(ms(r.c_after_takeover.last_takeover) <= r.takeover_ms + 2);

  // The server's record (pgiplock status): each tenure's winner and token.
  // A release leaves it as history (status shows it only beside a lock row
  // of the same app); a later win overwrites it.
  CHECK(r.a_recorded.app == r.a_app);
  CHECK(r.a_recorded.token == r.a_token);
  CHECK(r.b_recorded.app == r.b_app);
  CHECK(r.b_recorded.token == r.b_token);
  CHECK(r.c_recorded.app == r.c_app);
  CHECK(r.c_recorded.token == r.c_token);
  CHECK(r.after_release.app == r.c_app);
  CHECK(r.after_release.token == r.c_token);
}

TEST_CASE("the strict exposition check refuses what it must", "[stats][prometheus]") {
  const std::string head = "# HELP pgiplock_x_total X.\n# TYPE pgiplock_x_total counter\n";
  const std::string ok = head + "pgiplock_x_total{member=\"m\"} 1\n";
  CHECK(parse_exposition(ok).problems.empty());
  const std::vector<std::pair<std::string, std::string>> bad{
      {"no newline at the end", head + "pgiplock_x_total{member=\"m\"} 1"},
      {"no HELP", "# TYPE pgiplock_x_total counter\npgiplock_x_total{member=\"m\"} 1\n"},
      {"TYPE twice", head + "# TYPE pgiplock_x_total counter\npgiplock_x_total{member=\"m\"} 1\n"},
      {"HELP after the samples", "# TYPE pgiplock_x_total counter\npgiplock_x_total{member=\"m\"} 1\n"
                                 "# HELP pgiplock_x_total X.\n"},
      {"a counter without _total", "# HELP pgiplock_x X.\n# TYPE pgiplock_x counter\npgiplock_x{member=\"m\"} 1\n"},
      {"a gauge with _total", "# HELP pgiplock_x_total X.\n# TYPE pgiplock_x_total gauge\n"
                              "pgiplock_x_total{member=\"m\"} 1\n"},
      {"a gauge without a unit", "# HELP pgiplock_lag X.\n# TYPE pgiplock_lag gauge\npgiplock_lag{member=\"m\"} 1\n"},
      {"a name outside the namespace",
       "# HELP other_total X.\n# TYPE other_total counter\nother_total{member=\"m\"} 1\n"},
      {"an upper-case name", "# HELP pgiplock_X_total X.\n# TYPE pgiplock_X_total counter\n"
                             "pgiplock_X_total{member=\"m\"} 1\n"},
      {"no labels", head + "pgiplock_x_total 1\n"},
      {"no member label", head + "pgiplock_x_total{channel=\"c\"} 1\n"},
      {"an unescaped quote", head + "pgiplock_x_total{member=\"a\"b\"} 1\n"},
      {"an unknown escape", head + "pgiplock_x_total{member=\"a\\tb\"} 1\n"},
      {"a trailing comma", head + "pgiplock_x_total{member=\"m\",} 1\n"},
      {"a label twice", head + "pgiplock_x_total{member=\"m\",member=\"n\"} 1\n"},
      {"lower-case nan", head + "pgiplock_x_total{member=\"m\"} nan\n"},
      {"inf", head + "pgiplock_x_total{member=\"m\"} inf\n"},
      {"a timestamp", head + "pgiplock_x_total{member=\"m\"} 1 1718000000000\n"},
      {"two spaces", head + "pgiplock_x_total{member=\"m\"}  1\n"},
      {"the same sample twice", ok + "pgiplock_x_total{member=\"m\"} 2\n"},
      {"an empty line", ok + "\n"},
      {"samples apart", ok + "# HELP pgiplock_y_total Y.\n# TYPE pgiplock_y_total counter\n"
                             "pgiplock_y_total{member=\"m\"} 1\npgiplock_x_total{member=\"n\"} 1\n"},
      {"a label value that is not UTF-8", head + "pgiplock_x_total{member=\"\xff\"} 1\n"},
  };
  for (auto& [why, text] : bad) {
    INFO(why << ":\n" << text);
    CHECK_FALSE(parse_exposition(text).problems.empty());
  }
}

TEST_CASE("prometheus_text of a made-up snapshot: strict format, escaping, values, durable-only families",
          "[stats][prometheus]") {
  pubsub_stats s;
  s.member = "pgiplock:odd \"member\" \\ name";
  s.reconnects = 123456789012345;  // exact in a double
  s.notify_sent = 7;
  s.notify_failed = 2;
  s.probes_failed = 1;
  s.probe_round_trip = std::chrono::microseconds(1500);
  s.queue_usage = 0.25;
  channel_stats plain, held, standby;
  plain.channel = "plain";
  plain.delivered = 42;
  plain.last_delivery = wall_clock::time_point(std::chrono::milliseconds(1718000000123));
  held.channel = "q\"uo\\te\nnew line ü";
  held.role = channel_role::holder;
  held.token = 99;
  held.tenure_since = wall_clock::time_point(std::chrono::seconds(1718000000));
  held.takeovers = 3;
  held.handovers = 4;
  held.last_takeover = std::chrono::microseconds(5400);
  held.last_handover = std::chrono::microseconds(4720);
  held.durable = true;
  held.backlog = 17;
  held.oldest_unacknowledged = std::chrono::milliseconds(1500);
  standby.channel = "standby";
  standby.role = channel_role::standby;
  s.channels = {plain, held, standby};

  auto text = pgiplock::prometheus_text(s);
  require_valid(text);
  auto e = parse_exposition(text);
  require_matches(e, s);
  INFO(text);
  CHECK(text.find(R"(member="pgiplock:odd \"member\" \\ name")") != std::string::npos);
  CHECK(text.find(R"(channel="q\"uo\\te\nnew line ü")") != std::string::npos);
  CHECK(e.value("pgiplock_reconnects_total") == 123456789012345.0);
  CHECK(e.value("pgiplock_probe_round_trip_seconds") == near(0.0015));
  CHECK(e.value("pgiplock_channel_holder", "plain") == 1.0);
  CHECK(e.value("pgiplock_channel_holder", held.channel) == 1.0);
  CHECK(e.value("pgiplock_channel_holder", "standby") == 0.0);
  CHECK(e.value("pgiplock_channel_tenure_start_seconds", held.channel) == 1718000000.0);
  CHECK(e.value("pgiplock_channel_last_delivery_seconds", "plain") == near(1718000000.123));
  CHECK(e.value("pgiplock_durable_backlog_messages", held.channel) == 17.0);
  CHECK(e.value("pgiplock_durable_oldest_unacknowledged_seconds", held.channel) == 1.5);
  CHECK(e.count("pgiplock_durable_backlog_messages") == 1);  // durable channels only
  CHECK(e.count("pgiplock_channel_delivered_total") == 3);

  pubsub_stats empty;
  empty.member = "pgiplock:nobody";
  auto bare = pgiplock::prometheus_text(empty);
  require_valid(bare);
  auto eb = parse_exposition(bare);
  CHECK(eb.samples.size() == 6);  // the member's own families, no channel family without a channel
  for (auto& smp : eb.samples) CHECK(smp.label("channel").empty());
}

TEST_CASE("prometheus_text of a live pubsub: valid, escaped channel labels, values as stats() says",
          "[stats][prometheus]") {
  event_loop loop;
  std::string plain_name = fresh_channel("expo");
  std::string odd = "q\"b\\s ü\nx" + fresh_channel("");
  auto r = loop.run(exposition_flow(loop, {plain_name, odd}));
  require_valid(r.text);
  auto e = parse_exposition(r.text);
  require_matches(e, r.stats);
  INFO(r.text);
  std::set<std::string> labelled;
  for (auto& smp : e.samples) {
    if (!smp.label("channel").empty()) labelled.insert(smp.label("channel"));
  }
  CHECK(labelled == std::set<std::string>{plain_name, odd});  // unescaped, they are the channel names again
  CHECK(r.text.find("channel=\"q\\\"b\\\\s ü\\nx") != std::string::npos);
  CHECK(e.value("pgiplock_channel_delivered_total", plain_name) == 2.0);
  CHECK(e.value("pgiplock_channel_delivered_total", odd) == 1.0);
}

TEST_CASE("the probe: a LISTEN that hears nothing (a proxy drops NotificationResponse) is reported and replaced",
          "[stats][probe]") {
  auto host = conninfo_field(dsn(), "host").value_or(""), port = conninfo_field(dsn(), "port").value_or("5432");
  if (host.empty() || host.front() == '/') {
    WARN("skipped: PGIPLOCK_DSN does not name a TCP host, which the proxy needs: " << dsn());
    return;
  }
  std::string python = find_tool("python3");
  if (python.empty()) {
    WARN("skipped: no python3 to run " << proxy_script());
    return;
  }
  REQUIRE(::access(proxy_script().c_str(), R_OK) == 0);
  event_loop loop;
  child_process proxy({python, proxy_script(), host, port});
  auto ready = loop.run(proxy.expect(loop, "PORT ", 10s));
  REQUIRE(ready);
  std::string via = conninfo_with(dsn(), {"host", "hostaddr", "port", "sslmode", "gssencmode"},
                                  {{"host", "127.0.0.1"},
                                   {"port", ready->substr(5)},
                                   {"sslmode", "disable"},
                                   {"gssencmode", "disable"}});
  auto r = loop.run(probe_flow(loop, proxy, via, fresh_channel("probe")));
  WARN("deaf LISTEN: reported after " << r.error_ms << " ms, reconnected after " << r.reconnect_ms
                                      << " ms, delivering again after " << r.recovery_ms << " ms ("
                                      << r.deaf_line << ")");
  CHECK(r.healthy.probe_round_trip.count() > 0);
  CHECK(r.healthy.probe_round_trip < 1s);
  CHECK(r.healthy.queue_usage >= 0);
  CHECK(r.healthy.queue_usage <= 1);
  CHECK(r.healthy.probes_failed == 0);
  CHECK(r.deaf_line != "DEAF 0");
  CHECK_THAT(r.dead_error, Catch::Contains("1000 ms") && Catch::Contains("reconnecting"));
  CHECK(r.error_ms > 0);
  CHECK(r.error_ms <= 1500);  // at most a probe interval (300 ms) + the liveness timeout (1 s)
  CHECK(r.heard_while_deaf == 0);
  CHECK(r.recovery_ms > r.error_ms);
  CHECK(r.recovery_ms <= 3000);
  CHECK(r.recovered.probes_failed == 1);
  // The last sample stays across the reconnect (the new probe may not have
  // echoed yet): 0 would read as an empty NOTIFY queue.
  CHECK(r.recovered.probe_round_trip.count() > 0);
  CHECK(r.recovered.reconnects == 1);
  CHECK(r.calm.probes_failed == 1);  // the new connection hears its probes
  CHECK(r.calm.probe_round_trip.count() > 0);
  auto e = parse_exposition(pgiplock::prometheus_text(r.calm));
  CHECK(e.value("pgiplock_probe_failures_total") == 1.0);
}

TEST_CASE("the probe's cadence: 0 disables it, unset is the liveness timeout when shorter than 10 s",
          "[stats][probe]") {
  event_loop loop;
  auto r = loop.run(cadence_flow(loop, fresh_channel("cadence")));
  CHECK(r.fast.probe_round_trip.count() > 0);  // 100 ms: probed within 300 ms
  CHECK(r.defaulted.probe_round_trip.count() > 0);
  CHECK(r.defaulted.probe_round_trip < 1s);
  CHECK(r.defaulted.queue_usage >= 0);
  CHECK(r.defaulted.queue_usage <= 1);
  CHECK(r.disabled.probe_round_trip.count() == 0);  // 1.5 s and never probed
  for (auto* s : {&r.fast, &r.defaulted, &r.disabled}) CHECK(s->probes_failed == 0);
}

TEST_CASE("bad probe_interval and queue_warning are refused naming the values", "[stats][probe][input]") {
  event_loop loop;
  auto make = [&](std::optional<std::chrono::milliseconds> probe, std::chrono::milliseconds live, double warn) {
    auto o = pubsub_opts();
    o.probe_interval = probe;
    o.liveness_timeout = live;
    o.queue_warning = warn;
    pubsub p(loop, o);
  };
  try {
    make(50ms, 10s, 0.5);
    FAIL("probe_interval 50 ms was accepted");
  } catch (const std::invalid_argument& e) {
    CHECK_THAT(e.what(), Catch::Contains("50 ms") && Catch::Contains("10000 ms") && Catch::Contains("100 ms"));
  }
  try {
    make(20s, 10s, 0.5);
    FAIL("probe_interval 20 s with liveness_timeout 10 s was accepted");
  } catch (const std::invalid_argument& e) {
    CHECK_THAT(e.what(), Catch::Contains("20000 ms") && Catch::Contains("10000 ms"));
  }
  CHECK_THROWS_AS(make(std::nullopt, 10s, 0), std::invalid_argument);
  CHECK_THROWS_AS(make(std::nullopt, 10s, 1.5), std::invalid_argument);
  CHECK_THROWS_AS(make(std::nullopt, 10s, -0.1), std::invalid_argument);
  CHECK_THROWS_AS(make(std::nullopt, 10s, std::nan("")), std::invalid_argument);
  // The limits themselves, 0 (off), and no limit without a liveness timeout.
  CHECK_NOTHROW(make(100ms, 10s, 1));
  CHECK_NOTHROW(make(10s, 10s, 0.5));
  CHECK_NOTHROW(make(0ms, 10s, 0.5));
  CHECK_NOTHROW(make(20s, 0ms, 0.5));
  CHECK_NOTHROW(make(std::nullopt, 300ms, 0.5));
}

TEST_CASE("the queue watch: one warning per crossing of queue_warning, from a stuck listener", "[stats][queue]") {
  event_loop loop;
  auto version = loop.run(server_version_num(loop));
  // The issue's test, a queue filled past 50 % by a stopped listener, needs
  // 4 GB of notifications on PostgreSQL < 17 (the queue is 8 GB) and a
  // server restarted with a small max_notify_queue_pages on 17: neither
  // fits this suite's server and time limit.
  WARN("not run: filling the NOTIFY queue past the default 0.5 (server_version_num "
       << version << "); checked instead with a threshold of 2e-5 and 40 pages held by a stuck listener");
  double threshold = 2e-5;
  auto r = loop.run(queue_flow(loop, fresh_channel("queue"), threshold));
  INFO("usage while held: " << r.highs.size() << " samples, peak " << r.peak << "; after the release "
                            << r.after_release);
  CHECK(r.warnings.size() == 2);  // one per crossing: two crossings
  for (auto h : r.highs) CHECK(h >= threshold);
  CHECK(r.peak < 0.01);
  CHECK(r.after_release >= 0);
  CHECK(r.after_release < threshold);
  for (auto& w : r.warnings) {
    CHECK_THAT(w, Catch::Contains("NOTIFY queue") && Catch::Contains("does not read"));
  }
}

TEST_CASE("the metrics_server example serves GET /metrics, 404 elsewhere; curl scrapes valid text",
          "[stats][example]") {
  std::string curl_tool = find_tool("curl");
  if (curl_tool.empty()) {
    WARN("skipped: curl is not installed");
    return;
  }
  std::string exe = metrics_server_exe();
  INFO("the example: " << exe << " (PGIPLOCK_METRICS_SERVER overrides)");
  REQUIRE(::access(exe.c_str(), X_OK) == 0);
  event_loop loop;
  std::vector<std::string> channels{fresh_channel("scrape"), "sc\"r\\ape " + fresh_channel("")};
  auto r = loop.run(scrape_flow(loop, curl_tool, exe, channels));
  INFO(r.text);
  CHECK(r.delivered);
  require_valid(r.text);
  auto e = parse_exposition(r.text);
  for (auto& ch : channels) {
    CHECK(e.value("pgiplock_channel_holder", ch) == 1.0);
    CHECK(e.value("pgiplock_channel_token", ch) > 0);
  }
  CHECK(e.value("pgiplock_channel_delivered_total", channels[0]) == 3.0);
  CHECK(e.value("pgiplock_channel_delivered_total", channels[1]) == 0.0);
  CHECK(e.samples.front().label("member").rfind("pgiplock:", 0) == 0);
  CHECK(r.not_found_code == "404");
  REQUIRE(r.exit_status);
  CHECK(WIFSIGNALED(*r.exit_status));
  CHECK(WTERMSIG(*r.exit_status) == SIGTERM);
}
