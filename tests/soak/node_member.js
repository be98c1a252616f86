#!/usr/bin/env node
'use strict';
/*
 * The soak's Node member (tests/soak/soak.py starts one where node and the
 * pinned package are installed): one @imqueue/pg-pubsub@1.10.0 PgPubSub in
 * single-listener mode on the plain fleet's channels, in the plain fleet's
 * lock schema (PG_PUBSUB_SCHEMA_NAME, which the package reads when it is
 * loaded: soak.py sets it in the environment). Needs NODE_PATH to hold
 * @imqueue/pg-pubsub and pg (tests/interop/node_install.sh puts them in the
 * build directory).
 *
 *   node node_member.js DSN --channels A,B [--interval MS]
 *
 * DSN: libpq key=value conninfo (as soak.py hands the C++ members) or a URL.
 * --interval: PgPubSub's acquireInterval (the retry timer of a standby).
 *
 * One line per event on stdout, the line protocol of
 * tests/fault/soak_member.cpp, stamped with process.hrtime.bigint()
 * (CLOCK_MONOTONIC on Linux: the clock of test::now_ns() and of the driver):
 *   R <t> <backend pid>          connected (PgPubSub's processId), listen()
 *                                called for every channel
 *   H <t> <channel> 0            it holds the channel's lock row: the
 *                                acquired flag of one of its lock objects
 *                                for the channel went true (by listen(), by
 *                                a release event, or by a retry timer), or
 *                                the row names its app (polled, below)
 *   L <t> <channel> 0            no longer (a failed re-acquire, or the
 *                                SIGTERM handler's release)
 *   D <t> <channel> <payload> 0 0
 *                                PgPubSub emitted 'message'
 *   E <t> <what>                 an error
 * and one line of its own:
 *   N <t> <channel> listen       PgPubSub emitted 'listen': it ran LISTEN on
 *                                the channel. Only a session that did so
 *                                delivers: a lock won by the retry timer
 *                                never LISTENs (the 1.10.0 defect README.md
 *                                describes), so an H without an N in the
 *                                same process is a silent hold.
 *   N <t> <channel> shadow       its second lock object for the channel
 *                                holds the row (below)
 *   N <t> <channel> row          the row names its app while neither lock
 *                                object's flag says so: a silent hold
 *
 * The rows are polled (every ROW_POLL_MS, on a connection of its own)
 * because the package's flags can say "not mine" while the row stays its:
 * the "two release events" defect below. Such a hold keeps the channel
 * from every other member as long as the process lives, and the checker
 * must see it as this member's tenure.
 *
 * Two lock objects per channel: PgPubSub.onNotification calls lock() on
 * every notification's channel before it skips lock channels, so the first
 * release event it hears for a channel makes a lock for the channel
 * "__PgIpLock__:<channel>", which PgIpLock maps to the same lock channel
 * and the same row. That second object has its own release handler (each
 * later release event calls listen(channel) twice: the second acquire
 * collides with the row the first one just took, and the channel's flag
 * goes false while the row stays its: the "two release events" defect of
 * README.md) and its own retry timer (when that one wins the row, PgPubSub
 * counts the channel "__PgIpLock__:<channel>" active, not the channel, and
 * nothing LISTENs). Either object holding the row is a tenure here.
 * The flags are polled every millisecond and also checked before an N or a
 * D line is printed, so a D never comes before its tenure's H.
 *
 * The token is 0 in every line: the Node package has no fencing token (its
 * lock row is (channel, app), nothing that grows per tenure), and drawing a
 * number from pgiplock_tenure here would be a token that fences nothing.
 * check.py knows this member by its kind ("node" in soak.py's X start line)
 * and checks its tenures by time and by the seqs they deliver instead.
 *
 * The payload: the publisher's plain notify() sends the decimal seq, which
 * PgPubSub's unpack() (JSON.parse) turns into a number; printed with
 * String() it is the seq's digits again, exactly (seqs are far below 2^53).
 * Anything else is printed as its JSON text, which check.py does not count.
 *
 * Shutdown and crashes are the package's own: its PgIpLock module installs
 * a SIGTERM handler at load time that releases every lock (DELETE of the
 * rows: the release event) and exits after PG_PUBSUB_SHUTDOWN_TIMEOUT
 * (1000 ms); it is left in place. A lost connection is not survived: 1.10.0
 * reconnects by calling connect() on the ended pg.Client, which pg 8
 * refuses ("Client has already been connected") with a promise nobody
 * awaits. A default Node 20 process exits on that unhandled rejection; this
 * one does too, after an E line (exit status 1), and soak.py restarts it
 * after a second, as a supervisor would.
 */

const { PgPubSub } = require('@imqueue/pg-pubsub');

function now() { return process.hrtime.bigint().toString(); }

function out(line) {
    // stdout is a pipe: synchronous writes on Linux, so a line is out before
    // the handler returns or the process exits.
    process.stdout.write(line + '\n');
}

function oneLine(err) {
    const m = (err && typeof err === 'object' && err.message) ? err.message : String(err);
    return String(m).replace(/\s+/g, ' ');
}

const { parseDsn } = require('../interop/conninfo');
const { Client } = require('pg');

const ROW_POLL_MS = 20;

function fail(what) {
    out(`E ${now()} ${what}`);
    process.exit(1);
}

process.stdout.on('error', (err) => process.exit(err && err.code === 'EPIPE' ? 0 : 1));
// Node 20's default for both is to end the process; the E line says why.
process.on('unhandledRejection', err => fail('unhandled rejection: ' + oneLine(err)));
process.on('uncaughtException', err => fail('uncaught exception: ' + oneLine(err)));

async function main() {
    const argv = process.argv.slice(2);
    const dsn = argv[0];
    let channels = [];
    let interval = 5000;
    for (let i = 1; i < argv.length; i++) {
        if (argv[i] === '--channels' && i + 1 < argv.length) {
            channels = argv[++i].split(',').filter(c => c);
        } else if (argv[i] === '--interval' && i + 1 < argv.length) {
            interval = +argv[++i];
        } else {
            throw new Error('unknown argument ' + argv[i]);
        }
    }
    if (!dsn || !channels.length || !(interval > 0)) {
        throw new Error('usage: node_member.js DSN --channels A,B [--interval MS]');
    }
    const mine = new Set(channels);
    const pubSub = new PgPubSub({ ...parseDsn(dsn), singleListener: true, acquireInterval: interval }, {
        error: (...args) => out(`E ${now()} ` + args.map(oneLine).join(' ')),
        warn: () => {}, info: () => {}, log: () => {},
    });
    pubSub.pgClient.setMaxListeners(0);  // one 'notification' listener per lock
    const active = new Map(channels.map(c => [c, false]));
    const shadow = new Map(channels.map(c => [c, false]));
    const silent = new Map(channels.map(c => [c, false]));
    const rows = pollRows(dsn, () => pubSub.pgClient.appName);
    const sync = (ch) => {
        const byShadow = pubSub.isActive('__PgIpLock__:' + ch);
        const byFlag = pubSub.isActive(ch) || byShadow;
        const byRow = !byFlag && rows.has(ch);
        const is = byFlag || byRow;
        if (byRow !== silent.get(ch)) {
            silent.set(ch, byRow);
            if (byRow) { out(`N ${now()} ${ch} row`); }
        }
        if (is !== active.get(ch)) {
            active.set(ch, is);
            out(`${is ? 'H' : 'L'} ${now()} ${ch} 0`);
        }
        if (byShadow !== shadow.get(ch)) {
            shadow.set(ch, byShadow);
            if (byShadow) { out(`N ${now()} ${ch} shadow`); }
        }
    };
    setInterval(() => { for (const ch of channels) { sync(ch); } }, 1);
    // PgPubSub re-emits the client's 'error' without arguments; an 'error'
    // nobody listens to would throw.
    pubSub.on('error', err => out(`E ${now()} pubsub error` + (err ? ': ' + oneLine(err) : '')));
    pubSub.on('end', () => out(`E ${now()} connection ended`));
    pubSub.on('listen', (ch) => {
        if (!mine.has(ch)) { return; }
        sync(ch);
        out(`N ${now()} ${ch} listen`);
    });
    pubSub.on('message', (ch, payload) => {
        if (!mine.has(ch)) { return; }
        sync(ch);
        const text = typeof payload === 'number' ? String(payload)
            : JSON.stringify(payload === undefined ? null : payload).replace(/\s/g, '_');
        out(`D ${now()} ${ch} ${text} 0 0`);
    });
    await pubSub.connect();
    for (const ch of channels) { await pubSub.listen(ch); }
    out(`R ${now()} ${pubSub.processId}`);
}

// The channels whose lock row names `app()`, refreshed every ROW_POLL_MS.
// Its connection is not the package's: a fault that ends it (a terminated
// backend, a server restart) only pauses the poll, which connects again.
function pollRows(dsn, app) {
    const held = new Set();
    const schema = process.env.PG_PUBSUB_SCHEMA_NAME || 'pgip_lock';
    const sql = `SELECT substr(channel, length('__PgIpLock__:') + 1) AS ch FROM "${schema.replace(/"/g, '""')}".lock ` +
        'WHERE app = $1';
    let client = null;
    const tick = async () => {
        try {
            if (!client) {
                client = new Client({ ...parseDsn(dsn), application_name: 'pgiplock_soak_node_poll' });
                client.on('error', () => {});
                await client.connect();
            }
            const name = app();
            if (name) {
                const r = await client.query(sql, [name]);
                held.clear();
                for (const row of r.rows) { held.add(row.ch); }
            }
        } catch (err) {
            const c = client;
            client = null;
            if (c) { c.end().catch(() => {}); }
        }
        setTimeout(tick, ROW_POLL_MS);
    };
    tick();
    return held;
}

main().catch(err => fail('start: ' + oneLine(err)));
