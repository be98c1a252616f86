// ==== stats ==================================================================
//
// What an operator asks of a fleet member: who holds what since when, how
// many takeovers and how long they took, whether the listener still hears
// (the end-to-end probe), how far behind a durable channel is, how full the
// server's NOTIFY queue is. pubsub::stats() takes a snapshot (cheap enough
// every second); counters never go back while the pubsub lives.
// prometheus_text() renders one in the Prometheus text exposition format.
#pragma once

#include "errors.hpp"

namespace pgiplock {

enum class channel_role {
  plain,    // every instance delivers (single_listener off)
  standby,  // single-listener mode, another member holds it
  holder,   // this member holds it and delivers it
};

struct channel_stats {
  std::string channel;
  channel_role role = channel_role::plain;
  std::int64_t token = 0;                                 // holder: its tenure's fencing token
  std::chrono::system_clock::time_point tenure_since{};   // holder: when the tenure began
  std::uint64_t delivered = 0;                            // messages handed to the handlers
  std::chrono::system_clock::time_point last_delivery{};  // the epoch when none yet (a few ms coarse)
  // Tenures this instance won from a holder that was gone (a crash, a
  // demotion), and of a channel that was free (a graceful handover, or the
  // first holder); each with how long its last claim took.
  std::uint64_t takeovers = 0, handovers = 0;
  std::chrono::microseconds last_takeover{0}, last_handover{0};
  bool durable = false;
  // Durable holder, as of its last acknowledgement: published minus
  // acknowledged, and the age of the oldest unacknowledged message.
  std::int64_t backlog = 0;
  std::chrono::milliseconds oldest_unacknowledged{0};
};

struct pubsub_stats {
  std::string member;  // the listening connection's application_name
  std::uint64_t reconnects = 0;
  std::uint64_t notify_sent = 0, notify_failed = 0;  // notify() calls
  std::uint64_t probes_failed = 0;                   // echoes that did not come back
  // The last echo's round trip and pg_notification_queue_usage() with it,
  // kept across reconnects; both 0 before the first echo.
  std::chrono::microseconds probe_round_trip{0};
  double queue_usage = 0;
  std::vector<channel_stats> channels;
};

// The Prometheus text exposition format (version 0.0.4): names in the
// pgiplock_ namespace with their unit, labels member and channel.
[[nodiscard]] std::string prometheus_text(const pubsub_stats& stats);

namespace detail {

// The wall clock, read once per batch of notifications a connection
// dispatches (the vDSO's CLOCK_REALTIME_COARSE, no system call), so that
// counting a delivery is an increment and a copy, not a clock read. Beside
// it the monotonic one, which no clock step moves: a durable holder
// compares it with its tenure's last confirmation (journal.hpp).
inline thread_local std::int64_t dispatch_ms = 0;
inline thread_local std::int64_t dispatch_steady_ms = 0;
PGIPLOCK_INLINE void note_dispatch_time() noexcept;
// CLOCK_MONOTONIC_COARSE in ms (a few ms coarse, no system call).
PGIPLOCK_INLINE std::int64_t steady_coarse_ms() noexcept;

// Per channel, on the delivery path.
struct delivery_count {
  std::uint64_t n = 0;
  std::int64_t last_ms = 0;
  void tick() noexcept {
    ++n;
    last_ms = dispatch_ms;
  }
};

}  // namespace detail

// ---- implementation ---------------------------------------------------------

#if PGIPLOCK_DEFINITIONS
namespace detail {

PGIPLOCK_INLINE void note_dispatch_time() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME_COARSE, &ts);
  dispatch_ms = static_cast<std::int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
  dispatch_steady_ms = steady_coarse_ms();
}

PGIPLOCK_INLINE std::int64_t steady_coarse_ms() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

PGIPLOCK_INLINE std::string prometheus_label(std::string_view value) {
  std::string out;
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out.push_back('\\');
      out.push_back(c);
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

PGIPLOCK_INLINE std::string prometheus_number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

PGIPLOCK_INLINE double unix_seconds(std::chrono::system_clock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

// One metric family: its HELP and TYPE once, then a sample per label set.
struct prometheus_family {
  std::string& out;
  std::string name;
  void head(std::string_view type, std::string_view help) {
    out += "# HELP " + name + " " + std::string(help) + "\n# TYPE " + name + " " + std::string(type) + "\n";
  }
  void sample(std::string_view labels, double v) { out += name + "{" + std::string(labels) + "} " + prometheus_number(v) + "\n"; }
};

}  // namespace detail

namespace detail {

PGIPLOCK_INLINE void prometheus_member(std::string& out, const pubsub_stats& s, const std::string& m) {
  auto metric = [&](const char* name, const char* type, const char* help, double v) {
    prometheus_family f{out, name};
    f.head(type, help);
    f.sample(m, v);
  };
  metric("pgiplock_reconnects_total", "counter", "Reconnects of the listening connection.",
         static_cast<double>(s.reconnects));
  metric("pgiplock_notify_sent_total", "counter", "notify() calls that committed.", static_cast<double>(s.notify_sent));
  metric("pgiplock_notify_failed_total", "counter", "notify() calls that failed.",
         static_cast<double>(s.notify_failed));
  metric("pgiplock_probe_failures_total", "counter", "End-to-end probes whose echo did not come back.",
         static_cast<double>(s.probes_failed));
  metric("pgiplock_probe_round_trip_seconds", "gauge", "The last end-to-end probe's round trip.",
         std::chrono::duration<double>(s.probe_round_trip).count());
  metric("pgiplock_notify_queue_usage_ratio", "gauge",
         "The server's NOTIFY queue usage (pg_notification_queue_usage()) at the last probe.", s.queue_usage);
}

struct channel_column {
  const char* name;
  const char* type;
  const char* help;
  double (*value)(const channel_stats&);
  bool durable_only;
};

PGIPLOCK_INLINE double seconds(std::chrono::microseconds d) { return std::chrono::duration<double>(d).count(); }

PGIPLOCK_INLINE const std::vector<channel_column>& channel_columns() {
  using c_t = const channel_stats&;
  static const std::vector<channel_column> columns{
      {"pgiplock_channel_holder", "gauge", "1 while this member delivers the channel (holder, or plain mode).",
       [](c_t c) { return c.role == channel_role::standby ? 0.0 : 1.0; }, false},
      {"pgiplock_channel_token", "gauge", "The fencing token of this member's tenure (0: none).",
       [](c_t c) { return static_cast<double>(c.token); }, false},
      {"pgiplock_channel_tenure_start_seconds", "gauge", "Unix time this member's tenure began (0: none).",
       [](c_t c) { return c.role == channel_role::holder ? unix_seconds(c.tenure_since) : 0.0; }, false},
      {"pgiplock_channel_delivered_total", "counter", "Messages delivered to the handlers.",
       [](c_t c) { return static_cast<double>(c.delivered); }, false},
      {"pgiplock_channel_last_delivery_seconds", "gauge", "Unix time of the last delivery (0: none).",
       [](c_t c) { return unix_seconds(c.last_delivery); }, false},
      {"pgiplock_channel_takeovers_total", "counter", "Tenures won from a holder that was gone.",
       [](c_t c) { return static_cast<double>(c.takeovers); }, false},
      {"pgiplock_channel_handovers_total", "counter", "Tenures won of a free channel (a graceful handover).",
       [](c_t c) { return static_cast<double>(c.handovers); }, false},
      {"pgiplock_channel_last_takeover_seconds", "gauge", "How long the claim of the last takeover took.",
       [](c_t c) { return seconds(c.last_takeover); }, false},
      {"pgiplock_channel_last_handover_seconds", "gauge", "How long the claim of the last handover took.",
       [](c_t c) { return seconds(c.last_handover); }, false},
      {"pgiplock_durable_backlog_messages", "gauge", "Durable channel: published minus acknowledged.",
       [](c_t c) { return static_cast<double>(c.backlog); }, true},
      {"pgiplock_durable_oldest_unacknowledged_seconds", "gauge",
       "Durable channel: the age of the oldest unacknowledged message.",
       [](c_t c) { return std::chrono::duration<double>(c.oldest_unacknowledged).count(); }, true},
  };
  return columns;
}

}  // namespace detail

PGIPLOCK_INLINE std::string prometheus_text(const pubsub_stats& s) {
  std::string out;
  std::string m = "member=\"" + detail::prometheus_label(s.member) + "\"";
  detail::prometheus_member(out, s, m);
  for (auto& col : detail::channel_columns()) {
    auto wanted = [&](const channel_stats& c) { return !col.durable_only || c.durable; };
    if (std::none_of(s.channels.begin(), s.channels.end(), wanted)) continue;
    detail::prometheus_family f{out, col.name};
    f.head(col.type, col.help);
    for (auto& c : s.channels) {
      if (wanted(c)) f.sample(m + ",channel=\"" + detail::prometheus_label(c.channel) + "\"", col.value(c));
    }
  }
  return out;
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace pgiplock
