#!/usr/bin/env python3
"""The randomized fault soak's driver (tools/soak runs it; so does the fault suite).

Starts members of three kinds (plain single-listener, balanced, durable; C++
processes, tests/fault/soak_member.cpp), where node and the pinned package
are installed (--node-modules) one Node @imqueue/pg-pubsub@1.10.0 standby in
the plain fleet (tests/soak/node_member.js), a publisher at a steady rate,
and a nemesis that injects, at times drawn from the seed, one of: SIGKILL,
SIGTERM, SIGSTOP for longer than the liveness timeout then SIGCONT,
pg_terminate_backend of a holder or of a waiter, a silent partition of one
member (netns + nftables), a lock row deleted, the server restarted with
-m immediate. Killed members are restarted. Everything the processes say
and every fault go into OUT/history.txt, which check.py reads.

The same seed gives the same schedule: the times, kinds and the random
choices of targets (which channel's holder, which member) come from it;
who holds what at that moment is up to the run.

Needs PGIPLOCK_DSN; the server restart needs PGIPLOCK_TEST_PGBIN and
PGIPLOCK_TEST_PGDATA (tools/check and tools/soak set them); the partition
needs root, ip and nft and a server that accepts 10.213.0.0/16
(tools/lib/common.sh's throwaway server does).
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

KINDS = ("plain", "balanced", "durable")
PREFIX = {"plain": "p", "balanced": "b", "durable": "d"}
# Each kind is a fleet of its own, in its own lock schema
# (PG_PUBSUB_SCHEMA_NAME): in a fleet of one kind a member's watcher (the
# ring's next member) wants the channels of the member it watches, the
# takeover the soak is after. (Mixing kinds in one schema once left balanced
# channels unheld: the shares counted every member; test_fleet covers the
# fix.) The
# durable members keep the default schema, where the publisher's journal is.
SCHEMA = {"plain": "pgip_lock_plain", "balanced": "pgip_lock_balanced", "durable": "pgip_lock"}
# The Node member is one more member of the plain fleet: the same channels
# and the same lock schema (the package reads PG_PUBSUB_SCHEMA_NAME when it
# is loaded), so C++ and Node compete for the same rows, as in a mixed
# deployment. Its kind in the history is "node" (check.py tells it by that).
SCHEMA["node"] = SCHEMA["plain"]
PREFIX["node"] = "n"
HERE = os.path.dirname(os.path.abspath(__file__))
NODE_PACKAGE = ("@imqueue/pg-pubsub", "1.10.0")
# A Node member that ended by itself (1.10.0 does not survive a lost
# connection: see node_member.js) is started again after this long, as a
# supervisor (systemd's Restart=, a pod's restartPolicy) would.
NODE_RESTART_S = 1.0
FAULTS = ("kill", "term", "stop", "terminate_holder", "terminate_waiter", "partition", "delete_row", "restart")
# Relative weights: the server restart is the heaviest, and hits everyone.
WEIGHTS = (3, 2, 2, 2, 2, 2, 2, 1)


def now():
    return time.monotonic_ns()


def log(msg):
    print("soak: " + msg, file=sys.stderr, flush=True)


class History:
    def __init__(self, path):
        self.f = open(path, "w", buffering=1 << 16)
        self.lock = threading.Lock()

    def write(self, line):
        with self.lock:
            self.f.write(line + "\n")

    def close(self):
        with self.lock:
            self.f.close()


def conninfo_with(dsn, **fields):
    """The DSN (key=value form) with `fields` replaced."""
    parts = [p for p in dsn.split() if p.split("=", 1)[0] not in fields and p.split("=", 1)[0] != "hostaddr"]
    return " ".join(parts + ["%s=%s" % kv for kv in fields.items()])


def run(cmd, timeout=30):
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, text=True)
        return r.returncode, r.stdout
    except subprocess.TimeoutExpired:
        return 124, "timeout"


class Network:
    """One member's network namespace joined by a veth, with an nftables table
    that drops everything but loopback while partitioned (as
    tests/fault/test_partition.cpp builds it)."""

    def __init__(self, tag):
        self.ip, self.nft = shutil.which("ip"), shutil.which("nft")
        self.name = "pgsk-%d-%s" % (os.getpid(), tag)
        self.host_if = "pgsh%dx%s" % (os.getpid(), tag)
        self.ns_if = "pgsn%dx%s" % (os.getpid(), tag)
        self.created = False
        self.failure = ""
        self.host_addr = ""
        if os.geteuid() != 0:
            self.failure = "not root"
            return
        if not self.ip or not self.nft:
            self.failure = "ip or nft not installed"
            return
        if not self.step([self.ip, "netns", "add", self.name]):
            return
        self.created = True
        if not self.step([self.ip, "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
                          "netns", self.name]):
            return
        if not self.pick_addresses(tag):
            return
        ns = [self.ip, "-n", self.name]
        for cmd in ([self.ip, "link", "set", self.host_if, "up"],
                    ns + ["addr", "add", self.ns_addr + "/30", "dev", self.ns_if],
                    ns + ["link", "set", self.ns_if, "up"], ns + ["link", "set", "lo", "up"]):
            if not self.step(cmd):
                return
        self.heal(first=True)

    def step(self, cmd):
        rc, out = run(cmd)
        if rc != 0:
            self.failure = "`%s` failed (%d): %s" % (" ".join(cmd), rc, out.strip())
        return rc == 0

    def pick_addresses(self, tag):
        for attempt in range(64):
            s = (os.getpid() * 16 + 7 + sum(map(ord, tag)) + attempt * 977) % 16384
            net = "10.213.%d." % (s // 64)
            base = (s % 64) * 4
            rc, out = run([self.ip, "-o", "addr", "show", "to", "%s%d/30" % (net, base)])
            if rc != 0 or out.strip():
                continue
            self.host_addr, self.ns_addr = net + str(base + 1), net + str(base + 2)
            return self.step([self.ip, "addr", "add", self.host_addr + "/30", "dev", self.host_if])
        self.failure = "no free /30 in 10.213.0.0/16"
        return False

    def nft_in(self, script):
        return self.step([self.ip, "netns", "exec", self.name, self.nft, script])

    def heal(self, first=False):
        script = ("add table inet pgiplock_soak; " if first else "delete table inet pgiplock_soak; add table inet pgiplock_soak; ")
        script += ("add chain inet pgiplock_soak input { type filter hook input priority 0; policy accept; }; "
                   "add chain inet pgiplock_soak output { type filter hook output priority 0; policy accept; }; "
                   "add rule inet pgiplock_soak input iif lo accept; add rule inet pgiplock_soak output oif lo accept")
        return self.nft_in(script)

    def partition(self):
        return self.nft_in("add rule inet pgiplock_soak input drop; add rule inet pgiplock_soak output drop")

    def prefix(self):
        return [self.ip, "netns", "exec", self.name]

    def remove(self):
        if self.created:
            run([self.ip, "link", "del", self.host_if])
            run([self.ip, "netns", "del", self.name])
            self.created = False


def remove_stale_networks():
    ip = shutil.which("ip")
    if not ip or os.geteuid() != 0:
        return
    rc, out = run([ip, "netns", "list"])
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "pgsk" or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            continue  # its soak still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        run([ip, "link", "del", "pgsh%dx%s" % (pid, parts[2])])
        run([ip, "netns", "del", name])


class Member:
    def __init__(self, soak, kind, index, channels):
        self.soak, self.kind, self.index, self.channels = soak, kind, index, channels
        self.name = PREFIX[kind] + str(index)
        self.incarnation = 0
        self.proc = None
        self.net = None
        self.holds = set()      # channels it says it holds (H without L since)
        self.ready = False      # its R line came
        self.stopped = False    # the nemesis has it (stopped, or killed and not yet restarted)
        self.start_lock = threading.Lock()
        self.partitioned = False
        self.lock = threading.Lock()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def command(self):
        s = self.soak
        if self.kind == "node":
            return [s.node_bin, os.path.join(HERE, "node_member.js"), s.dsn, "--channels", ",".join(self.channels),
                    "--interval", str(s.a.interval)]
        args = [s.member_bin, s.dsn if not self.net else s.net_dsn(self.net), "--channels", ",".join(self.channels),
                "--liveness", str(s.liveness_ms), "--interval", str(s.a.interval), "--retry", "100"]
        if self.kind == "durable":
            args.append("--durable")
        if self.kind == "balanced":
            args.append("--balance")
        if self.net:
            args = self.net.prefix() + args
        return args

    def start(self):
        with self.start_lock:
            if not self.soak.closing.is_set():
                self.start_locked()

    def revive(self):
        """Starts it again if it is not running (the quiet tail, the Node member's supervisor)."""
        with self.start_lock:
            if not self.alive() and not self.soak.closing.is_set():
                self.start_locked()

    def start_locked(self):
        s = self.soak
        args = self.command()
        self.incarnation += 1
        self.holds = set()
        self.ready = False
        self.stopped = False
        err = open(os.path.join(s.out, "%s.%d.stderr" % (self.name, self.incarnation)), "w")
        env = dict(os.environ, PG_PUBSUB_SCHEMA_NAME=SCHEMA[self.kind])
        if self.kind == "node":
            env["NODE_PATH"] = s.node_modules
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, env=env)
        err.close()
        s.history.write("X %d %s %d start %d %s" % (now(), self.name, self.incarnation, self.proc.pid, self.kind))
        threading.Thread(target=self.read, args=(self.proc, self.incarnation), daemon=True).start()

    def read(self, proc, incarnation):
        h = self.soak.history
        tag = "M %s %d " % (self.name, incarnation)
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not line:
                continue
            h.write(tag + line)
            f = line.split(" ")
            if f[0] in ("H", "L") and len(f) >= 3:
                with self.lock:
                    if incarnation == self.incarnation:
                        (self.holds.add if f[0] == "H" else self.holds.discard)(f[2])
            elif f[0] == "D" and self.kind == "durable":
                self.soak.delivered(f[2], f[3])
            elif f[0] == "R" and incarnation == self.incarnation:
                self.ready = True
        rc = proc.wait()
        h.write("X %d %s %d exit %d" % (now(), self.name, incarnation, rc))
        # The Node member's supervisor: it ended by itself (not by the
        # nemesis, which restarts what it kills, nor at the end).
        if self.kind == "node" and incarnation == self.incarnation and not self.stopped:
            if not self.soak.closing.wait(NODE_RESTART_S) and incarnation == self.incarnation and not self.stopped:
                self.revive()

    def signal(self, sig):
        if self.alive():
            try:
                os.kill(self.proc.pid, sig)
                return True
            except ProcessLookupError:
                pass
        return False


class Soak:
    def __init__(self, a):
        self.a = a
        self.out = a.out
        os.makedirs(self.out, exist_ok=True)
        self.dsn = os.environ.get("PGIPLOCK_DSN", "")
        if not self.dsn:
            sys.exit("soak: PGIPLOCK_DSN is not set (tools/soak starts a server)")
        self.member_bin = a.member_bin
        self.liveness_ms = a.liveness
        self.pgbin = os.environ.get("PGIPLOCK_TEST_PGBIN", "")
        self.pgdata = os.environ.get("PGIPLOCK_TEST_PGDATA", "")
        self.pglog = os.environ.get("PGIPLOCK_TEST_LOG", "/dev/null")
        self.pgrunas = os.environ.get("PGIPLOCK_TEST_PGRUNAS", "")
        self.port = os.environ.get("PGIPLOCK_TEST_PORT", "")
        self.psql = os.path.join(self.pgbin, "psql") if self.pgbin and os.path.exists(os.path.join(self.pgbin, "psql")) \
            else (shutil.which("psql") or "")
        self.history = History(os.path.join(self.out, "history.txt"))
        self.rng = random.Random(a.seed)
        tag = "s%d" % os.getpid()
        self.channels = {k: ["soak_%s_%s_%d" % (tag, PREFIX[k], i) for i in range(a.channels)] for k in KINDS}
        self.members = {k: [Member(self, k, i, self.channels[k]) for i in range(a.members)] for k in KINDS}
        self.node_bin, self.node_modules = "", ""  # find_node() sets them
        self.node_skip = self.find_node()
        self.node_member = None
        if not self.node_skip:
            # Last in the plain fleet's list: the partition (always member 0)
            # never takes it, the faults aimed at a channel's holder or at a
            # member of the plain kind can.
            self.node_member = Member(self, "node", 0, self.channels["plain"])
            self.members["plain"].append(self.node_member)
        self.all_members = [m for k in KINDS for m in self.members[k]]
        self.closing = threading.Event()  # set when the run ends: no more restarts
        self.published_ok = {}   # durable channel -> set of seqs confirmed
        self.delivered_set = {}  # durable channel -> set of seqs delivered
        self.durable_lock = threading.Lock()
        self.skipped = {}
        self.publisher = None
        self.nemesis_threads = []
        self.stop_nemesis = threading.Event()

    def find_node(self):
        """Why there is no Node member, or "" when there is one."""
        a = self.a
        if a.node_skip:
            return a.node_skip
        if not a.node_modules:
            return "no --node-modules (tools/soak and tests/soak/run.sh install the package with npm)"
        self.node_bin = shutil.which("node") or ""
        if not self.node_bin:
            return "node is not installed"
        pkg = os.path.join(a.node_modules, NODE_PACKAGE[0], "package.json")
        try:
            with open(pkg) as f:
                version = json.load(f).get("version", "")
        except (OSError, ValueError) as e:
            return "%s is not in %s (%s)" % (NODE_PACKAGE[0], a.node_modules, e)
        if version != NODE_PACKAGE[1]:
            return "%s is %s in %s, not the pinned %s" % (NODE_PACKAGE[0], version, a.node_modules, NODE_PACKAGE[1])
        self.node_modules = os.path.abspath(a.node_modules)
        return ""

    # ---- the durable tally, for the drain at the end
    def delivered(self, ch, payload):
        with self.durable_lock:
            self.delivered_set.setdefault(ch, set()).add(payload)

    def published(self, ch, seq):
        with self.durable_lock:
            self.published_ok.setdefault(ch, set()).add(seq)

    def undelivered(self):
        with self.durable_lock:
            return sum(len(s - self.delivered_set.get(ch, set())) for ch, s in self.published_ok.items())

    def net_dsn(self, net):
        return conninfo_with(self.dsn, host=net.host_addr, port=self.port or "5432")

    def sql(self, statement):
        if not self.psql:
            return 127, "no psql"
        return run([self.psql, "-X", "-q", "-t", "-A", "-d", self.dsn, "-c", statement], timeout=10)

    # ---- the schedule: everything random is drawn here, from the seed alone
    def schedule(self):
        sched, t = [], self.a.warmup
        end = self.a.warmup + self.a.seconds
        while True:
            t += self.rng.uniform(self.a.gap * 0.4, self.a.gap * 1.6)
            if t >= end:
                break
            kind = self.rng.choices(FAULTS, WEIGHTS)[0]
            ev = {"at": round(t, 3), "fault": kind, "kind": self.rng.choice(KINDS),
                  "channel": self.rng.randrange(self.a.channels), "holder": self.rng.random() < 0.6,
                  "member": self.rng.randrange(self.a.members), "pick": self.rng.random()}
            live = self.liveness_ms / 1000
            if kind == "stop":
                ev["duration"] = round(live + self.rng.uniform(0.5, 2.0), 3)
            elif kind == "partition":
                ev["duration"] = round(live * 2 + self.rng.uniform(0, 1.0), 3)
            elif kind in ("kill", "term"):
                ev["duration"] = round(self.rng.uniform(0.3, 2.0), 3)  # until the restart
            else:
                ev["duration"] = 0
            sched.append(ev)
        return sched

    def describe(self, ev):
        target = ""
        if ev["fault"] in ("kill", "term", "stop", "terminate_holder"):
            target = ("holder of %s channel %d" % (ev["kind"], ev["channel"])) if ev["holder"] or \
                ev["fault"] == "terminate_holder" else "%s member %d" % (ev["kind"], ev["member"])
        elif ev["fault"] == "partition":
            target = "the %s member in a namespace" % ev["kind"]
        elif ev["fault"] == "delete_row":
            target = "%s channel %d" % (ev["kind"], ev["channel"])
        elif ev["fault"] == "terminate_waiter":
            target = "a waiter"
        dur = " for %.1f s" % ev["duration"] if ev["duration"] and ev["fault"] in ("stop", "partition") else ""
        dur = " restarted after %.1f s" % ev["duration"] if ev["fault"] in ("kill", "term") else dur
        return "%7.2f s  %-16s %s%s" % (ev["at"], ev["fault"], target, dur)

    def pick_member(self, ev):
        kind = ev["kind"]
        if ev["holder"] or ev["fault"] == "terminate_holder":
            ch = self.channels[kind][ev["channel"]]
            for m in self.members[kind]:
                with m.lock:
                    # pg_terminate_backend hits the holder the lock row names, stopped or not
                    if m.alive() and ch in m.holds and (not m.stopped or ev["fault"] == "terminate_holder"):
                        return m
        cands = [m for m in self.members[kind] if m.alive() and not m.stopped]
        if not cands:
            return None
        return cands[ev["member"] % len(cands)]

    def fault(self, ev):
        kind, t0 = ev["fault"], now()
        affected, target, note = "*", "-", "done"
        if kind in ("kill", "term", "stop"):
            m = self.pick_member(ev)
            if m is None:
                note = "no-target"
            else:
                target, affected = m.name, ",".join(m.channels)
                if kind == "stop":
                    m.stopped = True
                    m.signal(signal.SIGSTOP)
                    self.wait(ev["duration"])
                    m.signal(signal.SIGCONT)
                    m.stopped = False
                else:
                    m.stopped = True
                    m.signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
                    try:
                        m.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        m.signal(signal.SIGKILL)
                        m.proc.wait()
                    self.wait(ev["duration"])
                    m.start()
        elif kind == "terminate_holder":
            ch = self.channels[ev["kind"]][ev["channel"]]
            m = self.pick_member(ev)
            target, affected = (m.name if m else "?"), ",".join(self.channels[ev["kind"]])
            rc, out = self.sql("SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN %s.lock l "
                               "ON a.application_name = l.app WHERE l.channel = '__PgIpLock__:%s'" %
                               (SCHEMA[ev["kind"]], ch))
            note = "done" if rc == 0 and "t" in out.split() else "no-target"
        elif kind == "terminate_waiter":
            rc, out = self.sql("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted ORDER BY pid")
            pids = [p for p in out.split() if p.isdigit()] if rc == 0 else []
            if not pids:
                note = "no-target"
            else:
                pid = pids[int(ev["pick"] * len(pids))]
                rc, out = self.sql("SELECT pg_terminate_backend(%s)" % pid)
                target = "backend" + pid
                note = "done" if rc == 0 else "failed"
        elif kind == "partition":
            m = self.members[ev["kind"]][0]
            if not m.net:
                note = "skipped"
            elif m.partitioned:
                note = "no-target"
            else:
                target, affected = m.name, ",".join(m.channels)
                m.partitioned = True
                m.net.partition()
                self.wait(ev["duration"])
                m.net.heal()
                m.partitioned = False
        elif kind == "delete_row":
            ch = self.channels[ev["kind"]][ev["channel"]]
            affected = ch
            rc, out = self.sql("WITH d AS (DELETE FROM %s.lock WHERE channel = '__PgIpLock__:%s' RETURNING 1) "
                               "SELECT count(*) FROM d" % (SCHEMA[ev["kind"]], ch))
            note = "failed" if rc != 0 else ("done" if out.strip() == "1" else "no-target")
            target = ch
        elif kind == "restart":
            if not (self.pgbin and self.pgdata):
                note = "skipped"
            else:
                cmd = [os.path.join(self.pgbin, "pg_ctl"), "-D", self.pgdata, "-l", self.pglog, "-m", "immediate",
                       "-w", "-t", "60", "restart"]
                if self.pgrunas:
                    cmd = ["runuser", "-u", self.pgrunas, "--"] + cmd
                rc, out = run(cmd, timeout=90)
                note = "done" if rc == 0 else "failed"
                if rc != 0:
                    log("pg_ctl restart failed: " + out)
        self.history.write("F %d %d %s %s %s %s" % (t0, now(), kind, target, affected, note))

    def wait(self, seconds):
        self.stop_nemesis.wait(seconds)

    def nemesis(self, sched, t_begin):
        for ev in sched:
            delay = t_begin + ev["at"] * 1e9 - now()
            if delay > 0 and self.stop_nemesis.wait(delay / 1e9):
                return
            if self.stop_nemesis.is_set():
                return
            th = threading.Thread(target=self.fault, args=(ev,), daemon=True)
            th.start()
            self.nemesis_threads.append(th)

    def wait_for(self, what, cond, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        log("gave up waiting for " + what)
        return False

    def read_publisher(self, proc):
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not line:
                continue
            self.history.write(line)
            f = line.split(" ")
            if f[0] == "P" and f[5] == "ok" and f[3] in self.durable_channels:
                self.published(f[3], f[4])
        self.history.write("X %d publisher 1 exit %d" % (now(), proc.wait()))

    def run(self):
        a = self.a
        remove_stale_networks()
        sched = self.schedule()
        for k in KINDS:
            self.history.write("C %s %s" % (k, ",".join(self.channels[k])))
        self.history.write("C liveness_ms %d" % self.liveness_ms)
        self.history.write("C interval_ms %d" % a.interval)
        if self.node_member:
            self.history.write("C node_member %s %s@%s" % (self.node_member.name, *NODE_PACKAGE))
        else:
            self.history.write("C node_member none %s" % self.node_skip)
        self.history.write("C seed %d" % a.seed)
        if a.partition:
            for k in KINDS:
                net = Network(PREFIX[k])
                if net.failure:
                    self.skipped["partition"] = net.failure
                    net.remove()
                    break
                self.members[k][0].net = net
        else:
            self.skipped["partition"] = "--no-partition"
        if "partition" in self.skipped:
            for k in KINDS:
                if self.members[k][0].net:
                    self.members[k][0].net.remove()
                    self.members[k][0].net = None
        if not (self.pgbin and self.pgdata):
            self.skipped["restart"] = "PGIPLOCK_TEST_PGBIN/PGDATA not set: the server is not ours to restart"
        if not self.psql:
            self.skipped["terminate_holder"] = self.skipped["terminate_waiter"] = self.skipped["delete_row"] = "no psql"
        print("soak: seed %d, %d s of faults, %d members and %d channels per kind (%s), liveness %d ms" %
              (a.seed, a.seconds, a.members, a.channels, ", ".join(KINDS), self.liveness_ms))
        for kind, why in self.skipped.items():
            print("soak: fault kind %s skipped: %s" % (kind, why))
        if self.node_member:
            print("soak: Node member %s: %s@%s in the plain fleet (NODE_PATH %s)" % (
                self.node_member.name, NODE_PACKAGE[0], NODE_PACKAGE[1], self.node_modules))
        else:
            print("soak: no Node member: %s" % self.node_skip)
        print("soak: schedule (seconds from the start of the publisher):")
        for ev in sched:
            print("  " + self.describe(ev) + (" (skipped)" if ev["fault"] in self.skipped else ""))
        sys.stdout.flush()
        try:
            for m in self.all_members:
                if m is not self.node_member:
                    m.start()
            ok = self.wait_for("every channel held", lambda: all(
                any(ch in m.holds for m in self.members[k]) for k in KINDS for ch in self.channels[k]), 60)
            if not ok:
                log("not every channel has a holder after 60 s; going on")
            if self.node_member:
                # A standby: it joins a fleet whose channels are held.
                self.node_member.start()
                if not self.wait_for("the Node member to be ready", lambda: self.node_member.ready, 30):
                    log("the Node member is not ready after 30 s; going on (see %s.*.stderr)" % self.node_member.name)
            self.durable_channels = set(self.channels["durable"])
            pub = [self.member_bin, self.dsn, "--publish", "--plain",
                   ",".join(self.channels["plain"] + self.channels["balanced"]),
                   "--durable", ",".join(self.channels["durable"]), "--period", str(a.period)]
            err = open(os.path.join(self.out, "publisher.stderr"), "w")
            self.publisher = subprocess.Popen(pub, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
            err.close()
            t_begin = now()
            self.history.write("T %d begin" % t_begin)
            self.history.write("X %d publisher 1 start %d publisher" % (t_begin, self.publisher.pid))
            reader = threading.Thread(target=self.read_publisher, args=(self.publisher,), daemon=True)
            reader.start()
            sched_run = [ev for ev in sched if ev["fault"] not in self.skipped]
            nem = threading.Thread(target=self.nemesis, args=(sched_run, t_begin), daemon=True)
            nem.start()
            end = t_begin + (a.warmup + a.seconds) * 1e9
            while now() < end:
                time.sleep(0.2)
                if self.publisher.poll() is not None:
                    log("the publisher exited (%d)" % self.publisher.returncode)
                    break
            nem.join()
            for th in self.nemesis_threads:
                th.join(timeout=120)
            self.history.write("T %d faults_end" % now())
            # A quiet tail: every member up, the publisher still sending.
            for m in self.all_members:
                m.revive()
            time.sleep(a.tail)
            self.publisher.send_signal(signal.SIGTERM)
            self.publisher.wait(timeout=30)
            reader.join(timeout=10)
            self.history.write("T %d publish_end" % now())
            self.wait_for("the durable channels to drain", lambda: self.undelivered() == 0, a.drain)
            time.sleep(1.0)  # the last plain deliveries
            self.history.write("T %d end" % now())
        finally:
            self.stop_nemesis.set()
            self.closing.set()
            if self.publisher and self.publisher.poll() is None:
                self.publisher.kill()
            for m in self.all_members:
                with m.start_lock:  # no revive() after this: closing is set
                    m.signal(signal.SIGCONT)
                    if m.net and m.partitioned:
                        m.net.heal()
                    m.signal(signal.SIGTERM)
            for m in self.all_members:
                if m.proc:
                    try:
                        m.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        m.signal(signal.SIGKILL)
                        m.proc.wait()
            time.sleep(0.2)
            for m in self.all_members:
                if m.net:
                    m.net.remove()
            self.history.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="how long the nemesis runs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--members", type=int, default=3, help="members per kind")
    p.add_argument("--channels", type=int, default=2, help="channels per kind")
    p.add_argument("--gap", type=float, default=4.0, help="mean seconds between faults")
    p.add_argument("--period", type=int, default=20, help="ms between two messages of a channel")
    p.add_argument("--liveness", type=int, default=3000, help="liveness_timeout, ms")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--tail", type=float, default=8.0, help="seconds without faults at the end")
    p.add_argument("--drain", type=float, default=30.0)
    p.add_argument("--interval", type=int, default=5000, help="acquire_interval (Node: acquireInterval), ms")
    p.add_argument("--no-partition", dest="partition", action="store_false")
    p.add_argument("--node-modules", default="", help="node_modules holding @imqueue/pg-pubsub@1.10.0 and pg: "
                   "adds the Node member (tests/interop/node_install.sh)")
    p.add_argument("--node-skip", default="", help="no Node member, for this reason (said once)")
    p.add_argument("--member-bin", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1, 1 << 31)
    Soak(a).run()


if __name__ == "__main__":
    main()
