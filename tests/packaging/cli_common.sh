# shellcheck shell=bash
# Sourced by the command-line tool's tests. $1 is the pgiplock executable.

set -euo pipefail

cli="${1:?usage: $0 PGIPLOCK_EXECUTABLE [BUILD_ROOT]}"
[[ -x "$cli" ]] || { echo "FAIL: $cli is not executable" >&2; exit 1; }
work="$(mktemp -d "${TMPDIR:-/tmp}/pgiplock-cli.XXXXXX")"
children=()
cleanup() {
    local pid
    for pid in ${children[@]+"${children[@]}"}; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf -- "$work"
}
trap cleanup EXIT

fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*"; }

# expect STATUS CMD...: runs the tool, stdout/stderr into $work/out, $work/err.
expect() {
    local want="$1" rc=0
    shift
    "$cli" "$@" >"$work/out" 2>"$work/err" </dev/null || rc=$?
    if [[ "$rc" != "$want" ]]; then
        note "stdout:"; cat "$work/out"; note "stderr:"; cat "$work/err"
        fail "pgiplock $* exited with $rc, expected $want"
    fi
}
stdout_has() { grep -qE -- "$1" "$work/out" || { cat "$work/out"; fail "stdout lacks /$1/"; }; }
stderr_has() { grep -qE -- "$1" "$work/err" || { cat "$work/err"; fail "stderr lacks /$1/"; }; }
stderr_empty() { [[ ! -s "$work/err" ]] || { cat "$work/err"; fail "unexpected stderr"; }; }

# wait_for FILE REGEX [SECONDS]: until a line of FILE matches.
wait_for() {
    local file="$1" re="$2" limit="${3:-10}" i
    for ((i = 0; i < limit * 20; i++)); do
        grep -qE -- "$re" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    note "--- $file:"; cat "$file" 2>/dev/null || true
    fail "no line matching /$re/ in $file within ${limit}s"
}
