#!/usr/bin/env python3
"""A/B: the CPU time a worker spends importing the app, with the cyclic
garbage collector's automatic trigger paused during the import (what the
bootstrap does, `collector_paused`) and without.

Each sample is a fresh interpreter that first does what a worker forked from
the base zygote inherits (uvicorn and its protocol and loop modules imported,
gc.collect(); gc.freeze()), then imports the app and reports
time.process_time() for that import alone. The two variants alternate, so a
change in the machine's load hits both alike. CPU time, not wall time: on a
shared machine it is the steadier of the two.

    bench/gc-import.py [--python bench/.venv/bin/python] [--app-dir examples/fastapi]
                       [--module app] [--runs 15]

Stdlib only.
"""

import argparse
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WARM = ("import gc, time, uvicorn, uvicorn.config, uvicorn.protocols.http.h11_impl\n"
        "try:\n    import uvloop, uvicorn.protocols.http.httptools_impl\nexcept ImportError:\n    pass\n"
        "gc.collect(); gc.freeze()\n")


def sample(python, app_dir, module, paused):
    code = WARM + ("gc.set_threshold(0)\n" if paused else "") + (
        f"t = time.process_time(); import {module}; print(time.process_time() - t)\n")
    out = subprocess.run([python, "-c", code], cwd=app_dir, capture_output=True, text=True, check=True)
    return float(out.stdout.strip()) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=os.path.join(REPO, "bench", ".venv", "bin", "python"))
    ap.add_argument("--app-dir", default=os.path.join(REPO, "examples", "fastapi"))
    ap.add_argument("--module", default="app")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    runs = {False: [], True: []}
    for _ in range(args.runs):
        for paused in (False, True):
            runs[paused].append(sample(args.python, args.app_dir, args.module, paused))
    normal, paused = statistics.median(runs[False]), statistics.median(runs[True])
    print(f"import {args.module} (CPU ms, median of {args.runs}, [min-max]):")
    print(f"  collector running: {normal:.1f} [{min(runs[False]):.1f}-{max(runs[False]):.1f}]")
    print(f"  collector paused:  {paused:.1f} [{min(runs[True]):.1f}-{max(runs[True]):.1f}]")
    print(f"  paused / running:  {paused / normal:.3f}")


if __name__ == "__main__":
    sys.exit(main())
