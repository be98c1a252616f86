#!/usr/bin/env node
'use strict';
// node holder.js DSN CH INTERVAL_MS - PgPubSub single listener with the
// protocol of `bench_pgiplock holder`: prints `listening <ns>` on the 'listen'
// event; `destroy` on stdin hands the channel over. PgPubSub.destroy() in
// 1.10.0 closes the client before releasing (the row stays, standbys wait
// for their retry timer), so the graceful path a Node user has is
// unlisten(channel): UNLISTEN + lock release -> release NOTIFY.
const { now, say, pgConfig, requirePubSub, quietLogger } = require('./common');
const { PgPubSub } = requirePubSub();

async function main() {
    const [dsn, channel, interval] = process.argv.slice(2);
    const ps = new PgPubSub({ ...pgConfig(dsn), singleListener: true, acquireInterval: +interval }, quietLogger);
    ps.on('listen', () => say(`listening ${now()}`));
    ps.on('message', (ch, payload) => say(`msg ${now()} ${JSON.stringify(payload)}`));
    ps.on('error', () => {});
    await ps.connect();
    await ps.listen(channel);  // the driver starts the holder first, alone
    say(`ready ${ps.isActive(channel) ? 'active' : 'standby'}`);
    const rl = require('readline').createInterface({ input: process.stdin, terminal: false });
    rl.on('line', async (line) => {
        if (line.includes('destroy')) {
            say(`destroy ${now()}`);
            await ps.unlisten(channel);
            say(`destroyed ${now()}`);
        }
        if (line.includes('exit')) { process.exit(0); }
    });
    rl.on('close', () => process.exit(0));
}
main().catch(e => { process.stderr.write('node holder: ' + e.stack + '\n'); process.exit(1); });
