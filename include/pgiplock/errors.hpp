// ==== errors and logging ====================================================
//
// The library's own errors, rooted in pgiplock::error, so callers catch what
// they can handle: a lost link (connection_error) apart from a statement the
// server refused (sql_error, with its SQLSTATE). Bad input found before
// anything is sent is std::invalid_argument / std::length_error instead.
#pragma once

#include "config.hpp"

namespace pgiplock {

class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Cannot connect, or the link to the server was lost.
class connection_error : public error {
 public:
  using error::error;
};

// The server rejected a statement; sqlstate() is the five-character code.
class sql_error : public error {
 public:
  sql_error(const std::string& message, std::string sqlstate)
      : error(message), sqlstate_(std::move(sqlstate)) {}
  [[nodiscard]] const std::string& sqlstate() const noexcept { return sqlstate_; }

 private:
  std::string sqlstate_;
};

enum class log_level { debug, info, warn, error };
using log_handler = std::function<void(log_level, std::string_view)>;

inline constexpr std::size_t unlimited = std::numeric_limits<std::size_t>::max();

namespace detail {
// To the user's logger; warnings and errors to stderr when there is none.
PGIPLOCK_INLINE void log(const log_handler& logger, log_level level, std::string_view message);
PGIPLOCK_INLINE std::string trim_message(std::string m);
PGIPLOCK_INLINE std::string without_prefix(std::string m);
}  // namespace detail

// ---- implementation ---------------------------------------------------------

namespace detail {

#if PGIPLOCK_DEFINITIONS
PGIPLOCK_INLINE const char* level_name(log_level level) {
  switch (level) {
    case log_level::debug: return "debug";
    case log_level::info: return "info";
    case log_level::warn: return "warn";
    case log_level::error: return "error";
  }
  return "?";
}

// Without a user logger, warnings and errors still reach stderr: a library
// that silently swallows a lost link is worse than a noisy one.
PGIPLOCK_INLINE void log(const log_handler& logger, log_level level, std::string_view message) {
  if (logger) {
    logger(level, message);
  } else if (level >= log_level::warn) {
    std::fprintf(stderr, "pgiplock %s: %.*s\n", level_name(level), static_cast<int>(message.size()),
                 message.data());
  }
}

// libpq ends its messages with a newline; ours are one line each.
PGIPLOCK_INLINE std::string trim_message(std::string m) {
  while (!m.empty() && (m.back() == '\n' || m.back() == ' ')) m.pop_back();
  return m;
}

// For a message quoted inside another of ours.
PGIPLOCK_INLINE std::string without_prefix(std::string m) {
  static constexpr std::string_view prefix = "pgiplock: ";
  if (m.compare(0, prefix.size(), prefix) == 0) m.erase(0, prefix.size());
  return m;
}
#endif  // PGIPLOCK_DEFINITIONS

}  // namespace detail
}  // namespace pgiplock
