#!/usr/bin/env python3
"""check.py against made-up histories: a clean one passes, and each kind of
violation it promises to find is found (no database; suite 'unit')."""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
S = 1_000_000_000


def history(extra_publishes=(), extra_deliveries=(), holds=None, faults=(), drop=(), redeliver=False):
    """Two channels (plain P, durable D) of 20 messages each, one every 100 ms;
    member a holds both (token 1 / 2) until 1 s, then member b (3 / 4)."""
    lines = ["C plain P", "C balanced ", "C durable D", "C liveness_ms 3000", "C seed 1", "T 0 begin",
             "X 0 a 1 start 10 plain", "X 0 b 1 start 11 plain"]
    holds = holds if holds is not None else [("a", 0, "P", 1), ("a", 0, "D", 2), ("b", S, "P", 3), ("b", S, "D", 4)]
    for (m, t, ch, tok) in holds:
        lines.append("M %s 1 H %d %s %d" % (m, t, ch, tok))
    for ch in ("P", "D"):
        for seq in range(1, 21):
            t = seq * S // 10
            lines.append("P %d %d %s %d ok" % (t, t + 1000, ch, seq))
            if (ch, seq) in drop:
                continue
            m, tok = ("a", 1 if ch == "P" else 2) if t < S else ("b", 3 if ch == "P" else 4)
            if redeliver and ch == "D" and seq == 10:  # b's first: a's last, delivered but not acknowledged
                lines.append("M b 1 D %d D 9 90 4" % (t + 100_000))
            lines.append("M %s 1 D %d %s %d %d %d" % (m, t + 500_000, ch, seq, seq * 10 if ch == "D" else 0, tok))
    lines += list(extra_publishes) + list(extra_deliveries) + list(faults)
    lines += ["T %d faults_end" % (3 * S), "T %d end" % (3 * S)]
    return "\n".join(lines) + "\n"


def node_history(listen=True, a_until=10, node_from=10, node_until=20, drop=(), extra=(), faults=(), a_token=1,
                 listen_at=S + 1000):
    """One plain channel P of 20 messages, one every 100 ms: the C++ member a
    (token a_token) holds it until 0.95 s and delivers seqs 1..a_until; the
    Node member n0 (kind node, token 0) holds it from 1 s on, LISTENs (an N
    line) at listen_at when `listen`, and delivers seqs node_from..node_until."""
    lines = ["C plain P", "C balanced ", "C durable ", "C liveness_ms 3000", "C interval_ms 5000", "C seed 1",
             "C node_member n0 @imqueue/pg-pubsub@1.10.0", "T 0 begin", "X 0 a 1 start 10 plain",
             "X 0 n0 1 start 12 node", "M a 1 H 0 P %d" % a_token, "M a 1 L %d P %d" % (S - S // 20, a_token),
             "M n0 1 H %d P 0" % S]
    if listen:
        lines.append("M n0 1 N %d P listen" % listen_at)
    for seq in range(1, 21):
        t = seq * S // 10
        lines.append("P %d %d P %d ok" % (t, t + 1000, seq))
        if seq in drop:
            continue
        if seq <= a_until:
            lines.append("M a 1 D %d P %d 0 %d" % (t + 500_000, seq, a_token))
        if listen and node_from <= seq <= node_until:
            lines.append("M n0 1 D %d P %d 0 0" % (t + 600_000, seq))
    lines += list(extra) + list(faults)
    lines += ["T %d faults_end" % (3 * S), "T %d end" % (3 * S)]
    return "\n".join(lines) + "\n"


def check(text):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "history.txt"), "w") as f:
            f.write(text)
        r = subprocess.run([sys.executable, os.path.join(HERE, "check.py"), d], capture_output=True, text=True)
        return r.returncode, r.stdout


CASES = [
    # name, history, expected exit status, a phrase the report must contain
    ("clean", history(), 0, "violations: 0"),
    ("twice", history(extra_deliveries=["M b 1 D %d P 5 0 3" % (S // 2 + 1)]), 1, "delivered 2 times"),
    ("overlap", history(extra_deliveries=["M a 1 D %d P 21 0 1" % (2 * S)],
                        extra_publishes=["P %d %d P 21 ok" % (2 * S, 2 * S + 1)]), 1, "two tenures delivering"),
    ("token down", history(holds=[("a", 0, "P", 5), ("a", 0, "D", 2), ("b", S, "P", 3), ("b", S, "D", 4)]), 1,
     "not increasing"),
    ("durable lost", history(drop=[("D", 7)]), 1, "never delivered"),
    ("durable order", history(extra_deliveries=["M b 1 D %d D 3 30 4" % (2 * S)]), 1, "not in id order"),
    ("durable redelivery at takeover", history(redeliver=True), 0,
     "violations: 0"),
    ("plain loss outside faults", history(drop=[("P", 7)]), 1, "outside every fault window"),
    ("plain loss in a kill", history(drop=[("P", 7)], faults=["F %d %d kill a P done" % (S // 2, S // 2 + 1)]), 0,
     "violations: 0"),
    ("plain loss in a SIGTERM", history(drop=[("P", 7)], faults=["F %d %d term a P done" % (S // 2, S // 2 + 1)]),
     1, "outside every fault window"),
    # The Node member: no token, its tenures told by time (check.py's module comment).
    ("node takes over", node_history(node_from=11), 0, "violations: 0"),
    ("node row printed", node_history(node_from=11), 0, "Node member n0 (@imqueue/pg-pubsub@1.10.0"),
    ("C++ member without a token", node_history(node_from=11, a_token=0), 1, "took the channel with no token"),
    ("node holds without LISTEN", node_history(listen=False), 0, "held without LISTEN (won by its timer)"),
    ("node loss before its LISTEN", node_history(node_from=12, drop=[11], listen_at=S + S * 3 // 20), 0,
     "handover to it"),
    ("node holds its row silently", node_history(node_from=21, listen_at=S - 1000, extra=["M n0 1 N %d P row" % S]),
     0, "held silently: its row, not its flags"),
    ("node loss while it LISTENed", node_history(node_from=11, drop=[15]), 0, "while it held and LISTENed"),
    ("node keeps its row silently", node_history(node_from=11, node_until=12, extra=["M n0 1 L %d P 0" % (S * 5 // 4)]),
     0, "after its tenure, its process alive (its row kept)"),
    ("C++ loss before the node tenure", node_history(node_from=11, drop=[5]), 1, "outside every fault window"),
    ("C++ loss after it took the channel back", node_history(node_from=11, node_until=15, extra=[
        "M a 1 H %d P 2" % (S * 3 // 2)] + ["M a 1 D %d P %d 0 2" % (seq * S // 10 + 1000, seq)
                                            for seq in (16, 17, 19, 20)]),
     1, "message 18 (confirmed) lost outside every fault window"),
    ("node and C++ twice, no fault", node_history(a_until=12, node_from=11), 1, "delivered 2 times"),
    ("node twice, another row deleted", node_history(a_until=12, node_from=11, faults=[
        "F %d %d delete_row Q Q done" % (S + S // 20, S + S // 20 + 1000)]), 1, "delivered 2 times"),
    ("node twice, the old holder's row deleted", node_history(a_until=12, node_from=11, faults=[
        "F %d %d delete_row P P done" % (S - S // 20, S - S // 20 + 1000)]), 0,
     "the old holder until its heartbeat (row deleted)"),
    ("node row deleted under it", node_history(
        node_from=11, extra=["M a 1 H %d P 2" % (S + S // 2), "M a 1 D %d P 17 0 2" % (17 * S // 10 + 1000)],
        faults=["F %d %d delete_row P P done" % (S + S // 20, S + S // 20 + 1000)]), 0, "its row deleted under it"),
    ("C++ draining into node (SIGTERM)", node_history(a_until=13, node_from=11, faults=[
        "F %d %d term a P done" % (S - S // 10, S + S // 2)]), 0, "the old C++ holder draining into it (SIGTERM)"),
    ("node and C++ interleaved, no fault", node_history(node_from=11, extra=[
        "M a 1 H %d P 2" % (S + S // 4)] + ["M a 1 D %d P %d 0 2" % (seq * S // 10 + 1000, seq) for seq in (21, 22)]
        + ["P %d %d P %d ok" % (seq * S // 10, seq * S // 10 + 1000, seq) for seq in (21, 22)]
        + ["M n0 1 D %d P 23 0 0" % (23 * S // 10), "P %d %d P 23 ok" % (23 * S // 10 - 1000, 23 * S // 10 - 500)]),
     1, "delivered at once"),
]


def main():
    failed = 0
    for name, text, want, phrase in CASES:
        rc, out = check(text)
        ok = rc == want and phrase in out
        print("%-28s %s (exit %d, wanted %d)" % (name, "ok" if ok else "FAILED", rc, want))
        if not ok:
            failed += 1
            print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
