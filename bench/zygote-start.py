#!/usr/bin/env python3
"""A/B: how long the base zygote takes to get ready, and how much CPU it
uses, for two procman binaries (say, before and after a change to the
bootstrap).

Each sample starts `procman APP -w 1 --log-format json` afresh, reads the
zygote's own `zygote-ready` line ("Zygote P ready in 0.114s": from the
master's fork to the zygote's ready message, wall time) and, once the worker
is ready and the zygote idle, the zygote's CPU time so far from
/proc/P/schedstat (nanoseconds of run time; it includes the zygote's one
fork). The binaries alternate, so a change in the machine's load hits both
alike. CPU time is the steadier figure on a shared machine.

    bench/zygote-start.py --a OLD_PROCMAN --b NEW_PROCMAN [--runs 10]
                          [--python .venv/bin/python] [--app-dir examples/fastapi] [--app app:main]

Stdlib only (and bench/ab.py, the A/B both scripts share).
"""

import re
import signal
import statistics
import sys
import time

import ab


def sample(procman, args):
    """(ready in, s; CPU ms) of the zygote of one fresh procman."""
    with ab.one_worker(procman, args) as (p, log, _):
        def ready(found):
            return (any(e.get("event") == "zygote-ready" for e in found)
                    and any(e.get("event") == "all-ready" for e in found))

        found = ab.wait_events(procman, log, ready)
        zygote_ready = next(e for e in found if e.get("event") == "zygote-ready")
        ready_in = float(re.search(r"ready in ([0-9.]+)s", zygote_ready["message"]).group(1))
        time.sleep(0.2)  # the zygote has replied to its one spawn and waits
        with open(f"/proc/{zygote_ready['zygote']}/schedstat") as f:
            cpu_ms = int(f.read().split()[0]) / 1e6
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    return ready_in, cpu_ms


def show(label, runs):
    ready = [r for r, _ in runs]
    cpu = [c for _, c in runs]
    print(f"  {label}: ready in {statistics.median(ready) * 1000:.1f} ms "
          f"[{min(ready) * 1000:.1f}-{max(ready) * 1000:.1f}], "
          f"CPU {statistics.median(cpu):.1f} ms [{min(cpu):.1f}-{max(cpu):.1f}]")
    return statistics.median(ready), statistics.median(cpu)


def main():
    args = ab.parser(__doc__).parse_args()
    runs = ab.alternate(args, lambda procman: sample(procman, args))
    print(f"base zygote, median of {args.runs} [min-max]:")
    ra, ca = show(f"A {args.a}", runs["a"])
    rb, cb = show(f"B {args.b}", runs["b"])
    print(f"  B / A: ready in {rb / ra:.3f}, CPU {cb / ca:.3f}")


if __name__ == "__main__":
    sys.exit(main())
