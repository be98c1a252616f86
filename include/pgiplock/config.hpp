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

// Separate compilation, optional. By default every function of the library
// is inline, and each file that includes the header compiles its own copy:
// what one header costs, about 30 s of g++ -O2 per file (and 150 s under the
// sanitizers). Define PGIPLOCK_SEPARATE_COMPILATION for the whole program
// (every file: on the command line), and PGIPLOCK_IMPLEMENTATION besides in
// exactly one .cpp that includes the header: the library is compiled once,
// there, and every other file sees its declarations and templates only.
#if defined(PGIPLOCK_SEPARATE_COMPILATION)
#define PGIPLOCK_INLINE
#if defined(PGIPLOCK_IMPLEMENTATION)
#define PGIPLOCK_DEFINITIONS 1
// GCC flags the coroutine frame of an out-of-line coroutine defined in a
// header when a local type (a scope guard) lives across a co_await; that
// frame is private to this one file, so nothing can clash with it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif
#else
#define PGIPLOCK_DEFINITIONS 0
#endif
#else
#define PGIPLOCK_INLINE inline
#define PGIPLOCK_DEFINITIONS 1
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
