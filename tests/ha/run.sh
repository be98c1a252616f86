#!/usr/bin/env bash
# tests/ha/run.sh SCENARIO PROGRAM - the HA suite's entry point (meson test
# runs it): starts the set-up from tools/lib/ha.sh, runs the test program
# against it once or more, and always removes the set-up.
#   promote   a primary and a replica: [bad-input], then [promote] once per
#             item of PGIPLOCK_HA_PLAN (default "sync async:300"): MODE[:LAG]
#             is synchronous or asynchronous replication, and a replica LAG
#             ms behind when the primary dies (its WAL receiver stopped that
#             long before); after each promotion the promoted node leads and
#             a fresh replica is cloned from it for the next item
#   patroni   Patroni on etcd, synchronous_mode (PGIPLOCK_HA_PATRONI_SYNC=0:
#             asynchronous): [patroni]. Skips (77) when patroni and
#             etcd-server are missing and cannot be installed.
# PGIPLOCK_HA_TRIALS=N repeats the failovers N times (default 1).
# Exit status: 0, 77 (skipped), or the first failure's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=../../tools/lib/common.sh
source "$here/../../tools/lib/common.sh"
# shellcheck source=../../tools/lib/ha.sh
source "$here/../../tools/lib/ha.sh"

scenario="${1:?usage: run.sh promote|patroni PROGRAM}"
exe="${2:?usage: run.sh promote|patroni PROGRAM}"
trials="${PGIPLOCK_HA_TRIALS:-1}"
export PGIPLOCK_HA_CTL="$here/ctl.sh" PGIPLOCK_HA_LAG_MS=0
# The servers here are the set-up's, not the suite's throwaway one.
unset PGIPLOCK_DSN
pgiplock__unset_server_env
pgiplock_ha_install_traps

rc=0
step() {
    local r=0
    pgiplock_log "ha: $exe $* (lag ${PGIPLOCK_HA_LAG_MS} ms)"
    pgiplock_run "$exe" "$@" || r=$?
    (( r != 0 && r != 77 && rc == 0 )) && rc=$r
    return 0
}

case "$scenario" in
    promote)
        read -r -a plan <<<"${PGIPLOCK_HA_PLAN:-sync async:300}"
        items=()
        for ((i = 1; i <= trials; i++)); do items+=("${plan[@]}"); done
        for ((k = 0; k < ${#items[@]}; k++)); do
            mode="${items[k]%%:*}" lag=0
            [[ "${items[k]}" == *:* ]] && lag="${items[k]#*:}"
            [[ "$mode" == sync || "$mode" == async ]] || pgiplock_die "PGIPLOCK_HA_PLAN: '${items[k]}' is not sync[:LAG] or async[:LAG]"
            sync=""
            [[ "$mode" == sync ]] && sync=--sync
            if (( k == 0 )); then
                pgiplock_ha_start_pair $sync || exit 1
                step "[bad-input]"
            else
                pgiplock_ha_repair $sync || exit 1    # the promoted node leads; a fresh replica
            fi
            export PGIPLOCK_HA_LAG_MS="$lag"
            step "[promote]"
            export PGIPLOCK_HA_LAG_MS=0
        done
        ;;
    patroni)
        if ! pgiplock_ha_ensure_patroni; then
            echo "skipped: patroni and etcd-server are not installed and cannot be (root and apt-get needed)"
            exit 77
        fi
        sync=--sync
        [[ "${PGIPLOCK_HA_PATRONI_SYNC:-1}" == 0 ]] && sync=""
        for ((i = 1; i <= trials; i++)); do
            pgiplock_ha_start_patroni $sync || exit 1
            step "[patroni]"
            pgiplock_ha_stop
        done
        ;;
    *)
        pgiplock_die "unknown scenario '$scenario' (promote, patroni)"
        ;;
esac
exit "$rc"
