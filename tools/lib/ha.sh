# shellcheck shell=bash
# tools/lib/ha.sh - throwaway PostgreSQL high-availability set-ups for the HA
# test suite (tests/ha/) and the demo: a primary with a streaming replica
# promoted by hand, or a Patroni cluster on etcd.
#
# Sourced after tools/lib/common.sh, never executed.  Like common.sh, every
# function checks its failures explicitly (`|| return`), so it works under
# `set -euo pipefail` and from an `if`/`||` context alike.
#
# Public functions:
#   pgiplock_ha_start_pair [--sync]   a primary and a `pg_basebackup -R`
#                                     replica streaming from it (--sync:
#                                     synchronous_standby_names = '*' on the
#                                     primary); exports the PGIPLOCK_HA_* below
#   pgiplock_ha_stop_primary          pg_ctl stop -m immediate on the primary
#   pgiplock_ha_promote               pg_ctl promote (waits) on the replica
#   pgiplock_ha_cut_replication       disconnect the replica (it falls behind;
#                                     with --sync the primary's commits wait)
#   pgiplock_ha_repair [--sync]       after a promotion: the promoted node is
#                                     the primary, a fresh replica is cloned
#                                     from it (no initdb), the old one deleted
#   pgiplock_ha_ensure_patroni        patroni and etcd present, else installed
#                                     when root (apt-get, --no-install-recommends)
#   pgiplock_ha_start_patroni [--sync]
#                                     one etcd and two Patroni nodes (ttl 3,
#                                     loop_wait 1, retry_timeout 2; --sync:
#                                     synchronous_mode); returns once a leader
#                                     is read-write and the other node streams
#   pgiplock_ha_leader                print the read-write node: "NAME PORT"
#   pgiplock_ha_kill_leader           SIGKILL the leader's patroni and postmaster;
#                                     prints "killed NAME PORT"
#   pgiplock_ha_use_as_dsn            export PGIPLOCK_DSN = the multi-host
#                                     conninfo (for tools/demo and the CLI)
#   pgiplock_ha_stop                  stop and delete whatever was started
#                                     (idempotent; the traps call it)
#   pgiplock_ha_install_traps         common.sh's traps, extended to call
#                                     pgiplock_ha_stop (the start functions
#                                     install them)
#
# Exported by the start functions (what a test program or a second shell
# needs; the action functions read nothing else, so a program can run
# them through tests/ha/ctl.sh while the shell that started the servers
# waits for it):
#   PGIPLOCK_HA_KIND           pair | patroni
#   PGIPLOCK_HA_DIR            the temp dir holding everything
#   PGIPLOCK_HA_DSN            host=127.0.0.1,127.0.0.1 port=P1,P2 user=postgres dbname=postgres
#   PGIPLOCK_HA_SYNC           1 with synchronous replication, else 0
#   PGIPLOCK_HA_PGBIN, PGIPLOCK_HA_PGRUNAS (postgres when root, else empty)
#   PGIPLOCK_HA_PORTS          "P1 P2" (node 1 first; for a pair P1 is the primary)
#   PGIPLOCK_HA_PRIMARY_PORT/_DATA/_LOG, PGIPLOCK_HA_REPLICA_PORT/_DATA/_LOG   (pair)
#   PGIPLOCK_HA_ETCD_PORT, PGIPLOCK_HA_NODE<i>_PORT/_DATA/_LOG/_API_PORT        (patroni)
#
# Uses common.sh's private helpers pgiplock__pick_port, pgiplock__apt,
# pgiplock__apt_update_once, pgiplock__kill_child, pgiplock__on_signal and
# pgiplock__unset_server_env.

if [[ -n "${PGIPLOCK__HA_SOURCED:-}" ]]; then
    return 0
fi
PGIPLOCK__HA_SOURCED=1

if [[ -z "${PGIPLOCK__COMMON_SOURCED:-}" ]]; then
    # shellcheck source=common.sh
    source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
fi

PGIPLOCK__HA_OWNER=""      # this shell started the set-up and removes it
PGIPLOCK__HA_TRAPS=""
PGIPLOCK__HA_ETCD_PID=""
PGIPLOCK__HA_NODES=0       # pair: node directories made so far

# ---------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------

# Runs a command as the servers' owner (postgres when root), from the HA dir
# (postgres cannot chdir into e.g. /root).
pgiplock__ha_as_pg() {
    if [[ -n "${PGIPLOCK_HA_PGRUNAS:-}" ]]; then
        (cd "${PGIPLOCK_HA_DIR:-/}" && exec runuser -u "$PGIPLOCK_HA_PGRUNAS" -- "$@")
    else
        (cd "${PGIPLOCK_HA_DIR:-/}" && exec "$@")
    fi
}

# One value from a server: pgiplock__ha_sql PORT SQL (empty when it cannot
# connect).
pgiplock__ha_sql() {
    "$PGIPLOCK_HA_PGBIN/psql" -X -A -t -q \
        "host=127.0.0.1 port=$1 user=postgres dbname=postgres connect_timeout=2" -c "$2" 2>/dev/null
}

# True when the server on port $1 is read-write.
pgiplock__ha_writable() {
    [[ "$(pgiplock__ha_sql "$1" 'SELECT pg_is_in_recovery()')" == f ]]
}

# True when the primary on port $1 has one standby streaming, and with $2 = 1
# a synchronous one.
pgiplock__ha_streaming() {
    local want="streaming"
    [[ "$2" == 1 ]] && want="streaming sync"
    [[ "$(pgiplock__ha_sql "$1" "SELECT state || CASE WHEN sync_state = 'sync' THEN ' sync' ELSE '' END FROM pg_stat_replication")" == "$want" ]]
}

# A TCP port on 127.0.0.1 that nothing listens on, below the kernel's
# ephemeral range (ip_local_port_range), so no outgoing connection's local
# port takes it between the check and the bind; common.sh's picker draws
# from 20000-60000, which overlaps that range.
pgiplock__ha_pick_port() {
    local low=32768 port
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || low=32768
    (( low > 12000 )) || { pgiplock__pick_port; return; }
    for _ in $(seq 200); do
        port=$(( 10000 + (RANDOM * 32768 + RANDOM) % (low - 10000) ))
        if [[ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]]; then
            printf '%s\n' "$port"; return 0
        fi
    done
    pgiplock__pick_port
}

# Distinct free TCP ports: pgiplock__ha_ports N.
pgiplock__ha_ports() {
    local want="$1" got=() p
    while (( ${#got[@]} < want )); do
        p="$(pgiplock__ha_pick_port)" || return 1
        [[ " ${got[*]} " == *" $p "* ]] && continue
        got+=("$p")
    done
    printf '%s\n' "${got[*]}"
}

# The temp dir, reachable by the postgres user, and whom the servers run as.
pgiplock__ha_prepare() {
    local kind="$1"
    if [[ -n "${PGIPLOCK_HA_DIR:-}" && -n "$PGIPLOCK__HA_OWNER" ]]; then
        pgiplock_log "an HA set-up is running already ($PGIPLOCK_HA_DIR)"
        return 1
    fi
    pgiplock_ha_install_traps
    PGIPLOCK_HA_PGBIN="$(pgiplock_find_pgbin)" || return 1
    PGIPLOCK_HA_PGRUNAS=""
    if [[ "$(id -u)" -eq 0 ]]; then
        id postgres >/dev/null 2>&1 \
            || { pgiplock_log "running as root but there is no 'postgres' user"; return 1; }
        PGIPLOCK_HA_PGRUNAS=postgres
    fi
    # /tmp, not TMPDIR: a TMPDIR under /root is closed to postgres.
    PGIPLOCK_HA_DIR="$(mktemp -d /tmp/pgiplock-ha.XXXXXX)" || return 1
    PGIPLOCK__HA_OWNER=1      # from here on the traps remove it
    chmod 755 "$PGIPLOCK_HA_DIR" || return 1
    mkdir -m 755 "$PGIPLOCK_HA_DIR/sock" || return 1
    [[ -n "$PGIPLOCK_HA_PGRUNAS" ]] && { chown "$PGIPLOCK_HA_PGRUNAS": "$PGIPLOCK_HA_DIR/sock" || return 1; }
    PGIPLOCK_HA_KIND="$kind"
    export PGIPLOCK_HA_KIND PGIPLOCK_HA_DIR PGIPLOCK_HA_PGBIN PGIPLOCK_HA_PGRUNAS
}

# A directory or file the servers' owner writes to.
pgiplock__ha_own() {
    [[ -n "${PGIPLOCK_HA_PGRUNAS:-}" ]] || return 0
    chown "$PGIPLOCK_HA_PGRUNAS": "$@"
}

# Waits up to $2 seconds for `$1` (a command line, eval'd) to succeed.
pgiplock__ha_wait() {
    local cond="$1" limit="$2" start=$SECONDS
    while ! eval "$cond"; do
        (( SECONDS - start >= limit )) && return 1
        sleep 0.1
    done
}

# PIDs of the processes whose cwd is data dir $1: the postmaster and every
# backend chdir() there, also orphans of a killed postmaster.  As common.sh's
# pgiplock__server_pids, but with no process forked per /proc entry (that
# took over a second on a loaded 2-core machine).
pgiplock__ha_server_pids() {
    local data="$1" p
    [[ -n "$data" && -d "$data" ]] || return 0
    for p in /proc/[0-9]*; do
        [[ "$p/cwd" -ef "$data" ]] && printf '%s\n' "${p#/proc/}"
    done
    return 0
}

# Stops the server in data dir $1 (pg_ctl immediate), then kills whatever
# still runs there.
pgiplock__ha_kill_server() {
    local data="$1" pids
    [[ -n "$data" && -d "$data" ]] || return 0
    pids="$(pgiplock__ha_server_pids "$data" | tr '\n' ' ')"
    [[ -z "${pids// /}" ]] && return 0
    # shellcheck disable=SC2086
    kill -CONT $pids 2>/dev/null || true
    if [[ -f "$data/postmaster.pid" ]]; then
        pgiplock__ha_as_pg "$PGIPLOCK_HA_PGBIN/pg_ctl" -D "$data" -m immediate -w -t 10 -s stop >/dev/null 2>&1 || true
    fi
    for _ in $(seq 50); do
        pids="$(pgiplock__ha_server_pids "$data" | tr '\n' ' ')"
        [[ -z "${pids// /}" ]] && break
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    return 0
}

# PIDs of processes one of whose arguments is $1 (a path of ours, unique
# to this set-up: never a bare program name).
pgiplock__ha_pids_with_arg() {
    local want="$1" p a args
    for p in /proc/[0-9]*; do
        mapfile -d '' args 2>/dev/null <"$p/cmdline" || continue
        for a in ${args[@]+"${args[@]}"}; do
            [[ "$a" == "$want" ]] && { printf '%s\n' "${p#/proc/}"; break; }
        done
    done
    return 0
}

# ---------------------------------------------------------------------------
# A primary and a streaming replica, failed over by hand
# ---------------------------------------------------------------------------

# pgiplock__ha_node_conf DATA PORT SYNC_NAMES: the per-node settings, in a
# file of their own so the replica's copy (pg_basebackup copies every file)
# can be rewritten.
pgiplock__ha_node_conf() {
    printf "port = %s\nsynchronous_standby_names = '%s'\n" "$2" "$3" >"$1/pgiplock_ha_node.conf" || return 1
    pgiplock__ha_own "$1/pgiplock_ha_node.conf"
}

pgiplock_ha_start_pair() {
    local sync=0 dir data log port
    [[ "${1:-}" == "--sync" ]] && sync=1
    pgiplock__ha_prepare pair || return 1
    dir="$PGIPLOCK_HA_DIR"
    PGIPLOCK__HA_NODES=0
    pgiplock__ha_new_node || return 1
    data="$PGIPLOCK__HA_NEW_DATA"; log="$PGIPLOCK__HA_NEW_LOG"; port="$PGIPLOCK__HA_NEW_PORT"
    pgiplock__ha_as_pg "$PGIPLOCK_HA_PGBIN/initdb" -D "$data" -A trust -U postgres \
        --no-sync -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; pgiplock_log "initdb failed"; return 1; }
    # wal_level, max_wal_senders and hot_standby are the defaults already.
    cat >>"$data/postgresql.conf" <<CONF

# --- pgiplock throwaway HA pair ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir/sock'
fsync = off
max_connections = 100
log_line_prefix = '%m [%p] '
include 'pgiplock_ha_node.conf'
CONF
    { printf 'local all all trust\n'
      printf 'local replication all trust\n'
      printf 'host all all 127.0.0.1/32 trust\n'
      printf 'host replication all 127.0.0.1/32 trust\n'
    } >"$data/pg_hba.conf"
    pgiplock__ha_start_node "$data" "$log" || { pgiplock_log "could not start the primary"; return 1; }
    port="$PGIPLOCK__HA_NEW_PORT"
    export PGIPLOCK_HA_PRIMARY_PORT="$port" PGIPLOCK_HA_PRIMARY_DATA="$data" PGIPLOCK_HA_PRIMARY_LOG="$log"
    pgiplock__ha_add_replica "$sync"
}

# After pgiplock_ha_promote: the promoted replica is the primary now, and a
# fresh replica is cloned from it (no initdb: a new pair in ~2 s).  The old
# primary's files are deleted.  pgiplock_ha_repair [--sync]
pgiplock_ha_repair() {
    local sync=0 old="$PGIPLOCK_HA_PRIMARY_DATA"
    [[ "${1:-}" == "--sync" ]] && sync=1
    pgiplock__ha_writable "$PGIPLOCK_HA_REPLICA_PORT" \
        || { pgiplock_log "pgiplock_ha_repair: the replica has not been promoted"; return 1; }
    pgiplock__ha_kill_server "$old"
    rm -rf -- "$old"
    export PGIPLOCK_HA_PRIMARY_PORT="$PGIPLOCK_HA_REPLICA_PORT" PGIPLOCK_HA_PRIMARY_DATA="$PGIPLOCK_HA_REPLICA_DATA" \
        PGIPLOCK_HA_PRIMARY_LOG="$PGIPLOCK_HA_REPLICA_LOG"
    pgiplock__ha_add_replica "$sync"
}

# A node directory and log of our own, and a free port: PGIPLOCK__HA_NEW_*.
pgiplock__ha_new_node() {
    local n=$(( ${PGIPLOCK__HA_NODES:-0} + 1 )) dir="$PGIPLOCK_HA_DIR"
    PGIPLOCK__HA_NODES=$n
    PGIPLOCK__HA_NEW_DATA="$dir/node$n"; PGIPLOCK__HA_NEW_LOG="$dir/node$n.log"
    # Made here (not by initdb/pg_basebackup): the parent belongs to root.
    { mkdir -m 700 "$PGIPLOCK__HA_NEW_DATA" && : >"$PGIPLOCK__HA_NEW_LOG" && chmod 644 "$PGIPLOCK__HA_NEW_LOG"; } \
        || return 1
    pgiplock__ha_own "$PGIPLOCK__HA_NEW_DATA" "$PGIPLOCK__HA_NEW_LOG" || return 1
    PGIPLOCK__HA_NEW_PORT="$(pgiplock__ha_pick_port)" || return 1
}

# Starts the server in $1 (log $2) on PGIPLOCK__HA_NEW_PORT, with no
# synchronous standby; another port when that one was taken meanwhile.
pgiplock__ha_start_node() {
    local data="$1" log="$2"
    for _ in 1 2 3 4 5; do
        pgiplock__ha_node_conf "$data" "$PGIPLOCK__HA_NEW_PORT" "" || return 1
        : >"$log"
        pgiplock__ha_as_pg "$PGIPLOCK_HA_PGBIN/pg_ctl" -D "$data" -l "$log" -w -t 30 -s start && return 0
        grep -q "Address already in use" "$log" || break
        pgiplock_log "port $PGIPLOCK__HA_NEW_PORT taken, retrying"
        PGIPLOCK__HA_NEW_PORT="$(pgiplock__ha_pick_port)" || return 1
    done
    cat "$log" >&2
    return 1
}

# Clones the primary into a new node and starts it streaming; with $1 = 1
# the primary waits for it (synchronous_standby_names = '*').
pgiplock__ha_add_replica() {
    local sync="$1" dir="$PGIPLOCK_HA_DIR" data log port p1="$PGIPLOCK_HA_PRIMARY_PORT" names=""
    pgiplock__ha_new_node || return 1
    data="$PGIPLOCK__HA_NEW_DATA"; log="$PGIPLOCK__HA_NEW_LOG"; port="$PGIPLOCK__HA_NEW_PORT"
    # -c fast: no wait for a spread checkpoint; -R: standby.signal and
    # primary_conninfo.
    pgiplock__ha_as_pg "$PGIPLOCK_HA_PGBIN/pg_basebackup" -D "$data" -h 127.0.0.1 -p "$p1" -U postgres \
        -R -X stream -c fast --no-sync >"$dir/basebackup.log" 2>&1 \
        || { cat "$dir/basebackup.log" >&2; pgiplock_log "pg_basebackup failed"; return 1; }
    # The replica waits for no standby of its own, or its commits would
    # hang once it is promoted.
    pgiplock__ha_start_node "$data" "$log" || { pgiplock_log "could not start the replica"; return 1; }
    port="$PGIPLOCK__HA_NEW_PORT"
    (( sync )) && names='*'
    pgiplock__ha_node_conf "$PGIPLOCK_HA_PRIMARY_DATA" "$p1" "$names" || return 1
    pgiplock__ha_as_pg "$PGIPLOCK_HA_PGBIN/pg_ctl" -D "$PGIPLOCK_HA_PRIMARY_DATA" -s reload || return 1

    export PGIPLOCK_HA_SYNC="$sync" PGIPLOCK_HA_PORTS="$p1 $port"
    export PGIPLOCK_HA_REPLICA_PORT="$port" PGIPLOCK_HA_REPLICA_DATA="$data" PGIPLOCK_HA_REPLICA_LOG="$log"
    export PGIPLOCK_HA_DSN="host=127.0.0.1,127.0.0.1 port=$p1,$port user=postgres dbname=postgres"
    pgiplock__ha_wait "pgiplock__ha_streaming $p1 $sync" 30 \
        || { cat "$log" >&2; pgiplock_log "the replica is not streaming after 30 s"; return 1; }
    pgiplock_log "HA pair: primary 127.0.0.1:$p1, replica 127.0.0.1:$port ($( ((sync)) && echo synchronous || echo asynchronous) replication; $dir)"
}

# Disconnects the replica from the primary (primary_conninfo emptied and
# reloaded: its WAL receiver ends, and no new one starts), so it falls
# behind from now on, as one does across a broken link.  With synchronous
# replication the primary's commits wait from now on.  (A SIGTERM to the
# WAL receiver is not enough: a new one streams again within ~30 ms.)
pgiplock_ha_cut_replication() {
    local port="$PGIPLOCK_HA_REPLICA_PORT"
    # Two statements: ALTER SYSTEM refuses to run in a transaction block.
    pgiplock__ha_sql "$port" "ALTER SYSTEM SET primary_conninfo = ''" >/dev/null
    [[ "$(pgiplock__ha_sql "$port" "SELECT pg_reload_conf()")" == t ]] \
        || { pgiplock_log "could not reconfigure the replica"; return 1; }
    pgiplock__ha_wait "[[ -z \"\$(pgiplock__ha_sql $port 'SELECT pid FROM pg_stat_wal_receiver')\" ]]" 10 \
        || { pgiplock_log "the replica's WAL receiver did not stop"; return 1; }
    printf 'the replica at %s no longer receives WAL\n' "$port"
}

pgiplock_ha_stop_primary() {
    pgiplock__ha_as_pg "$PGIPLOCK_HA_PGBIN/pg_ctl" -D "$PGIPLOCK_HA_PRIMARY_DATA" -m immediate -w -t 20 -s stop
}

pgiplock_ha_promote() {
    pgiplock__ha_as_pg "$PGIPLOCK_HA_PGBIN/pg_ctl" -D "$PGIPLOCK_HA_REPLICA_DATA" -w -t 30 -s promote
}

# ---------------------------------------------------------------------------
# Patroni on etcd
# ---------------------------------------------------------------------------

pgiplock_ha_ensure_patroni() {
    if command -v patroni >/dev/null 2>&1 && command -v etcd >/dev/null 2>&1; then
        return 0
    fi
    if [[ "$(id -u)" -ne 0 ]]; then
        pgiplock_log "patroni or etcd is missing and we are not root; run:"
        printf '  sudo apt-get install -y --no-install-recommends patroni etcd-server\n' >&2
        return 1
    fi
    pgiplock__apt_update_once || { pgiplock_log "apt-get update failed"; return 1; }
    pgiplock_log "installing: patroni etcd-server"
    pgiplock__apt install -y -q --no-install-recommends patroni etcd-server \
        || { pgiplock_log "apt-get install patroni etcd-server failed"; return 1; }
    command -v patroni >/dev/null 2>&1 && command -v etcd >/dev/null 2>&1
}

# pgiplock__ha_patroni_yml I PORT API_PORT SYNC: node I's configuration.
# Settings measured on a 2-core machine: etcd3 (Patroni 3.0 speaks etcd's v3
# HTTP API itself; the v2 `etcd:` section needs etcd --enable-v2), ttl 3 /
# loop_wait 1 / retry_timeout 2 (the fastest that stay stable; retry_timeout
# 1 left the cluster without a leader), watchdog "off" quoted (a bare off is
# a boolean and fails).
pgiplock__ha_patroni_yml() {
    local i="$1" port="$2" api="$3" sync="$4" dir="$PGIPLOCK_HA_DIR"
    local sync_mode=false
    (( sync )) && sync_mode=true
    cat >"$dir/node$i/patroni.yml" <<YML
scope: pgiplock-ha-${dir##*.}
namespace: /pgiplock/
name: node$i
log:
  level: WARNING
restapi:
  listen: 127.0.0.1:$api
  connect_address: 127.0.0.1:$api
etcd3:
  hosts: 127.0.0.1:$PGIPLOCK_HA_ETCD_PORT
bootstrap:
  dcs:
    ttl: 3
    loop_wait: 1
    retry_timeout: 2
    maximum_lag_on_failover: 1048576
    synchronous_mode: $sync_mode
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: "on"
        max_connections: 100
        max_wal_senders: 10
        max_replication_slots: 10
        fsync: "off"
  initdb:
    - encoding: UTF8
    - locale: C
    - auth-local: trust
    - auth-host: trust
  pg_hba:
    - local all all trust
    - local replication all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:$port
  connect_address: 127.0.0.1:$port
  data_dir: $dir/node$i/data
  bin_dir: $PGIPLOCK_HA_PGBIN
  pgpass: $dir/node$i/pgpass
  authentication:
    superuser:
      username: postgres
    replication:
      username: replicator
  parameters:
    unix_socket_directories: '$dir/sock'
    log_line_prefix: '%m [%p] '
watchdog:
  mode: "off"
YML
}

# True when etcd on port $1 says it is healthy (python3 comes with
# Patroni; curl may not be installed).
pgiplock__ha_etcd_healthy() {
    python3 - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
body = urllib.request.urlopen("http://127.0.0.1:%s/health" % sys.argv[1], timeout=1).read()
sys.exit(0 if b'"true"' in body else 1)
PY
}

pgiplock_ha_start_patroni() {
    local sync=0 dir ports etcd_c etcd_p p1 p2 a1 a2 i port api
    [[ "${1:-}" == "--sync" ]] && sync=1
    pgiplock_ha_ensure_patroni || return 1
    pgiplock__ha_prepare patroni || return 1
    dir="$PGIPLOCK_HA_DIR"
    ports="$(pgiplock__ha_ports 6)" || return 1
    read -r etcd_c etcd_p p1 p2 a1 a2 <<<"$ports"
    export PGIPLOCK_HA_ETCD_PORT="$etcd_c"

    # One etcd member, as this user (it needs nothing of postgres).
    mkdir -m 700 "$dir/etcd" || return 1
    etcd --name e1 --data-dir "$dir/etcd/data" \
        --listen-client-urls "http://127.0.0.1:$etcd_c" --advertise-client-urls "http://127.0.0.1:$etcd_c" \
        --listen-peer-urls "http://127.0.0.1:$etcd_p" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_p" \
        --initial-cluster "e1=http://127.0.0.1:$etcd_p" --initial-cluster-state new --log-level warn \
        >"$dir/etcd/etcd.log" 2>&1 </dev/null &
    PGIPLOCK__HA_ETCD_PID=$!
    printf '%s\n' "$PGIPLOCK__HA_ETCD_PID" >"$dir/etcd/pid"
    pgiplock__ha_wait "pgiplock__ha_etcd_healthy $etcd_c" 20 \
        || { cat "$dir/etcd/etcd.log" >&2; pgiplock_log "etcd did not become healthy"; return 1; }

    for i in 1 2; do
        port="$p1"; api="$a1"
        [[ "$i" == 2 ]] && { port="$p2"; api="$a2"; }
        mkdir -m 700 "$dir/node$i" || return 1
        pgiplock__ha_patroni_yml "$i" "$port" "$api" "$sync" || return 1
        : >"$dir/node$i/patroni.log"
        pgiplock__ha_own "$dir/node$i" "$dir/node$i/patroni.yml" "$dir/node$i/patroni.log" || return 1
        export "PGIPLOCK_HA_NODE${i}_PORT=$port" "PGIPLOCK_HA_NODE${i}_API_PORT=$api" \
            "PGIPLOCK_HA_NODE${i}_DATA=$dir/node$i/data" "PGIPLOCK_HA_NODE${i}_LOG=$dir/node$i/patroni.log"
        # exec: the pid file names patroni itself, not runuser or sh.
        # shellcheck disable=SC2016
        pgiplock__ha_as_pg sh -c 'echo $$ >"$1/patroni.pid"; exec patroni "$1/patroni.yml" >>"$1/patroni.log" 2>&1' \
            sh "$dir/node$i" </dev/null &
        disown    # its end (SIGKILL by a test) is no job of this shell's to report
        # Node 1 bootstraps alone first, so it is the leader: which node
        # leads then does not depend on a race.
        if [[ "$i" == 1 ]]; then
            pgiplock__ha_wait "pgiplock__ha_writable $p1" 60 \
                || { cat "$dir/node1/patroni.log" >&2; pgiplock_log "patroni node1 did not become leader"; return 1; }
        fi
    done
    export PGIPLOCK_HA_SYNC="$sync" PGIPLOCK_HA_PORTS="$p1 $p2"
    export PGIPLOCK_HA_DSN="host=127.0.0.1,127.0.0.1 port=$p1,$p2 user=postgres dbname=postgres"
    pgiplock__ha_wait "pgiplock__ha_streaming $p1 $sync" 60 \
        || { cat "$dir/node2/patroni.log" >&2; pgiplock_log "node2 is not streaming after 60 s"; return 1; }
    pgiplock_log "Patroni: leader node1 127.0.0.1:$p1, replica node2 127.0.0.1:$p2, etcd 127.0.0.1:$etcd_c ($( ((sync)) && echo synchronous_mode || echo asynchronous); $dir)"
}

# The node that is read-write now: "NAME PORT" (node<i>, or primary/replica).
pgiplock_ha_leader() {
    local i port
    for i in 1 2; do
        if [[ "$PGIPLOCK_HA_KIND" == pair ]]; then
            port="$PGIPLOCK_HA_PRIMARY_PORT"; [[ "$i" == 2 ]] && port="$PGIPLOCK_HA_REPLICA_PORT"
        else
            local v="PGIPLOCK_HA_NODE${i}_PORT"; port="${!v}"
        fi
        if pgiplock__ha_writable "$port"; then
            if [[ "$PGIPLOCK_HA_KIND" == pair ]]; then
                printf '%s %s\n' "$( [[ $i == 1 ]] && echo primary || echo replica)" "$port"
            else
                printf 'node%s %s\n' "$i" "$port"
            fi
            return 0
        fi
    done
    pgiplock_log "no read-write node"
    return 1
}

# The leader's Patroni first (or it would restart its postgres), then its
# postmaster; the backends go with it.  Both SIGKILL: a machine that died.
pgiplock_ha_kill_leader() {
    local leader name port node pid
    leader="$(pgiplock_ha_leader)" || return 1
    read -r name port <<<"$leader"
    node="$PGIPLOCK_HA_DIR/$name"
    [[ -f "$node/patroni.pid" ]] || { pgiplock_log "no Patroni pid for $name"; return 1; }
    pid="$(cat "$node/patroni.pid")"
    kill -KILL "$pid" || return 1
    pid="$(head -n1 "$node/data/postmaster.pid" 2>/dev/null)" || true
    [[ -n "$pid" ]] && kill -KILL "$pid"
    printf 'killed %s %s\n' "$name" "$port"
}

# ---------------------------------------------------------------------------
# The demo and the CLI against the set-up; cleanup
# ---------------------------------------------------------------------------

pgiplock_ha_use_as_dsn() {
    export PGIPLOCK_DSN="$PGIPLOCK_HA_DSN"
    pgiplock__unset_server_env
}

pgiplock_ha_stop() {
    local dir="${PGIPLOCK_HA_DIR:-}" pid i data
    [[ -n "$PGIPLOCK__HA_OWNER" && -n "$dir" ]] || return 0
    local -    # set options restored on return: cleanup runs to the end whatever fails
    set +e
    if [[ "${PGIPLOCK_HA_KIND:-}" == patroni ]]; then
        # Patroni first: it would restart a postgres we stop.
        for i in 1 2; do
            for pid in $( [[ -f "$dir/node$i/patroni.pid" ]] && cat "$dir/node$i/patroni.pid") \
                       $(pgiplock__ha_pids_with_arg "$dir/node$i/patroni.yml"); do
                kill -KILL "$pid" 2>/dev/null || true
            done
        done
        for i in 1 2; do pgiplock__ha_kill_server "$dir/node$i/data"; done
        pid="${PGIPLOCK__HA_ETCD_PID:-}"
        [[ -z "$pid" && -f "$dir/etcd/pid" ]] && pid="$(cat "$dir/etcd/pid")"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    else
        for data in "$dir"/node*; do
            [[ -d "$data" ]] && pgiplock__ha_kill_server "$data"
        done
    fi
    rm -rf -- "$dir"
    PGIPLOCK__HA_OWNER=""
    PGIPLOCK__HA_ETCD_PID=""
    unset PGIPLOCK_HA_DIR PGIPLOCK_HA_DSN PGIPLOCK_HA_KIND
    return 0
}

# common.sh's traps stop its own server; these stop ours as well, after the
# child that pgiplock_run started (the test program) and before common.sh's
# server, keeping its exit status and signal handling.
pgiplock__ha_on_exit() {
    local rc=$?
    set +e
    pgiplock__kill_child
    pgiplock_ha_stop
    pgiplock_stop_pg
    return "$rc"
}

pgiplock__ha_on_signal() {
    [[ -n "$PGIPLOCK__CLEANING" ]] && return 0
    trap '' INT TERM HUP
    set +e
    pgiplock__kill_child
    pgiplock_ha_stop
    pgiplock__on_signal "$1"
}

pgiplock_ha_install_traps() {
    [[ -n "$PGIPLOCK__HA_TRAPS" ]] && return 0
    pgiplock_install_traps
    PGIPLOCK__HA_TRAPS=1
    trap 'pgiplock__ha_on_exit' EXIT
    trap 'pgiplock__ha_on_signal 130' INT
    trap 'pgiplock__ha_on_signal 143' TERM
    trap 'pgiplock__ha_on_signal 129' HUP
}
