/* target: the program whose watched variable is written N times.
 *
 *   target N
 * prints "pid P addr 0xA", waits for a line on stdin (the gate), writes the variable N
 * times timing the whole loop with clock_gettime, prints "ns_per_write X", then waits for
 * another line (or EOF) so watchers can read their counters while it is still alive, and
 * exits 0.  Run with no watch it gives the baseline; per-hit cost = with - without.
 */
#include "common.h"

volatile uint64_t watched __attribute__((aligned(64)));

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: target N\n");
		return 2;
	}
	long n = atol(argv[1]);
	char buf[64];
	printf("pid %d addr 0x%lx\n", (int)getpid(), (unsigned long)&watched);
	fflush(stdout);
	if (!fgets(buf, sizeof(buf), stdin))
		return 1;
	uint64_t t0 = now_ns();
	for (long i = 0; i < n; i++)
		watched = (uint64_t)i;
	uint64_t t1 = now_ns();
	printf("ns_per_write %.3f\n", (double)(t1 - t0) / (double)n);
	fflush(stdout);
	(void)!fgets(buf, sizeof(buf), stdin);
	return 0;
}
