// ==== detail: environment variables ==========================================
//
// The variables the Node package reads (PG_PUBSUB_*), parsed strictly: the
// Node package turns "abc" into 0 or false without a word, which for
// PG_PUBSUB_SHUTDOWN_TIMEOUT means exiting at once with every lock held. An
// invalid value is reported once (variable and value named) and the default
// is used instead.
#pragma once

#include "../errors.hpp"

namespace pgiplock::detail {

// Set and not empty; what an unset variable and "" both mean is "default".
inline std::optional<std::string> env_value(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

// One warning per variable and value, however often it is read.
inline void warn_invalid_env(const char* name, const std::string& value, std::string_view expected,
                             std::string_view fallback) {
  static std::set<std::string> warned;
  if (!warned.insert(std::string(name) + '=' + value).second) return;
  log({}, log_level::warn,
      std::string("ignoring ") + name + "='" + value + "': expected " + std::string(expected) + "; using " +
          std::string(fallback));
}

// A whole non-negative decimal number of milliseconds, nothing else.
inline std::chrono::milliseconds env_milliseconds(const char* name, std::chrono::milliseconds fallback) {
  auto v = env_value(name);
  if (!v) return fallback;
  long long ms = -1;
  auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), ms);
  if (ec != std::errc() || end != v->data() + v->size() || ms < 0) {
    warn_invalid_env(name, *v, "a whole number of milliseconds (0 or more)",
                     "the default, " + std::to_string(fallback.count()) + " ms");
    return fallback;
  }
  return std::chrono::milliseconds(ms);
}

// A number (non-zero: on, as the Node package reads it) or true/false.
inline bool env_flag(const char* name, bool fallback = false) {
  auto v = env_value(name);
  if (!v) return fallback;
  if (*v == "true") return true;
  if (*v == "false") return false;
  long long n = 0;
  auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
  if (ec == std::errc() && end == v->data() + v->size()) return n != 0;
  warn_invalid_env(name, *v, "a number (0 = off) or true/false", fallback ? "on" : "off");
  return fallback;
}

}  // namespace pgiplock::detail
