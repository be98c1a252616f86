'use strict';
// Shared by the Node reference benchmarks: same line protocol as the C++
// programs (see bench/driver.py); times are CLOCK_MONOTONIC ns
// (process.hrtime.bigint() reads it, as the C++ side and Python do).
const now = () => process.hrtime.bigint().toString();
const say = (line) => process.stdout.write(line + '\n');

// libpq "k=v" conninfo (what tools/bench passes) -> pg.Client config.
function pgConfig(dsn) {
    if (/^postgres(ql)?:\/\//i.test(dsn)) { return { connectionString: dsn }; }
    const kv = {};
    for (const m of dsn.matchAll(/(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)/g)) {
        kv[m[1]] = m[2].startsWith("'") ? m[2].slice(1, -1).replace(/\\(.)/g, '$1') : m[2];
    }
    const cfg = {};
    if (kv.host || kv.hostaddr) { cfg.host = kv.host || kv.hostaddr; }
    if (kv.port) { cfg.port = +kv.port; }
    if (kv.user) { cfg.user = kv.user; }
    if (kv.dbname) { cfg.database = kv.dbname; }
    if (kv.password) { cfg.password = kv.password; }
    return cfg;
}

// The package installs SIGTERM/SIGINT/SIGABRT handlers at require() time
// that keep the process alive for a second; the driver ends us by closing
// stdin or with SIGKILL, so they would only slow the run down.
function requirePubSub() {
    const sigs = ['SIGTERM', 'SIGINT', 'SIGABRT'];
    const before = Object.fromEntries(sigs.map(s => [s, process.listeners(s).slice()]));
    const pkg = require('@imqueue/pg-pubsub');
    for (const s of sigs) {
        for (const l of process.listeners(s)) {
            if (!before[s].includes(l)) { process.removeListener(s, l); }
        }
    }
    return pkg;
}

const quietLogger = { log() {}, info() {}, warn() {}, error: (...a) => process.stderr.write('node: ' + a.join(' ') + '\n') };

module.exports = { now, say, pgConfig, requirePubSub, quietLogger };
