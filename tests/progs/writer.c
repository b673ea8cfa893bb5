/* writer N [mode]: after the gate, call write_both() N times, which stores the loop index to
 * `var` and then, in the very next instruction, to `var2` (single-step tests rely on that).
 * mode "pair": instead do N 16-byte SSE stores (movdqa) over `pair[0..1]` - one instruction
 * that touches two 8-byte words. mode "gate2": wait on a second gate before exiting. */
#include "common.h"

volatile long var;
volatile long var2;
__attribute__((aligned(16))) volatile long pair[2];

__attribute__((noinline)) void write_both(long i)
{
	var = i;
	var2 = i;
	__asm__ volatile("" ::: "memory");
}

static void store_pair(long i)
{
	__attribute__((aligned(16))) long v[2] = {i, i};
	__asm__ volatile("movdqa (%1), %%xmm0\n\tmovdqa %%xmm0, (%0)"
			 : : "r"(pair), "r"(v) : "xmm0", "memory");
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1;
	const char *mode = argc > 2 ? argv[2] : "";
	printf("addr=%p addr2=%p pair=%p func=%p pid=%d\n", (void *)&var, (void *)&var2,
	       (void *)pair, (void *)write_both, getpid());
	fflush(stdout);
	gate();
	for (long i = 1; i <= n; i++) {
		if (!strcmp(mode, "pair"))
			store_pair(i);
		else
			write_both(i);
	}
	printf("done var=%ld pair0=%ld\n", var, pair[0]);
	fflush(stdout);
	if (!strcmp(mode, "gate2"))
		gate();
	return 0;
}
