#!/usr/bin/env python3
"""Python's runtime in the base zygote (RUNTIME_MODULES in
src/classes/bootstrap.py): checks each module and measures what it saves.

`check`: in a fresh interpreter warmed like the base zygote (uvicorn, its
protocol and loop modules), imports each module of the list in turn and
reports any that started a thread (threading.active_count(), and the
kernel's /proc/self/task) or left a file descriptor open (/proc/self/fd),
and which modules each one pulled in. Fork hazards that leave no such trace
(state kept for later) are the comment's business in the bootstrap.

`ab` (the default): CPU time of `import app` alone in a worker forked from
the base zygote, with and without the list imported before it. Each sample
is a fresh interpreter that does what the zygote does (uvicorn and its
modules imported, the list or not, gc.collect(); gc.freeze()) and then what
the worker does (collector paused, import the app), and reports
time.process_time() for the app's import and, with the list, for importing
the list (the zygote's extra start-up CPU). The variants alternate, so a
change in the machine's load hits both alike.

    bench/runtime-modules.py [check|ab] [--python .venv/bin/python]
                             [--app-dir examples/fastapi] [--module app] [--runs 15]

Stdlib only.
"""

import argparse
import ast
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOTSTRAP = os.path.join(REPO, "src", "classes", "bootstrap.py")

WARM = ("import gc, time, importlib\ngc.set_threshold(0)\n"
        "import uvicorn, uvicorn.config, uvicorn.protocols.http.h11_impl\n"
        "try:\n    import uvloop, uvicorn.protocols.http.httptools_impl\nexcept ImportError:\n    pass\n")


def runtime_modules():
    """RUNTIME_MODULES, read from the bootstrap's source (not imported: it runs)."""
    with open(BOOTSTRAP, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RUNTIME_MODULES"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"no RUNTIME_MODULES in {BOOTSTRAP}")


CHECK = WARM + """
import os, sys, threading
def fds():
    return sorted(os.listdir("/proc/self/fd"))
bad = 0
for name in MODULES:
    before = (fds(), threading.active_count(), len(os.listdir("/proc/self/task")))
    known = set(sys.modules)
    try:
        importlib.import_module(name)
    except ImportError as exc:
        print(f"{name}: missing ({exc})")
        continue
    after = (fds(), threading.active_count(), len(os.listdir("/proc/self/task")))
    new = sorted(set(sys.modules) - known)
    if after != before:
        bad += 1
        print(f"{name}: HAZARD fds {before[0]} -> {after[0]}, threads {before[1]} -> {after[1]}, "
              f"tasks {before[2]} -> {after[2]}")
    else:
        print(f"{name}: ok" + (f", pulls {', '.join(new)}" if new else " (already imported)"))
print(f"{len(MODULES)} modules, {bad} with a thread or an open fd")
sys.exit(1 if bad else 0)
"""


def check(python, modules):
    code = f"MODULES = {modules!r}\n" + CHECK
    return subprocess.run([python, "-c", code], cwd="/").returncode


def sample(python, app_dir, module, modules):
    """(import app CPU ms, import of the list CPU ms or None)."""
    code = WARM
    if modules is not None:
        code += (f"t = time.process_time()\nfor m in {modules!r}:\n    try:\n"
                 "        importlib.import_module(m)\n    except ImportError:\n        pass\n"
                 "runtime = time.process_time() - t\n")
    else:
        code += "runtime = None\n"
    code += ("gc.set_threshold(700, 10, 10); gc.collect(); gc.freeze()\n"
             "gc.set_threshold(0)\n"
             f"t = time.process_time(); import {module}; app = time.process_time() - t\n"
             "print(app, runtime)\n")
    out = subprocess.run([python, "-c", code], cwd=app_dir, capture_output=True, text=True, check=True)
    app, runtime = out.stdout.split()
    return float(app) * 1000, None if runtime == "None" else float(runtime) * 1000


def spread(values):
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=("ab", "check"), default="ab")
    ap.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"),
                    type=os.path.abspath)
    ap.add_argument("--app-dir", default=os.path.join(REPO, "examples", "fastapi"))
    ap.add_argument("--module", default="app")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    modules = runtime_modules()
    if args.what == "check":
        return check(args.python, modules)
    without, with_set, runtime = [], [], []
    for _ in range(args.runs):
        without.append(sample(args.python, args.app_dir, args.module, None)[0])
        app, cost = sample(args.python, args.app_dir, args.module, modules)
        with_set.append(app)
        runtime.append(cost)
    print(f"import {args.module} in a forked worker (CPU ms, median of {args.runs} [min-max]):")
    print(f"  zygote without the runtime list: {spread(without)}")
    print(f"  zygote with the runtime list:    {spread(with_set)}")
    print(f"  with / without:                  {statistics.median(with_set) / statistics.median(without):.3f}")
    print(f"the zygote's import of the list ({len(modules)} modules): {spread(runtime)} CPU ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
