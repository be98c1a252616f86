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
