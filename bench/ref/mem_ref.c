/* mem_ref: what holding the memory scenario's slots costs a C program.
 *
 *   mem_ref PID ADDR WATCHES
 * PTRACE_SEIZEs every thread of PID and opens WATCHES (<= 4) counting breakpoint events
 * per thread (ADDR, ADDR+8, ...): the physical slots the daemon holds when 100 clients put
 * the same 4 watches on a 100-thread program.  Prints "ready"; on a line from stdin prints
 * "rss_kb R events E" (its own VmRSS) and exits; the kernel detaches the threads.
 */
#include "common.h"
#include <sys/ptrace.h>

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: mem_ref PID ADDR WATCHES\n");
		return 2;
	}
	pid_t pid = (pid_t)atoi(argv[1]);
	uint64_t addr = parse_u64(argv[2]);
	int watches = atoi(argv[3]);
	pid_t *tids;
	int n = list_tids(pid, &tids), events = 0;
	for (int i = 0; i < n; i++) {
		if (ptrace(PTRACE_SEIZE, tids[i], 0, (void *)(long)PTRACE_O_TRACECLONE) < 0)
			die("PTRACE_SEIZE");
		for (int k = 0; k < watches; k++) {
			struct perf_event_attr attr;
			bp_attr(&attr, addr + 8u * (unsigned)k, HW_BREAKPOINT_LEN_8);
			if (perf_open(&attr, tids[i]) < 0)
				die("perf_event_open");
			events++;
		}
	}
	printf("ready\n");
	fflush(stdout);
	char buf[64];
	(void)!fgets(buf, sizeof(buf), stdin);
	printf("rss_kb %ld events %d\n", self_rss_kb(), events);
	fflush(stdout);
	return 0;
}
