/* threads_ref: the C reference of a process-scope watch on a many-threaded program.
 *
 *   threads_ref PID ADDR REPS
 * REPS times: install = PTRACE_SEIZE every thread (PTRACE_O_TRACECLONE, so later threads
 * are caught) and open one counting breakpoint event on each; remove = close every event,
 * PTRACE_INTERRUPT every thread, wait for its stop and PTRACE_DETACH it.  Prints
 * "install_ns med min max", "remove_ns med min max" and "threads T".  Then installs once
 * more, prints "ready" and serves new threads as the daemon does (DESIGN.md §4): at the
 * new thread's first stop open its event, then let it run.  When the target exits it
 * prints "new_threads N new_thread_hits H".
 */
#include "common.h"
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/wait.h>

#define MAXT 65536
static int fds[MAXT];  /* indexed by slot; tids kept alongside */
static pid_t tids_of[MAXT];
static int nslots;

static struct perf_event_attr attr;

static int install(pid_t pid)
{
	pid_t *tids;
	int n = list_tids(pid, &tids);
	for (int i = 0; i < n; i++) {
		if (ptrace(PTRACE_SEIZE, tids[i], 0, (void *)(long)PTRACE_O_TRACECLONE) < 0)
			die("PTRACE_SEIZE");
		fds[i] = perf_open(&attr, tids[i]);
		if (fds[i] < 0)
			die("perf_event_open");
		tids_of[i] = tids[i];
	}
	nslots = n;
	free(tids);
	return n;
}

static void removeall(void)
{
	for (int i = 0; i < nslots; i++)
		close(fds[i]);
	for (int i = 0; i < nslots; i++)
		if (ptrace(PTRACE_INTERRUPT, tids_of[i], 0, 0) < 0)
			die("PTRACE_INTERRUPT");
	for (int i = 0; i < nslots; i++) {
		int st;
		for (;;) {
			if (waitpid(tids_of[i], &st, __WALL) < 0)
				die("waitpid");
			if (WIFSTOPPED(st) && (st >> 16) == PTRACE_EVENT_STOP)
				break;
			/* a signal raced the interrupt: pass it on and wait again */
			if (WIFSTOPPED(st))
				ptrace(PTRACE_CONT, tids_of[i], 0, (void *)(long)WSTOPSIG(st));
		}
		if (ptrace(PTRACE_DETACH, tids_of[i], 0, 0) < 0)
			die("PTRACE_DETACH");
	}
	nslots = 0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: threads_ref PID ADDR REPS\n");
		return 2;
	}
	pid_t pid = (pid_t)atoi(argv[1]);
	int reps = atoi(argv[3]);
	bp_attr(&attr, parse_u64(argv[2]), HW_BREAKPOINT_LEN_8);
	uint64_t *ins = calloc((size_t)reps, 8), *rem = calloc((size_t)reps, 8);
	int n = 0;
	for (int r = 0; r < reps; r++) {
		uint64_t t0 = now_ns();
		n = install(pid);
		uint64_t t1 = now_ns();
		removeall();
		uint64_t t2 = now_ns();
		ins[r] = t1 - t0;
		rem[r] = t2 - t1;
	}
	print_stats("install_ns", ins, reps);
	print_stats("remove_ns", rem, reps);
	printf("threads %d\n", n);
	install(pid);
	printf("ready\n");
	fflush(stdout);

	uint64_t new_threads = 0, hits = 0;
	for (;;) {
		int st;
		pid_t w = waitpid(-1, &st, __WALL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECHILD)
				break;
			die("waitpid");
		}
		if (WIFEXITED(st) || WIFSIGNALED(st)) {
			for (int i = 0; i < nslots; i++)
				if (tids_of[i] == w && fds[i] >= 0) {
					uint64_t c = 0;
					if (read(fds[i], &c, sizeof(c)) == sizeof(c) && i >= 0)
						hits += c;
					close(fds[i]);
					fds[i] = -1;
				}
			if (w == pid)
				break;
			continue;
		}
		if (!WIFSTOPPED(st))
			continue;
		int sig = WSTOPSIG(st), event = st >> 16;
		if (event == PTRACE_EVENT_CLONE) {
			ptrace(PTRACE_CONT, w, 0, 0);
		} else if (event == PTRACE_EVENT_STOP) {
			int known = 0;
			for (int i = 0; i < nslots && !known; i++)
				known = tids_of[i] == w && fds[i] >= 0;
			if (!known && nslots < MAXT) {
				/* a new thread's first stop: install before it runs */
				tids_of[nslots] = w;
				fds[nslots] = perf_open(&attr, w);
				if (fds[nslots] < 0)
					die("perf_event_open new thread");
				nslots++;
				new_threads++;
			}
			if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
				ptrace(PTRACE_LISTEN, w, 0, 0);
			else
				ptrace(PTRACE_CONT, w, 0, 0);
		} else {
			ptrace(PTRACE_CONT, w, 0, (void *)(long)sig);
		}
	}
	printf("new_threads %" PRIu64 " new_thread_hits %" PRIu64 "\n", new_threads, hits);
	fflush(stdout);
	return 0;
}
