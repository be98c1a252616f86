# shellcheck shell=bash
# Sourced by the packaging tests. Usage of each test: SCRIPT SOURCE_ROOT.

set -euo pipefail

fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
note() { printf '%s\n' "$*"; }

src="${1:?usage: $0 SOURCE_ROOT}"
[[ -f "$src/pgiplock.hpp" ]] || fail "$src/pgiplock.hpp not found"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cxx="${CXX:-g++}"
meson="${MESON:-meson}"

# The version the header declares: what every packaging must report.
version="$(sed -n 's/^#define PGIPLOCK_VERSION "\(.*\)"$/\1/p' "$src/pgiplock.hpp")"
[[ -n "$version" ]] || fail "no #define PGIPLOCK_VERSION in $src/pgiplock.hpp"

work="$(mktemp -d "${TMPDIR:-/tmp}/pgiplock-packaging.XXXXXX")"
trap 'rm -rf -- "$work"' EXIT

# A consumer's build must not pick up include paths from our environment.
unset CPATH CPLUS_INCLUDE_PATH C_INCLUDE_PATH

# Runs the consumer program $1 and checks what it prints.
run_consumer() {
    local out
    out="$("$1")" || fail "$1 exited with status $?"
    note "$out"
    [[ "$out" =~ ^pgiplock\ ${version//./\\.}\ ok\ on\ (io_uring|epoll)$ ]] \
        || fail "unexpected output from the consumer: '$out'"
}

# Copies the source tree as a release would ship it into $1: what git tracks
# plus new files not ignored (so no build directories, no downloaded
# subprojects).
copy_release_tree() {
    local dest="$1"
    mkdir -p "$dest"
    if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$src" && git ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
            | tar --null -T - -cf -) | tar -C "$dest" -xf -
    else
        (cd "$src" && tar --exclude='./build' --exclude='./build-*' --exclude='./.git' \
            --exclude='node_modules' --exclude='./subprojects/*/' -cf - .) \
            | tar -C "$dest" -xf -
    fi
}
