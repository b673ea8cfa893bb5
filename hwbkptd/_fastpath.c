/* The compiled stop round of hwbkptd (issue 13): hwbkptd._fastpath.
 *
 * Theory of operation
 * -------------------
 * A client in a stop-mode hit loop costs the daemon one round per hit: SIGCHLD, waitpid,
 * PTRACE_GETSIGINFO, the thread's slot counters, PTRACE_GETREGS, a `stop` event written
 * to every client that holds a stop watch on the slot that advanced, each client's
 * `resume`, and PTRACE_CONT once nobody holds the thread. In Python that round is
 * ~100-300 us of CPU, most of it interpreter; here it is the system calls alone.
 *
 * This file decides nothing. The engine (hwbkptd/_prepared.py) prepares a table before
 * each call of run(): for every thread whose next SIGTRAP stop is plain (running, nothing
 * pending: no step, interrupt, reopen, detach, parking, filter or raw debug register) the
 * slots' event fds with their last counter values and, per slot, the (client, watch) pairs
 * of its stop watches; for every thread stopped and held in the plain way, its holders;
 * and the clients whose connection may be written and read directly (protocol 2, nothing
 * queued, nothing half-parsed). run() executes those decisions and reports what it did:
 * the new counter values, the threads stopped or resumed and their holders, the stop
 * events sent and resumes taken per client. Anything else - a status of another kind, a
 * SIGTRAP that is not one of our TRAP_PERF tokens, a slot that advanced and is not a plain
 * stop slot, a client message that is not a v2 `resume` of a thread it holds here, a
 * socket that did not take a whole stop event, a notify ring, a socket of another client -
 * ends the call and is handed back to the Python engine unchanged (the status, the unread
 * bytes, the unsent bytes, the ready fd), after the engine has applied the report.
 *
 * Every ptrace request is made by the calling thread, which is the tracer thread (the trio
 * main thread that seized): the kernel's ptrace_check_attach refuses any other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 256
#define MAX_SLOTS 4     /* a thread has four debug registers */
#define MAX_STOPS 32    /* stop watches on one slot */
#define MAX_CLIENTS 64
#define NREGS 27        /* struct user_regs_struct, arch/x86/include/asm/user_64.h */
#define RECV_SIZE 65536
/* include/uapi/asm-generic/siginfo.h */
#define TRAP_PERF_CODE 6
/* hwbkptd/_records.py: TOKEN_MAGIC / TOKEN_MASK */
#define TOKEN_MAGIC (0x68776270ULL << 32)
#define TOKEN_MASK (0xFFFFFFFFULL << 32)

typedef struct {
    long cid;
    long wid;
} stop_t;

typedef struct {
    int fd;
    int ok;          /* an advance of this slot may be served here */
    uint64_t last;   /* counter value as the engine last credited it */
    int nstops;
    stop_t stops[MAX_STOPS];
} slot_t;

typedef struct {
    long tid;
    long pid;
    int trap_ok;     /* its next SIGTRAP stop may be served here */
    int stopped;     /* held (by the engine before the call, or by this call) */
    int changed;
    int nslots;
    slot_t slots[MAX_SLOTS];
    int nholds;
    long holds[MAX_CLIENTS];
} thread_t;

typedef struct {
    long cid;
    int fd;
    int blocked;     /* its socket did not take a whole stop: write nothing more here */
    long resumes;
    long sent;
    PyObject *unsent;  /* bytes of a stop event the socket did not take */
    PyObject *unread;  /* bytes read that are not for this file */
} client_t;

typedef struct {
    int nthreads;
    thread_t threads[MAX_THREADS];
    int nclients;
    client_t clients[MAX_CLIENTS];
    long stops;
    long traps;
    long rounds;
    PyObject *handed;  /* list of (tid, status) */
    int ready_fd;      /* a ready fd left to the engine, or -1 */
    const char *why;
} state_t;

static state_t S;  /* one tracer per daemon; run() is not reentrant (GIL held throughout) */

static thread_t *find_thread(long tid) {
    for (int i = 0; i < S.nthreads; i++)
        if (S.threads[i].tid == tid) return &S.threads[i];
    return NULL;
}

static client_t *find_client_cid(long cid) {
    for (int i = 0; i < S.nclients; i++)
        if (S.clients[i].cid == cid) return &S.clients[i];
    return NULL;
}

static client_t *find_client_fd(int fd) {
    for (int i = 0; i < S.nclients; i++)
        if (S.clients[i].fd == fd) return &S.clients[i];
    return NULL;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* --- parsing the table ------------------------------------------------------------- */

static int parse_tables(PyObject *threads, PyObject *clients) {
    PyObject *tseq = PySequence_Fast(threads, "threads must be a sequence");
    if (!tseq) return -1;
    Py_ssize_t nt = PySequence_Fast_GET_SIZE(tseq);
    if (nt > MAX_THREADS) nt = MAX_THREADS;  /* the rest is the engine's: not in the table */
    S.nthreads = 0;
    for (Py_ssize_t i = 0; i < nt; i++) {
        thread_t *t = &S.threads[S.nthreads];
        PyObject *holds, *slots;
        int trap_ok;
        memset(t, 0, sizeof(*t));
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(tseq, i), "llOOp", &t->tid, &t->pid,
                              &holds, &slots, &trap_ok)) goto fail;
        t->trap_ok = trap_ok;
        PyObject *hseq = PySequence_Fast(holds, "holds must be a sequence");
        if (!hseq) goto fail;
        Py_ssize_t nh = PySequence_Fast_GET_SIZE(hseq);
        if (nh > MAX_CLIENTS) { Py_DECREF(hseq); continue; }
        for (Py_ssize_t h = 0; h < nh; h++)
            t->holds[h] = PyLong_AsLong(PySequence_Fast_GET_ITEM(hseq, h));
        Py_DECREF(hseq);
        t->nholds = (int)nh;
        t->stopped = nh > 0;
        PyObject *sseq = PySequence_Fast(slots, "slots must be a sequence");
        if (!sseq) goto fail;
        Py_ssize_t ns = PySequence_Fast_GET_SIZE(sseq);
        int skip = ns > MAX_SLOTS;
        for (Py_ssize_t s = 0; s < ns && !skip; s++) {
            slot_t *sl = &t->slots[s];
            PyObject *stops;
            unsigned long long last;
            int ok;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sseq, s), "iKOp", &sl->fd, &last,
                                  &stops, &ok)) { Py_DECREF(sseq); goto fail; }
            sl->last = last;
            sl->ok = ok;
            PyObject *wseq = PySequence_Fast(stops, "stops must be a sequence");
            if (!wseq) { Py_DECREF(sseq); goto fail; }
            Py_ssize_t nw = PySequence_Fast_GET_SIZE(wseq);
            if (nw > MAX_STOPS) { sl->ok = 0; nw = 0; }
            for (Py_ssize_t w = 0; w < nw; w++) {
                if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(wseq, w), "ll",
                                      &sl->stops[w].cid, &sl->stops[w].wid)) {
                    Py_DECREF(wseq); Py_DECREF(sseq); goto fail;
                }
            }
            sl->nstops = (int)nw;
            Py_DECREF(wseq);
        }
        Py_DECREF(sseq);
        if (skip) continue;
        t->nslots = (int)ns;
        if (PyErr_Occurred()) goto fail;
        S.nthreads++;
    }
    Py_DECREF(tseq);

    PyObject *cseq = PySequence_Fast(clients, "clients must be a sequence");
    if (!cseq) return -1;
    Py_ssize_t nc = PySequence_Fast_GET_SIZE(cseq);
    if (nc > MAX_CLIENTS) nc = MAX_CLIENTS;
    S.nclients = 0;
    for (Py_ssize_t i = 0; i < nc; i++) {
        client_t *c = &S.clients[S.nclients];
        memset(c, 0, sizeof(*c));
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(cseq, i), "li", &c->cid, &c->fd)) {
            Py_DECREF(cseq);
            return -1;
        }
        S.nclients++;
    }
    Py_DECREF(cseq);
    return 0;
fail:
    Py_DECREF(tseq);
    return -1;
}

/* --- encoding a v2 stop event (proto/PROTOCOL.md: [2, "stop", [pid, tid, watches,
 * reason, regs]], trailing absent fields left out; msgpack's smallest int forms, as
 * msgpack-python writes them) ---------------------------------------------------------- */

static size_t put_uint(uint8_t *p, uint64_t v) {
    if (v < 0x80) { p[0] = (uint8_t)v; return 1; }
    if (v <= 0xff) { p[0] = 0xcc; p[1] = (uint8_t)v; return 2; }
    if (v <= 0xffff) { p[0] = 0xcd; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)v; return 3; }
    if (v <= 0xffffffffULL) {
        p[0] = 0xce;
        for (int i = 0; i < 4; i++) p[1 + i] = (uint8_t)(v >> (24 - 8 * i));
        return 5;
    }
    p[0] = 0xcf;
    for (int i = 0; i < 8; i++) p[1 + i] = (uint8_t)(v >> (56 - 8 * i));
    return 9;
}

static size_t encode_stop(uint8_t *p, long pid, long tid, const long *wids, int nw,
                          const uint64_t *regs) {
    size_t n = 0;
    static const uint8_t head[] = {0x93, 0x02, 0xa4, 's', 't', 'o', 'p', 0x95};
    memcpy(p, head, sizeof head);
    n += sizeof head;
    n += put_uint(p + n, (uint64_t)pid);
    n += put_uint(p + n, (uint64_t)tid);
    if (nw < 16) {
        p[n++] = (uint8_t)(0x90 | nw);
    } else {
        p[n++] = 0xdc; p[n++] = (uint8_t)(nw >> 8); p[n++] = (uint8_t)nw;
    }
    for (int i = 0; i < nw; i++) n += put_uint(p + n, (uint64_t)wids[i]);
    static const uint8_t reason[] = {0xa5, 'w', 'a', 't', 'c', 'h', 0xc4, NREGS * 8};
    memcpy(p + n, reason, sizeof reason);
    n += sizeof reason;
    memcpy(p + n, regs, NREGS * 8);  /* x86-64 is little-endian: the wire order as is */
    return n + NREGS * 8;
}

/* --- one SIGTRAP stop ----------------------------------------------------------------- */

/* Returns 1 if served, 0 if it is the engine's (nothing was changed). */
static int serve_trap(thread_t *t) {
    uint8_t si[128];
    if (ptrace(PTRACE_GETSIGINFO, (pid_t)t->tid, 0, si) == -1) return 0;
    int code;
    uint64_t perf_data;
    memcpy(&code, si + 8, sizeof code);         /* si_code */
    memcpy(&perf_data, si + 24, sizeof perf_data);  /* _sigfault._perf._data */
    if (code != TRAP_PERF_CODE || (perf_data & TOKEN_MASK) != TOKEN_MAGIC) return 0;
    /* Route by counter deltas, never by si_perf_data alone: one instruction can fire
     * several events and yield one SIGTRAP (DESIGN.md section 4). */
    uint64_t now[MAX_SLOTS];
    int advanced = 0;
    for (int s = 0; s < t->nslots; s++) {
        uint64_t v;
        if (read(t->slots[s].fd, &v, sizeof v) != (ssize_t)sizeof v) return 0;
        now[s] = v;
        if (v > t->slots[s].last) {
            if (!t->slots[s].ok) return 0;
            advanced++;
        }
    }
    if (!advanced) return 0;
    /* Recipients, in order of first appearance, with their watches. */
    long cids[MAX_CLIENTS];
    long wids[MAX_CLIENTS][MAX_SLOTS * MAX_STOPS];
    int nw[MAX_CLIENTS];
    int nc = 0;
    for (int s = 0; s < t->nslots; s++) {
        if (now[s] <= t->slots[s].last) continue;
        for (int w = 0; w < t->slots[s].nstops; w++) {
            stop_t *st = &t->slots[s].stops[w];
            int k = 0;
            while (k < nc && cids[k] != st->cid) k++;
            if (k == nc) {
                client_t *c = find_client_cid(st->cid);
                if (c == NULL || c->blocked || nc == MAX_CLIENTS) return 0;
                cids[nc] = st->cid;
                nw[nc++] = 0;
            }
            wids[k][nw[k]++] = st->wid;
        }
    }
    if (nc == 0) return 0;  /* only count hits: the engine resumes it (and logs) */
    uint64_t regs[NREGS];
    if (ptrace(PTRACE_GETREGS, (pid_t)t->tid, 0, regs) == -1) return 0;
    /* Decided: from here on this stop is served. */
    for (int s = 0; s < t->nslots; s++)
        if (now[s] > t->slots[s].last) t->slots[s].last = now[s];
    t->stopped = 1;
    t->changed = 1;
    t->nholds = nc;
    memcpy(t->holds, cids, sizeof(long) * (size_t)nc);
    S.stops++;
    S.traps++;
    uint8_t msg[64 + 9 * MAX_SLOTS * MAX_STOPS + NREGS * 8];
    for (int k = 0; k < nc; k++) {
        client_t *c = find_client_cid(cids[k]);
        size_t len = encode_stop(msg, t->pid, t->tid, wids[k], nw[k], regs);
        ssize_t sent = send(c->fd, msg, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent == (ssize_t)len) {
            c->sent++;
            continue;
        }
        if (sent < 0) sent = 0;  /* full (EAGAIN) or broken: the connection's writer finds out */
        c->unsent = PyBytes_FromStringAndSize((const char *)msg + sent, (Py_ssize_t)(len - sent));
        c->blocked = 1;
        S.why = "blocked";
    }
    return 1;
}

/* --- wait statuses ------------------------------------------------------------------- */

/* Drain SIGCHLD and every status; returns 0 to go on, 1 once one was handed back. */
static int serve_waits(int sigfd) {
    uint8_t junk[128 * 16];
    while (read(sigfd, junk, sizeof junk) == (ssize_t)sizeof junk) {
    }
    for (;;) {
        int status;
        pid_t tid = waitpid(-1, &status, WNOHANG | __WALL);
        if (tid <= 0) return 0;
        thread_t *t = find_thread(tid);
        /* A signal-delivery-stop of SIGTRAP: WIFSTOPPED, no PTRACE_EVENT in bits 16-23. */
        int plain = WIFSTOPPED(status) && WSTOPSIG(status) == SIGTRAP && (status >> 16) == 0;
        if (t != NULL && plain && t->trap_ok && !t->stopped && serve_trap(t)) {
            if (S.why != NULL) return 1;  /* a socket did not take its stop */
            continue;
        }
        PyObject *item = Py_BuildValue("(ii)", (int)tid, status);
        if (item == NULL || PyList_Append(S.handed, item) < 0) {
            Py_XDECREF(item);
            return -1;
        }
        Py_DECREF(item);
        S.why = "status";
        return 1;
    }
}

/* --- client messages ----------------------------------------------------------------- */

static void release(thread_t *t, long cid) {
    int k = 0;
    while (k < t->nholds && t->holds[k] != cid) k++;
    t->holds[k] = t->holds[--t->nholds];
    t->changed = 1;
    if (t->nholds == 0) {
        /* Nobody holds it: run on with the SIGTRAP suppressed (signal 0). ESRCH: it died
         * meanwhile (SIGKILL); its exit status follows, as in _stops._resume_now. */
        ptrace(PTRACE_CONT, (pid_t)t->tid, 0, 0);
        t->stopped = 0;
    }
}

static int held_by(thread_t *t, long cid) {
    for (int k = 0; k < t->nholds; k++)
        if (t->holds[k] == cid) return 1;
    return 0;
}

/* Read a client; returns 0 to go on, 1 once something was handed back, -1 on error. */
static int serve_client(client_t *c) {
    static uint8_t buf[RECV_SIZE];
    ssize_t n = read(c->fd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    if (n <= 0) {
        S.ready_fd = c->fd;  /* hung up or failed: read_some finds out again */
        S.why = "hangup";
        return 1;
    }
    static const uint8_t head[] = {0x93, 0x02, 0xa6, 'r', 'e', 's', 'u', 'm', 'e', 0x91};
    ssize_t pos = 0;
    while (pos < n) {
        ssize_t p = pos + (ssize_t)sizeof head;
        if (p >= n || memcmp(buf + pos, head, sizeof head) != 0) break;
        uint64_t tid = 0;
        uint8_t b = buf[p++];
        int len = b < 0x80 ? 0 : b == 0xcc ? 1 : b == 0xcd ? 2 : b == 0xce ? 4 : -1;
        if (len < 0 || p + len > n) break;
        if (len == 0) tid = b;
        for (int i = 0; i < len; i++) tid = (tid << 8) | buf[p++];
        thread_t *t = find_thread((long)tid);
        if (t == NULL || !t->stopped || !held_by(t, c->cid)) break;
        release(t, c->cid);
        c->resumes++;
        pos = p;
    }
    if (pos == n) return 0;
    c->unread = PyBytes_FromStringAndSize((const char *)buf + pos, n - pos);
    if (c->unread == NULL) return -1;
    S.why = "message";
    return 1;
}

/* Whether a thread of the table is stopped and held (by this call or before it). */
static int any_held(void) {
    for (int i = 0; i < S.nthreads; i++)
        if (S.threads[i].stopped) return 1;
    return 0;
}

/* --- run ----------------------------------------------------------------------------- */

static PyObject *report(void) {
    PyObject *threads = PyList_New(0), *clients = PyList_New(0);
    if (!threads || !clients) goto fail;
    for (int i = 0; i < S.nthreads; i++) {
        thread_t *t = &S.threads[i];
        if (!t->changed) continue;
        PyObject *holds = PyTuple_New(t->nholds);
        PyObject *lasts = PyTuple_New(t->nslots);
        if (!holds || !lasts) { Py_XDECREF(holds); Py_XDECREF(lasts); goto fail; }
        for (int k = 0; k < t->nholds; k++)
            PyTuple_SET_ITEM(holds, k, PyLong_FromLong(t->holds[k]));
        for (int s = 0; s < t->nslots; s++)
            PyTuple_SET_ITEM(lasts, s, PyLong_FromUnsignedLongLong(t->slots[s].last));
        PyObject *item = Py_BuildValue("(lNNN)", t->tid, PyBool_FromLong(t->stopped), holds,
                                       lasts);
        if (!item || PyList_Append(threads, item) < 0) { Py_XDECREF(item); goto fail; }
        Py_DECREF(item);
    }
    for (int i = 0; i < S.nclients; i++) {
        client_t *c = &S.clients[i];
        if (!c->resumes && !c->sent && !c->unsent && !c->unread) continue;
        PyObject *item = Py_BuildValue(
            "(lllOO)", c->cid, c->resumes, c->sent, c->unsent ? c->unsent : Py_None,
            c->unread ? c->unread : Py_None);
        Py_CLEAR(c->unsent);
        Py_CLEAR(c->unread);
        if (!item || PyList_Append(clients, item) < 0) { Py_XDECREF(item); goto fail; }
        Py_DECREF(item);
    }
    return Py_BuildValue("(NNNilllz)", S.handed, threads, clients, S.ready_fd, S.stops, S.traps,
                         S.rounds, S.why);
fail:
    Py_XDECREF(threads);
    Py_XDECREF(clients);
    Py_CLEAR(S.handed);
    for (int i = 0; i < S.nclients; i++) {
        Py_CLEAR(S.clients[i].unsent);
        Py_CLEAR(S.clients[i].unread);
    }
    return NULL;
}

PyDoc_STRVAR(run_doc,
"run(threads, clients, epfd, sigfd, wait_ms, budget_ns) -> report\n\n"
"Serve plain stop rounds from the engine's table until something is not plain, nothing\n"
"came within wait_ms (while a thread of the table is held: within the budget), or\n"
"budget_ns passed and no thread of the table is held (at the latest twice budget_ns)\n"
"(hwbkptd/_prepared.py builds the table and applies the report). Raises\n"
"TypeError/ValueError for a malformed table, OSError if epoll_wait fails.");

static PyObject *run(PyObject *self, PyObject *args) {
    PyObject *threads, *clients;
    int epfd, sigfd, wait_ms;
    unsigned long long budget;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOiiiK", &threads, &clients, &epfd, &sigfd, &wait_ms, &budget))
        return NULL;
    if (parse_tables(threads, clients) < 0) return NULL;
    S.stops = S.traps = S.rounds = 0;
    S.ready_fd = -1;
    S.why = NULL;
    S.handed = PyList_New(0);
    if (S.handed == NULL) return NULL;
    /* The budget ends the call at the first moment no thread of the table is held, so
     * that the resume in flight is read here: left to trio it would be read by the
     * connection's task and served by the pure path (~1 % of stops in a hit loop went
     * that way, one per budget). The next stop's SIGCHLD then wakes the tracer's trio
     * task, which calls run() again. A client that never resumes cannot keep trio out
     * longer than twice the budget. */
    uint64_t deadline = now_ns() + budget;
    uint64_t hard = deadline + budget;
    struct epoll_event ev[16];
    while (S.why == NULL) {
        int n;
        int timeout = wait_ms;
        if (wait_ms > 0 && any_held()) {
            /* A thread of the table is held: the next event is a holder's resume, and only
             * the clients know when it comes (one preempted for a few ms by other load is
             * common on a busy machine). Wait for it up to the budget: leaving "idle" after
             * wait_ms would have the resume read by the connection's trio task and served
             * by the pure path, and the next stop woken through trio, each ~100 us of
             * Python against one epoll_wait here. */
            uint64_t now = now_ns();
            int left = now >= hard ? 0 : (int)((hard - now + 999999) / 1000000);
            if (left > timeout) timeout = left;
        }
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(epfd, ev, 16, timeout);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) continue;
            PyErr_SetFromErrno(PyExc_OSError);
            Py_CLEAR(S.handed);
            return NULL;
        }
        if (n == 0) {
            S.why = "idle";
            break;
        }
        for (int i = 0; i < n && S.why == NULL; i++) {
            int fd = ev[i].data.fd;
            int r;
            client_t *c;
            if (fd == sigfd) {
                r = serve_waits(sigfd);
            } else if ((c = find_client_fd(fd)) != NULL && !c->blocked) {
                r = serve_client(c);
            } else {
                S.ready_fd = fd;  /* a ring, another client, a socket we wrote half of */
                S.why = "fd";
                r = 1;
            }
            if (r < 0) {
                Py_CLEAR(S.handed);
                return NULL;
            }
        }
        S.rounds++;
        if (S.why == NULL) {
            uint64_t now = now_ns();
            if (now >= hard || (now >= deadline && !any_held())) S.why = "budget";
        }
    }
    return report();
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hwbkptd._fastpath",
    "The compiled stop round (issue 13); see hwbkptd/_prepared.py.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "MAX_THREADS", MAX_THREADS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_STOPS", MAX_STOPS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_CLIENTS", MAX_CLIENTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
