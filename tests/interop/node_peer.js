#!/usr/bin/env node
'use strict';
/*
 * node_peer.js - line-protocol driver around @imqueue/pg-pubsub@1.10.0, used
 * by the pgiplock C++ interop tests as a child process.
 *
 * Requires `@imqueue/pg-pubsub` and `pg` to be resolvable (set NODE_PATH to a
 * node_modules dir holding them).
 *
 * Usage:
 *   node node_peer.js lock   <dsn> <channel> <acquireIntervalMs> [auto|manual]
 *   node node_peer.js pubsub <dsn> <channel> [acquireIntervalMs]
 *   node node_peer.js fleet  <dsn> <stem> <count> [acquireIntervalMs]
 *
 * <dsn>: libpq key=value conninfo ("host=127.0.0.1 port=5432 user=postgres
 *        dbname=postgres", single-quoted values allowed) or a postgres:// URL.
 *
 * Output (stdout, one line per event; stdout on a pipe is synchronous on Linux):
 *   common : `error <message>` on any error (process keeps going)
 *            `bye` right before exiting on `exit` / stdin EOF
 *   lock   : `app <uuid>` (application_name == lock.app of this peer), `ready`,
 *            `acquired` | `not-acquired`     (reply to `acquire`)
 *            `released`                      (reply to `release`)
 *            `held` | `free`                 (reply to `status`, lock.isAcquired())
 *            `destroyed`                     (reply to `destroy`)
 *            `on-release <channel>`          (onRelease handler fired; channel without prefix)
 *            `became-holder` | `lost-holder` (isAcquired() flipped by itself: retry
 *                                             timer or auto-acquire; polled every 5 ms,
 *                                             flips caused by a command are NOT reported)
 *   pubsub : `app <uuid>`, `ready` (after connect() + listen(channel)),
 *            `message <JSON.stringify(payload as received/unpacked)>`,
 *            `raw <JSON.stringify(notification.payload)>` (before unpack; printed
 *            for every notification on the channel, delivered or not),
 *            `notified` (reply to notify/notify-json), `active` | `inactive` (reply to status),
 *            `event <name> [args]` for PgPubSub events listen/unlisten/reconnect/end/close/error.
 *
 * Commands (stdin, one per line, executed strictly one after another):
 *   lock   : acquire | release | status | destroy | exit
 *   pubsub : notify <payload text>   -> pubSub.notify(channel, "<payload text>")
 *                                       (a JS string: wire payload is JSON.stringify(text))
 *            notify-json <json>      -> pubSub.notify(channel, JSON.parse(json))
 *            unlisten                -> pubSub.unlisten(channel): UNLISTEN, lock.destroy()
 *                                       (UNLISTEN lock channel + DELETE row -> release
 *                                       NOTIFY); replies `unlistened`
 *            status | exit           -> exit = pubSub.destroy(): NOTE in 1.10.0 this ends
 *                                       the pg client BEFORE the locks' UNLISTEN/DELETE
 *                                       run, so the lock row is NOT deleted (prints
 *                                       `error Client was closed and is not queryable`)
 *
 *   fleet  : one PgPubSub (single-listener) on channels <stem>.0 .. <stem>.<count-1>,
 *            one listen() call each, one after another:
 *            `app <uuid>`, `ready <n>` (n: how many it holds then),
 *            `holding <n>` whenever the number of its channels that PgPubSub
 *            counts active (lock acquired) changes (polled every 5 ms, whatever
 *            caused it), `event listen <channel>` when PgPubSub LISTENs one of
 *            them (after its lock was won: only then does it deliver),
 *            `message <channel> <JSON payload>`,
 *            `listening <n>` (reply to `listening`: how many of its channels the
 *            session LISTENs, from pg_listening_channels()), the events as in pubsub.
 *
 * Commands (fleet): release -> pubSub.unlisten(ch) for each channel, one after
 *            another (UNLISTEN, then the lock's UNLISTEN and DELETE: the trigger's
 *            release NOTIFY tells standbys at once); replies `released`.
 *            status -> `holding <n>`; listening; exit -> release, close(), `bye`.
 *
 * lock mode, 5th arg (default `auto`): on a release notification the peer prints
 * `on-release <channel>` and, in `auto` mode, immediately calls lock.acquire() the
 * way PgPubSub does (its onRelease handler calls listen() -> acquire()). The release
 * notification caused by this peer's own `release` command does not trigger the
 * auto-acquire (a real PgPubSub holder UNLISTENs before deleting). `manual`: print only.
 *
 * PgIpLock.js installs process.on('SIGTERM'|'SIGINT'|'SIGABRT') handlers at
 * module load time (not at construction). They are removed right after require()
 * unless NODE_PEER_KEEP_SIGNALS=1, so SIGTERM/SIGKILL simulate a crash (no release).
 * With NODE_PEER_KEEP_SIGNALS=1 a signal destroys all locks and exits after
 * PG_PUBSUB_SHUTDOWN_TIMEOUT ms (default 1000).
 * NODE_PEER_DEBUG=1 echoes every stdout line to stderr with an epoch-ms timestamp.
 */

const SIGNALS = ['SIGTERM', 'SIGINT', 'SIGABRT'];
const before = {};
for (const s of SIGNALS) { before[s] = process.listeners(s).slice(); }
const pg = require('pg');
const pubsubPkg = require('@imqueue/pg-pubsub');
if (process.env.NODE_PEER_KEEP_SIGNALS !== '1') {
    for (const s of SIGNALS) {
        for (const l of process.listeners(s)) {
            if (!before[s].includes(l)) { process.removeListener(s, l); }
        }
    }
}
const { PgIpLock, PgPubSub } = pubsubPkg;
const crypto = require('crypto');
const readline = require('readline');

const DEBUG = process.env.NODE_PEER_DEBUG === '1';

function out(line) {
    process.stdout.write(line + '\n');
    if (DEBUG) { process.stderr.write(`[${Date.now()}] ${line}\n`); }
}

function errMsg(err) {
    if (err && typeof err === 'object') {
        const m = err.message || String(err);
        return String(m).replace(/\s+/g, ' ');
    }
    return String(err).replace(/\s+/g, ' ');
}

function fmtArg(a) {
    if (a instanceof Error) { return errMsg(a); }
    if (typeof a === 'string') { return a; }
    try { return JSON.stringify(a); } catch (e) { return String(a); }
}

const logger = {
    error: (...args) => out('error ' + args.map(fmtArg).join(' ').replace(/\s+/g, ' ')),
    warn: (...args) => DEBUG && process.stderr.write('warn ' + args.map(fmtArg).join(' ') + '\n'),
    info: (...args) => DEBUG && process.stderr.write('info ' + args.map(fmtArg).join(' ') + '\n'),
    log: (...args) => DEBUG && process.stderr.write('log ' + args.map(fmtArg).join(' ') + '\n'),
};

const { parseDsn } = require('./conninfo');

/** stdin line reader executing handlers strictly sequentially */
function commandLoop(handle, onEof) {
    const rl = readline.createInterface({ input: process.stdin, terminal: false });
    let chain = Promise.resolve();
    rl.on('line', (raw) => {
        const line = raw.replace(/\r$/, '');
        if (!line.trim()) { return; }
        chain = chain.then(() => handle(line)).catch(err => out('error ' + errMsg(err)));
    });
    rl.on('close', () => { chain = chain.then(onEof).catch(() => process.exit(1)); });
}

async function runLock(dsn, channel, intervalArg, modeArg) {
    const acquireInterval = +intervalArg;
    if (!channel || !(acquireInterval > 0)) {
        throw new Error('usage: lock <dsn> <channel> <acquireIntervalMs> [auto|manual]');
    }
    const autoAcquire = (modeArg || 'auto') !== 'manual';
    const client = new pg.Client(parseDsn(dsn));
    client.on('error', err => out('error ' + errMsg(err)));
    client.on('end', () => out('event end'));
    await client.connect();
    // Exactly what PgPubSub.setAppName() does: PgIpLock reads pgClient.appName
    // and writes it into <schema>.lock.app; deadlock_check() looks it up in
    // pg_stat_activity.application_name.
    client.appName = crypto.randomUUID();
    await client.query(`SET APPLICATION_NAME TO '${client.appName}'`);
    out('app ' + client.appName);

    const lock = new PgIpLock(channel, { pgClient: client, logger, acquireInterval });
    await lock.init(); // creates schema if absent, LISTEN "__PgIpLock__:<ch>", starts retry timer

    let busy = false;           // a command is running: poller does not report flips
    let last = lock.isAcquired();
    let selfReleaseUntil = 0;   // ignore auto-acquire for our own release notification
    let destroyed = false;

    lock.onRelease((ch) => {
        out('on-release ' + ch);
        if (!autoAcquire || destroyed) { return; }
        if (selfReleaseUntil) {
            selfReleaseUntil = 0;
            return;
        }
        lock.acquire().catch(err => out('error ' + errMsg(err)));
    });

    const poller = setInterval(() => {
        if (selfReleaseUntil && Date.now() > selfReleaseUntil) { selfReleaseUntil = 0; }
        if (busy) { return; }
        const now = lock.isAcquired();
        if (now !== last) {
            last = now;
            out(now ? 'became-holder' : 'lost-holder');
        }
    }, 5);

    out('ready');

    const cmd = async (line) => {
        const verb = line.trim().split(/\s+/)[0];
        busy = true;
        try {
            switch (verb) {
                case 'acquire':
                    out((await lock.acquire()) ? 'acquired' : 'not-acquired');
                    break;
                case 'release': {
                    const wasHeld = lock.isAcquired();
                    if (wasHeld) { selfReleaseUntil = Date.now() + 1000; }
                    await lock.release();
                    out('released');
                    break;
                }
                case 'status':
                    out(lock.isAcquired() ? 'held' : 'free');
                    break;
                case 'destroy':
                    destroyed = true;
                    await lock.destroy();
                    out('destroyed');
                    break;
                case 'exit':
                    await shutdown();
                    break;
                default:
                    out('error unknown command: ' + verb);
            }
        } catch (err) {
            out('error ' + errMsg(err));
        } finally {
            last = lock.isAcquired();
            busy = false;
        }
    };

    async function shutdown() {
        clearInterval(poller);
        try {
            if (!destroyed) { destroyed = true; await lock.destroy(); }
        } catch (err) { out('error ' + errMsg(err)); }
        try { await client.end(); } catch (err) { /* ignore */ }
        out('bye');
        process.exit(0);
    }

    commandLoop(cmd, shutdown);
}

async function runPubSub(dsn, channel, intervalArg) {
    if (!channel) { throw new Error('usage: pubsub <dsn> <channel> [acquireIntervalMs]'); }
    const opts = { ...parseDsn(dsn) };
    if (intervalArg !== undefined) {
        const iv = +intervalArg;
        if (!(iv > 0)) { throw new Error('acquireIntervalMs must be > 0'); }
        opts.acquireInterval = iv;
    }
    const pubSub = new PgPubSub(opts, logger);
    // PgPubSub re-emits pg client 'error' WITHOUT arguments; an 'error' event
    // without a listener would throw, so always listen.
    pubSub.on('error', err => out('event error' + (err ? ' ' + errMsg(err) : '')));
    pubSub.on('end', () => out('event end'));
    pubSub.on('close', () => out('event close'));
    pubSub.on('listen', ch => out('event listen ' + ch));
    pubSub.on('unlisten', chs => out('event unlisten ' + JSON.stringify(chs)));
    pubSub.on('reconnect', n => out('event reconnect ' + n));
    pubSub.on('message', (ch, payload) => {
        if (ch === channel) {
            out('message ' + JSON.stringify(payload === undefined ? null : payload));
        }
    });
    // The notification as the server sent it, before PgPubSub's unpack():
    // what a Node application reads when it wants a nudge's id.
    pubSub.pgClient.on('notification', n => {
        if (n.channel === channel) { out('raw ' + JSON.stringify(n.payload)); }
    });

    await pubSub.connect();   // SET APPLICATION_NAME TO '<uuid v4>', reads backend pid
    out('app ' + pubSub.pgClient.appName);
    await pubSub.listen(channel);
    out('ready');

    async function shutdown() {
        try { await pubSub.destroy(); } catch (err) { out('error ' + errMsg(err)); }
        out('bye');
        process.exit(0);
    }

    const cmd = async (line) => {
        const m = /^\s*(\S+)(?: (.*))?$/.exec(line);
        const verb = m[1];
        const rest = m[2] === undefined ? '' : m[2];
        try {
            switch (verb) {
                case 'notify':
                    await pubSub.notify(channel, rest);
                    out('notified');
                    break;
                case 'notify-json':
                    await pubSub.notify(channel, JSON.parse(rest));
                    out('notified');
                    break;
                case 'status':
                    out(pubSub.isActive(channel) ? 'active' : 'inactive');
                    break;
                case 'unlisten':
                    await pubSub.unlisten(channel);
                    out('unlistened');
                    break;
                case 'exit':
                    await shutdown();
                    break;
                default:
                    out('error unknown command: ' + verb);
            }
        } catch (err) {
            out('error ' + errMsg(err));
        }
    };

    commandLoop(cmd, shutdown);
}

async function runFleet(dsn, stem, countArg, intervalArg) {
    const count = +countArg;
    if (!stem || !(count > 0)) { throw new Error('usage: fleet <dsn> <stem> <count> [acquireIntervalMs]'); }
    const opts = { ...parseDsn(dsn), singleListener: true };
    if (intervalArg !== undefined) {
        const iv = +intervalArg;
        if (!(iv > 0)) { throw new Error('acquireIntervalMs must be > 0'); }
        opts.acquireInterval = iv;
    }
    const channels = [];
    for (let i = 0; i < count; i++) { channels.push(`${stem}.${i}`); }
    const mine = new Set(channels);
    const pubSub = new PgPubSub(opts, logger);
    // Each lock adds a 'notification' listener to the one pg client: 50 of
    // them are expected, not a leak to warn about.
    pubSub.pgClient.setMaxListeners(0);
    pubSub.on('error', err => out('event error' + (err ? ' ' + errMsg(err) : '')));
    pubSub.on('end', () => out('event end'));
    pubSub.on('close', () => out('event close'));
    pubSub.on('reconnect', n => out('event reconnect ' + n));
    pubSub.on('listen', (ch) => { if (mine.has(ch)) { out('event listen ' + ch); } });
    pubSub.on('message', (ch, payload) => {
        if (mine.has(ch)) {
            out(`message ${ch} ${JSON.stringify(payload === undefined ? null : payload)}`);
        }
    });

    // Of our channels only: PgPubSub.onNotification makes a lock object for a
    // lock channel's own release event too (lock() before the skip test), and
    // activeChannels() would count those if they ever won.
    const held = () => {
        const active = new Set(pubSub.activeChannels());
        return channels.filter(ch => active.has(ch)).length;
    };
    await pubSub.connect();
    out('app ' + pubSub.pgClient.appName);
    for (const ch of channels) { await pubSub.listen(ch); }
    let last = held();
    out('ready ' + last);
    const poller = setInterval(() => {
        const now = held();
        if (now !== last) {
            last = now;
            out('holding ' + now);
        }
    }, 5);

    let released = false;
    async function release() {
        released = true;
        for (const ch of channels) { await pubSub.unlisten(ch); }
    }
    async function shutdown() {
        clearInterval(poller);
        try {
            if (!released) { await release(); }
            await pubSub.close();
        } catch (err) { out('error ' + errMsg(err)); }
        out('bye');
        process.exit(0);
    }

    const cmd = async (line) => {
        const verb = line.trim().split(/\s+/)[0];
        try {
            switch (verb) {
                case 'release':
                    await release();
                    out('released');
                    break;
                case 'status':
                    out('holding ' + held());
                    break;
                case 'listening': {
                    const { rows } = await pubSub.pgClient.query(
                        'SELECT count(*) AS n FROM pg_listening_channels() c WHERE c = ANY($1::text[])',
                        [channels]);
                    out('listening ' + rows[0].n);
                    break;
                }
                case 'exit':
                    await shutdown();
                    break;
                default:
                    out('error unknown command: ' + verb);
            }
        } catch (err) {
            out('error ' + errMsg(err));
        }
    };

    commandLoop(cmd, shutdown);
}

process.stdout.on('error', (err) => {
    // parent went away (EPIPE): nothing left to talk to
    process.exit(err && err.code === 'EPIPE' ? 0 : 1);
});
process.on('unhandledRejection', (err) => out('error unhandled: ' + errMsg(err)));

async function main() {
    const [mode, ...args] = process.argv.slice(2);
    if (mode === 'lock') { return runLock(...args); }
    if (mode === 'pubsub') { return runPubSub(...args); }
    if (mode === 'fleet') { return runFleet(...args); }
    throw new Error('usage: node_peer.js lock <dsn> <channel> <acquireIntervalMs> [auto|manual]'
        + ' | pubsub <dsn> <channel> [acquireIntervalMs] | fleet <dsn> <stem> <count> [acquireIntervalMs]');
}

main().catch((err) => {
    out('error ' + errMsg(err));
    process.exit(2);
});
