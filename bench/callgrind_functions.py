#!/usr/bin/env python3
"""Reads the callgrind files bench/gateway_instructions.sh leaves behind.

  bench/callgrind_functions.py self FILE [FLOOR_FILE] [--requests N] [--top K]
      Instructions per request each function runs itself (exclusive), and
      with FLOOR_FILE (FLOOR_BIN=... bench/gateway_instructions.sh) the
      difference: where the gateway's instructions above hyper's floor go.
      Exclusive counts are what inlining cannot move between names, which
      callgrind_annotate's inclusive view blurs.
  bench/callgrind_functions.py callers FILE NAME [--requests N] [--top K]
      Who calls the functions whose name holds NAME, how often a request,
      and the instructions spent in those calls (inclusive), per request.

FILE is the second dump (cg.<pid>.out.2: the measured requests only).
"""
import argparse
import collections
import re

NAMED = re.compile(r"\((\d+)\)(?: (.*))?")


class Names:
    """callgrind's name compression: "(id) name" once, then "(id)"."""

    def __init__(self):
        self.by_id = {}

    def __call__(self, text):
        m = NAMED.match(text)
        if not m:
            return text
        if m.group(2) is not None:
            self.by_id[m.group(1)] = m.group(2)
        return self.by_id.get(m.group(1), "?")


def read(path):
    """(exclusive cost by function, {(caller, callee): [calls, inclusive]})."""
    fns, files = Names(), Names()
    own = collections.Counter()
    calls = collections.defaultdict(lambda: [0, 0])
    fn = callee = None
    pending = None  # call count of the cost line that follows "calls="
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                fn = fns(line[3:].rstrip("\n"))
            elif line.startswith("cfn="):
                callee = fns(line[4:].rstrip("\n"))
            elif line.startswith(("fl=", "fi=", "fe=")):
                files(line[3:].rstrip("\n"))
            elif line.startswith(("cfi=", "cfl=")):
                files(line[4:].rstrip("\n"))
            elif line.startswith("calls="):
                pending = int(line[6:].split()[0])
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) < 2 or fn is None:
                    continue
                cost = int(parts[1])
                if pending is not None:
                    entry = calls[(fn, callee)]
                    entry[0] += pending
                    entry[1] += cost
                    pending = None
                else:
                    own[fn] += cost
    return own, calls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["self", "callers"])
    p.add_argument("file")
    p.add_argument("other", nargs="?", help="self: the floor's file; callers: a name")
    p.add_argument("--requests", type=float, default=4000)
    p.add_argument("--top", type=int, default=60)
    a = p.parse_args()
    n = a.requests
    own, calls = read(a.file)
    if a.mode == "self":
        floor = read(a.other)[0] if a.other else collections.Counter()
        rows = sorted(set(own) | set(floor), key=lambda k: floor[k] - own[k])
        print(f"{'floor':>7} {'gateway':>7} {'delta':>7}  function (instructions a request, own)")
        for k in rows[: a.top]:
            print(f"{floor[k] / n:7.0f} {own[k] / n:7.0f} {(own[k] - floor[k]) / n:+7.0f}  {k[:150]}")
        print(f"{sum(floor.values()) / n:7.0f} {sum(own.values()) / n:7.0f}  in all")
    else:
        if not a.other:
            p.error("callers needs a NAME")
        by_caller = collections.defaultdict(lambda: [0, 0])
        for (caller, callee), (count, cost) in calls.items():
            if callee and a.other in callee:
                by_caller[caller][0] += count
                by_caller[caller][1] += cost
        rows = sorted(by_caller.items(), key=lambda kv: -kv[1][1])
        print(f"{'instr':>7} {'calls':>6}  caller (a request)")
        for caller, (count, cost) in rows[: a.top]:
            print(f"{cost / n:7.0f} {count / n:6.1f}  {caller[:150]}")
        print(f"{sum(c for _, c in by_caller.values()) / n:7.0f}         in all")


if __name__ == "__main__":
    main()
