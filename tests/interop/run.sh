#!/usr/bin/env bash
# Runs an interop test program with @imqueue/pg-pubsub (pinned) installed by
# npm into the build directory. Without node or npm the suite is skipped (77).
set -euo pipefail
exe="$1"; shift
for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "skipped: '$tool' is not installed (the Node interop suite needs node and npm)"
        exit 77
    fi
done
# Absolute: npm runs in another directory, and node resolves NODE_PATH as given.
exe="$(cd "$(dirname "$exe")" && pwd)/$(basename "$exe")"
dir="$(cd "$(dirname "$exe")/.." && pwd)/node_interop"
pins=("@imqueue/pg-pubsub@1.10.0" "pg@8.23.1")
stamp="$dir/.installed"  # holds the pins it was installed with
installed() { [[ -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; }
if ! installed; then
    mkdir -p "$dir"
    # A lock directory, so two interop programs never install at once.
    exec 9>"$dir/.lock"
    flock 9
    if ! installed; then
        (cd "$dir" && npm install --no-audit --no-fund --loglevel=error --prefix "$dir" "${pins[@]}") >&2
        printf '%s' "${pins[*]}" >"$stamp"
    fi
    exec 9>&-
fi
export NODE_PATH="$dir/node_modules"
export PGIPLOCK_NODE_PEER
PGIPLOCK_NODE_PEER="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/node_peer.js"
exec "$exe" "$@"
