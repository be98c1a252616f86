// pgiplock — reliable PostgreSQL LISTEN/NOTIFY for Linux, with an
// inter-process lock so that exactly one process of a fleet listens to a
// channel and another takes over when it releases or dies.
//
// C++20, Linux only; link with -lpq -luring. Wire-compatible with the lock
// schema of the Node.js package @imqueue/pg-pubsub (PgIpLock), so C++ and
// Node processes can share a lock.
//
// This umbrella includes the parts in the order a reader needs them; users
// get them as one file, pgiplock.hpp at the top of the repository, which
// tools/amalgamate makes from them.
#pragma once

#include "config.hpp"
#include "errors.hpp"
#include "task.hpp"
#include "event_loop.hpp"
#include "connection.hpp"
#include "ip_lock.hpp"
#include "stats.hpp"
#include "pubsub.hpp"
#include "shutdown.hpp"
