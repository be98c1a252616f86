#!/usr/bin/env bash
# tests/ha/ctl.sh ACTION - one failover step on the HA set-up that
# tests/ha/run.sh started (tools/lib/ha.sh; its PGIPLOCK_HA_* variables are
# in the environment), for the test programs:
#   stop-primary   pg_ctl stop -m immediate on the primary (pair)
#   promote        pg_ctl promote on the replica, waiting for it (pair)
#   cut-replication  disconnect the replica from the primary: it falls behind (pair)
#   leader         prints the read-write node: NAME PORT
#   kill-leader    SIGKILLs the leader's patroni and postmaster (Patroni);
#                  prints "killed NAME PORT"
# This shell owns nothing: it neither starts nor removes servers.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=../../tools/lib/common.sh
source "$here/../../tools/lib/common.sh"
# shellcheck source=../../tools/lib/ha.sh
source "$here/../../tools/lib/ha.sh"
[[ -n "${PGIPLOCK_HA_DIR:-}" ]] || pgiplock_die "PGIPLOCK_HA_DIR is not set: run under tests/ha/run.sh"
case "${1:-}" in
    stop-primary) pgiplock_ha_stop_primary ;;
    promote)      pgiplock_ha_promote ;;
    cut-replication) pgiplock_ha_cut_replication ;;
    leader)       pgiplock_ha_leader ;;
    kill-leader)  pgiplock_ha_kill_leader ;;
    *)            pgiplock_die "usage: ctl.sh stop-primary|promote|cut-replication|leader|kill-leader" ;;
esac
