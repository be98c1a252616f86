#!/usr/bin/env bash
# The pgiplock tool without a server: --help, --version, usage errors
# (status 2, a message on stderr), a failing connection (status 1), and that
# `meson install` would install it.
source "$(dirname "$0")/cli_common.sh"
build_root="${2:-}"
# The tool reads the test server's PGIPLOCK_DSN too: without a server means
# without that.
unset PGIPLOCK_DSN

expect 0 --help
stdout_has '^Usage: pgiplock '
stdout_has 'listen \[--single\] CH'
stdout_has 'status \[--json\] '
stdout_has 'then the fleet members'
stdout_has '\{"channels":\[\.\.\.\],"members":\[\.\.\.\]\}'
stderr_empty
expect 0 listen --help
stdout_has '^Usage: pgiplock '
expect 0 help
stdout_has '^Usage: pgiplock '
expect 0 --version
stdout_has '^pgiplock [0-9]+\.[0-9]+\.[0-9]+$'

expect 2
stderr_has 'no command given'
stderr_has "Try 'pgiplock --help'"
[[ ! -s "$work/out" ]] || fail "a usage error printed to stdout"
expect 2 frobnicate
stderr_has "unknown command 'frobnicate'"
expect 2 listen
stderr_has 'listen: give at least one channel'
expect 2 notify only-a-channel
stderr_has 'notify: give a channel and a payload'
expect 2 notify a b c
stderr_has 'notify: give a channel and a payload'
expect 2 status --bogus
stderr_has "unknown option '--bogus'"
expect 2 status extra
stderr_has "status: unexpected argument 'extra'"
expect 2 status --watch=0
stderr_has -- '--watch=N: N is seconds, 1 to 3600'
expect 2 listen --watch ch
stderr_has -- '--watch applies to .status. only'
expect 2 notify --single ch payload
stderr_has -- '--single applies to .listen. only'
expect 2 listen --json ch
stderr_has -- '--json applies to .status. only'
expect 2 status --dsn
stderr_has -- 'option --dsn needs a value'
expect 2 status --dsn ''
stderr_has -- '--dsn is empty'
# libpq's own parser refuses the conninfo before anything is sent.
expect 2 status --dsn 'not a conninfo'
stderr_has 'cannot parse conninfo'

# Nothing listens on port 1: a runtime failure that names the target.
expect 1 status --dsn 'host=127.0.0.1 port=1 connect_timeout=5'
stderr_has '^pgiplock: error: cannot connect to host=127.0.0.1 port=1'
PGIPLOCK_DSN='host=127.0.0.1 port=1 connect_timeout=5' expect 1 notify ch payload
stderr_has 'cannot connect to host=127.0.0.1 port=1'

if [[ -n "$build_root" ]]; then
    installed="$("${MESON:-meson}" introspect --installed "$build_root")"
    [[ "$installed" == *'/bin/pgiplock"'* ]] || fail "meson install would not install bin/pgiplock: $installed"
fi
note "cli usage: OK"
