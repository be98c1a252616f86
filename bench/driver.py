#!/usr/bin/env python3
"""bench/driver.py - runs every benchmark scenario and prints a Markdown table.

Usage: driver.py --dsn DSN --bin BUILD/bench [--node-path DIR] [--reps N]
                 [--messages N] [--workdir DIR] [--only SCENARIO,...]
                 [--baseline-bin OLD/bench_pgiplock --baseline-label TEXT]

Started by tools/bench, which builds the programs and the throwaway server.
Every figure is measured next to a baseline run in the same invocation; each
cell is `median (min-max)` over the repetitions, and a ratio is computed per
repetition (pgiplock / baseline of that repetition), then summarised. With
--baseline-bin, the listener scenario also drains with bench_pgiplock built
against a previous header, next to the current one, and reports new / old
(the Node reference rows are left out then).
listen_scale measures the server alone (plain libpq): one connection
LISTENing to 1, 1,000 and 10,000 channels, ratios against the first row.
durable (durable channels, docs/durable.md) and durable_retention run with
fsync = on: the driver turns it on for them with ALTER SYSTEM (the throwaway
server runs with fsync = off) and back afterwards, and says in the rows what
the server had. durable_retention (1 GiB through the journal) only when named.

Line protocol of the programs (stdout, one line per event; times are
CLOCK_MONOTONIC ns, the clock time.monotonic_ns() reads):
  listeners : `ready <pid>` once LISTEN is committed (the CPU counter starts
              there), then `done <count> <cpu_us> <t_done> <t_first>` when the
              COUNT-th notification was handled; they exit when stdin closes.
  listenmany: `ready <pid> <server backend pid>` once its LISTENs are
              committed; per `drain <k>` line on stdin, `done <k> ...` as above.
  holders   : `ready active|standby`, `listening <t>` (LISTEN committed after
              becoming holder), `msg <t> <payload>`, `destroy <t>` (just before
              calling destroy()), `destroyed <t>`.
  e2e       : e2e_listen `ready <pid>`, then `done <count> <cpu_us> <t_done>
              <t_first> <out_of_order> <on_error calls> <repeats>` once every
              id (durable) or COUNT messages (plain) arrived; e2e_publish
              `sent <count> <t_start> <t_end>`; latency `lat plain <n> <p50>
              <p90> <p99> durable <n> <p50> <p90> <p99>` (ns).
  sql       : `result <first field>` or `error <message>`; journal_size:
              `size <t> <bytes>` per interval until stdin closes.
Progress goes to stderr, the table to stdout.
"""

import argparse
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time

NS = 1_000_000_000


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Proc:
    """A child speaking the line protocol, with time-limited line reads."""

    def __init__(self, args, env=None, errlog=None):
        self.args = args
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=errlog, env=env)
        self.buf = b""
        self.lines = []
        self.eof = False

    @property
    def pid(self):
        return self.p.pid

    def _fill(self, timeout):
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
        sel.close()
        if not ready:
            return False
        chunk = os.read(self.p.stdout.fileno(), 1 << 16)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        *full, self.buf = self.buf.split(b"\n")
        self.lines.extend(x.decode(errors="replace") for x in full)
        return True

    def expect(self, word, timeout=30.0):
        """The next line starting with `word` (earlier lines are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.lines:
                line = self.lines.pop(0)
                if line.split(" ", 1)[0] == word:
                    return line.split()
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return None
            self._fill(left)

    def must(self, word, timeout=30.0):
        got = self.expect(word, timeout)
        if got is None:
            if self.eof:
                self.p.wait()
                raise RuntimeError(f"{' '.join(self.args[:2])}: exited (status {self.p.returncode}) "
                                   f"before a '{word}' line")
            raise RuntimeError(f"{' '.join(self.args[:2])}: no '{word}' line within {timeout} s")
        return got

    def send(self, line):
        try:
            self.p.stdin.write((line + "\n").encode())
            self.p.stdin.flush()
        except BrokenPipeError:
            pass

    def finish(self, timeout=10.0):
        try:
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()

    def kill(self):
        if self.p.poll() is None:
            try:
                os.kill(self.p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.p.kill()
        self.p.wait()


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def summary(values, fmt):
    if not values:
        return "n/a"
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


class Bench:
    def __init__(self, a):
        self.a = a
        self.raw = os.path.join(a.bin, "bench_raw")
        self.pgl = os.path.join(a.bin, "bench_pgiplock")
        self.node = None
        if a.node_path and shutil.which("node"):
            self.node = shutil.which("node")
            self.node_env = dict(os.environ, NODE_PATH=a.node_path)
            self.node_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
        os.makedirs(a.workdir, exist_ok=True)
        self.errlog = open(os.path.join(a.workdir, "children.log"), "ab")
        self.rows = []
        self.extra = []  # (title, header, rows) of scenarios with a table of their own
        self.tag = f"b{os.getpid()}"
        self.procs = []

    def spawn(self, args, env=None):
        p = Proc(args, env=env, errlog=self.errlog)
        self.procs.append(p)
        return p

    def node_proc(self, script, *args, own_schema=False):
        env = self.node_env
        if own_schema:  # its own lock group: it must hold the channel next to a C++ single listener
            env = dict(env, PG_PUBSUB_SCHEMA_NAME="pgip_lock_bench_node")
        return self.spawn([self.node, os.path.join(self.node_dir, script), *args], env=env)

    def run(self, args, word, timeout=120.0):
        p = self.spawn(args)
        line = p.must(word, timeout)
        p.finish()
        return line

    def cleanup(self):
        for p in self.procs:
            if p.p.poll() is None:
                p.kill()

    def row(self, scenario, baseline, ours, ratio, target, met):
        self.rows.append((scenario, baseline, ours, ratio, target, "—" if met is None else "yes" if met else "**no**"))

    # ---- listener drain: CPU per message, drain rate, peak RSS --------------

    def listeners(self):
        a, n = self.a, self.a.messages
        kinds = [("raw", lambda ch: [self.raw, "listen", a.dsn, ch, str(n)]),
                 ("single", lambda ch: [self.pgl, "listen", a.dsn, ch, str(n), "1"]),
                 ("multi", lambda ch: [self.pgl, "listen", a.dsn, ch, str(n), "0"])]
        # Drained one after the other in this order, the groups rotated per
        # repetition; a pgiplock listener and the same one built against the
        # baseline header form a group, so they run next to each other, the
        # one first that went second in the repetition before.
        groups = [["raw"], ["single"], ["multi"]]
        old_env = None
        if a.baseline_bin:
            # Its own lock schema: the old single listener must hold the
            # channel next to the new one, and an old header's lock table
            # need not be the current one's.
            old_env = dict(os.environ, PG_PUBSUB_SCHEMA_NAME="pgip_lock_bench_old")
            kinds += [("old_single", lambda ch: [a.baseline_bin, "listen", a.dsn, ch, str(n), "1"]),
                      ("old_multi", lambda ch: [a.baseline_bin, "listen", a.dsn, ch, str(n), "0"])]
            groups = [["raw"], ["single", "old_single"], ["multi", "old_multi"]]
        # Not with a baseline header: it is not what is compared, and every
        # listener drained after it stays stopped the longer (Node pg-pubsub
        # has hung in its lock retry loop after such a stop).
        if self.node and not a.baseline_bin:
            kinds.append(("node", None))
            groups.append(["node"])
        res = {k: {"cpu": [], "rate": [], "rss": []} for k, _ in kinds}
        for rep in range(a.reps):
            ch = f"{self.tag}_l{rep}"
            procs = {}
            for k, mk in kinds:
                if k == "node":
                    procs[k] = self.node_proc("listen.js", a.dsn, ch, str(n), own_schema=True)
                else:
                    procs[k] = self.spawn(mk(ch), env=old_env if k.startswith("old_") else None)
            for k, p in procs.items():
                p.must("ready")
            for p in procs.values():
                os.kill(p.pid, signal.SIGSTOP)
            self.run([self.raw, "publish", a.dsn, ch, str(n), "10000", f"l{rep}"], "published")
            turn = groups[rep % len(groups):] + groups[:rep % len(groups)]  # no kind always first
            order = [k for g in turn for k in (g if rep % 2 == 0 else g[::-1])]
            for k in order:
                p = procs[k]
                t_cont = time.monotonic_ns()
                os.kill(p.pid, signal.SIGCONT)
                _, got, cpu_us, t_done, _ = p.must("done", 120)
                if int(got) != n:
                    raise RuntimeError(f"{k} listener got {got} of {n}")
                res[k]["cpu"].append(int(cpu_us) / n)
                res[k]["rate"].append(n / ((int(t_done) - t_cont) / NS))
                res[k]["rss"].append(vm_hwm_kib(p.pid) / 1024)
                p.finish()
            log(f"listeners rep {rep + 1}/{a.reps}: " + ", ".join(
                f"{k} {res[k]['cpu'][-1]:.3f} µs {res[k]['rate'][-1] / 1e6:.2f} M/s {res[k]['rss'][-1]:.1f} MiB"
                for k in order))
        raw = res["raw"]
        us = lambda v: f"{v:.3f} µs"
        mps = lambda v: f"{v / 1e6:.2f} M/s"
        mib = lambda v: f"{v:.1f} MiB"
        rat = lambda v: f"{v:.2f}×"
        names = {"single": "pgiplock (single_listener)", "multi": "pgiplock (single_listener=false)",
                 "node": "Node pg-pubsub 1.10.0 (reference)"}
        for k in [k for k, _ in kinds if k not in ("raw", "old_single", "old_multi")]:
            r = res[k]
            cpu_ratio = [x / y for x, y in zip(r["cpu"], raw["cpu"])]
            rate_ratio = [x / y for x, y in zip(r["rate"], raw["rate"])]
            rss_ratio = [x / y for x, y in zip(r["rss"], raw["rss"])]
            ours = k != "node"
            self.row(f"listener CPU per message, {n:,} queued — {names[k]}", "raw libpq " + summary(raw["cpu"], us),
                     summary(r["cpu"], us), summary(cpu_ratio, rat), "≤ 1.2× raw" if ours else "(reference)",
                     statistics.median(cpu_ratio) <= 1.2 if ours else True)
            self.row(f"listener drain rate — {names[k]}", "raw libpq " + summary(raw["rate"], mps),
                     summary(r["rate"], mps), summary(rate_ratio, rat), "≥ 0.8× raw" if ours else "(reference)",
                     statistics.median(rate_ratio) >= 0.8 if ours else True)
            self.row(f"listener peak RSS (VmHWM) — {names[k]}", "raw libpq " + summary(raw["rss"], mib),
                     summary(r["rss"], mib), summary(rss_ratio, rat), "≤ 12 MiB" if ours else "(reference)",
                     statistics.median(r["rss"]) <= 12 if ours else True)
        if a.baseline_bin:
            self.baseline_rows(res, names, us, mps, mib)

    def baseline_rows(self, res, names, us, mps, mib):
        """The same listener built against the current header (new) and the
        baseline header (old), drained next to each other: new / old."""
        a, n = self.a, self.a.messages
        rat = lambda v: f"{v:.3f}×"
        old = f"header {a.baseline_label}"
        for k in ("single", "multi"):
            new_r, old_r = res[k], res["old_" + k]
            cpu = [x / y for x, y in zip(new_r["cpu"], old_r["cpu"])]
            rate = [x / y for x, y in zip(new_r["rate"], old_r["rate"])]
            rss = [x / y for x, y in zip(new_r["rss"], old_r["rss"])]
            what = f"{names[k]}: current header vs {old}"
            self.row(f"listener CPU per message, {n:,} queued — {what}", old + " " + summary(old_r["cpu"], us),
                     summary(new_r["cpu"], us), summary(cpu, rat), "≤ 1.05× old", statistics.median(cpu) <= 1.05)
            self.row(f"listener drain rate — {what}", old + " " + summary(old_r["rate"], mps),
                     summary(new_r["rate"], mps), summary(rate, rat), "(for information)", None)
            self.row(f"listener peak RSS (VmHWM) — {what}", old + " " + summary(old_r["rss"], mib),
                     summary(new_r["rss"], mib), summary(rss, rat), "(for information)", None)

    # ---- notify throughput ---------------------------------------------------

    def notify(self):
        a = self.a
        naive, ours, ratio, lost = [], [], [], []
        for rep in range(a.reps):
            ch = f"{self.tag}_n{rep}"
            runs = [("naive", [self.raw, "naive", a.dsn, ch + "a", str(a.naive_count)]),
                    ("ours", [self.pgl, "notify", a.dsn, ch + "b", str(a.notify_count), "1000"])]
            if rep % 2:
                runs.reverse()
            got = {}
            for k, args in runs:
                _, sent, ns, _, delivered = self.run(args, "sent")
                got[k] = int(sent) / (int(ns) / NS)
                if int(delivered) != int(sent):
                    lost.append(f"{k}: {delivered}/{sent}")
            naive.append(got["naive"])
            ours.append(got["ours"])
            ratio.append(got["ours"] / got["naive"])
            log(f"notify rep {rep + 1}/{a.reps}: naive {got['naive']:,.0f}/s, pgiplock {got['ours']:,.0f}/s")
        per_s = lambda v: f"{v:,.0f}/s"
        note = f"{a.notify_count:,} calls, 1,000 in flight, every one delivered" if not lost else \
            "LOST: " + "; ".join(lost)
        self.row(f"notify() from one connection ({note})",
                 "1 pg_notify per transaction, raw libpq " + summary(naive, per_s), summary(ours, per_s),
                 summary(ratio, lambda v: f"{v:.1f}×"), "≥ 100,000/s",
                 statistics.median(ours) >= 100_000 and not lost)

    # ---- execution lock --------------------------------------------------------

    def exec_lock(self):
        a, n = self.a, self.a.exec_count
        base, ours, ratio, dups, missing = [], [], [], [], []
        for rep in range(a.reps):
            ch = f"{self.tag}_e{rep}"
            # Baseline: one raw libpq listener gets the same 20,000 messages.
            p = self.spawn([self.raw, "listen", a.dsn, ch + "r", str(n)])
            p.must("ready")
            t0 = time.monotonic_ns()
            self.run([self.raw, "publish", a.dsn, ch + "r", str(n), "10000", f"r{rep}"], "published")
            _, _, _, t_done, _ = p.must("done", 60)
            p.finish()
            base.append(n / ((int(t_done) - t0) / NS))
            # pgiplock: three execution-lock worker processes.
            files = [os.path.join(a.workdir, f"exec{rep}_{i}.txt") for i in range(3)]
            workers = [self.spawn([self.pgl, "exec", a.dsn, ch, "500", f]) for f in files]
            for w in workers:
                w.must("ready")
            t0 = time.monotonic_ns()
            self.run([self.raw, "publish", a.dsn, ch, str(n), "10000", f"e{rep}"], "published")
            t_last = 0
            for w in workers:
                line = w.must("done", 90)
                t_last = max(t_last, int(line[4]))
                w.finish()
            seen = []
            for f in files:
                with open(f) as fh:
                    seen.extend(x for x in fh.read().split("\n") if x)
            distinct = set(seen)
            dups.append(len(seen) - len(distinct))
            missing.append(n - len(distinct))
            ours.append(n / ((t_last - t0) / NS) if t_last else 0.0)
            ratio.append(ours[-1] / base[-1])
            log(f"exec-lock rep {rep + 1}/{a.reps}: raw {base[-1]:,.0f} msg/s, pgiplock {ours[-1]:,.0f} msg/s, "
                f"{dups[-1]} duplicates, {missing[-1]} missing")
        per_s = lambda v: f"{v:,.0f} msg/s"
        self.row(f"execution lock, 3 worker processes, {n:,} messages (publish start → last delivery)",
                 "1 raw libpq listener, same messages " + summary(base, per_s),
                 summary(ours, per_s) + f"; duplicates {sum(dups)}, missing {sum(missing)} (all reps)",
                 summary(ratio, lambda v: f"{v:.2f}×"), "≥ 10,000 msg/s, 0 duplicates, 0 missing",
                 statistics.median(ours) >= 10_000 and sum(dups) == 0 and sum(missing) == 0)

    # ---- graceful handover -------------------------------------------------------

    def handover_once(self, make, ch):
        old = make(ch)
        if old.must("ready")[1] != "active":
            raise RuntimeError("handover: first holder is not active")
        new = make(ch)
        if new.must("ready")[1] != "standby":
            raise RuntimeError("handover: second holder is not a standby")
        old.send("destroy")
        t_destroy = int(old.must("destroy")[1])
        got = new.expect("listening", 10)
        old.must("destroyed", 10)
        for p in (old, new):
            p.send("exit")
            p.finish()
        return None if got is None else (int(got[1]) - t_destroy) / 1e6

    def handover(self):
        a = self.a
        mk_ours = lambda ch: self.spawn([self.pgl, "holder", a.dsn, ch, "30000"])
        mk_node = lambda ch: self.node_proc("holder.js", a.dsn, ch, "30000")
        ours, node, ratio = [], [], []
        for rep in range(2 * a.reps + 1):
            ms = self.handover_once(mk_ours, f"{self.tag}_h{rep}")
            if ms is not None:
                ours.append(ms)
            if self.node:
                nms = self.handover_once(mk_node, f"{self.tag}_hn{rep}")
                if nms is not None:
                    node.append(nms)
                    if ms is not None:
                        ratio.append(ms / nms)
            log(f"handover rep {rep + 1}/{2 * a.reps + 1}: pgiplock {ms} ms" + (f", node {nms} ms" if self.node else ""))
        ms_f = lambda v: f"{v:.2f} ms"
        self.row("graceful handover: old holder's destroy() → new holder's LISTEN committed",
                 ("Node pg-pubsub unlisten() " + summary(node, ms_f)) if self.node else "(node not installed)",
                 summary(ours, ms_f), summary(ratio, lambda v: f"{v:.2f}×") if ratio else "n/a", "≤ 5 ms median",
                 bool(ours) and statistics.median(ours) <= 5)

    # ---- crash takeover ---------------------------------------------------------------

    def crash(self):
        a = self.a
        floor, ours, never = [], [], 0
        for rep in range(2 * a.reps + 1):
            floor.append(int(self.run([self.raw, "crashfloor", a.dsn], "wake")[1]) / 1e6)
            ch = f"{self.tag}_c{rep}"
            old = self.spawn([self.pgl, "holder", a.dsn, ch, "30000"])
            old.must("ready")
            new = self.spawn([self.pgl, "holder", a.dsn, ch, str(a.acquire_interval)])
            new.must("ready")
            ticker = self.spawn([self.raw, "ticker", a.dsn, ch])
            ticker.must("ready")
            old.must("msg")  # traffic flows to the holder
            time.sleep((rep % 5) * a.acquire_interval / 5000)  # spread the kill over the retry period
            t_kill = time.monotonic_ns()
            os.kill(old.pid, signal.SIGKILL)
            old.p.wait()
            got = new.expect("msg", 5 + a.acquire_interval / 1000)
            if got is None:
                never += 1
            else:
                ours.append((int(got[1]) - t_kill) / 1e6)
            ticker.finish()
            new.send("exit")
            new.finish()
            log(f"crash rep {rep + 1}/{2 * a.reps + 1}: floor {floor[-1]:.2f} ms, pgiplock "
                f"{ours[-1] if got else 'never'} ms")
        ms_f = lambda v: f"{v:.1f} ms"
        ratio = [o / f for o, f in zip(ours, floor)]
        self.row(f"crash takeover: SIGKILL holder → standby delivers again (standby acquire_interval "
                 f"{a.acquire_interval} ms; ticker every ~1 ms)",
                 "advisory-lock waiter wakes (server floor) " + summary(floor, ms_f),
                 summary(ours, ms_f) + (f"; never resumed {never}×" if never else ""),
                 summary(ratio, lambda v: f"{v:.0f}×"), "≤ 10 ms median",
                 bool(ours) and not never and statistics.median(ours) <= 10)

    # ---- durable channels (fsync on) ----------------------------------------------

    def sql(self, statement):
        """(True, first field) or (False, error message), on a new connection."""
        out = subprocess.run([self.raw, "sql", self.a.dsn, statement], stdout=subprocess.PIPE,
                             stderr=self.errlog, timeout=60).stdout.decode(errors="replace").strip()
        word, _, rest = out.partition(" ")
        return word == "result", rest

    def fsync_on(self):
        """fsync = on for the durable rows. Returns (what the rows say about the
        server, how to put it back)."""
        ok, before = self.sql("SHOW fsync")
        if not ok:
            raise RuntimeError(f"SHOW fsync: {before}")
        restore = lambda: None
        if before != "on":
            ok, why = self.sql("ALTER SYSTEM SET fsync = on")
            if ok:
                def restore():
                    self.sql("ALTER SYSTEM RESET fsync")
                    self.sql("SELECT pg_reload_conf()")
                    self.wait_setting("fsync", before)
                self.sql("SELECT pg_reload_conf()")
                if not self.wait_setting("fsync", "on"):
                    restore()
                    raise RuntimeError("fsync did not turn on after pg_reload_conf()")
            else:
                log(f"cannot turn fsync on ({why}): the durable rows run with fsync = {before}")
        _, now = self.sql("SHOW fsync")
        _, sync = self.sql("SHOW synchronous_commit")
        _, method = self.sql("SHOW wal_sync_method")
        return f"fsync={now}, synchronous_commit={sync}, wal_sync_method={method}", restore

    def wait_setting(self, name, value, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok, got = self.sql(f"SHOW {name}")
            if ok and got == value:
                return True
            time.sleep(0.1)
        return False

    def e2e_once(self, ch, n, durable, inflight=1000, size=64):
        """One publisher process (n notify(), `inflight` in flight) and one
        listener process: (messages/s from the first notify() call to the
        handler's last new message, the listener's done line)."""
        a = self.a
        flag = "1" if durable else "0"
        listener = self.spawn([self.pgl, "e2e_listen", a.dsn, ch, str(n), flag])
        listener.must("ready")
        _, sent, t0, _ = self.run([self.pgl, "e2e_publish", a.dsn, ch, str(n), str(inflight), flag, str(size)],
                                  "sent", timeout=1800)
        if int(sent) != n:
            raise RuntimeError(f"e2e_publish sent {sent} of {n}")
        done = listener.must("done", 600)
        listener.finish()
        return n / ((int(done[3]) - int(t0)) / NS), done

    def durable(self):
        server, restore = self.fsync_on()
        try:
            self.durable_rows(server)
        finally:
            restore()

    def durable_rows(self, server):
        # Latency first, on a journal that holds nothing yet: what the
        # holder's connection does besides delivering (acknowledgements,
        # pruning) slows its live deliveries when the journal is large.
        self.durable_latency(server)
        self.durable_e2e(server)

    def durable_e2e(self, server):
        a, n = self.a, self.a.durable_count
        plain, ours, ratio, bad = [], [], [], []
        for rep in range(a.reps):
            order = [False, True] if rep % 2 == 0 else [True, False]
            got = {}
            for durable in order:
                rate, done = self.e2e_once(f"{self.tag}_d{rep}{'d' if durable else 'p'}", n, durable)
                got[durable] = rate
                _, _, _, _, _, ooo, errors, repeats = done
                if int(ooo) or int(errors) or int(repeats):
                    bad.append(f"{'durable' if durable else 'plain'} rep {rep + 1}: {repeats} redelivered, "
                               f"{ooo} out of order, {errors} on_error")
            plain.append(got[False])
            ours.append(got[True])
            ratio.append(got[True] / got[False])
            log(f"durable e2e rep {rep + 1}/{a.reps}: plain {got[False]:,.0f}/s, durable {got[True]:,.0f}/s")
        per_s = lambda v: f"{v:,.0f} msg/s"
        cell = summary(ours, per_s) + ("; " + "; ".join(bad) if bad else "; every id once, in order (all reps)")
        self.row(f"durable channel end to end: {n:,} notify(), 1,000 in flight on one connection → a durable "
                 f"listener's on_delivery, first call → last new message ({server})",
                 "plain notify() → single-listener on_delivery, same shape " + summary(plain, per_s), cell,
                 summary(ratio, lambda v: f"{v:.2f}×"), "≥ 100,000 msg/s and ≥ 0.3× plain",
                 statistics.median(ours) >= 100_000 and statistics.median(ratio) >= 0.3 and not bad)

    def durable_latency(self, server):
        a = self.a
        # One message at a time, plain and durable alternating.
        lat = {"plain": [], "durable": [], "plain99": [], "durable99": []}
        lratio = []
        for rep in range(a.reps):
            line = self.run([self.pgl, "latency", a.dsn, f"{self.tag}_t{rep}", str(a.latency_count),
                             str(a.latency_pause)], "lat", timeout=600)
            p50, p99, d50, d99 = int(line[3]), int(line[5]), int(line[8]), int(line[10])
            lat["plain"].append(p50 / 1e6)
            lat["durable"].append(d50 / 1e6)
            lat["plain99"].append(p99 / 1e6)
            lat["durable99"].append(d99 / 1e6)
            lratio.append(d50 / p50)
            log(f"durable latency rep {rep + 1}/{a.reps}: plain p50 {p50 / 1e6:.2f} ms, durable p50 {d50 / 1e6:.2f} ms")
        ms = lambda v: f"{v:.2f} ms"
        self.row(f"durable channel live latency, one message at a time ({a.latency_count:,} each, alternating with "
                 f"plain, {a.latency_pause} ms apart): notify() call → listener's handler, median ({server})",
                 f"plain notify() {summary(lat['plain'], ms)}; p99 {summary(lat['plain99'], ms)}",
                 f"{summary(lat['durable'], ms)}; p99 {summary(lat['durable99'], ms)}",
                 summary(lratio, lambda v: f"{v:.2f}×"), "≤ 1.5× plain (median)",
                 statistics.median(lratio) <= 1.5)

    def durable_retention(self):
        server, restore = self.fsync_on()
        try:
            self.retention_row(server)
        finally:
            restore()

    def retention_row(self, server):
        """1 GiB of messages through a durable channel that one listener
        acknowledges: the journal's size on disk, sampled every 200 ms, until it
        is under 10 % of its peak."""
        a = self.a
        size = a.retention_payload
        n = -(-a.retention_bytes // size)
        schema = os.environ.get("PG_PUBSUB_SCHEMA_NAME", "pgip_lock")
        ch = f"{self.tag}_r"
        watch = self.spawn([self.raw, "journal_size", a.dsn, schema, "200"])
        samples = []  # (t, bytes)

        def take(timeout):
            line = watch.expect("size", timeout)
            if line is not None:
                samples.append((int(line[1]), int(line[2])))
            return line

        take(30)
        start_size = samples[-1][1]
        listener = self.spawn([self.pgl, "e2e_listen", a.dsn, ch, str(n), "1"])
        listener.must("ready")
        publisher = self.spawn([self.pgl, "e2e_publish", a.dsn, ch, str(n), "200", "1", str(size)])
        sent = None
        while sent is None:
            take(1)
            sent = publisher.expect("sent", 0.001)
            if publisher.eof and sent is None:
                raise RuntimeError("durable_retention: the publisher exited early")
        publisher.finish()
        t_start, t_end = int(sent[2]), int(sent[3])
        done = None
        while done is None:
            take(1)
            done = listener.expect("done", 0.001)
            if listener.eof and done is None:
                raise RuntimeError("durable_retention: the listener exited early")
        # The listener stays, acknowledging and pruning, while the journal shrinks.
        peak_t, peak = max(samples, key=lambda s: s[1])
        deadline = time.monotonic() + a.retention_wait
        under = None
        while time.monotonic() < deadline:
            take(1)
            t, b = samples[-1]
            if t > t_end and b < 0.1 * peak:
                under = (t, b)
                break
        listener.finish()
        watch.finish()
        final_t, final = samples[-1]
        mib = lambda v: f"{v / 2**20:,.1f} MiB"
        secs = lambda t: f"{(t - t_start) / NS:.1f} s"
        log(f"retention: {n:,} × {size:,} B in {(t_end - t_start) / NS:.1f} s; peak {mib(peak)} at {secs(peak_t)}; "
            f"final {mib(final)} at {secs(final_t)}")
        _, _, _, _, _, ooo, errors, repeats = done
        note = "" if not (int(ooo) or int(errors) or int(repeats)) else \
            f"; {repeats} redelivered, {ooo} out of order, {errors} on_error"
        self.row(f"durable retention (not in the default set): {n * size / 2**30:.2f} GiB = {n:,} messages × "
                 f"{size:,} B (random, incompressible) through one durable channel, acknowledged by one listener; "
                 f"the journal's partitions on disk (pg_total_relation_size, sampled every 200 ms) ({server})",
                 f"peak {mib(peak)} at {secs(peak_t)} after the first notify() (published in "
                 f"{(t_end - t_start) / NS:.1f} s; {mib(start_size)} before)",
                 (f"{mib(under[1])} {(under[0] - t_end) / NS:.1f} s after the last notify() returned"
                  if under else f"still {mib(final)} {(final_t - t_end) / NS:.1f} s after the last notify()") + note,
                 f"{(under[1] if under else final) / peak:.3f}× peak" if peak else "n/a",
                 "< 10 % of the peak", under is not None)

    # ---- PostgreSQL's listen list: one connection LISTENing to many channels ----

    def backend_cpu_ns(self, pid):
        """CPU time of a server backend: /proc/<pid>/schedstat (ns), else
        utime + stime of /proc/<pid>/stat (clock ticks)."""
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                ns = int(f.read().split()[0])
            if ns:
                return ns
        except (OSError, ValueError, IndexError):
            pass
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * NS // os.sysconf("SC_CLK_TCK")

    def queued_drain(self, p, backend, publishes, expect):
        """Stops the listener's server backend, queues the notifications,
        resumes it: (messages/s from SIGCONT to the client's EXPECT-th
        notification, backend CPU ns over that time)."""
        os.kill(backend, signal.SIGSTOP)
        try:
            for args in publishes:
                self.run(args, "published")
            cpu0 = self.backend_cpu_ns(backend)
            p.send(f"drain {expect}")
        finally:
            t_cont = time.monotonic_ns()
            os.kill(backend, signal.SIGCONT)
        _, got, _, t_done, _ = p.must("done", 300)
        if int(got) != expect:
            raise RuntimeError(f"listen_scale: got {got} of {expect}")
        time.sleep(0.1)  # the backend finishes its pass over the queue and is idle again
        return int(t_done) - t_cont, self.backend_cpu_ns(backend) - cpu0

    def listen_scale(self):
        a, n = self.a, self.a.scale_messages
        sizes = [int(x) for x in a.scale_channels.split(",")]
        keys = ("rate", "cpu", "other_rate", "other_cpu")
        res = {k: {x: [] for x in keys} for k in sizes}
        for rep in range(a.reps):
            order = sizes[rep % len(sizes):] + sizes[:rep % len(sizes)]
            for k in order:
                prefix = f"{self.tag}_s{rep}_{k}_"
                p = self.spawn([self.raw, "listenmany", a.dsn, prefix, str(k)])
                backend = int(p.must("ready", 300)[2])
                try:
                    with open(f"/proc/{backend}/comm") as f:
                        local = f.read().strip() == "postgres"
                    os.kill(backend, 0)
                except OSError:
                    local = False
                if not local:
                    raise RuntimeError(f"listen_scale needs the server on this machine and the right to signal its "
                                       f"backends (root or the server's user); backend {backend} is not one")
                target = prefix + str(k - 1)  # LISTENed last: PostgreSQL compares it last
                pub = lambda ch, count, tag: [self.raw, "publish", a.dsn, ch, str(count), "10000", tag]
                # Traffic to one of its channels, every notification delivered.
                ns, cpu = self.queued_drain(p, backend, [pub(target, n, f"s{rep}")], n)
                res[k]["rate"].append(n / (ns / NS))
                res[k]["cpu"].append(cpu / n / 1000)
                # Traffic to a channel it does not LISTEN to, then one to its
                # own as the end mark: every one is read and compared, none sent.
                ns, cpu = self.queued_drain(p, backend, [pub(f"{self.tag}_s{rep}_other", n, f"o{rep}"),
                                                         pub(target, 1, f"m{rep}")], 1)
                res[k]["other_rate"].append(n / (ns / NS))
                res[k]["other_cpu"].append(cpu / n / 1000)
                p.finish()
                log(f"listen_scale rep {rep + 1}/{a.reps}, {k:,} channels: delivered {res[k]['rate'][-1]:,.0f}/s, "
                    f"backend {res[k]['cpu'][-1]:.2f} µs/notification; other channel: "
                    f"{res[k]['other_rate'][-1]:,.0f}/s, backend {res[k]['other_cpu'][-1]:.2f} µs/notification")
        base = res[sizes[0]]
        per_s = lambda v: f"{v:,.0f}/s"
        us = lambda v: f"{v:.2f} µs"
        rat = lambda v: f"{v:.0f}×" if v >= 10 else f"{v:.2f}×" if v >= 0.1 else f"{v:.2g}×"
        rows = []
        for k in sizes:
            r = res[k]
            cells = [f"{k:,}"]
            for x, fmt in (("rate", per_s), ("cpu", us), ("other_rate", per_s), ("other_cpu", us)):
                cells += [summary(r[x], fmt), summary([v / b for v, b in zip(r[x], base[x])], rat)]
            rows.append(cells)
        ref = f"{sizes[0]:,}"
        self.extra.append((
            f"PostgreSQL: one connection LISTENing to N channels, {n:,} notifications queued while its backend "
            f"is stopped, then delivered (plain libpq)",
            ["channels LISTENed", "delivered, traffic to the channel LISTENed last", f"vs {ref}",
             "backend CPU per notification", f"vs {ref}", "read, traffic to a channel not LISTENed",
             f"vs {ref}", "backend CPU per notification", f"vs {ref}"],
            rows))

    def table(self):
        out = []
        if self.rows:
            out += ["| scenario | baseline (same run) | pgiplock | ratio | target | met? |",
                    "|---|---|---|---|---|---|"]
            out += ["| " + " | ".join(r) + " |" for r in self.rows]
        for title, head, rows in self.extra:
            if out:
                out.append("")
            out += [title + ":", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--bin", required=True, help="build dir of bench/ (bench_raw, bench_pgiplock)")
    ap.add_argument("--node-path", help="node_modules with @imqueue/pg-pubsub and pg; no Node rows without it")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1_000_000, help="queued notifications per listener run")
    ap.add_argument("--notify-count", type=int, default=200_000)
    ap.add_argument("--naive-count", type=int, default=4_000)
    ap.add_argument("--exec-count", type=int, default=20_000)
    ap.add_argument("--acquire-interval", type=int, default=100, help="crash standby's acquire_interval, ms")
    ap.add_argument("--scale-messages", type=int, default=100_000,
                    help="listen_scale: notifications per run (twice per connection)")
    ap.add_argument("--scale-channels", default="1,1000,10000",
                    help="listen_scale: how many channels the connection LISTENs to; ratios against the first")
    ap.add_argument("--durable-count", type=int, default=200_000, help="durable: messages per end-to-end run")
    ap.add_argument("--latency-count", type=int, default=500, help="durable: messages per latency run, each kind")
    ap.add_argument("--latency-pause", type=int, default=2, help="durable: ms between latency messages")
    ap.add_argument("--retention-bytes", type=int, default=1 << 30, help="durable_retention: payload bytes in all")
    ap.add_argument("--retention-payload", type=int, default=7000,
                    help="durable_retention: bytes per message (≤ 7,900 travel in the nudge)")
    ap.add_argument("--retention-wait", type=int, default=180,
                    help="durable_retention: seconds to wait, after the last message, for the journal to shrink")
    ap.add_argument("--baseline-bin", help="bench_pgiplock built against a previous header (bench/build_baseline.py): "
                    "the listener scenario runs it next to the current one")
    ap.add_argument("--baseline-label", default="baseline", help="what the baseline header is, for the table")
    ap.add_argument("--workdir", default="/tmp/pgiplock-bench")
    ap.add_argument("--only", default="listeners,notify,exec_lock,handover,crash,durable",
                    help="scenarios to run, in this order; listen_scale (PostgreSQL's own cost of a long listen "
                    "list, ~1 min) and durable_retention (1 GiB through the journal, minutes) only when named")
    a = ap.parse_args()
    b = Bench(a)
    t0 = time.monotonic()
    try:
        for name in a.only.split(","):
            log(f"scenario {name}")
            getattr(b, name)()
    except Exception:
        log(f"failed; the programs' stderr is in {os.path.join(a.workdir, 'children.log')}")
        raise
    finally:
        b.cleanup()
    log(f"all scenarios in {time.monotonic() - t0:.0f} s")
    print(b.table())


if __name__ == "__main__":
    main()
