"""A/B: daemon CPU per watch+remove pair, compiled vs HWBKPT_PURE=1, alternating."""
import os, subprocess, sys, time, statistics
import hwbkpt

WT = "/work/wt-mypyc"
N = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
d = "/tmp/mypyc-work/abrpc"
procs = []

def ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

try:
    daemons = {}
    for kind, pure in (("compiled", "0"), ("pure", "1")):
        sock = f"{d}/{kind}.sock"
        if os.path.exists(sock):
            os.unlink(sock)
        env = dict(os.environ, HWBKPT_PURE=pure)
        p = subprocess.Popen([f"{WT}/.venv/bin/python", "-m", "hwbkptd._main", "--socket", sock,
                              "--log-level", "warning"], env=env, cwd=WT)
        procs.append(p)
        t = subprocess.Popen(["sleep", "600"]); procs.append(t)
        daemons[kind] = (p, sock, t.pid)
    deadline = time.monotonic() + 60
    clients = {}
    for kind, (p, sock, tpid) in daemons.items():
        while True:
            try:
                c = hwbkpt.Client(socket=sock); break
            except Exception:
                if time.monotonic() > deadline: raise
                time.sleep(0.2)
        c.watch(tpid, 0x10000 + 24, length=8, access="w", mode="count", tid=tpid)  # anchor
        clients[kind] = c
        st = c.status()
        print(kind, {k: v for k, v in st.items() if k in ("fastpath", "compiled")}, flush=True)
    spies = []
    if os.environ.get("SPY"):
        for kind, (p, sock, tpid) in daemons.items():
            spies.append(subprocess.Popen(["/tmp/spy/bin/py-spy", "record", "--native", "-r", "400",
                "--format", "raw", "-o", f"{d}/spy-{kind}.txt", "-p", str(p.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(2)
    res = {k: [] for k in daemons}
    for r in range(ROUNDS):
        for kind, (p, sock, tpid) in daemons.items():
            c = clients[kind]
            t0 = ticks(p.pid)
            w0 = time.perf_counter()
            for _ in range(N):
                w = c.watch(tpid, 0x10000, length=8, access="w", mode="count", tid=tpid)
                w.remove()
            wall = time.perf_counter() - w0
            us = (ticks(p.pid) - t0) / os.sysconf("SC_CLK_TCK") * 1e6 / N
            res[kind].append(us)
            print(f"round {r} {kind}: daemon CPU/pair {us:.1f} us, wall/pair {wall/N*1e6:.1f} us, load {os.getloadavg()[0]:.1f}", flush=True)
    for s_ in spies:
        s_.send_signal(2); s_.wait(30)
    for kind, v in res.items():
        print(kind, "median", round(statistics.median(v), 1), "min", round(min(v), 1), "max", round(max(v), 1))
    ratios = [a / b for a, b in zip(res["compiled"], res["pure"])]
    print("compiled/pure per round:", [round(x, 2) for x in ratios], "median", round(statistics.median(ratios), 3))
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        try: p.wait(10)
        except Exception: p.kill()
