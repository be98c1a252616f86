'use strict';
/*
 * conninfo.js - libpq conninfo ("k=v k2='v 2'") or a postgres:// URL -> a
 * pg.Client config, for the Node peers of the tests (tests/interop/node_peer.js,
 * tests/soak/node_member.js).
 */

function parseDsn(dsn) {
    if (/^postgres(ql)?:\/\//i.test(dsn)) { return { connectionString: dsn }; }
    const kv = {};
    let i = 0;
    const n = dsn.length;
    while (i < n) {
        while (i < n && /\s/.test(dsn[i])) { i++; }
        if (i >= n) { break; }
        let key = '';
        while (i < n && dsn[i] !== '=' && !/\s/.test(dsn[i])) { key += dsn[i++]; }
        while (i < n && /\s/.test(dsn[i])) { i++; }
        if (dsn[i] !== '=') { throw new Error(`bad conninfo near "${key}"`); }
        i++;
        while (i < n && /\s/.test(dsn[i])) { i++; }
        let val = '';
        if (dsn[i] === "'") {
            i++;
            while (i < n && dsn[i] !== "'") {
                if (dsn[i] === '\\' && i + 1 < n) { i++; }
                val += dsn[i++];
            }
            if (i >= n) { throw new Error('unterminated quote in conninfo'); }
            i++;
        } else {
            while (i < n && !/\s/.test(dsn[i])) {
                if (dsn[i] === '\\' && i + 1 < n) { i++; }
                val += dsn[i++];
            }
        }
        kv[key] = val;
    }
    const cfg = {};
    if (kv.host !== undefined) { cfg.host = kv.host; }
    else if (kv.hostaddr !== undefined) { cfg.host = kv.hostaddr; }
    if (kv.port !== undefined) { cfg.port = +kv.port; }
    if (kv.user !== undefined) { cfg.user = kv.user; }
    if (kv.dbname !== undefined) { cfg.database = kv.dbname; }
    if (kv.password !== undefined) { cfg.password = kv.password; }
    if (kv.application_name !== undefined) { cfg.application_name = kv.application_name; }
    if (kv.connect_timeout !== undefined) {
        cfg.connectionTimeoutMillis = 1000 * +kv.connect_timeout;
    }
    return cfg;
}

module.exports = { parseDsn };
