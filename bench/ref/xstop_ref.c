/* xstop_ref: what a breakpoint stop costs with a hardware execute slot and with a uprobe.
 *
 *   xstop_ref KIND N      KIND = none | hw | uprobe
 * Forks a child that calls a small function N times, timing the loop with clock_gettime.
 * The parent PTRACE_SEIZEs the child and puts on the function's first instruction
 *   hw      a PERF_TYPE_BREAKPOINT execute event (bp_len 8), sigtrap=1: the stop comes
 *           before the instruction, EFLAGS.RF lets it run once continued;
 *   uprobe  an event of the `uprobe` PMU (config1 = /proc/CHILD/exe, config2 = the file
 *           offset from /proc/CHILD/maps), sample_period 1, sigtrap=1: the kernel puts an
 *           int3 in the child's copy of the page and steps the instruction out of line;
 *           the stop comes after it (HACKING.md, uprobes);
 *   none    nothing: the baseline.
 * At each SIGTRAP stop it does what the daemon does (PTRACE_GETSIGINFO, read the counter,
 * PTRACE_GETREGS) and PTRACE_CONTs with the signal suppressed. Prints
 * "ns_per_call X stops S count C"; per-stop cost = X(kind) - X(none).
 */
#include "common.h"
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>

#ifndef TRAP_PERF
#define TRAP_PERF 6
#endif
#define COOKIE 0x7570ull

volatile long sink;

__attribute__((noinline)) void probed(long i)
{
	sink = i;
}

static long file_offset(pid_t pid, unsigned long addr)
{
	char path[64], line[512];
	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		die("open maps");
	long off = -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi, pgoff;
		if (sscanf(line, "%lx-%lx %*s %lx", &lo, &hi, &pgoff) == 3 && lo <= addr && addr < hi) {
			off = (long)(pgoff + addr - lo);
			break;
		}
	}
	fclose(f);
	return off;
}

static int open_event(const char *kind, pid_t pid, unsigned long addr, char *exe)
{
	struct perf_event_attr a;
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.sample_period = 1;
	a.sigtrap = 1;
	a.remove_on_exec = 1;
	a.sig_data = COOKIE;
	if (!strcmp(kind, "hw")) {
		a.type = PERF_TYPE_BREAKPOINT;
		a.bp_type = HW_BREAKPOINT_X;
		a.bp_addr = addr;
		a.bp_len = sizeof(long);
		a.exclude_kernel = 1;
		a.exclude_hv = 1;
	} else {
		FILE *t = fopen("/sys/bus/event_source/devices/uprobe/type", "r");
		int type;
		if (!t || fscanf(t, "%d", &type) != 1)
			die("uprobe PMU");
		fclose(t);
		long off = file_offset(pid, addr);
		if (off < 0)
			die("file offset of the probed function");
		snprintf(exe, 64, "/proc/%d/exe", (int)pid);
		a.type = (uint32_t)type;
		a.config1 = (uint64_t)(uintptr_t)exe; /* uprobe_path */
		a.config2 = (uint64_t)off;            /* probe_offset */
	}
	int fd = perf_open(&a, pid);
	if (fd < 0)
		die("perf_event_open");
	return fd;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: xstop_ref none|hw|uprobe N\n");
		return 2;
	}
	const char *kind = argv[1];
	long n = atol(argv[2]);
	int gate[2], result[2];
	if (pipe(gate) || pipe(result))
		die("pipe");
	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		char c;
		if (read(gate[0], &c, 1) != 1)
			_exit(1);
		uint64_t t0 = now_ns();
		for (long i = 0; i < n; i++)
			probed(i);
		double ns = (double)(now_ns() - t0) / (double)n;
		if (write(result[1], &ns, sizeof(ns)) != sizeof(ns))
			_exit(1);
		_exit(0);
	}
	char exe[64];
	int fd = -1;
	if (ptrace(PTRACE_SEIZE, child, 0, 0))
		die("PTRACE_SEIZE");
	if (strcmp(kind, "none"))
		fd = open_event(kind, child, (unsigned long)&probed, exe);
	if (write(gate[1], "g", 1) != 1)
		die("gate");
	long stops = 0;
	for (;;) {
		int status;
		if (waitpid(child, &status, __WALL) < 0)
			die("waitpid");
		if (WIFEXITED(status) || WIFSIGNALED(status))
			break;
		int sig = WIFSTOPPED(status) ? WSTOPSIG(status) : 0;
		if (sig == SIGTRAP && (status >> 16) == 0) {
			siginfo_t si;
			struct user_regs_struct regs;
			uint64_t count;
			if (ptrace(PTRACE_GETSIGINFO, child, 0, &si))
				die("GETSIGINFO");
			if (si.si_code == TRAP_PERF) {
				if (fd >= 0 && read(fd, &count, sizeof(count)) != sizeof(count))
					die("read counter");
				if (ptrace(PTRACE_GETREGS, child, 0, &regs))
					die("GETREGS");
				stops++;
				sig = 0;
			}
		}
		ptrace(PTRACE_CONT, child, 0, (void *)(long)sig);
	}
	uint64_t count = 0;
	if (fd >= 0 && read(fd, &count, sizeof(count)) != sizeof(count))
		die("read counter");
	double ns;
	if (read(result[0], &ns, sizeof(ns)) != sizeof(ns))
		die("child result");
	printf("ns_per_call %.3f stops %ld count %" PRIu64 "\n", ns, stops, count);
	return 0;
}
