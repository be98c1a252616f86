// pgiplock — the command-line tool: listen to channels, send a notification,
// and show who holds which channel lock.
//
//   pgiplock listen [--single|--durable] CH...
//                                       one JSON object per notification on stdout
//   pgiplock notify [--durable] CH PAYLOAD
//                                       PAYLOAD '-' reads standard input
//   pgiplock status [--json]            the lock table, with alive/stale holders,
//                                       the fleet members (alive or dead), and
//                                       each durable channel's backlog
//
// Exit codes: 0 success, 1 runtime failure (cannot connect, SQL error),
// 2 usage error. `listen` runs until SIGINT/SIGTERM and then ends the way
// the signal ends a process (status 130/143 in a shell), after releasing
// its locks so a standby elsewhere takes over at once.
#include "pgiplock.hpp"

#include <time.h>

#include <algorithm>
#include <ctime>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace std::chrono_literals;
using pgiplock::event_loop;
using pgiplock::task;

constexpr int exit_ok = 0;
constexpr int exit_failure = 1;
constexpr int exit_usage = 2;

// A lock row's channel is this prefix and the channel (the lock protocol
// shared with @imqueue/pg-pubsub).
constexpr std::string_view lock_prefix = "__PgIpLock__:";

constexpr const char* usage_text =
    "Usage: pgiplock [--dsn DSN] COMMAND [OPTIONS] [ARGS]\n"
    "\n"
    "PostgreSQL LISTEN/NOTIFY with an inter-process lock (pgiplock " PGIPLOCK_VERSION ").\n"
    "\n"
    "Commands:\n"
    "  listen [--single] CH...  print each notification on the channels as one JSON\n"
    "                           object per line: {\"channel\",\"payload\",\"pid\",\"time\"}\n"
    "                           (pid: the sender's backend pid; time: when it was\n"
    "                           received, UTC). Runs until SIGINT or SIGTERM.\n"
    "                           --single: single-listener mode: of all processes\n"
    "                           listening with --single, only the holder of a\n"
    "                           channel's lock prints it; the others stand by.\n"
    "  listen --durable CH...   durable channels (single-listener mode): the holder\n"
    "                           prints what the journal holds after the channel's\n"
    "                           cursor, then what comes, in order, with the\n"
    "                           message's id instead of the pid:\n"
    "                           {\"channel\",\"payload\",\"id\",\"time\"}.\n"
    "  notify [--durable] CH PAYLOAD\n"
    "                           send PAYLOAD (at most 7999 bytes; '-' reads it from\n"
    "                           standard input) on channel CH. --durable: append it\n"
    "                           to the channel's journal (up to 1 GiB) and nudge\n"
    "                           the channel, in one transaction.\n"
    "  status [--json] [--watch[=N]]\n"
    "                           list the channel locks: channel, alive or stale, the\n"
    "                           holder's backend pid and application_name, its\n"
    "                           tenure's fencing token and start (as the winner\n"
    "                           recorded them; '-' for a Node peer's row), and since\n"
    "                           when its session exists; then the fleet members\n"
    "                           (processes in single-listener mode): application_name,\n"
    "                           alive (holds its member lock), dead, or unlocked (its\n"
    "                           session lost the lock: the others treat it as dead),\n"
    "                           the backend pid and time it joined with, and how many\n"
    "                           channels it holds; then, once a durable channel was\n"
    "                           used, each durable channel: messages published,\n"
    "                           acknowledged, the backlog (published - acknowledged)\n"
    "                           the age of the oldest unacknowledged message and the\n"
    "                           fencing token of the tenure that holds its cursor.\n"
    "                           --json prints one JSON object,\n"
    "                           {\"channels\":[...],\"members\":[...]}, with a third\n"
    "                           list, \"durable\":[...], and \"queue_usage\" (the\n"
    "                           server's NOTIFY queue, 0 to 1). --watch[=N]: again\n"
    "                           every N seconds (default 1), redrawing the screen;\n"
    "                           with --json, one object every N seconds.\n"
    "\n"
    "Options:\n"
    "  --dsn DSN      libpq connection string or postgresql:// URI. Default:\n"
    "                 $PGIPLOCK_DSN; without either, libpq's defaults and its\n"
    "                 environment (PGHOST, PGPORT, PGDATABASE, PGUSER, PGSERVICE...)\n"
    "                 apply, as for psql.\n"
    "  -h, --help     show this help\n"
    "  --version      show the version\n"
    "\n"
    "Environment: PG_PUBSUB_SCHEMA_NAME (lock schema, default pgip_lock),\n"
    "PGIPLOCK_BACKEND (io_uring or epoll), PG_PUBSUB_SHUTDOWN_TIMEOUT (ms).\n"
    "\n"
    "Exit status: 0 success, 1 runtime failure, 2 usage error.\n";

struct usage_error {
  std::string message;
};

struct command_line {
  std::string command;
  std::string dsn;
  bool dsn_given = false;
  bool single = false;
  bool durable = false;
  bool json = false;
  int watch_s = 0;  // status --watch[=N]: refresh every N seconds
  bool help = false;
  bool version = false;
  std::vector<std::string> args;
};

command_line parse(int argc, char** argv) {
  command_line cl;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (!options_done && a.size() > 1 && a[0] == '-') {
      if (a == "--") {
        options_done = true;
      } else if (a == "-h" || a == "--help") {
        cl.help = true;
      } else if (a == "--version") {
        cl.version = true;
      } else if (a == "--single") {
        cl.single = true;
      } else if (a == "--durable") {
        cl.durable = true;
      } else if (a == "--json") {
        cl.json = true;
      } else if (a == "--watch" || a.substr(0, 8) == "--watch=") {
        cl.watch_s = 1;
        if (a.size() > 8) {
          auto n = std::strtol(std::string(a.substr(8)).c_str(), nullptr, 10);
          if (n < 1 || n > 3600) throw usage_error{"--watch=N: N is seconds, 1 to 3600"};
          cl.watch_s = static_cast<int>(n);
        }
      } else if (a == "--dsn") {
        if (i + 1 >= argc) throw usage_error{"option --dsn needs a value"};
        cl.dsn = argv[++i];
        cl.dsn_given = true;
      } else if (a.substr(0, 6) == "--dsn=") {
        cl.dsn = std::string(a.substr(6));
        cl.dsn_given = true;
      } else {
        throw usage_error{"unknown option '" + std::string(a) + "'"};
      }
    } else if (cl.command.empty()) {
      cl.command = a;
    } else {
      cl.args.emplace_back(a);
    }
  }
  if (cl.help || cl.version) return cl;
  if (cl.command.empty()) throw usage_error{"no command given (listen, notify or status)"};
  if (cl.command == "help") {
    cl.help = true;
    return cl;
  }
  if (cl.command != "listen" && cl.command != "notify" && cl.command != "status") {
    throw usage_error{"unknown command '" + cl.command + "' (listen, notify or status)"};
  }
  if (cl.single && cl.command != "listen") throw usage_error{"--single applies to 'listen' only"};
  if (cl.durable && cl.command != "listen" && cl.command != "notify") {
    throw usage_error{"--durable applies to 'listen' and 'notify' only"};
  }
  if (cl.durable && cl.command == "listen") cl.single = true;  // a durable channel is delivered by its holder
  if (cl.json && cl.command != "status") throw usage_error{"--json applies to 'status' only"};
  if (cl.watch_s && cl.command != "status") throw usage_error{"--watch applies to 'status' only"};
  if (cl.command == "listen" && cl.args.empty()) throw usage_error{"listen: give at least one channel"};
  if (cl.command == "notify" && cl.args.size() != 2) {
    throw usage_error{"notify: give a channel and a payload, e.g. pgiplock notify orders '{\"id\":1}'"};
  }
  if (cl.command == "status" && !cl.args.empty()) {
    throw usage_error{"status: unexpected argument '" + cl.args[0] + "'"};
  }
  if (!cl.dsn_given) {
    const char* env = std::getenv("PGIPLOCK_DSN");
    if (env && *env) cl.dsn = env;
  }
  // The library refuses an empty conninfo; a conninfo that sets only what the
  // library overrides anyway leaves every other parameter to libpq's defaults.
  if (cl.dsn.find_first_not_of(" \t\r\n") == std::string::npos) {
    if (cl.dsn_given) throw usage_error{"--dsn is empty"};
    cl.dsn = "application_name=pgiplock";
  }
  return cl;
}

// ---- JSON ---------------------------------------------------------------

// A JSON string literal. Bytes that are not valid UTF-8 become U+FFFD, so
// the output is valid JSON whatever the server's encoding let through.
std::string json_string(std::string_view s) {
  std::string out = "\"";
  static constexpr char hex[] = "0123456789abcdef";
  for (std::size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (c < 0x20 || c == 0x7f) {
            out += "\\u00";
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 15]);
          } else {
            out.push_back(static_cast<char>(c));
          }
      }
      ++i;
      continue;
    }
    // Length and smallest code point of a multi-byte sequence (RFC 3629).
    std::size_t len = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c <= 0xdf ? 2 : 0;
    if (c >= 0xf5) len = 0;
    bool ok = len != 0 && i + len <= s.size();
    char32_t cp = len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
    for (std::size_t k = 1; ok && k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) ok = false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if (ok && ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))) {
      ok = false;
    }
    if (ok) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\\ufffd";
      ++i;
    }
  }
  out.push_back('"');
  return out;
}

std::string utc_now_iso() {
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char buf[40];
  std::size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  std::snprintf(buf + n, sizeof buf - n, ".%03dZ", static_cast<int>(ms % 1000));
  return buf;
}

void print_error(std::string_view what) {
  // The library's messages already start with "pgiplock: ".
  if (what.substr(0, 10) == "pgiplock: ") what.remove_prefix(10);
  std::cerr << "pgiplock: error: " << what << '\n';
}

pgiplock::log_handler stderr_logger() {
  return [](pgiplock::log_level level, std::string_view message) {
    if (level == pgiplock::log_level::warn) std::cerr << "pgiplock: warning: " << message << '\n';
    if (level == pgiplock::log_level::error) std::cerr << "pgiplock: error: " << message << '\n';
  };
}

// ---- listen -------------------------------------------------------------

struct listen_state {
  // Set by pubsub's on_message for the notification being dispatched; the
  // connection-level subscriber, which runs after pubsub's for the same
  // notification, prints it with the sender's pid that on_message lacks.
  bool delivered = false;
};

void print_notification(const pgiplock::notification& n) {
  std::string line = "{\"channel\":" + json_string(n.channel) + ",\"payload\":" + json_string(n.payload) +
                     ",\"pid\":" + std::to_string(n.sender_pid) + ",\"time\":\"" + utc_now_iso() + "\"}\n";
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fflush(stdout);
}

// A durable channel's message comes from the journal or a nudge, with its
// id; the sender's pid is not recorded.
void print_delivery(const pgiplock::delivery& d) {
  std::string line = "{\"channel\":" + json_string(d.channel) + ",\"payload\":" + json_string(d.payload) +
                     ",\"id\":" + std::to_string(d.id) + ",\"time\":\"" + utc_now_iso() + "\"}\n";
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fflush(stdout);
}

task<int> run_listen(event_loop& loop, command_line cl) {
  pgiplock::pubsub_options opt;
  opt.conninfo = cl.dsn;
  opt.single_listener = cl.single;
  opt.execution_lock = false;
  opt.durable = cl.durable;
  opt.logger = stderr_logger();
  pgiplock::pubsub ps(loop, std::move(opt));
  listen_state st;
  if (cl.durable) {
    ps.on_delivery(print_delivery);
  } else {
    ps.on_message([&st](std::string_view, std::string_view) { st.delivered = true; });
    ps.on_connect([&ps, &st] {
      (void)ps.client()->subscribe("", [&st](const pgiplock::notification& n) {
        if (std::exchange(st.delivered, false)) print_notification(n);
      });
    });
  }
  ps.on_listen([](std::string_view ch) {
    std::cerr << "pgiplock: listening on " << json_string(ch) << '\n';
  });
  ps.on_error([](const std::exception& e) { print_error(e.what()); });
  ps.on_reconnect([](std::size_t retries) {
    std::cerr << "pgiplock: reconnected after " << retries << " attempt(s)\n";
  });
  // on_close, not on_end: a lost link (the primary failed over) is followed
  // by reconnect attempts; on_close comes only when they gave up.
  bool ended = false;
  ps.on_close([&ended] { ended = true; });

  co_await ps.connect();
  for (const auto& ch : cl.args) {
    co_await ps.listen(ch);
    if (cl.single && !ps.is_active(ch)) {
      std::cerr << "pgiplock: standby for " << json_string(ch) << " (another process holds its lock)\n";
    }
  }
  while (!ended) co_await loop.sleep(200ms);
  std::cerr << "pgiplock: error: gave up reconnecting\n";
  co_return exit_failure;
}

// ---- notify -------------------------------------------------------------

task<int> run_notify(event_loop& loop, command_line cl) {
  std::string payload = cl.args[1];
  if (payload == "-") {
    payload.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  pgiplock::pubsub_options opt;
  opt.conninfo = cl.dsn;
  opt.single_listener = false;
  opt.execution_lock = false;
  opt.durable = cl.durable;
  opt.retry_limit = 0;
  opt.logger = stderr_logger();
  pgiplock::pubsub ps(loop, std::move(opt));
  co_await ps.connect();
  co_await ps.notify(cl.args[0], payload);
  co_await ps.close();
  co_return exit_ok;
}

// ---- status -------------------------------------------------------------

struct lock_row {
  std::string channel, app, pid, since, age;
  // The tenure as its winner recorded it (<schema>.pgiplock_holder): empty
  // for a holder that records none (a Node peer, a pgiplock before the table).
  std::string token, held_since, held_age;
  bool alive = false;
};

// A fleet member: a pubsub in single-listener mode (<schema>.pgiplock_member).
// It is alive while it holds its session advisory lock, the test the other
// members make; a member whose lock is free is dead to them, and the next
// claim any of them makes deletes its row and frees its channels.
struct member_row {
  std::string app, pid, since, age, channels;
  bool locked = false;   // its advisory lock is held
  bool session = false;  // a session with its application_name exists
};

// A durable channel (docs/durable.md): its counter row, its cursor, and the
// oldest message of the journal above the cursor (empty: none there).
struct durable_row {
  std::string channel, published, acked, backlog, oldest_age, token;
};

struct status_report {
  std::string schema;
  bool lock_table = false;
  std::vector<lock_row> channels;
  std::vector<member_row> members;
  std::vector<durable_row> durable;
  std::string queue_usage;  // pg_notification_queue_usage(), 0..1
};

std::string format_age(long secs) {
  if (secs < 0) secs = 0;
  if (secs < 60) return std::to_string(secs) + "s";
  if (secs < 3600) return std::to_string(secs / 60) + "m" + std::to_string(secs % 60) + "s";
  if (secs < 86400) return std::to_string(secs / 3600) + "h" + std::to_string(secs / 60 % 60) + "m";
  return std::to_string(secs / 86400) + "d" + std::to_string(secs / 3600 % 24) + "h";
}

std::string since_cell(const std::string& since, const std::string& age) {
  if (since.empty()) return "-";
  return since + " (" + format_age(std::strtol(age.c_str(), nullptr, 10)) + " ago)";
}

// Seconds with a fraction (from extract(epoch ...)): tenths under a minute,
// where a backlog's age matters most.
std::string age_cell(const std::string& secs) {
  if (secs.empty()) return "-";
  double v = std::strtod(secs.c_str(), nullptr);
  if (v < 60) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1fs", v < 0 ? 0.0 : v);
    return std::string(buf) + " ago";
  }
  return format_age(static_cast<long>(v)) + " ago";
}

const char* member_state(const member_row& m) {
  if (m.locked) return "alive";
  return m.session ? "unlocked" : "dead";
}

// Columns line up in characters, not bytes (a channel name may be UTF-8).
std::size_t display_width(std::string_view s) {
  return static_cast<std::size_t>(
      std::count_if(s.begin(), s.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xc0) != 0x80; }));
}

void print_columns(const std::vector<std::vector<std::string>>& cells) {
  std::vector<std::size_t> width(cells.front().size(), 0);
  for (const auto& row : cells) {
    for (std::size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], display_width(row[i]));
  }
  for (const auto& row : cells) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(width[i] - display_width(row[i]) + 2, ' ');
    }
    std::cout << line << '\n';
  }
}

void print_text(const status_report& s) {
  if (s.channels.empty()) {
    std::cout << "no channel is locked (lock table " << s.schema << ".lock"
              << (s.lock_table ? " is empty)" : " does not exist yet)") << '\n';
  } else {
    std::vector<std::vector<std::string>> cells;
    cells.push_back({"CHANNEL", "STATE", "PID", "APPLICATION", "TOKEN", "HELD SINCE", "SESSION SINCE"});
    for (const auto& r : s.channels) {
      cells.push_back({r.channel, r.alive ? "alive" : "stale", r.pid.empty() ? "-" : r.pid, r.app,
                       r.token.empty() ? "-" : r.token, since_cell(r.held_since, r.held_age),
                       since_cell(r.since, r.age)});
    }
    print_columns(cells);
  }
  if (!s.members.empty()) {
    std::vector<std::vector<std::string>> cells;
    cells.push_back({"MEMBER", "STATE", "PID", "SINCE", "CHANNELS"});
    for (const auto& m : s.members) {
      cells.push_back({m.app, member_state(m), m.pid, since_cell(m.since, m.age), m.channels});
    }
    std::cout << '\n';
    print_columns(cells);
  }
  std::cout << "\nNOTIFY queue: " << s.queue_usage << " used (pg_notification_queue_usage())\n";
  if (s.durable.empty()) return;
  std::vector<std::vector<std::string>> cells;
  cells.push_back({"DURABLE CHANNEL", "PUBLISHED", "ACKNOWLEDGED", "BACKLOG", "OLDEST UNACKNOWLEDGED", "TOKEN"});
  for (const auto& d : s.durable) {
    cells.push_back({d.channel, d.published, d.acked, d.backlog, age_cell(d.oldest_age), d.token.empty() ? "-" : d.token});
  }
  std::cout << '\n';
  print_columns(cells);
}

void print_json(const status_report& s) {
  std::cout << "{\"channels\":[";
  for (std::size_t i = 0; i < s.channels.size(); ++i) {
    const auto& r = s.channels[i];
    std::cout << (i ? ",\n " : "") << "{\"channel\":" << json_string(r.channel) << ",\"alive\":"
              << (r.alive ? "true" : "false") << ",\"pid\":" << (r.pid.empty() ? "null" : r.pid)
              << ",\"app\":" << json_string(r.app)
              << ",\"since\":" << (r.since.empty() ? "null" : json_string(r.since))
              << ",\"token\":" << (r.token.empty() ? "null" : r.token)
              << ",\"held_since\":" << (r.held_since.empty() ? "null" : json_string(r.held_since)) << '}';
  }
  std::cout << "],\n \"members\":[";
  for (std::size_t i = 0; i < s.members.size(); ++i) {
    const auto& m = s.members[i];
    std::cout << (i ? ",\n " : "") << "{\"app\":" << json_string(m.app) << ",\"alive\":"
              << (m.locked ? "true" : "false") << ",\"pid\":" << m.pid << ",\"since\":" << json_string(m.since)
              << ",\"channels\":" << m.channels << ",\"session\":" << (m.session ? "true" : "false") << '}';
  }
  std::cout << "],\n \"durable\":[";
  for (std::size_t i = 0; i < s.durable.size(); ++i) {
    const auto& d = s.durable[i];
    std::cout << (i ? ",\n " : "") << "{\"channel\":" << json_string(d.channel) << ",\"published\":" << d.published
              << ",\"acknowledged\":" << d.acked << ",\"backlog\":" << d.backlog
              << ",\"oldest_age_s\":" << (d.oldest_age.empty() ? "null" : d.oldest_age)
              << ",\"token\":" << (d.token.empty() ? "null" : d.token) << '}';
  }
  std::cout << "],\n \"queue_usage\":" << (s.queue_usage.empty() ? "null" : s.queue_usage) << "}\n";
}

task<bool> table_exists(std::shared_ptr<pgiplock::connection> conn, std::string table) {
  auto r = co_await conn->query("SELECT to_regclass($1) IS NOT NULL", table);
  co_return r.get(0, 0) == "t";
}

// A holder is alive while a session with its application_name exists: the
// same test acquire() makes. backend_start is NULL for sessions of other
// roles unless we may read all statistics (pg_read_all_stats).
// The tenure's token and start come from pgiplock_holder when its app is
// still the lock row's (else it is an earlier tenure's record).
task<std::vector<lock_row>> read_channels(std::shared_ptr<pgiplock::connection> conn, std::string schema,
                                          bool holder_table) {
  std::string prefix(lock_prefix), pattern = prefix + "%";
  std::string tenure = holder_table
      ? "h.token, to_char(h.since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
        "extract(epoch FROM now() - h.since)::bigint "
      : "NULL::bigint, NULL::text, NULL::bigint ";
  std::string join = holder_table ? "LEFT JOIN " + schema + ".pgiplock_holder h ON h.channel = l.channel AND h.app = l.app "
                                  : std::string();
  auto r = co_await conn->query(
      "SELECT substr(l.channel, length($1) + 1), l.app, a.pid, "
      "       to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
      "       extract(epoch FROM now() - a.backend_start)::bigint, a.app IS NOT NULL, " + tenure +
      "FROM " + schema + ".lock l " + join +
      "LEFT JOIN LATERAL (SELECT s.pid, s.backend_start, s.application_name AS app "
      "                   FROM pg_catalog.pg_stat_activity s WHERE s.application_name = l.app "
      "                   ORDER BY s.backend_start LIMIT 1) a ON true "
      "WHERE l.channel LIKE $2 ORDER BY l.channel",
      prefix, pattern);
  std::vector<lock_row> rows;
  for (int i = 0; i < r.rows(); ++i) {
    lock_row row;
    row.channel = r.get(i, 0);
    row.app = r.get(i, 1);
    row.pid = r.get(i, 2);
    row.since = r.get(i, 3);
    row.age = r.get(i, 4);
    row.alive = r.get(i, 5) == "t";
    if (!r.is_null(i, 6)) {
      row.token = r.get(i, 6);
      row.held_since = r.get(i, 7);
      row.held_age = r.get(i, 8);
    }
    rows.push_back(std::move(row));
  }
  co_return rows;
}

// pid and since are what the member row recorded when it joined (its
// listening session's backend pid), shown whether or not it is still alive.
// The member lock is a session advisory lock on the 64-bit key, which
// pg_locks shows as its two halves (objsubid 1), per database.
task<std::vector<member_row>> read_members(std::shared_ptr<pgiplock::connection> conn, std::string schema,
                                           bool lock_table) {
  std::string pattern = std::string(lock_prefix) + "%";
  std::string held = lock_table ? "(SELECT count(*) FROM " + schema + ".lock l WHERE l.app = m.app AND l.channel LIKE $1)"
                                : "0";
  std::string sql =
      "SELECT m.app, m.pid, to_char(m.since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "
      "       extract(epoch FROM now() - m.since)::bigint, " + held + ", "
      "       EXISTS (SELECT 1 FROM pg_catalog.pg_locks k WHERE k.locktype = 'advisory' AND k.granted "
      "               AND k.objsubid = 1 AND k.database = (SELECT d.oid FROM pg_catalog.pg_database d "
      "                                                     WHERE d.datname = current_database()) "
      "               AND k.classid = ((m.key >> 32) & 4294967295)::oid "
      "               AND k.objid = (m.key & 4294967295)::oid), "
      "       EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.application_name = m.app) "
      "FROM " + schema + ".pgiplock_member m ORDER BY m.app";
  pgiplock::result r;
  if (lock_table) {
    r = co_await conn->query(sql, pattern);
  } else {
    r = co_await conn->query(sql);
  }
  std::vector<member_row> rows;
  for (int i = 0; i < r.rows(); ++i) {
    member_row row;
    row.app = r.get(i, 0);
    row.pid = r.get(i, 1);
    row.since = r.get(i, 2);
    row.age = r.get(i, 3);
    row.channels = r.get(i, 4);
    row.locked = r.get(i, 5) == "t";
    row.session = r.get(i, 6) == "t";
    rows.push_back(std::move(row));
  }
  co_return rows;
}

// The journal's tables exist from the first durable pubsub's connect on
// (all of them, in one bootstrap); before that there is nothing to show.
task<std::vector<durable_row>> read_durable(std::shared_ptr<pgiplock::connection> conn, std::string schema) {
  for (const char* table : {".pgiplock_channel", ".pgiplock_cursor", ".pgiplock_journal"}) {
    bool present = co_await table_exists(conn, schema + table);
    if (!present) co_return std::vector<durable_row>{};
  }
  namespace sql = pgiplock::detail::sql;
  auto r = co_await conn->query(sql::in_schema(sql::durable_status, schema));
  std::vector<durable_row> rows;
  for (int i = 0; i < r.rows(); ++i) {
    durable_row row;
    row.channel = r.get(i, 0);
    row.published = r.get(i, 1);
    row.acked = r.get(i, 2);
    row.backlog = r.get(i, 3);
    row.oldest_age = r.is_null(i, 4) ? std::string() : std::string(r.get(i, 4));
    row.token = r.is_null(i, 5) ? std::string() : std::string(r.get(i, 5));
    rows.push_back(std::move(row));
  }
  co_return rows;
}

task<status_report> read_status(std::shared_ptr<pgiplock::connection> conn) {
  status_report s;
  s.schema = pgiplock::ip_lock::schema_name();
  const std::string schema = conn->quote_identifier(s.schema);
  s.lock_table = co_await table_exists(conn, schema + ".lock");
  if (s.lock_table) {
    s.channels = co_await read_channels(conn, schema, co_await table_exists(conn, schema + ".pgiplock_holder"));
  }
  if (co_await table_exists(conn, schema + ".pgiplock_member")) {
    s.members = co_await read_members(conn, schema, s.lock_table);
  }
  s.durable = co_await read_durable(conn, schema);
  auto q = co_await conn->query("SELECT round(pg_notification_queue_usage()::numeric, 6)");
  s.queue_usage = q.get(0, 0);
  co_return s;
}

// Reads only: status never creates the lock schema. --watch redraws the
// screen every N seconds, as top does, until interrupted.
task<int> run_status(event_loop& loop, command_line cl) {
  pgiplock::connect_options copt;
  copt.application_name = "pgiplock-status";
  copt.logger = stderr_logger();
  auto conn = co_await pgiplock::connection::connect(loop, cl.dsn, std::move(copt));
  for (;;) {
    auto s = co_await read_status(conn);
    if (cl.watch_s && !cl.json) {
      std::time_t now = std::time(nullptr);
      char stamp[32];
      std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", std::localtime(&now));
      std::cout << "\x1b[H\x1b[2J" << "pgiplock status, every " << cl.watch_s << " s, " << stamp << "\n\n";
    }
    if (cl.json) {
      print_json(s);
    } else {
      print_text(s);
    }
    std::cout.flush();
    if (!cl.watch_s || !std::cout) break;
    co_await loop.sleep(std::chrono::seconds(cl.watch_s));
  }
  co_await conn->close();
  co_return std::cout ? exit_ok : exit_failure;
}

task<int> run_command(event_loop& loop, command_line cl) {
  if (cl.command == "listen") co_return co_await run_listen(loop, std::move(cl));
  if (cl.command == "notify") co_return co_await run_notify(loop, std::move(cl));
  co_return co_await run_status(loop, std::move(cl));
}

}  // namespace

int main(int argc, char** argv) {
  command_line cl;
  try {
    cl = parse(argc, argv);
  } catch (const usage_error& e) {
    std::cerr << "pgiplock: " << e.message << "\nTry 'pgiplock --help' for more information.\n";
    return exit_usage;
  }
  if (cl.help) {
    std::cout << usage_text;
    return exit_ok;
  }
  if (cl.version) {
    std::cout << "pgiplock " << PGIPLOCK_VERSION << '\n';
    return exit_ok;
  }
  try {
    pgiplock::event_loop_options lopt;
    lopt.logger = stderr_logger();
    event_loop loop(lopt);
    // Before anything else runs: the signals must be blocked before the
    // loop reads them, and then SIGINT/SIGTERM release our locks first.
    if (cl.command == "listen") pgiplock::enable_graceful_shutdown(loop);
    return loop.run(run_command(loop, std::move(cl)));
  } catch (const std::invalid_argument& e) {
    // Bad input found before anything was sent: a channel name, a payload,
    // a conninfo libpq cannot parse.
    print_error(e.what());
    return exit_usage;
  } catch (const std::length_error& e) {
    print_error(e.what());
    return exit_usage;
  } catch (const std::exception& e) {
    print_error(e.what());
    return exit_failure;
  }
}
