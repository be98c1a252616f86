#!/usr/bin/env bash
# Runs an interop test program with @imqueue/pg-pubsub (pinned) installed by
# npm into the build directory (node_install.sh). Without node or npm the
# suite is skipped (77).
set -euo pipefail
exe="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Absolute: npm runs in another directory, and node resolves NODE_PATH as given.
exe="$(cd "$(dirname "$exe")" && pwd)/$(basename "$exe")"
rc=0
modules="$("$here/node_install.sh" "$(cd "$(dirname "$exe")/.." && pwd)/node_interop")" || rc=$?
if (( rc == 77 )); then
    echo "skipped: the Node interop suite needs node and npm"
    exit 77
fi
(( rc == 0 )) || exit "$rc"
export NODE_PATH="$modules"
export PGIPLOCK_NODE_PEER="$here/node_peer.js"
exec "$exe" "$@"
