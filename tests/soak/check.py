#!/usr/bin/env python3
"""The soak's checker: reads OUT/history.txt (tests/soak/soak.py), prints a
table, writes OUT/timeline/* for plot.gp, exits 1 on any violation.

Checks, per channel:
  plain and balanced (single-listener) channels
    - no message delivered twice (by two members, or by one);
    - tenures never overlap in delivery: in commit order (a channel's
      messages are sent one after another, so their seq is their commit
      order) the tokens of the deliveries never go down; an older tenure
      that delivers a message committed after one a newer tenure delivered
      is two listeners at once;
    - tokens strictly increasing: a token is one tenure, of one member, and
      each new tenure of a channel (on_listen) has a greater token than
      every earlier one;
    - every message confirmed (notify() returned) but not delivered lies in
      the window of a fault that could lose it (from its injection to its
      end plus the liveness timeout and 2 s; a fault of a member affects its
      kind's channels, a server restart or terminated waiter all of them, a
      deleted lock row its channel). Such losses are by design and summed
      per fault kind; one outside every window is a violation, and so is
      one inside only SIGTERMs' windows (a graceful handover is lossless).
  durable channels
    - every confirmed message delivered (after the drain at the end);
    - in id order: each tenure delivers increasing ids, never one twice;
      the same seq always has the same id, and ids grow with seq;
    - redelivered only within the at-least-once window: a newer tenure
      redelivers a message only if an older tenure delivered it within
      REDELIVERY_WINDOW before that tenure's last delivery (delivered, not yet
      acknowledged when it stopped).

The Node member (soak.py's "node" kind: one @imqueue/pg-pubsub@1.10.0
PgPubSub in the plain fleet, tests/soak/node_member.js), where there is one:
  - it has no fencing token (its lock row is (channel, app); its lines carry
    0). A token is not invented for it: the token checks above (strictly
    increasing per channel, never going down in commit order) run over the
    members that have tokens, exactly as without it. Its tenures are told
    apart by time instead: a Node tenure is one H line of one incarnation,
    and its deliveries belong to the last H before them (node_member.js
    prints the H before the first D; it polls its lock rows too, so a row
    it holds while the package's flags say otherwise is a tenure, marked by
    an "N ... row" line);
  - no message delivered twice still holds for it: a message delivered by
    it and by a C++ member, or two tenures delivering at once where one is
    its (the seqs one tenure delivered reach in between the seqs of the
    other), is a violation unless a fault explains it (node_excuse(): its
    row deleted under it, which 1.10.0 never notices; the old C++ holder
    still delivering when it took over, in a SIGTERM's or a deleted row's
    window; its own SIGTERM). Those are counted in their own rows, printed,
    not violations;
  - a plain loss outside every fault window is not a violation when it lies
    in a Node tenure or in the gaps around one (node_cover(): from the end of
    the tenure before, at most the grace earlier, to the next other member's
    tenure, at most the C++ acquire interval and GRACE_EXTRA after the Node
    process ended). There the channel is the Node package's to deliver: the
    two 1.10.0 defects README.md describes (a standby that wins by its timer
    never LISTENs; one that hears two release events for a channel collides
    with its own row) hold it silently, and neither side's handover is
    lossless across the two implementations (a Node successor never
    announces its LISTEN). These are counted by cause in the Node rows, not
    violations of pgiplock; the same loss anywhere else still is.
"""
import os
import sys
from collections import defaultdict

REDELIVERY_WINDOW_NS = 2_000_000_000
GRACE_EXTRA_NS = 2_000_000_000
# soak.py's acquire_interval (its C++ members take a dead Node member's rows
# at their timer: Node rows have no member lock to watch).
INTERVAL_NS = 5_000_000_000
# A graceful shutdown (SIGTERM) hands its channels over losslessly: a loss
# in its window alone is a violation.
LOSSLESS = {"term"}


class Violation:
    def __init__(self, t, channel, what):
        self.t, self.channel, self.what = t, channel, what


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: check.py OUT_DIR")
    out = sys.argv[1]
    kinds = {}             # channel -> kind
    liveness_ns = 3_000_000_000
    seed = None
    marks = {}
    pubs = defaultdict(dict)        # channel -> seq -> (t0, t1, ok)
    deliveries = defaultdict(list)  # channel -> [(t, member, inc, seq, id, token)]
    holds = defaultdict(list)       # channel -> [(t, member, inc, token)]
    tenures = []                    # (member, inc, channel, t_start, t_end, token)
    open_tenure = {}                # (member, inc, channel) -> (t, token)
    faults = []                     # (t0, t1, kind, target, affected set or None, note)
    lanes = []
    starts, exits = [], []
    errors = defaultdict(int)
    interval_ns = INTERVAL_NS
    node_members = set()            # members soak.py started as kind "node"
    node_info = None                # the C node_member line's words
    node_listen = {}                # (member, inc, channel) -> [t of each N ... listen line]
    node_row = {}                   # (member, inc, channel) -> [t of each N ... row line: a silent hold]
    exit_at = {}                    # (member, inc) -> (t, status)

    def close_tenure(key, t):
        if key in open_tenure:
            t0, tok = open_tenure.pop(key)
            tenures.append((key[0], key[1], key[2], t0, t, tok))

    with open(os.path.join(out, "history.txt")) as f:
        for line in f:
            p = line.split()
            if not p:
                continue
            tag = p[0]
            if tag == "C":
                if p[1] in ("plain", "balanced", "durable") and len(p) > 2:
                    for ch in p[2].split(","):
                        kinds[ch] = p[1]
                elif p[1] == "liveness_ms":
                    liveness_ns = int(p[2]) * 1_000_000
                elif p[1] == "seed":
                    seed = p[2]
                elif p[1] == "interval_ms":
                    interval_ns = int(p[2]) * 1_000_000
                elif p[1] == "node_member":
                    node_info = p[2:]
            elif tag == "T":
                marks[p[2]] = int(p[1])
            elif tag == "P" and len(p) >= 6:
                pubs[p[3]][int(p[4])] = (int(p[1]), int(p[2]), p[5] == "ok")
            elif tag == "F":
                aff = None if p[5] == "*" else set(p[5].split(","))
                faults.append((int(p[1]), int(p[2]), p[3], p[4], aff, p[6]))
            elif tag == "X":
                t, member, inc = int(p[1]), p[2], int(p[3])
                if p[4] == "start":
                    starts.append((t, member))
                    if member != "publisher" and member not in lanes:
                        lanes.append(member)
                    if len(p) > 6 and p[6] == "node":
                        node_members.add(member)
                else:
                    exits.append((t, member))
                    exit_at[(member, inc)] = (t, int(p[5]) if len(p) > 5 else 0)
                    for key in [k for k in open_tenure if k[0] == member and k[1] == inc]:
                        close_tenure(key, t)
            elif tag == "M":
                member, inc, ev = p[1], int(p[2]), p[3]
                if ev == "H":
                    t, ch, tok = int(p[4]), p[5], int(p[6])
                    holds[ch].append((t, member, inc, tok))
                    close_tenure((member, inc, ch), t)
                    open_tenure[(member, inc, ch)] = (t, tok)
                elif ev == "L":
                    close_tenure((member, inc, p[5]), int(p[4]))
                elif ev == "D":
                    t, ch = int(p[4]), p[5]
                    try:
                        seq = int(p[6])
                    except ValueError:
                        continue  # not the publisher's
                    deliveries[ch].append((t, member, inc, seq, int(p[7]), int(p[8])))
                elif ev == "E":
                    errors[member] += 1
                elif ev == "N" and len(p) > 6 and p[6] == "listen":
                    node_listen.setdefault((member, inc, p[5]), []).append(int(p[4]))
                elif ev == "N" and len(p) > 6 and p[6] == "row":
                    node_row.setdefault((member, inc, p[5]), []).append(int(p[4]))
    t_end = marks.get("end", max([d[-1][0] for d in deliveries.values() if d] + [0]))
    for key in list(open_tenure):
        close_tenure(key, t_end)
    t_begin = marks.get("begin", 0)

    violations = []
    grace = liveness_ns + GRACE_EXTRA_NS
    fault_kinds = ["kill", "term", "stop", "terminate_holder", "terminate_waiter", "partition", "delete_row", "restart"]
    per_fault = {k: defaultdict(int) for k in fault_kinds}
    for fa in faults:
        per_fault[fa[2]]["injected" if fa[5] == "done" else "no target"] += 1

    def window_for(ch, t0, t1):
        """The latest fault whose window covers [t0, t1] and that could lose ch's messages."""
        best = None
        for fa in faults:
            if fa[5] != "done" or fa[2] in LOSSLESS:
                continue
            if fa[4] is not None and ch not in fa[4]:
                continue
            if fa[0] <= t1 and t0 <= fa[1] + grace:
                if best is None or fa[0] > best[0]:
                    best = fa
        return best

    # ---- the Node member's tenures (see the module comment)
    tenures_of = defaultdict(list)  # channel -> [(t_start, t_end, member, inc)], every member
    for (member, inc, ch, t0, t1, tok) in tenures:
        tenures_of[ch].append((t0, t1, member, inc))
    for ch in tenures_of:
        tenures_of[ch].sort()
    node_stats = defaultdict(int)

    def node_tenure_of(ch, d):
        """The Node tenure (t_start, t_end, member, inc) a Node delivery d belongs to: its last H before it."""
        best = None
        for te in tenures_of.get(ch, []):
            if te[2] == d[1] and te[3] == d[2] and te[0] <= d[0]:
                best = te
        return best

    def node_excuse(ch, nt, other, t):
        """Why the Node tenure nt = (t_start, t_end, member, inc) and the member `other`
        both delivered around t, or None (then it is a violation)."""
        for fa in faults:
            # Its row deleted while it held: 1.10.0 never reads its row again
            # (no liveness check), so it delivers on while the row's next
            # owner does too, for as long as it lives.
            if fa[5] == "done" and fa[2] == "delete_row" and ch in (fa[4] or ()) and nt[0] <= fa[0] <= t:
                return "its row deleted under it"
        for fa in faults:
            if fa[5] != "done" or not fa[0] <= t <= fa[1] + grace:
                continue
            # It took over from a holder that still delivered: one whose row
            # was deleted (until its heartbeat sees that), or a C++ member's
            # SIGTERM, which drains for handover_timeout waiting for an
            # announcement that a Node successor never sends.
            if fa[2] == "delete_row" and ch in (fa[4] or ()) and fa[0] <= nt[0]:
                return "the old holder until its heartbeat (row deleted)"
            if fa[2] == "term" and fa[3] == other and fa[0] <= nt[0]:
                return "the old C++ holder draining into it (SIGTERM)"
            # Its own SIGTERM: the package's handler deletes its rows and
            # stops delivering only when the DELETE's reply is read.
            if fa[2] == "term" and fa[3] == nt[2]:
                return "its own SIGTERM"
        return None

    def node_cover(ch, t0, t1):
        """The cause, when the loss of a message published over [t0, t1] lies in a
        Node tenure or in the gaps around it; else None."""
        tes = tenures_of.get(ch, [])
        for i, nt in enumerate(tes):
            start, end, member, inc = nt
            if member not in node_members:
                continue
            before = [te[1] for te in tes[:i] if (te[2], te[3]) != (member, inc)]
            prev_end = max(before) if before else start
            lo = max(min(prev_end, start), start - grace)
            after = [te[0] for te in tes[i + 1:] if (te[2], te[3]) != (member, inc)]
            gone = exit_at.get((member, inc), (t_end, 0))[0]
            hi = min(after[0] if after else t_end, gone + interval_ns + GRACE_EXTRA_NS)
            if not (t0 <= hi and lo <= t1):
                continue
            # its LISTEN for this tenure (PgPubSub's listen() LISTENs again each time it wins)
            heard = min([t for t in node_listen.get((member, inc, ch), []) if start <= t], default=None)
            # its row named it while its flags did not (node_member.js polls the rows)
            silent = min([t for t in node_row.get((member, inc, ch), []) if start <= t <= end], default=None)
            if silent is not None and t1 >= silent:
                return "held silently: its row, not its flags (two release events)"
            if t1 < start:
                return "handover to it (before its LISTEN)"
            if t0 > end:
                # its process alive: the row is still its (nobody took it), the
                # two-release-events defect; else it ended and nobody took over yet
                return ("after its tenure, its process alive (its row kept)" if gone > t1 else
                        "after it ended, before the next holder")
            if heard is None or heard > end:
                return "held without LISTEN (won by its timer)"
            if t1 < heard:
                return "handover to it (before its LISTEN)"
            return "while it held and LISTENed"
        return None

    losses_red = []  # (t, channel) for the picture
    summary = {}
    for ch in sorted(kinds):
        kind = kinds[ch]
        ps = pubs.get(ch, {})
        ds = deliveries.get(ch, [])
        ok = sum(1 for v in ps.values() if v[2])
        row = {"kind": kind, "published": ok, "failed": len(ps) - ok, "delivered": len(ds), "lost": 0,
               "twice": 0, "redelivered": 0, "tenures": len(holds.get(ch, []))}
        # tokens: one tenure = one member incarnation; strictly increasing in on_listen order
        owner = {}
        best = 0
        for (t, member, inc, tok) in sorted(holds.get(ch, [])):
            if member in node_members:
                continue  # no token (see the module comment): checked by time and seq below
            if tok <= 0:
                violations.append(Violation(t, ch, "%s %d took the channel with no token" % (member, inc)))
                continue
            if tok in owner and owner[tok] != (member, inc):
                violations.append(Violation(t, ch, "token %d used by %s and %s" % (tok, owner[tok], (member, inc))))
            owner[tok] = (member, inc)
            if tok <= best:
                violations.append(Violation(t, ch, "token %d of %s after token %d: not increasing" % (tok, member, best)))
            best = max(best, tok)
        by_seq = defaultdict(list)
        for d in ds:
            by_seq[d[3]].append(d)
        if kind in ("plain", "balanced"):
            for seq, dl in by_seq.items():
                if len(dl) > 1:
                    row["twice"] += 1
                    nd = [d for d in dl if d[1] in node_members]
                    if len(dl) == 2 and len(nd) == 1:
                        other = dl[1] if dl[0] is nd[0] else dl[0]
                        nt = node_tenure_of(ch, nd[0])
                        why = node_excuse(ch, nt, other[1], max(nd[0][0], other[0])) if nt else None
                        if why:
                            node_stats["twice: " + why] += 1
                            continue
                    violations.append(Violation(dl[1][0], ch, "message %d delivered %d times (%s)" % (
                        seq, len(dl), ", ".join("%s token %d" % (d[1], d[5]) for d in dl))))
            # commit order: tokens never go down (members with tokens: all but the Node member)
            top, top_seq = 0, 0
            for seq in sorted(by_seq):
                tokened = [d for d in by_seq[seq] if d[1] not in node_members]
                if not tokened:
                    continue
                d = tokened[0]
                if d[5] < top:
                    violations.append(Violation(d[0], ch, "message %d delivered by %s token %d after message %d by "
                                                "token %d: two tenures delivering at once" % (seq, d[1], d[5], top_seq,
                                                                                              top)))
                elif d[5] > top:
                    top, top_seq = d[5], seq
                else:
                    top_seq = seq
            # A Node tenure and any other delivering at once: the seqs of one
            # reach in between the first and last seq of the other (what both
            # delivered is counted above, as twice).
            seqs_of = defaultdict(dict)  # tenure -> seq -> delivery
            node_of = {}
            for d in ds:
                if d[1] in node_members:
                    nt = node_tenure_of(ch, d)
                    key = ("node",) + (nt or (0, 0, d[1], d[2]))
                    node_of[key] = nt
                else:
                    key = ("token", d[5], d[1], d[2])
                seqs_of[key].setdefault(d[3], d)
            span = {k: (min(v), max(v)) for k, v in seqs_of.items()}
            for nk in [k for k in seqs_of if k[0] == "node"]:
                for ok_ in seqs_of:
                    if ok_ == nk or (ok_[0] == "node" and ok_ < nk):
                        continue  # each pair once
                    inside = [d for sq, d in seqs_of[ok_].items() if span[nk][0] < sq < span[nk][1]
                              and sq not in seqs_of[nk]]
                    inside += [d for sq, d in seqs_of[nk].items() if span[ok_][0] < sq < span[ok_][1]
                               and sq not in seqs_of[ok_]]
                    if not inside:
                        continue
                    first = min(inside)
                    other = ok_[3] if ok_[0] == "node" else ok_[2]
                    why = node_excuse(ch, node_of[nk], other, first[0]) if node_of[nk] else None
                    if why:
                        node_stats["overlap: " + why] += 1
                        continue
                    violations.append(Violation(first[0], ch, "the Node member's tenure (from %.3f s) and %s delivered "
                                                "at once: message %d by %s inside the other's seqs" % (
                                                    ((node_of[nk] or (t_begin,))[0] - t_begin) / 1e9,
                                                    "%s token %d" % (ok_[2], ok_[1]) if ok_[0] == "token"
                                                    else "its tenure from %.3f s" % ((ok_[1] - t_begin) / 1e9),
                                                    first[3], first[1])))
            for seq, (t0, t1, okp) in sorted(ps.items()):
                if not okp or seq in by_seq:
                    continue
                row["lost"] += 1
                losses_red.append((t0, ch))
                fa = window_for(ch, t0, t1)
                if fa is None:
                    why = node_cover(ch, t0, t1) if node_members else None
                    if why:
                        node_stats["lost: " + why] += 1
                    else:
                        violations.append(Violation(t0, ch, "message %d (confirmed) lost outside every fault window"
                                                    % seq))
                else:
                    per_fault[fa[2]]["lost " + kind] += 1
        else:
            # every confirmed message delivered
            for seq, (t0, t1, okp) in sorted(ps.items()):
                if okp and seq not in by_seq:
                    row["lost"] += 1
                    losses_red.append((t0, ch))
                    violations.append(Violation(t0, ch, "durable message %d (confirmed) never delivered" % seq))
            # ids: one per seq, growing with seq
            id_of = {}
            for d in ds:
                if d[3] in id_of and id_of[d[3]] != d[4]:
                    violations.append(Violation(d[0], ch, "message %d delivered with ids %d and %d" % (
                        d[3], id_of[d[3]], d[4])))
                id_of.setdefault(d[3], d[4])
            last_id = 0
            for seq in sorted(id_of):
                if id_of[seq] <= last_id:
                    violations.append(Violation(0, ch, "message %d has id %d, not above the previous message's %d"
                                                % (seq, id_of[seq], last_id)))
                last_id = max(last_id, id_of[seq])
            # per tenure: increasing ids, none twice
            by_tok = defaultdict(list)
            for d in ds:  # a member's lines are in its own order
                by_tok[(d[5], d[1], d[2])].append(d)
            last_of_tenure = {}
            for key, dl in by_tok.items():
                for a, b in zip(dl, dl[1:]):
                    if b[4] <= a[4]:
                        violations.append(Violation(b[0], ch, "token %d delivered id %d after id %d: not in id order"
                                                    % (key[0], b[4], a[4])))
                last_of_tenure[key[0]] = max(last_of_tenure.get(key[0], 0), dl[-1][0])
            # redeliveries: by a newer tenure, of what an older one delivered just before it stopped
            first = {}
            for d in sorted(ds):
                if d[3] not in first:
                    first[d[3]] = d
                    continue
                f0 = first[d[3]]
                row["redelivered"] += 1
                if d[5] <= f0[5]:  # (one token of two members is reported above)
                    if not (d[5] == f0[5] and (d[1], d[2]) != (f0[1], f0[2])):
                        violations.append(Violation(d[0], ch, "message %d (id %d) delivered again by token %d after "
                                                    "token %d had delivered it" % (d[3], d[4], d[5], f0[5])))
                    continue
                if f0[0] < last_of_tenure.get(f0[5], f0[0]) - REDELIVERY_WINDOW_NS:
                    violations.append(Violation(d[0], ch, "message %d (id %d) redelivered by token %d, but token %d "
                                                "delivered it %.1f s before its last delivery: outside the "
                                                "at-least-once window" % (d[3], d[4], d[5], f0[5],
                                                                          (last_of_tenure[f0[5]] - f0[0]) / 1e9)))
                fa = window_for(ch, d[0] - grace, d[0])
                per_fault[fa[2] if fa else "kill"]["redelivered"] += 1 if fa else 0
        summary[ch] = row

    # ---- the table
    secs = (marks.get("faults_end", t_end) - t_begin) / 1e9
    print("soak history: seed %s, %.0f s with faults, %d member starts, %d faults injected" % (
        seed, secs, sum(1 for s in starts if s[1] != "publisher"), sum(1 for f in faults if f[5] == "done")))
    print()
    print("%-24s %-9s %9s %7s %9s %6s %6s %9s %8s" % ("channel", "kind", "confirmed", "failed", "delivered", "lost",
                                                    "twice", "redeliv.", "tenures"))
    for ch, r in summary.items():
        print("%-24s %-9s %9d %7d %9d %6d %6d %9d %8d" % (ch, r["kind"], r["published"], r["failed"], r["delivered"],
                                                         r["lost"], r["twice"], r["redelivered"], r["tenures"]))
    print()
    print("%-18s %8s %9s %11s %13s %20s" % ("fault", "injected", "no target", "plain lost", "balanced lost",
                                           "durable redelivered"))
    for k in fault_kinds:
        r = per_fault[k]
        print("%-18s %8d %9d %11d %13d %20d" % (k, r["injected"], r["no target"], r["lost plain"],
                                               r["lost balanced"], r["redelivered"]))
    print("(a durable message lost is a violation, not a row here)")
    print()
    # ---- the Node member: its own rows, whatever they say
    if node_members:
        for member in sorted(node_members):
            mine = [(ch, te) for ch in tenures_of for te in tenures_of[ch] if te[2] == member]
            silent = sum(1 for ch, te in mine if not any(
                d[1] == member and d[2] == te[3] and te[0] <= d[0] <= te[1] for d in deliveries.get(ch, [])))
            incs = sorted(inc for (m, inc) in exit_at if m == member)
            by_itself = sum(1 for inc in incs if exit_at[(member, inc)][1] > 0)
            delivered = sum(1 for ch in deliveries for d in deliveries[ch] if d[1] == member)
            print("Node member %s (%s, plain fleet, no token): %d starts, %d ended by themselves (status > 0), "
                  "%d tenures (%d delivered nothing), %d deliveries" % (
                      member, node_info[1] if node_info and len(node_info) > 1 else "@imqueue/pg-pubsub",
                      sum(1 for st in starts if st[1] == member), by_itself, len(mine), silent, delivered))
        lost = sum(v for k, v in node_stats.items() if k.startswith("lost: "))
        print("  lost in its tenures or the gaps around them (the Node package's, not violations): %d" % lost)
        for k in sorted(node_stats):
            if k.startswith("lost: "):
                print("    %-60s %6d" % (k[6:], node_stats[k]))
        both = sum(v for k, v in node_stats.items() if not k.startswith("lost: "))
        print("  delivered by it and by another tenure, explained by a fault (not violations): %d" % both)
        for k in sorted(node_stats):
            if not k.startswith("lost: "):
                print("    %-60s %6d" % (k, node_stats[k]))
        print()
    elif node_info and node_info[0] == "none":
        print("Node member: none (%s)" % " ".join(node_info[1:]))
        print()
    violations.sort(key=lambda v: v.t)
    if violations:
        print("VIOLATIONS: %d" % len(violations))
        for v in violations[:50]:
            print("  %8.3f s  %s: %s" % ((v.t - t_begin) / 1e9, v.channel, v.what))
        if len(violations) > 50:
            print("  ... and %d more" % (len(violations) - 50))
    else:
        print("violations: 0")

    # ---- the picture's data (plot.gp): seconds from the start of the publisher
    tl = os.path.join(out, "timeline")
    os.makedirs(tl, exist_ok=True)
    lane_of = {m: i for i, m in enumerate(lanes)}
    chans = sorted(kinds)
    sec = lambda t: (t - t_begin) / 1e9
    with open(os.path.join(tl, "tenures.dat"), "w") as f:
        for (member, inc, ch, t0, t1, tok) in tenures:
            if member in lane_of:
                y = lane_of[member]
                n = len(kinds)
                k = chans.index(ch) if ch in chans else 0
                lo = y - 0.4 + 0.8 * k / n
                f.write("%.3f %.3f %.3f %.3f %.3f %.3f %d\n" % (
                    (sec(t0) + sec(t1)) / 2, (lo + lo + 0.8 / n) / 2, sec(t0), sec(t1), lo, lo + 0.8 / n, k + 1))
    with open(os.path.join(tl, "faults.dat"), "w") as f:
        for (t0, t1, kind, target, aff, note) in faults:
            if note != "done":
                continue
            y = lane_of.get(target, len(lanes))
            f.write("%.3f %.3f %d %d\n" % (sec(t0), sec(t1), y, fault_kinds.index(kind) + 1))
    with open(os.path.join(tl, "losses.dat"), "w") as f:
        for (t, ch) in losses_red:
            f.write("%.3f %d\n" % (sec(t), len(lanes) + 1))
    with open(os.path.join(tl, "violations.dat"), "w") as f:
        for v in violations:
            f.write("%.3f %d\n" % (sec(v.t) if v.t else 0, len(lanes) + 1))
    # gnuplot refuses an empty file: one point far left of the x range.
    for name, dummy in (("faults.dat", "-1000 -1000 -10 1"), ("losses.dat", "-1000 -10"),
                        ("violations.dat", "-1000 -10"), ("tenures.dat", "-1000 -10 -1000 -1000 -10 -10 1")):
        path = os.path.join(tl, name)
        if os.path.getsize(path) == 0:
            with open(path, "w") as f:
                f.write(dummy + "\n")
    with open(os.path.join(tl, "lanes.gp"), "w") as f:
        labels = ", ".join('"%s" %d' % (m, i) for m, i in lane_of.items())
        f.write('set ytics (%s, "server/any" %d, "lost" %d)\n' % (labels, len(lanes), len(lanes) + 1))
        f.write("set yrange [-1:%d]\n" % (len(lanes) + 2))
        f.write("set xrange [%.1f:%.1f]\n" % (min(0, sec(t_begin)), sec(t_end) + 1))
        short = lambda ch: "%s_%s" % (kinds[ch], ch.rsplit("_", 1)[-1])  # soak_s123_p_0 -> plain_0
        f.write('channels = "%s"\n' % " ".join(short(ch) for ch in chans))
        f.write("nchannels = %d\n" % len(chans))
        f.write('faults = "%s"\n' % " ".join(fault_kinds))
        f.write('set title "pgiplock soak: seed %s, %.0f s of faults, %d injected, %d violations"\n' % (
            seed, secs, sum(1 for fa in faults if fa[5] == "done"), len(violations)))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
