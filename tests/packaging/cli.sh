#!/usr/bin/env bash
# The pgiplock tool against the test server ($PGIPLOCK_DSN, which the tool
# reads too; skipped without one): notify/listen round trip as JSON lines,
# single-listener standby and handover, status with live and stale holders
# and with the fleet members (alive, dead after kill -9, gone once swept).
source "$(dirname "$0")/cli_common.sh"
[[ -n "${PGIPLOCK_DSN:-}" ]] || { echo "PGIPLOCK_DSN is not set: skipped"; exit 77; }

# Channel names of our own, so other suites on the same server do not interfere.
ch="cli_$$_$RANDOM"
odd="cli \"odd\" $$"
pid_re='"pid":[1-9][0-9]*'
time_re='"time":"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z"'
app_re='pgiplock:[0-9a-f-]{36}'
since_re='[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z \([0-9]+s ago\)'

# start NAME ARGS...: a background `pgiplock ARGS...`, output in $work/NAME.{out,err}.
start() {
    local name="$1"
    shift
    "$cli" "$@" >"$work/$name.out" 2>"$work/$name.err" </dev/null &
    children+=("$!")
    eval "${name}_pid=$!"
}
# holder CHANNEL: sets held_app, held_pid and held_token, CHANNEL's live
# holder and its tenure's fencing token in `status --json`.
holder() {
    local found
    expect 0 status --json
    found="$(grep -oE "\{\"channel\":\"$1\",\"alive\":true,\"pid\":[0-9]+,\"app\":\"$app_re\",[^}]*,\"token\":[0-9]+" "$work/out")" \
        || { cat "$work/out"; fail "no live holder of $1 with a token"; }
    held_pid="$(sed -E 's/.*"pid":([0-9]+),.*/\1/' <<<"$found")"
    held_app="$(grep -oE "$app_re" <<<"$found")"
    held_token="$(sed -E 's/.*"token":([0-9]+)$/\1/' <<<"$found")"
}
# member APP STATE PID CHANNELS: APP is listed so in both forms of `status`.
member() {
    expect 0 status
    stdout_has '^MEMBER +STATE +PID +SINCE +CHANNELS$'
    stdout_has "^$1 +$2 +$3 +$since_re +$4\$"
    local alive=false session=false
    [[ "$2" == alive ]] && alive=true session=true
    expect 0 status --json
    stdout_has "\{\"app\":\"$1\",\"alive\":$alive,\"pid\":$3,\"since\":\"[0-9T:Z-]{20}\",\"channels\":$4,\"session\":$session\}"
}
# not_member APP: APP is in neither form of `status`.
not_member() {
    expect 0 status
    grep -q -- "$1" "$work/out" && { cat "$work/out"; fail "$1 is still listed"; }
    expect 0 status --json
    grep -q -- "$1" "$work/out" && { cat "$work/out"; fail "$1 is still listed in the JSON"; }
    return 0
}

# stop PID SIGNAL STATUS: the process ends by the signal, with its shell status.
stop() {
    local rc=0
    kill "-$2" "$1"
    wait "$1" || rc=$?
    [[ "$rc" == "$3" ]] || fail "after SIG$2 the listener exited with $rc, expected $3"
}

# --- round trip: every listener prints every notification ------------------
start plain listen "$ch" "$odd"
wait_for "$work/plain.err" "^pgiplock: listening on \"$ch\"$"
wait_for "$work/plain.err" '^pgiplock: listening on "cli \\"odd\\" '
expect 0 notify "$ch" $'{"id":1}\ttab "quoted" back\\slash\nnew line é'
[[ ! -s "$work/out" && ! -s "$work/err" ]] || fail "notify printed something"
printf 'from stdin' | "$cli" notify "$odd" - || fail "notify with the payload on stdin failed"
wait_for "$work/plain.out" "^\\{\"channel\":\"$ch\",\"payload\":\"\\{\\\\\"id\\\\\":1\\}\\\\ttab \\\\\"quoted\\\\\" back\\\\\\\\slash\\\\nnew line é\",$pid_re,$time_re\\}$"
wait_for "$work/plain.out" "^\\{\"channel\":\"cli \\\\\"odd\\\\\" $$\",\"payload\":\"from stdin\",$pid_re,$time_re\\}$"
[[ "$(wc -l <"$work/plain.out")" == 2 ]] || { cat "$work/plain.out"; fail "expected exactly 2 lines"; }
note "listen: $(head -n1 "$work/plain.out")"

# Bad input is a usage error, found before anything is sent.
expect 2 notify "$ch" "$(head -c 8000 /dev/zero | tr '\0' x)"
stderr_has 'payload is 8000 bytes; PostgreSQL accepts at most 7999'

# --- single-listener mode: one holder, one standby, handover on SIGTERM ----
start first listen --single "$ch"
wait_for "$work/first.err" "^pgiplock: listening on \"$ch\"$"
start second listen --single "$ch"
wait_for "$work/second.err" "^pgiplock: standby for \"$ch\""

expect 0 status
note "$(cat "$work/out")"
stdout_has '^CHANNEL +STATE +PID +APPLICATION +TOKEN +HELD SINCE +SESSION SINCE$'
stdout_has "^$ch +alive +[1-9][0-9]* +$app_re +[1-9][0-9]* +$since_re +$since_re$"
expect 0 status --json
stdout_has "\\{\"channel\":\"$ch\",\"alive\":true,\"pid\":[1-9][0-9]*,\"app\":\"$app_re\",\"since\":\"[0-9T:Z-]{20}\",\"token\":[1-9][0-9]*,\"held_since\":\"[0-9T:Z-]{20}\"\\}"
# The server's NOTIFY queue, in the JSON and the text.
stdout_has '"queue_usage":(0|1|0\.[0-9]+)\}$'
expect 0 status
stdout_has '^NOTIFY queue: [0-9.]+ used'
# --watch: the same, again and again, the screen redrawn each time.
timeout 3.5 "$cli" status --watch >"$work/watch" 2>&1 || true
(( $(grep -c 'pgiplock status, every 1 s, ' "$work/watch") >= 2 )) \
    || fail "status --watch did not refresh: $(cat -v "$work/watch" | head -20)"
grep -q "^$ch " "$work/watch" || fail "status --watch does not show $ch: $(cat -v "$work/watch" | head -20)"
# --watch --json: one JSON object per round, no screen control.
timeout 2.5 "$cli" status --watch --json >"$work/watch.json" 2>&1 || true
(( $(grep -c '^{"channels":' "$work/watch.json") >= 2 )) \
    || fail "status --watch --json did not print an object per round: $(cat -v "$work/watch.json" | head -20)"
if grep -q $'\x1b' "$work/watch.json"; then fail "status --watch --json wrote terminal control sequences"; fi
holder "$ch"
holder_app="$held_app" holder_pid="$held_pid" holder_token="$held_token"

# --- the fleet members: one per single-listener process --------------------
# The holder with its channel; the standby, alive, with none (its app is
# not in the lock table: it is the one live member besides the holder).
member "$holder_app" alive "$holder_pid" 1
expect 0 status
stdout_has "^$app_re +alive +[1-9][0-9]* +$since_re +0\$"
# A member of three channels of its own; after kill -9 it is seen dead by
# the member that watches it, which frees its channels and deletes its row.
start multi listen --single "${ch}_m1" "${ch}_m2" "${ch}_m3"
wait_for "$work/multi.err" "^pgiplock: listening on \"${ch}_m3\"$"
holder "${ch}_m1"
multi_app="$held_app"
member "$multi_app" alive "$held_pid" 3
stop "$multi_pid" KILL 137
for ((i = 0; i < 200; i++)); do
    expect 0 status
    grep -q -- "$multi_app" "$work/out" || break
    sleep 0.05
done
not_member "$multi_app"

expect 0 notify "$ch" one
wait_for "$work/first.out" '"payload":"one"'
sleep 0.2
[[ ! -s "$work/second.out" ]] || fail "the standby printed a notification: $(cat "$work/second.out")"

stop "$first_pid" TERM 143
wait_for "$work/second.err" "^pgiplock: listening on \"$ch\"$"
expect 0 notify "$ch" two
wait_for "$work/second.out" '"payload":"two"'
grep -q '"payload":"two"' "$work/first.out" && fail "the stopped holder printed after it stopped"

# A member that left gracefully is gone from the list.
not_member "$holder_app"

# --- a holder that dies without releasing is shown stale -------------------
holder "$ch"
new_app="$held_app" new_pid="$held_pid" new_token="$held_token"
[[ "$new_app" != "$holder_app" ]] || fail "the holder did not change on SIGTERM"
(( new_token > holder_token )) || fail "the new tenure's token $new_token is not above the old one's, $holder_token"
member "$new_app" alive "$new_pid" 1
stop "$second_pid" KILL 137
for ((i = 0; i < 100; i++)); do
    expect 0 status
    grep -qE "^$ch +stale +- +$new_app +$new_token +$since_re +-$" "$work/out" && grep -qE "^$new_app +dead " "$work/out" && break
    sleep 0.05
done
grep -qE "^$ch +stale +- +$new_app +$new_token +$since_re +-$" "$work/out" \
    || { cat "$work/out"; fail "the killed holder is not shown stale, with its tenure's token"; }
note "$(cat "$work/out")"
# No other member is left to sweep it: its row stays, dead, with the pid it
# had and the channel it still holds.
member "$new_app" dead "$new_pid" 1

# A new listener takes the stale lock over at once (its claim deletes the
# dead member's row); SIGINT then deletes the lock row and its own.
start third listen --single "$ch"
wait_for "$work/third.err" "^pgiplock: listening on \"$ch\"$"
holder "$ch"
third_app="$held_app"
(( held_token > new_token )) || fail "the takeover's token $held_token is not above the dead holder's, $new_token"
member "$third_app" alive "$held_pid" 1
not_member "$new_app"
stop "$third_pid" INT 130
expect 0 status --json
grep -q "\"channel\":\"$ch\"" "$work/out" && fail "the lock row is still there after a graceful exit: $(cat "$work/out")"
not_member "$third_app"

stop "$plain_pid" TERM 143
note "cli: OK"
