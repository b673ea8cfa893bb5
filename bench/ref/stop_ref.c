/* stop_ref: the C reference of `watch(..., mode="stop")` with clients that resume.
 *
 *   stop_ref MODE PID ADDR        MODE = noclient | client | client2 | pyclient | pyclient2
 * PTRACE_SEIZEs thread PID, opens a breakpoint event with sigtrap=1 (remove_on_exec, a
 * sig_data cookie) and prints "ready".  At each signal-delivery-stop with SIGTRAP and
 * si_code TRAP_PERF it does what the daemon does: PTRACE_GETSIGINFO, read the counter,
 * PTRACE_GETREGS; then
 *   noclient  PTRACE_CONT at once (signal suppressed);
 *   client    sends the stop (tid, count, cookie, regs) over a Unix socket to a separate
 *             client process and PTRACE_CONTs when it answers;
 *   client2   sends it to two client processes and continues when both have answered
 *             (DESIGN.md §5.3: a thread stays stopped while any engine holds it);
 *   pyclient, pyclient2  as client and client2, but each client is the cheapest Python
 *             process that can answer: `$STOP_REF_PYTHON -m bench._floor client 3`, a
 *             blocking read of the message and a write of the resume, no decoding, no
 *             library.  This tracer with those clients is the least any daemon serving
 *             Python clients can cost (bench/README.md, "stop, the floor of the goals").
 * Any other signal is delivered unchanged.  When the target exits it prints
 * "stops S count C" and exits.
 */
#include "common.h"
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/user.h>
#include <sys/wait.h>

#ifndef TRAP_PERF
#define TRAP_PERF 6
#endif
#define COOKIE 0xb0b5ull

struct stop_msg {
	int32_t tid;
	int32_t pad;
	uint64_t count;
	uint64_t cookie;
	struct user_regs_struct regs;
};

static void client_loop(int s)
{
	struct stop_msg m;
	for (;;) {
		size_t got = 0;
		while (got < sizeof(m)) {
			ssize_t r = read(s, (char *)&m + got, sizeof(m) - got);
			if (r <= 0)
				_exit(0);
			got += (size_t)r;
		}
		int32_t resume = m.tid; /* "resume(tid)" */
		if (write(s, &resume, sizeof(resume)) != sizeof(resume))
			_exit(1);
	}
}

/* The child of a py* mode: the bare Python client on fd 3; it writes one byte once it has
 * started, so that the interpreter's start-up is not timed. */
static void exec_python_client(int s)
{
	const char *py = getenv("STOP_REF_PYTHON");
	if (py == NULL)
		die("pyclient modes need STOP_REF_PYTHON (the Python that runs bench._floor)");
	if (dup2(s, 3) < 0) /* dup2 clears close-on-exec */
		die("dup2");
	execl(py, py, "-m", "bench._floor", "client", "3", (char *)NULL);
	die("exec STOP_REF_PYTHON");
}

static void read_full(int s, void *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(s, (char *)buf + got, n - got);
		if (r <= 0)
			die("read from client");
		got += (size_t)r;
	}
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: stop_ref noclient|client|client2|pyclient|pyclient2 PID ADDR\n");
		return 2;
	}
	const char *mode = argv[1];
	int python = !strncmp(mode, "py", 2);
	if (python)
		mode += 2;
	int nclients = !strcmp(mode, "noclient") && !python ? 0 : !strcmp(mode, "client") ? 1
		     : !strcmp(mode, "client2") ? 2 : -1;
	if (nclients < 0) {
		fprintf(stderr, "bad mode %s\n", argv[1]);
		return 2;
	}
	pid_t pid = (pid_t)atoi(argv[2]);
	int socks[2];
	pid_t kids[2];
	for (int i = 0; i < nclients; i++) {
		int sv[2];
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
			die("socketpair");
		kids[i] = fork();
		if (kids[i] < 0)
			die("fork");
		if (kids[i] == 0) {
			close(sv[0]);
			for (int j = 0; j < i; j++)
				close(socks[j]);
			if (python)
				exec_python_client(sv[1]);
			client_loop(sv[1]);
		}
		close(sv[1]);
		socks[i] = sv[0];
		if (python) {
			char started;
			read_full(socks[i], &started, 1);
		}
	}
	/* EXITKILL: if this tracer dies the target dies too, never left stopped */
	if (ptrace(PTRACE_SEIZE, pid, 0, (void *)(long)PTRACE_O_EXITKILL) < 0)
		die("PTRACE_SEIZE");
	struct perf_event_attr attr;
	bp_attr(&attr, parse_u64(argv[3]), HW_BREAKPOINT_LEN_8);
	attr.sample_period = 1;
	attr.sigtrap = 1;
	attr.remove_on_exec = 1; /* the kernel requires it with sigtrap */
	attr.sig_data = COOKIE;
	int fd = perf_open(&attr, pid);
	if (fd < 0)
		die("perf_event_open sigtrap");
	printf("ready\n");
	fflush(stdout);

	uint64_t stops = 0, count = 0;
	for (;;) {
		int st;
		pid_t w = waitpid(pid, &st, __WALL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die("waitpid");
		}
		if (WIFEXITED(st) || WIFSIGNALED(st))
			break;
		if (!WIFSTOPPED(st))
			continue;
		int sig = WSTOPSIG(st);
		int event = st >> 16;
		if (event == PTRACE_EVENT_STOP) {
			/* group-stop under SEIZE: behave as if untraced */
			if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
				ptrace(PTRACE_LISTEN, pid, 0, 0);
			else
				ptrace(PTRACE_CONT, pid, 0, 0);
			continue;
		}
		int deliver = sig;
		if (sig == SIGTRAP) {
			siginfo_t si;
			if (ptrace(PTRACE_GETSIGINFO, pid, 0, &si) < 0)
				die("PTRACE_GETSIGINFO");
			if (si.si_code == TRAP_PERF) {
				struct stop_msg m;
				memset(&m, 0, sizeof(m));
				if (read(fd, &count, sizeof(count)) != sizeof(count))
					die("read counter");
				if (ptrace(PTRACE_GETREGS, pid, 0, &m.regs) < 0)
					die("PTRACE_GETREGS");
				stops++;
				m.tid = pid;
				m.count = count;
				m.cookie = COOKIE;
				for (int i = 0; i < nclients; i++)
					if (write(socks[i], &m, sizeof(m)) != sizeof(m))
						die("write to client");
				for (int i = 0; i < nclients; i++) {
					int32_t resume;
					read_full(socks[i], &resume, sizeof(resume));
				}
				deliver = 0; /* ours: suppress */
			}
		}
		if (ptrace(PTRACE_CONT, pid, 0, (void *)(long)deliver) < 0)
			die("PTRACE_CONT");
	}
	for (int i = 0; i < nclients; i++)
		close(socks[i]);
	for (int i = 0; i < nclients; i++)
		waitpid(kids[i], NULL, 0);
	printf("stops %" PRIu64 " count %" PRIu64 "\n", stops, count);
	fflush(stdout);
	return 0;
}
