# shellcheck shell=bash
# tools/lib/common.sh - helpers shared by tools/check, tools/demo, tools/bench
# and .ci/run.
#
# Sourced, never executed.  Every function is written to work under the
# callers' `set -euo pipefail` AND when called from an `if`/`||` context
# (where bash silently disables `set -e` inside functions), so failures are
# checked explicitly with `|| return` instead of relying on errexit.
#
# Public functions:
#   pgiplock_ensure_packages          install missing Debian packages
#   pgiplock_find_pgbin               print the PostgreSQL bin dir
#   pgiplock_install_traps            EXIT/INT/TERM/HUP cleanup (idempotent)
#   pgiplock_use_server               the server in PGIPLOCK_DSN, or a throwaway one
#   pgiplock_start_pg                 start a throwaway server, export PGIPLOCK_DSN
#                                     and PGIPLOCK_SERVER_ENV
#   pgiplock_stop_pg                  stop + delete it (idempotent)
#   pgiplock_configure_build DIR [meson setup args...]
#   pgiplock_run CMD [ARGS...]        run a long command so Ctrl-C/SIGTERM are
#                                     handled at once (see there)
#
# Environment understood:
#   PGIPLOCK_DSN   a libpq conninfo: use that server and start none.  Set by
#                  pgiplock_start_pg to the throwaway server's otherwise.
#   PGIPLOCK_SRC   source dir of the meson project (default: repo root).  Only
#                  meant for testing these scripts against another project.

# Guard against double sourcing: the traps and state below must exist once.
if [[ -n "${PGIPLOCK__COMMON_SOURCED:-}" ]]; then
    return 0
fi
PGIPLOCK__COMMON_SOURCED=1

# Repo root derived from this file's own location (tools/lib/common.sh), so the
# scripts work from any cwd and from any clone location (CI uses a fresh clone
# in another folder).
PGIPLOCK_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
PGIPLOCK_SRC="${PGIPLOCK_SRC:-$PGIPLOCK_ROOT}"

# The one place that lists what the project needs from Debian.
# nodejs/npm, pgbouncer, cmake, patroni, etcd-server, prometheus (for its
# promtool) and gnuplot-nox are optional test tools (the interop, PgBouncer,
# CMake packaging and Patroni tests skip without them, test_stats checks the
# metrics with its own parser only, tools/soak draws no timeline), see below.
PGIPLOCK_PACKAGES="libpq-dev liburing-dev catch2 meson ninja-build postgresql nftables iproute2 g++ clang nodejs npm pgbouncer cmake pkg-config patroni etcd-server prometheus gnuplot-nox"
PGIPLOCK_OPTIONAL_PACKAGES="nodejs npm pgbouncer cmake patroni etcd-server prometheus gnuplot-nox"

# Internal state (double underscore = private).
PGIPLOCK__APT_UPDATED=""      # apt-get update only once per script run
PGIPLOCK__PG_TMP=""           # temp dir of the running throwaway server
PGIPLOCK__PG_DATA=""
PGIPLOCK__PG_BIN=""
PGIPLOCK__PG_RUNAS=""
PGIPLOCK__PG_PORT=""
PGIPLOCK__PG_LOG=""
PGIPLOCK__PG_SOCK=""
PGIPLOCK__TRAPS=""            # traps installed?
PGIPLOCK__CHILD=""            # pid of the command run by pgiplock_run
PGIPLOCK__CLEANING=""         # re-entrancy guard for the signal path

# The one list of what a throwaway server tells the programs run against it
# about itself, besides PGIPLOCK_DSN: each exported name and the private
# variable its value comes from.  A server given by PGIPLOCK_DSN has none of
# them, and the tests leave out the checks that need them (a restart of the
# server, reading its log).
PGIPLOCK_SERVER_ENV=(
    PGIPLOCK_TEST_PORT=PGIPLOCK__PG_PORT      # TCP port (the partition test connects by address)
    PGIPLOCK_TEST_LOG=PGIPLOCK__PG_LOG        # server log (tests look for statements and ERROR lines)
    PGIPLOCK_TEST_PGDATA=PGIPLOCK__PG_DATA    # data and bin dir: the fault test restarts the server
    PGIPLOCK_TEST_PGBIN=PGIPLOCK__PG_BIN
    PGIPLOCK_TEST_PGRUNAS=PGIPLOCK__PG_RUNAS  # the user the server runs as (postgres when root), or empty
    PGIPLOCK_TEST_SOCKDIR=PGIPLOCK__PG_SOCK   # its Unix socket directory
)

pgiplock_log() { printf 'pgiplock: %s\n' "$*" >&2; }
pgiplock_die() { pgiplock_log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------

# True if Debian package $1 is installed.  ${Status} can be printed once per
# architecture for multi-arch packages, hence the prefix match.
pgiplock__pkg_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | head -n1)" || true
    [[ "$status" == "install ok installed"* ]]
}

# True if optional package $1 is already satisfied some other way.  The node
# on these machines may come from a non-Debian nodejs build that bundles npm;
# asking apt for Debian's npm there would fight that nodejs, so a working
# command counts as present.
pgiplock__optional_present() {
    case "$1" in
        nodejs) command -v node >/dev/null 2>&1 ;;
        npm)    command -v npm  >/dev/null 2>&1 ;;
        pgbouncer) command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] ;;
        cmake)  command -v cmake >/dev/null 2>&1 ;;
        patroni) command -v patroni >/dev/null 2>&1 ;;
        etcd-server) command -v etcd >/dev/null 2>&1 ;;
        prometheus) command -v promtool >/dev/null 2>&1 ;;
        gnuplot-nox) command -v gnuplot >/dev/null 2>&1 ;;
        *)      return 1 ;;
    esac
}

pgiplock__apt() {
    # DPkg::Lock::Timeout: wait for a concurrent apt/dpkg instead of failing.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@"
}

pgiplock__apt_update_once() {
    [[ -n "$PGIPLOCK__APT_UPDATED" ]] && return 0
    pgiplock_log "apt-get update"
    pgiplock__apt update -q || return 1
    PGIPLOCK__APT_UPDATED=1
}

pgiplock_ensure_packages() {
    local p required=() optional=() opt
    for p in $PGIPLOCK_PACKAGES; do
        pgiplock__pkg_installed "$p" && continue
        opt=""
        [[ " $PGIPLOCK_OPTIONAL_PACKAGES " == *" $p "* ]] && opt=1
        if [[ -n "$opt" ]]; then
            pgiplock__optional_present "$p" || optional+=("$p")
        else
            required+=("$p")
        fi
    done
    (( ${#required[@]} + ${#optional[@]} == 0 )) && return 0

    if [[ "$(id -u)" -ne 0 ]]; then
        # Not root: do not try sudo behind the user's back; say exactly what to run.
        local all=(${required[@]+"${required[@]}"} ${optional[@]+"${optional[@]}"})
        pgiplock_log "missing packages: ${all[*]}"
        printf 'Run:\n  sudo apt-get update && sudo apt-get install -y %s\n' "${all[*]}" >&2
        exit 1
    fi

    pgiplock__apt_update_once || { pgiplock_log "apt-get update failed"; return 1; }
    if (( ${#required[@]} )); then
        pgiplock_log "installing: ${required[*]}"
        pgiplock__apt install -y -q "${required[@]}" \
            || { pgiplock_log "apt-get install ${required[*]} failed"; return 1; }
    fi
    if (( ${#optional[@]} )); then
        # Separate call: a failure here must not block the required ones, and
        # the tests that need node skip themselves when it is absent.
        pgiplock_log "installing optional: ${optional[*]}"
        pgiplock__apt install -y -q "${optional[@]}" \
            || pgiplock_log "warning: could not install ${optional[*]}; the tests that need them will skip"
    fi
    return 0
}

# ---------------------------------------------------------------------------
# PostgreSQL binaries
# ---------------------------------------------------------------------------

# Prints the directory holding initdb, pg_ctl and postgres.  Debian keeps the
# server binaries out of PATH (/usr/lib/postgresql/<ver>/bin), and the version
# differs between releases, so nothing is hard-coded.
pgiplock_find_pgbin() {
    local d best=""
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null)" || d=""
        if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
            printf '%s\n' "$d"; return 0
        fi
    fi
    # pg_config may belong to a libpq-dev of another version than the server:
    # take the newest installed server.
    best="$(for d in /usr/lib/postgresql/*/bin; do
                [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && printf '%s\n' "$d"
            done | sort -V | tail -n1)"
    if [[ -n "$best" ]]; then
        printf '%s\n' "$best"; return 0
    fi
    if d="$(command -v initdb 2>/dev/null)"; then
        d="$(dirname "$(readlink -f "$d")")"
        if [[ -x "$d/pg_ctl" && -x "$d/postgres" ]]; then
            printf '%s\n' "$d"; return 0
        fi
    fi
    pgiplock_log "cannot find initdb/pg_ctl/postgres (is the postgresql package installed?)"
    return 1
}

# ---------------------------------------------------------------------------
# Traps and child handling
# ---------------------------------------------------------------------------

# All descendants of pid $1 (children first level, then theirs ...), so a
# signal reaches e.g. the test binaries that meson test started, not only meson.
pgiplock__descendants() {
    local c
    for c in $(pgrep -P "$1" 2>/dev/null); do
        printf '%s\n' "$c"
        pgiplock__descendants "$c"
    done
}

# Terminate the command started by pgiplock_run and everything below it.
pgiplock__kill_child() {
    local pid="$PGIPLOCK__CHILD" pids
    [[ -n "$pid" ]] || return 0
    PGIPLOCK__CHILD=""
    kill -0 "$pid" 2>/dev/null || return 0
    # Collect the tree before signalling: once the parent dies its children are
    # re-parented and could no longer be found from it.
    pids="$pid $(pgiplock__descendants "$pid" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null
    # shellcheck disable=SC2086
    kill -CONT $pids 2>/dev/null   # a stopped process would never act on TERM
    for _ in $(seq 50); do         # up to 5 s for a graceful exit
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

pgiplock__on_exit() {
    local rc=$?
    set +e      # cleanup must run to the end whatever fails
    pgiplock__kill_child
    pgiplock_stop_pg
    return "$rc"
}

pgiplock__on_signal() {
    # $1 = exit status to use (128 + signal number), as a shell would.
    local rc="$1"
    [[ -n "$PGIPLOCK__CLEANING" ]] && return 0   # second Ctrl-C during cleanup
    PGIPLOCK__CLEANING=1
    set +e
    trap '' INT TERM HUP                        # do not interrupt the cleanup
    pgiplock_log "interrupted, cleaning up"
    pgiplock__kill_child
    pgiplock_stop_pg
    trap - EXIT                                 # already cleaned up
    exit "$rc"
}

pgiplock_install_traps() {
    [[ -n "$PGIPLOCK__TRAPS" ]] && return 0
    PGIPLOCK__TRAPS=1
    trap 'pgiplock__on_exit' EXIT
    trap 'pgiplock__on_signal 130' INT
    trap 'pgiplock__on_signal 143' TERM
    trap 'pgiplock__on_signal 129' HUP
}

# Run a (possibly long) command and return its exit status.
# Why not simply run it in the foreground: bash delays a trap until the
# foreground command finishes, so a SIGINT/SIGTERM sent to the script alone
# (not its whole process group, e.g. by a CI timeout) would leave the server
# running for as long as the tests take.  `wait` is interrupted by trapped
# signals, so the trap runs at once and kills the child tree.
# env --default-signal undoes bash's SIG_IGN of INT/QUIT for background jobs,
# so a terminal Ctrl-C still reaches the command as usual; `<&0` keeps stdin
# (background jobs would otherwise get /dev/null).
pgiplock_run() {
    local rc=0
    pgiplock_install_traps
    if [[ -e /proc/$BASHPID/fd/0 ]]; then
        env --default-signal=INT,QUIT "$@" <&0 &
    else
        env --default-signal=INT,QUIT "$@" </dev/null &
    fi
    PGIPLOCK__CHILD=$!
    wait "$PGIPLOCK__CHILD" || rc=$?
    PGIPLOCK__CHILD=""
    return "$rc"
}

# ---------------------------------------------------------------------------
# Throwaway PostgreSQL server
# ---------------------------------------------------------------------------

# Run a PostgreSQL binary as the server's owner.  As root the server has to
# run as `postgres` (initdb and postgres refuse to run as root).  cd to the
# temp dir first: postgres cannot chdir into e.g. /root and would warn.
pgiplock__as_pg() {
    if [[ -n "$PGIPLOCK__PG_RUNAS" ]]; then
        (cd "${PGIPLOCK__PG_TMP:-/}" && runuser -u "$PGIPLOCK__PG_RUNAS" -- "$@")
    else
        "$@"
    fi
}

# PIDs of all processes whose cwd is the data dir: the postmaster and every
# backend chdir() there.  This also finds orphaned backends of a postmaster a
# fault test killed, and a server a test restarted (new postmaster.pid),
# without matching processes by name.
pgiplock__server_pids() {
    local data="$1" p cwd
    [[ -n "$data" ]] || return 0
    for p in /proc/[0-9]*; do
        cwd="$(readlink "$p/cwd" 2>/dev/null)" || continue
        [[ "$cwd" == "$data" || "$cwd" == "$data/"* ]] && printf '%s\n' "${p#/proc/}"
    done
    return 0
}

# Pick a TCP port on 127.0.0.1 that nothing listens on.  Racy by nature (the
# port can be taken between check and bind); pgiplock_start_pg retries.
pgiplock__pick_port() {
    local port
    for _ in $(seq 200); do
        port=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40001 ))
        if [[ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]]; then
            printf '%s\n' "$port"; return 0
        fi
    done
    pgiplock_log "no free TCP port found in 20000-60000"
    return 1
}

pgiplock_start_pg() {
    local base tmp data sock log port ok=""
    if [[ -n "$PGIPLOCK__PG_TMP" ]]; then
        pgiplock_log "throwaway server already running"
        return 0
    fi
    pgiplock_install_traps
    PGIPLOCK__PG_BIN="$(pgiplock_find_pgbin)" || return 1

    PGIPLOCK__PG_RUNAS=""
    if [[ "$(id -u)" -eq 0 ]]; then
        id postgres >/dev/null 2>&1 \
            || { pgiplock_log "running as root but there is no 'postgres' user"; return 1; }
        PGIPLOCK__PG_RUNAS=postgres
    fi

    # The temp dir must be reachable by the postgres user; a TMPDIR under
    # /root is not, so fall back to /tmp then.
    base="${TMPDIR:-/tmp}"
    tmp="$(mktemp -d "$base/pgiplock-pg.XXXXXX")" || return 1
    PGIPLOCK__PG_TMP="$tmp"   # set at once, so the traps remove it from here on
    chmod 755 "$tmp" || return 1
    if [[ -n "$PGIPLOCK__PG_RUNAS" ]] && ! runuser -u postgres -- test -x "$tmp" 2>/dev/null; then
        rm -rf "$tmp"
        tmp="$(mktemp -d /tmp/pgiplock-pg.XXXXXX)" || { PGIPLOCK__PG_TMP=""; return 1; }
        PGIPLOCK__PG_TMP="$tmp"
        chmod 755 "$tmp"
    fi
    data="$tmp/data"; sock="$tmp/sock"; log="$tmp/postgresql.log"
    PGIPLOCK__PG_DATA="$data"
    # Created here (not by initdb/pg_ctl) because the parent belongs to root.
    { mkdir -m 700 "$data" && mkdir -m 755 "$sock" && : >"$log" && chmod 644 "$log"; } || return 1
    if [[ -n "$PGIPLOCK__PG_RUNAS" ]]; then
        chown postgres: "$data" "$sock" "$log" || return 1
    fi

    pgiplock__as_pg "$PGIPLOCK__PG_BIN/initdb" -D "$data" -A trust -U postgres \
        --no-sync -E UTF8 --locale=C >"$tmp/initdb.log" 2>&1 \
        || { cat "$tmp/initdb.log" >&2; pgiplock_log "initdb failed"; return 1; }

    # Settings live in the config files (not pg_ctl -o) so that a fault test
    # that stops and starts the server with a plain `pg_ctl start` gets the
    # same port and socket dir.  Log levels stay at their defaults so ERROR
    # lines reach the log (tests grep it).  The port goes in its own included
    # file because it is rewritten on a retry.
    cat >>"$data/postgresql.conf" <<CONF

# --- pgiplock throwaway test server ---
listen_addresses = '*'
unix_socket_directories = '$sock'
fsync = off
max_connections = 300
log_line_prefix = '%m [%p] '
include 'pgiplock_port.conf'
CONF

    # Trust for everyone but the role pgiplock_pw, which must give a
    # password: the tests need one role where a wrong password is refused.
    # The partition test (tests/fault/test_partition.cpp) runs a member in a
    # network namespace joined by a veth pair whose host side gets an
    # address in 10.213.0.0/16, created while the server runs; hence
    # listen_addresses = '*' above (the address does not exist at start).
    # Only loopback and that private range, which nothing else here uses,
    # may connect: every other address finds no pg_hba line and is refused.
    { printf 'local all all trust\n'
      printf 'host all pgiplock_pw 127.0.0.1/32 scram-sha-256\n'
      printf 'host all pgiplock_pw 10.213.0.0/16 scram-sha-256\n'
      printf 'host all all 127.0.0.1/32 trust\n'
      printf 'host all all 10.213.0.0/16 trust\n'
    } >"$data/pg_hba.conf"

    for _ in 1 2 3 4 5; do
        port="$(pgiplock__pick_port)" || return 1
        printf "port = %s\n" "$port" >"$data/pgiplock_port.conf"
        [[ -n "$PGIPLOCK__PG_RUNAS" ]] && chown postgres: "$data/pgiplock_port.conf"
        : > "$log"      # no stale lines from a failed attempt
        if pgiplock__as_pg "$PGIPLOCK__PG_BIN/pg_ctl" -D "$data" -l "$log" -w -t 30 -s start; then
            ok=1; break
        fi
        # Somebody grabbed the port between the check and the bind: retry.
        if grep -q "Address already in use" "$log"; then
            pgiplock_log "port $port taken, retrying"
            continue
        fi
        break
    done
    if [[ -z "$ok" ]]; then
        cat "$log" >&2
        pgiplock_log "could not start PostgreSQL"
        return 1
    fi

    # shellcheck disable=SC2034  # read by name, through PGIPLOCK_SERVER_ENV
    { PGIPLOCK__PG_PORT="$port"; PGIPLOCK__PG_LOG="$log"; PGIPLOCK__PG_SOCK="$sock"; }
    export PGIPLOCK_DSN="host=127.0.0.1 port=$port user=postgres dbname=postgres"
    pgiplock__export_server_env
    pgiplock_log "PostgreSQL $("$PGIPLOCK__PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data $data, log $log)"
    return 0
}

pgiplock_stop_pg() {
    local tmp="$PGIPLOCK__PG_TMP" data="$PGIPLOCK__PG_DATA" pids
    [[ -n "$tmp" ]] || return 0
    if [[ -n "$data" && -d "$data" ]]; then
        # A test may have SIGSTOPped the postmaster or backends; a stopped
        # process never acts on pg_ctl's SIGQUIT.
        pids="$(pgiplock__server_pids "$data" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        [[ -n "${pids// /}" ]] && kill -CONT $pids 2>/dev/null
        if [[ -f "$data/postmaster.pid" ]]; then
            pgiplock__as_pg "$PGIPLOCK__PG_BIN/pg_ctl" -D "$data" -m immediate -w -t 20 -s stop \
                >/dev/null 2>&1
        fi
        # Whatever survived (pg_ctl timed out, orphaned backends of a killed
        # postmaster): kill it, then wait a little so rm does not race it.
        for _ in $(seq 50); do
            pids="$(pgiplock__server_pids "$data" | tr '\n' ' ')"
            [[ -z "${pids// /}" ]] && break
            # shellcheck disable=SC2086
            kill -CONT $pids 2>/dev/null
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null
            sleep 0.1
        done
    fi
    rm -rf -- "$tmp"
    PGIPLOCK__PG_TMP=""
    PGIPLOCK__PG_DATA=""
    # The exported values would point at a dead server now.
    if [[ "${PGIPLOCK_TEST_PGDATA:-}" == "$data" ]]; then
        unset PGIPLOCK_DSN
        pgiplock__unset_server_env
    fi
    return 0
}

pgiplock__export_server_env() {
    local e from
    for e in "${PGIPLOCK_SERVER_ENV[@]}"; do
        from="${e#*=}"
        export "${e%%=*}=${!from}"
    done
}

pgiplock__unset_server_env() {
    local e
    for e in "${PGIPLOCK_SERVER_ENV[@]}"; do
        unset "${e%%=*}"
    done
}

# The server the tools run against: the one in PGIPLOCK_DSN if set, else a
# throwaway one (pgiplock_start_pg, which exports PGIPLOCK_DSN).  With a
# given server, PGIPLOCK_SERVER_ENV left over in the environment (from
# another server) is unset, so no test restarts or reads the wrong one.
pgiplock_use_server() {
    [[ -n "$PGIPLOCK__PG_TMP" ]] && return 0   # ours, started before
    if [[ -n "${PGIPLOCK_DSN:-}" ]]; then
        pgiplock_log "using the server given by PGIPLOCK_DSN; none is started"
        pgiplock__unset_server_env
        return 0
    fi
    pgiplock_start_pg
}

# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------

# pgiplock_configure_build DIR [meson setup args...]
# DIR is relative to the source dir unless absolute.  The setup args are
# remembered in DIR; a plain `meson setup --reconfigure` would keep options
# that were dropped from the command line, so a change of args wipes and
# re-creates the build dir instead.  Unchanged args skip setup: ninja re-runs
# meson by itself when meson.build changes.
pgiplock_configure_build() {
    local dir="$1"; shift
    [[ "$dir" == /* ]] || dir="$PGIPLOCK_SRC/$dir"
    local stamp="$dir/.pgiplock-setup-args"
    local want have=""
    want="$(printf '%s\n' "src=$PGIPLOCK_SRC" "$@")"
    [[ -f "$stamp" ]] && have="$(cat "$stamp")"

    if [[ ! -f "$dir/build.ninja" ]] || [[ "$want" != "$have" ]]; then
        if [[ -d "$dir/meson-private" ]]; then
            pgiplock_log "meson setup --wipe $dir $*"
            if ! meson setup --wipe "$dir" "$PGIPLOCK_SRC" "$@"; then
                # --wipe needs readable old state (e.g. not after a meson
                # upgrade or a half-finished setup); start from scratch then.
                pgiplock_log "wipe failed, recreating $dir"
                rm -rf -- "$dir"
                meson setup "$dir" "$PGIPLOCK_SRC" "$@" || return 1
            fi
        else
            pgiplock_log "meson setup $dir $*"
            meson setup "$dir" "$PGIPLOCK_SRC" "$@" || return 1
        fi
        printf '%s\n' "$want" >"$stamp"
    fi
    meson compile -C "$dir" || return 1
}
