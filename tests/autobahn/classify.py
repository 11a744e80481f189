#!/usr/bin/env python3
"""Classifies the per-case reports of an Autobahn|Testsuite fuzzingclient run against Broadcaster.

Broadcaster does not echo: a text message that is valid UTF-8 but not a JSON request, and any
binary message, is answered with an InvalidArgument error and the connection stays open. So
every Autobahn case that expects an echo fails on content. This script tells those apart from
real misbehaviour by reading each case's JSON report (behavior, behaviorClose, result,
resultClose, expected/received, close codes, wirelog) and sorts every case into one class:

  ok             Autobahn says OK, NON-STRICT or INFORMATIONAL, and the close is OK
                 (NON-STRICT: UTF-8 is checked when a message is complete, 6.4.x;
                 INFORMATIONAL: Autobahn grades nothing, 7.1.6 and 7.13.x).
  answered       failed only because the answer is not an echo: every message the server sent
                 is an InvalidArgument error answer, one for each message Autobahn expected
                 back, in the same order among the pongs (which must match byte for byte),
                 and the close is right; or, in the cases that check the echo themselves
                 (9.x, 10.1.1, 12.x, 13.x), the first message back was a text answer of another
                 length than the echo and the close that followed is clean (1000 both ways).
                 Cases expecting an echo end by Autobahn's own timer when none comes: it closes
                 1001 "Going Away" and the server echoes 1001 (it echoes the peer's code), which
                 Autobahn grades WRONG CODE; that close counts as right here when the server
                 echoed the client's code, the close was clean and the server closed the TCP
                 connection.
  limit          the server closed 1009 "message larger than max_frame_bytes", cleanly: a limit
                 of the configuration, not a bug (the reason names the limit).
  unimplemented  Autobahn says UNIMPLEMENTED: permessage-deflate (12.x, 13.x) was not
                 negotiated.
  MISBEHAVED     anything else, with the reason.

Prints a per-group table and every misbehaving case with its reason; exits 1 when any case
misbehaved, 2 when there is no report to read.

Usage: classify.py REPORT_DIR [--agent broadcaster] [--max-frame-bytes N] [--markdown]
                               [--list CLASS]
"""

import argparse
import json
import os
import re
import sys

CLASSES = ["ok", "answered", "limit", "unimplemented", "MISBEHAVED"]

# The server's answer to a message that is not a request (text) or to any binary message.
# Autobahn's report truncates received payloads to 64 characters plus " ...".
ANSWER = re.compile(r'^\{"requestId":null,"error":\{"code":"InvalidArgument"')

# Results of the cases that check the echo in their own onMessage (the received list stays
# empty there and the wirelog is off): the answer's type and length as Autobahn reports them.
SELF_CHECKED = [
    # 9.1.x, 9.3.x (text, whole and fragmented)
    re.compile(r"^Expected text message with payload of length (?P<want>\d+), but got (?P<got>\d+)\.$"),
    # 9.2.x (binary): the answer is a text message
    re.compile(r"^Expected binary message with payload, but got text\.$"),
    # 9.4.x (binary, fragmented): the same, in Autobahn's words for it there (its case9_4_1.py
    # writes "got binary" in the branch where the message is not binary)
    re.compile(r"^Expected binary message with payload, but got binary\.$"),
    # 9.7.x, 9.8.x
    re.compile(r"^Echo'ed message type or length differs from what I sent "
               r"\(got binary = False, payload length = (?P<got>\d+)\)\.$"),
    # 12.x, 13.x (permessage-deflate): binary test data answered with text, or text test data
    # answered with an answer of another length
    re.compile(r"^Echo'ed message type differs from what I sent \(got binary False, expected binary True\)\.$"),
    re.compile(r"^Echo'ed message length differs from what I sent "
               r"\(got length (?P<got>\d+), expected length (?P<want>\d+)\)\.$"),
]

# Autobahn's failConnection() on its kill timer: close 1001 "Going Away".
GOING_AWAY = 1001


def case_key(case_id):
    return [int(x) for x in case_id.split(".")]


def normalize(events):
    """Events with each data message reduced to "message", so an answer stands for an echo."""
    return [("message",) if e[0] == "message" else tuple(e) for e in events]


def answers_only(received):
    """Every message the server sent is a text InvalidArgument answer."""
    return all(e[0] != "message" or (not e[2] and ANSWER.match(e[1] or "")) for e in received)


def timed_out_close(r):
    """Autobahn's timer closed (no echo came) and the server answered that close correctly:
    it echoed the client's code, the handshake was clean and the server closed TCP."""
    timer = any(w and w[0] in ("KLE", "TIE") for w in (r.get("wirelog") or []))
    return (
        timer
        and r.get("expectedClose", {}).get("closedByMe") is True
        and r.get("closedByMe") is True
        and r.get("wasClean") is True
        and r.get("droppedByMe") is False
        and r.get("remoteCloseCode") == r.get("localCloseCode")
        and r.get("localCloseCode") == GOING_AWAY
    )


def close_line(r):
    return "close %s (%s); sent %s, got %s%s" % (
        r.get("behaviorClose"),
        r.get("resultClose"),
        r.get("localCloseCode"),
        r.get("remoteCloseCode"),
        "" if r.get("wasClean") else ", unclean: %s" % r.get("wasNotCleanReason"),
    )


def classify(r, max_frame_bytes):
    """(class, reason) of one case report."""
    b, bc = r.get("behavior"), r.get("behaviorClose")
    result = r.get("result") or ""
    if r.get("remoteCloseCode") == 1009 and "max_frame_bytes" in (r.get("remoteCloseReason") or ""):
        if not (r.get("wasClean") and r.get("droppedByMe") is False):
            return "MISBEHAVED", "closed 1009 for the size limit, but " + close_line(r)
        return "limit", "closed 1009 %r: the message is over limits.max_frame_bytes = %s" % (
            r.get("remoteCloseReason"), max_frame_bytes)
    if b == "UNIMPLEMENTED":
        if bc in ("OK", "INFORMATIONAL"):
            return "unimplemented", "permessage-deflate not negotiated"
        return "MISBEHAVED", "UNIMPLEMENTED, but " + close_line(r)
    if b in ("OK", "NON-STRICT", "INFORMATIONAL"):
        if bc in ("OK", "INFORMATIONAL"):
            return "ok", b
        return "MISBEHAVED", "%s, but %s" % (b, close_line(r))
    if b != "FAILED":
        return "MISBEHAVED", "behavior %s (%s); %s" % (b, result, close_line(r))

    # FAILED: was it only the missing echo?
    received = r.get("received") or []
    expected = r.get("expected") or {}
    # Some cases (7.1.1, ...) copy the close verdict into their result.
    if result in ("Actual events differ from any expected.", r.get("resultClose")) and expected:
        if not answers_only(received):
            return "MISBEHAVED", "a message back that is not an InvalidArgument answer: %r; %s" % (
                received, close_line(r))
        got = normalize(received)
        if not any(got == normalize(events) for events in expected.values()):
            return "MISBEHAVED", "events differ beyond the missing echo: got %r, expected one of %r; %s" % (
                received, expected, close_line(r))
        n = sum(1 for e in received if e[0] == "message")
        if n == 0:
            return "MISBEHAVED", "no message was answered, yet %s; %s" % (result, close_line(r))
        if bc == "OK":
            return "answered", "%d message(s) answered with InvalidArgument; close OK" % n
        if timed_out_close(r):
            return "answered", ("%d message(s) answered with InvalidArgument; no echo, so Autobahn's "
                                "timer closed 1001 and the server echoed 1001" % n)
        return "MISBEHAVED", "events right but " + close_line(r)
    for pattern in SELF_CHECKED:
        m = pattern.match(result)
        if m:
            d = m.groupdict()
            if d.get("got") is not None and d.get("want") is not None and d["got"] == d["want"]:
                break
            if bc == "OK" and r.get("remoteCloseCode") == 1000 and r.get("wasClean"):
                return "answered", result + " Close OK"
            return "MISBEHAVED", "answered (%s) but %s" % (result, close_line(r))
    return "MISBEHAVED", "%s; %s" % (result, close_line(r))


def load(report_dir, agent):
    index_path = os.path.join(report_dir, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    if agent not in index:
        raise SystemExit("classify: no agent %r in %s (agents: %s)" % (agent, index_path, ", ".join(index)))
    reports = {}
    for case_id, entry in index[agent].items():
        with open(os.path.join(report_dir, entry["reportfile"])) as f:
            reports[case_id] = json.load(f)
    return reports


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir")
    ap.add_argument("--agent", default="broadcaster")
    ap.add_argument("--max-frame-bytes", default="?", help="the server's limits.max_frame_bytes, for the limit reason")
    ap.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    ap.add_argument("--list", choices=CLASSES, action="append", default=[],
                    help="also list the cases of this class with their reason (repeatable)")
    args = ap.parse_args()

    try:
        reports = load(args.report_dir, args.agent)
    except FileNotFoundError as e:
        print("classify: %s" % e, file=sys.stderr)
        return 2
    if not reports:
        print("classify: no case reports in %s" % args.report_dir, file=sys.stderr)
        return 2

    groups = {}
    verdicts = {}
    behaviors = {}
    for case_id in sorted(reports, key=case_key):
        cls, reason = classify(reports[case_id], args.max_frame_bytes)
        verdicts[case_id] = (cls, reason)
        group = case_id.split(".")[0]
        groups.setdefault(group, {c: 0 for c in CLASSES})[cls] += 1
        b = reports[case_id].get("behavior")
        behaviors[b] = behaviors.get(b, 0) + 1

    header = ["group", "total"] + CLASSES
    rows = []
    total = {c: 0 for c in CLASSES}
    for group in sorted(groups, key=int):
        counts = groups[group]
        rows.append([group, str(sum(counts.values()))] + [str(counts[c]) for c in CLASSES])
        for c in CLASSES:
            total[c] += counts[c]
    rows.append(["all", str(sum(total.values()))] + [str(total[c]) for c in CLASSES])

    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print("Autobahn's own grades: " + ", ".join("%s %d" % kv for kv in sorted(behaviors.items())))

    for cls in args.list:
        print("\n%s cases:" % cls)
        for case_id, (c, reason) in verdicts.items():
            if c == cls:
                print("  %s: %s" % (case_id, reason))

    bad = [(case_id, reason) for case_id, (c, reason) in verdicts.items() if c == "MISBEHAVED"]
    if bad:
        print("\n%d case(s) MISBEHAVED:" % len(bad))
        for case_id, reason in bad:
            r = reports[case_id]
            description = " ".join(re.sub(r"<[^>]*>", "", r.get("description") or "").split())
            print("  %s (%s): %s" % (case_id, description, reason))
        return 1
    print("\nno case misbehaved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
