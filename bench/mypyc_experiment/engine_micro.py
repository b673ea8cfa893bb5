"""Engine-only A/B (no I/O): watch+unwatch pairs on the fake kernel, in this process.
Run once with HWBKPT_PURE=1 and once without; prints CPU per pair (min of 5 batches)."""
import os, sys, time
sys.path.insert(0, "/work/wt-mypyc")
from tests.fakes import Harness
from hwbkptd._model import Access, Mode, Spec
import hwbkptd._engine as E
from hwbkpt_proto import Connection, Request
h = Harness(park=False)
h.k = h.kernel
tids = h.kernel.spawn(4242, 32)
h.engine.add_client(1)
anchor = h.engine.watch(1, 4242, Spec(0x10018, 8, Access.WRITE), Mode.COUNT, tid=4242)
h.settle()
spec = Spec(0x10000, 8, Access.WRITE)
class NullPort:
    # the kernel calls of a watch+unwatch pair, at no cost: the engine's own work only
    def __init__(self, real): self.real = real; self.n = 0
    def open_slot(self, tid, spec, mode, token, flt=None): self.n += 1; return self.n
    def close_slot(self, handle): pass
    def read_count(self, handle): return 0
    def __getattr__(self, name): return getattr(self.real, name)
h.engine._port = NullPort(h.kernel)
N = 5000
best = []
for _ in range(5):
    t0 = time.thread_time_ns()
    for i in range(N):
        w = h.engine.watch(1, 4242, spec, Mode.COUNT, tid=tids[i % 32])
        h.engine.unwatch(1, w.id)
    best.append((time.thread_time_ns() - t0) / N / 1e3)
    h.emitted.clear()
# protocol: decode a watch request and encode its answer
import msgpack
req = msgpack.packb([0, 7, "watch", [{"pid": 4242, "addr": 0x10000, "len": 8, "access": "w", "mode": "count", "tid": 4243}]])
conn = Connection()
pbest = []
for _ in range(5):
    t0 = time.thread_time_ns()
    for i in range(N):
        conn.receive_data(req)
        m = conn.next_message()
        conn.send_result(m.msgid, {"wid": 5, "state": "installed"}) if hasattr(conn, "send_result") else None
        conn.data_to_send() if hasattr(conn, "data_to_send") else None
    pbest.append((time.thread_time_ns() - t0) / N / 1e3)
print(f"{'pure' if os.environ.get('HWBKPT_PURE') == '1' else 'compiled'} ({E.__file__.rsplit('/',1)[1]}): "
      f"engine watch+unwatch {min(best):.2f} us/pair (batches {[round(b,1) for b in best]}); "
      f"proto decode+answer {min(pbest):.2f} us/msg")
