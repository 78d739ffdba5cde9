#!/usr/bin/env python3
"""CPU per request of procman's uvicorn workers vs gunicorn + UvicornWorker, interleaved
(see BENCHMARKS.md, "Throughput parity: CPU per request, A/B"). Measurement aid, not part of the suite.

usage: W=workers C=wrk-connections T=wrk-threads [PROF=1] [VENV=bench/.venv] \
       scripts/cpu-per-request.py PROCMAN_BIN ROUNDS SECONDS [procman|preload|gunicorn ...]

Per instance: wait for /pid, 1 s wrk warm-up, then wrk -dSECONDS; the workers' CPU (schedstat, all
threads) over that window divided by the requests wrk counted. PROF=1 also runs a cProfile in each
worker over the window (a sitecustomize on PYTHONPATH, toggled by SIGRTMIN+3) and writes
prof-KIND-PID.out into OUT (default /tmp/cpu-per-request): compare with pstats (calls per request).
"""
import os, re, signal, socket, subprocess, sys, time
W = os.environ.get("W", "1"); C = os.environ.get("C", "16"); T = os.environ.get("T", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = os.path.join(os.environ.get("VENV", os.path.join(ROOT, "bench", ".venv")), "bin")
APPDIR = os.path.join(ROOT, "examples", "fastapi")
OUT = os.environ.get("OUT", "/tmp/cpu-per-request")
os.makedirs(os.path.join(OUT, "site"), exist_ok=True)
with open(os.path.join(OUT, "site", "sitecustomize.py"), "w") as f:
    f.write(f"""import os, signal
if os.environ.get("PARITY_PROF"):
    import cProfile
    _state = {{}}
    def _toggle(signum, frame):
        p = _state.pop("p", None)
        if p is None:
            _state["p"] = cProfile.Profile()
            _state["p"].enable()
        else:
            p.disable()
            p.dump_stats(f"{OUT}/prof-{{os.environ['PARITY_PROF']}}-{{os.getpid()}}.out")
    signal.signal(signal.SIGRTMIN + 3, _toggle)
""")

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def argv(kind, port, procman):
    if kind == "gunicorn":
        return [f"{V}/gunicorn", "app:main", "-k", "uvicorn_worker.UvicornWorker", "-w", W, "-b", f"127.0.0.1:{port}"]
    py = f"{V}/python"
    extra = ["--preload"] if kind == "preload" else []
    return [procman, "app:main", "-w", W, "-b", f"127.0.0.1:{port}", "--no-access-log", "--python", py] + extra

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []

def cpu_ns(pid):
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/schedstat") as f:
            total += int(f.read().split()[0])
    return total

def wrk(port, dur):
    out = subprocess.run(["wrk", f"-t{T}", f"-c{C}", f"-d{dur}s", f"http://127.0.0.1:{port}/pid"],
                         capture_output=True, text=True).stdout
    m = re.search(r"(\d+) requests in", out)
    errs = re.search(r"Non-2xx.*|Socket errors.*", out)
    return int(m.group(1)), (errs.group(0) if errs else "")

def one(kind, procman, dur):
    port = free_port()
    log = open(f"{OUT}/{kind}.log", "w")
    env = dict(os.environ, PYTHONPATH=OUT + '/site', PARITY_PROF=kind) if os.environ.get('PROF') else None
    p = subprocess.Popen(argv(kind, port, procman), cwd=APPDIR, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                import urllib.request
                urllib.request.urlopen(f"http://127.0.0.1:{port}/pid", timeout=2).read()
                break
            except Exception:
                time.sleep(0.2)
        kids = children(p.pid)
        if kind == 'preload':
            kids = [k for k in kids if 'zygote' not in open(f'/proc/{k}/cmdline').read()]
        assert len(kids) == int(W), kids
        wrk(port, 1)  # warm-up
        prof = lambda: [os.kill(k, signal.SIGRTMIN + 3) for k in kids] if env else None
        prof(); time.sleep(0.2)
        c0 = sum(map(cpu_ns, kids)); m0 = cpu_ns(p.pid); import threading; conns = []
        def cnt():
            time.sleep(1.5); conns.extend(sum(1 for fd in os.listdir(f'/proc/{k}/fd') if os.readlink(f'/proc/{k}/fd/{fd}').startswith('socket')) for k in kids)
        th = threading.Thread(target=cnt); th.start()
        n, e = wrk(port, dur); th.join(); c1 = sum(map(cpu_ns, kids)); m1 = cpu_ns(p.pid)
        prof(); time.sleep(1)
        split = [cpu_ns(k) for k in kids]
        return (c1 - c0) / n / 1000, n, f"conns {conns} split {[round(x/1e9,1) for x in split]} master {(m1-m0)/n/1000:.2f} us/req rps {n/dur:.0f} " + e
    finally:
        os.killpg(p.pid, signal.SIGTERM); p.wait()

procman, rounds, dur = os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
kinds = sys.argv[4:] or ["procman", "gunicorn"]
res = {k: [] for k in kinds}
for r in range(rounds):
    for k in kinds:
        us, n, e = one(k, procman, dur)
        res[k].append(us)
        print(f"round {r+1} {k:9s} {us:7.1f} us/req  ({n} req) {e}", flush=True)
for k, v in res.items():
    v2 = sorted(v)
    print(f"{k:9s} median {v2[len(v2)//2]:.1f} us/req  min {v2[0]:.1f}  all {' '.join(f'{x:.1f}' for x in v)}")
