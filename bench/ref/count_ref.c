/* count_ref: the C reference of `watch(pid, addr, 8, "w", mode="count")`.
 *
 *   count_ref PID ADDR
 * opens one counting PERF_TYPE_BREAKPOINT event (8-byte write, user space only) on thread
 * PID, prints "ready", and on a line from stdin prints "count C" (the hits) and exits.
 * The thread never stops: the kernel only counts, so the per-hit cost is the debug
 * exception plus perf's bookkeeping (DESIGN.md §4, ~9 µs on a VM).
 */
#include "common.h"

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: count_ref PID ADDR\n");
		return 2;
	}
	pid_t pid = (pid_t)atoi(argv[1]);
	struct perf_event_attr attr;
	bp_attr(&attr, parse_u64(argv[2]), HW_BREAKPOINT_LEN_8);
	int fd = perf_open(&attr, pid);
	if (fd < 0)
		die("perf_event_open");
	printf("ready\n");
	fflush(stdout);
	char buf[64];
	(void)!fgets(buf, sizeof(buf), stdin);
	uint64_t count = 0;
	if (read(fd, &count, sizeof(count)) != sizeof(count))
		die("read counter");
	printf("count %" PRIu64 "\n", count);
	fflush(stdout);
	return 0;
}
