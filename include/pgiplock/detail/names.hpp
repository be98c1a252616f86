// ==== detail: names, keys and their limits ===================================
//
// What the lock protocol names things (sessions, lock channels, schemas),
// the limits PostgreSQL puts on those names, and the keys derived from them.
// PostgreSQL silently truncates identifiers, NOTIFY channels included, to 63
// bytes: two long names would then share one lock or one schema, so names
// that would be truncated are refused here, before anything is sent.
#pragma once

#include "../errors.hpp"
#include "env.hpp"

namespace pgiplock::detail {

// Our sessions' application_name: this prefix and a UUID. A holder whose
// app carries it always holds its channel's advisory lock, so a standby that
// got that lock knows the holder is gone without waiting for its session to
// vanish from pg_stat_activity.
inline constexpr std::string_view app_prefix = "pgiplock-";
inline constexpr std::string_view lock_prefix = "__PgIpLock__:";     // the Node package's
inline constexpr std::string_view announce_payload = "listening";   // a new holder's LISTEN committed
inline constexpr std::string_view release_payload = "1";            // the Node trigger's release event
inline constexpr std::size_t max_identifier = 63;                   // NAMEDATALEN - 1
inline constexpr std::size_t max_channel = max_identifier - lock_prefix.size();
// Starts every nudge of a durable channel (sql.hpp's pgiplock_publish_many
// writes the same text).
inline constexpr std::string_view nudge_prefix = "pgiplock#";
inline constexpr std::size_t max_payload = 7999;                    // the server rejects 8000 bytes
inline constexpr std::size_t max_durable_payload = (1u << 30) - 1024;  // a text value is at most 1 GiB
inline constexpr std::string_view default_schema = "pgip_lock";
inline constexpr std::string_view claim_schema_suffix = "_unique";  // execution-lock markers
inline constexpr std::size_t max_schema = max_identifier - claim_schema_suffix.size();
// A fleet member's listening connection is named with this prefix. Not
// "pgiplock-": ip_lock treats rows of such apps as its own (it takes one over
// when the channel's advisory lock is free, which a member never holds).
inline constexpr std::string_view member_prefix = "pgiplock:";
// A balanced member's (pubsub_options::balance): the census of the shares
// counts these only, as the server sees them, with no column to migrate.
inline constexpr std::string_view balanced_member_prefix = "pgiplock:b:";
// The fleet channel's prefix (see detail/member.hpp): reserved, like lock channels.
inline constexpr std::string_view fleet_prefix = "__pgiplock__";

inline std::string random_uuid() {
  unsigned char b[16];
  std::size_t got = 0;
  while (got < sizeof b) {
    ssize_t n = ::getrandom(b + got, sizeof b - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::system_category(), "getrandom");
    }
    got += static_cast<std::size_t>(n);
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);  // RFC 4122 variant
  static const char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(36);
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out.push_back('-');
    out.push_back(hex[b[i] >> 4]);
    out.push_back(hex[b[i] & 15]);
  }
  return out;
}

// A locked channel's name goes into the lock channel too, so it has 13 bytes
// less room than a plain one.
enum class channel_use { plain, locked };

inline void validate_channel(std::string_view channel, channel_use use) {
  if (channel.empty()) throw std::invalid_argument("pgiplock: the channel name is empty");
  if (channel.find('\0') != std::string_view::npos) {
    throw std::invalid_argument("pgiplock: the channel name contains a NUL byte");
  }
  std::string head = "pgiplock: channel name '" + std::string(channel.substr(0, 20)) + "...' is " +
                     std::to_string(channel.size()) + " bytes; ";
  if (use == channel_use::plain && channel.size() > max_identifier) {
    throw std::invalid_argument(head + "PostgreSQL allows at most " + std::to_string(max_identifier));
  }
  if (use == channel_use::locked && channel.size() > max_channel) {
    throw std::invalid_argument(head + "at most " + std::to_string(max_channel) + " fit, since the lock channel '" +
                                std::string(lock_prefix) + "<channel>' must stay within PostgreSQL's " +
                                std::to_string(max_identifier) + "-byte identifier limit");
  }
  if (use == channel_use::locked && channel.substr(0, lock_prefix.size()) == lock_prefix) {
    throw std::invalid_argument("pgiplock: channel names starting with '" + std::string(lock_prefix) +
                                "' are reserved for the locks themselves");
  }
  if (use == channel_use::locked && channel.substr(0, fleet_prefix.size()) == fleet_prefix) {
    throw std::invalid_argument("pgiplock: channel names starting with '" + std::string(fleet_prefix) +
                                "' are reserved for the fleet's own events");
  }
}

inline bool is_lock_channel(std::string_view channel) {
  return channel.substr(0, lock_prefix.size()) == lock_prefix;
}

// Lock channels and the fleet channel: the library's own traffic.
inline bool is_internal_channel(std::string_view channel) {
  if (channel.empty() || channel[0] != '_') return false;  // per notification: the common case decides at once
  return is_lock_channel(channel) || channel.substr(0, fleet_prefix.size()) == fleet_prefix;
}

// Where `text` stops being UTF-8 (overlong forms, surrogates and code
// points past U+10FFFF included, as PostgreSQL refuses them), or npos.
inline std::size_t utf8_error_at(std::string_view text) {
  auto* p = reinterpret_cast<const unsigned char*>(text.data());
  std::size_t n = text.size(), i = 0;
  while (i < n) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = p[i] >= 0xF0 ? 4 : p[i] >= 0xE0 ? 3 : p[i] >= 0xC2 ? 2 : 0;
    if (len == 0 || p[i] > 0xF4 || i + len > n) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
    }
    if ((p[i] == 0xE0 && p[i + 1] < 0xA0) || (p[i] == 0xED && p[i + 1] >= 0xA0) || (p[i] == 0xF0 && p[i + 1] < 0x90) ||
        (p[i] == 0xF4 && p[i + 1] >= 0x90)) {
      return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// Payloads are text in the session's encoding: a sequence the server would
// refuse fails here, naming where, before it could fail a whole batch.
inline void validate_encoding(std::string_view payload, std::string_view client_encoding) {
  if (client_encoding != "UTF8") return;
  auto at = utf8_error_at(payload);
  if (at != std::string_view::npos) {
    throw std::invalid_argument("pgiplock: notification payload is not valid UTF-8 at byte offset " +
                                std::to_string(at) + " (the session's client_encoding is UTF8)");
  }
}

inline void validate_durable_payload(std::string_view payload) {
  if (payload.size() > max_durable_payload) {
    throw std::length_error("pgiplock: payload is " + std::to_string(payload.size()) +
                            " bytes; a durable channel takes at most " + std::to_string(max_durable_payload));
  }
  if (payload.find('\0') != std::string_view::npos) {
    throw std::invalid_argument("pgiplock: notification payload contains a NUL byte at offset " +
                                std::to_string(payload.find('\0')) + "; payloads are text");
  }
}

inline void validate_payload(std::string_view payload) {
  if (payload.size() > max_payload) {
    throw std::length_error("pgiplock: notification payload is " + std::to_string(payload.size()) +
                            " bytes; PostgreSQL accepts at most " + std::to_string(max_payload) +
                            " on a plain channel (durable channels, pubsub_options::durable, take larger ones)");
  }
  validate_durable_payload(payload);
}

// "pgip_lock", or $PG_PUBSUB_SCHEMA_NAME as the Node package reads it. A name
// the server would truncate (itself, or with "_unique" for the execution
// lock's schema) would split the lock group: refused, naming the limit.
inline std::string lock_schema_name() {
  auto name = env_value("PG_PUBSUB_SCHEMA_NAME").value_or(std::string(default_schema));
  if (name.size() > max_schema) {
    throw std::invalid_argument("pgiplock: PG_PUBSUB_SCHEMA_NAME is " + std::to_string(name.size()) +
                                " bytes; at most " + std::to_string(max_schema) +
                                " fit, since the schema '<name>" + std::string(claim_schema_suffix) +
                                "' must stay within PostgreSQL's " + std::to_string(max_identifier) +
                                "-byte identifier limit");
  }
  return name;
}

// 64-bit FNV-1a: stable across processes and builds, which std::hash is not.
struct fnv1a {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  void feed(std::string_view s) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 0x100000001b3ULL;
    }
  }
};

// The advisory-lock key of a lock channel: the same in every process.
inline std::int64_t advisory_key(std::string_view lock_channel) {
  fnv1a f;
  f.feed(lock_channel);
  return static_cast<std::int64_t>(f.h);
}

// The same key as the (int4, int4) pair of the two-argument advisory
// functions, which live in a key space of their own.
inline std::pair<std::int32_t, std::int32_t> split_key(std::int64_t key) {
  auto k = static_cast<std::uint64_t>(key);
  return {static_cast<std::int32_t>(static_cast<std::uint32_t>(k >> 32)),
          static_cast<std::int32_t>(static_cast<std::uint32_t>(k & 0xffffffffULL))};
}

// 128 bits from two differently seeded FNV-1a passes (each field followed by
// its length, so field borders count) with a final mix: the default
// execution-lock key; not cryptographic, collisions are ~2^-64 for the
// traffic of a TTL.
inline std::string message_key(int sender_pid, std::string_view channel, std::string_view payload) {
  auto pass = [&](std::uint64_t seed) {
    fnv1a f{seed};
    std::string pid = std::to_string(sender_pid);
    for (std::string_view field : {std::string_view(pid), channel, payload}) {
      f.feed(field);
      f.h ^= field.size();
      f.h *= 0x100000001b3ULL;
    }
    std::uint64_t h = f.h;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
  };
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(pass(0xcbf29ce484222325ULL)),
                static_cast<unsigned long long>(pass(0x84222325cbf29ce4ULL)));
  return buf;
}

// A PostgreSQL text-array literal, for sending many values as one bound
// parameter ($1::text[]).
class text_array {
 public:
  void add(std::string_view s) {
    out_.push_back(count_++ ? ',' : '{');
    out_.push_back('"');
    for (char c : s) {
      if (c == '"' || c == '\\') out_.push_back('\\');
      out_.push_back(c);
    }
    out_.push_back('"');
  }
  std::size_t size() const noexcept { return count_; }
  std::string literal() const { return count_ ? out_ + '}' : std::string("{}"); }

 private:
  std::string out_;
  std::size_t count_ = 0;
};

}  // namespace pgiplock::detail
