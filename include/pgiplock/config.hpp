// ==== configuration and version =============================================
//
// The version (the build reads it back from here) and the macros a user may
// override before including the header; then every system header the
// library uses, so the other parts include nothing themselves.
#pragma once

#define PGIPLOCK_VERSION_MAJOR 0
#define PGIPLOCK_VERSION_MINOR 1
#define PGIPLOCK_VERSION_PATCH 0
#define PGIPLOCK_VERSION "0.1.0"

// Applies when neither the conninfo nor connect_options sets a timeout.
#ifndef PGIPLOCK_DEFAULT_CONNECT_TIMEOUT_MS
#define PGIPLOCK_DEFAULT_CONNECT_TIMEOUT_MS 10000
#endif

// Debian puts libpq's header under postgresql/; pkg-config adds that to the
// include path, a plain `g++ -lpq` does not.
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <queue>
#include <set>
#include <unordered_set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>
