#!/usr/bin/env node
'use strict';
// node listen.js DSN CH COUNT - PgPubSub listener (singleListener, the
// package default), counts 'message' events; protocol as bench_raw listen.
const { now, say, pgConfig, requirePubSub, quietLogger } = require('./common');
const { PgPubSub } = requirePubSub();

async function main() {
    const [dsn, channel, countArg] = process.argv.slice(2);
    const count = +countArg;
    const ps = new PgPubSub({ ...pgConfig(dsn), singleListener: true }, quietLogger);
    let got = 0, cpu0 = null, tFirst = '0';
    ps.on('message', () => {
        if (got++ === 0) { tFirst = now(); }
        if (got === count) {
            const tDone = now();
            const cpu = process.cpuUsage(cpu0);
            say(`done ${got} ${cpu.user + cpu.system} ${tDone} ${tFirst}`);
        }
    });
    await ps.connect();
    // A first listen() can lose the race with a C++ peer bootstrapping the
    // lock schema at the same moment (the package then logs and gives up
    // until its 30 s retry, which never LISTENs): just ask again.
    for (let i = 0; !ps.isActive(channel); i++) {
        if (i === 50) { throw new Error('not active on ' + channel); }
        if (i) { await new Promise(r => setTimeout(r, 100)); }
        await ps.listen(channel);
    }
    cpu0 = process.cpuUsage();
    say(`ready ${process.pid}`);
    process.stdin.resume();
    process.stdin.on('end', () => process.exit(0));
}
main().catch(e => { process.stderr.write('node listen: ' + e.stack + '\n'); process.exit(1); });
