#!/usr/bin/env bash
# Installs the pinned Node packages (@imqueue/pg-pubsub and pg) with npm into
# DIR (DIR/node_modules) unless they are there already, and prints that
# node_modules directory: the NODE_PATH for tests/interop/node_peer.js and
# tests/soak/node_member.js. The interop suite (run.sh) and the soak
# (tools/soak, tests/soak/run.sh) share DIR = BUILD/node_interop.
# Exits 77 with the reason on stderr when node or npm is missing, 1 when
# npm fails (offline, say).
# Usage: node_install.sh DIR
set -euo pipefail
dir="$1"
for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "'$tool' is not installed" >&2
        exit 77
    fi
done
pins=("@imqueue/pg-pubsub@1.10.0" "pg@8.23.1")
stamp="$dir/.installed"  # holds the pins it was installed with
installed() { [[ -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; }
if ! installed; then
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    stamp="$dir/.installed"
    # A lock directory, so two programs never install at once.
    exec 9>"$dir/.lock"
    flock 9
    if ! installed; then
        (cd "$dir" && npm install --no-audit --no-fund --loglevel=error --prefix "$dir" "${pins[@]}") >&2
        printf '%s' "${pins[*]}" >"$stamp"
    fi
    exec 9>&-
fi
echo "$(cd "$dir" && pwd)/node_modules"
