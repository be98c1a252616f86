#!/usr/bin/env bash
# The fault suite's soak: 60 s of tests/soak/soak.py with a fixed seed (4:
# its schedule has every fault kind, 17 faults), with the Node member where
# node and npm are, then tests/soak/check.py.
# PGIPLOCK_SOAK_SEED and PGIPLOCK_SOAK_SECONDS override them. On failure it
# prints the command that replays the schedule, and keeps the history.
# Usage: run.sh SOAK_MEMBER OUT_DIR
set -euo pipefail
member="$1" out="$2"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PGIPLOCK_DSN:-}" ]]; then
    echo "skipped: PGIPLOCK_DSN is not set (tools/check sets it)"
    exit 77
fi
seed="${PGIPLOCK_SOAK_SEED:-4}" seconds="${PGIPLOCK_SOAK_SECONDS:-60}"
rm -rf "$out"
mkdir -p "$out"
# The Node member where node and npm are (installed into the build
# directory, beside the interop suite's copy); without them the soak runs
# without it and soak.py says so.
build="$(cd "$(dirname "$member")/../.." && pwd)"
node_args=()
if modules="$("$here/../interop/node_install.sh" "$build/node_interop" 2>"$out/node_install.log")"; then
    node_args=(--node-modules "$modules")
else
    node_args=(--node-skip "tests/interop/node_install.sh failed: $(tail -n 1 "$out/node_install.log")")
fi
rc=0
python3 "$here/soak.py" --member-bin "$member" --out "$out" --seconds "$seconds" --seed "$seed" "${node_args[@]}" || rc=$?
crc=0
python3 "$here/check.py" "$out" || crc=$?
if (( rc != 0 || crc != 0 )); then
    echo "soak failed (driver $rc, checker $crc); history in $out/history.txt"
    echo "replay: tools/soak --seconds $seconds --seed $seed   (or PGIPLOCK_SOAK_SEED=$seed meson test soak)"
    exit 1
fi
