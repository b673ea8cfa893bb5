/* sigtrap K: install a SIGTRAP handler that counts; after the gate execute K `int3`s, K
 * `int1`s (icebp, byte 0xF1) and K raise(SIGTRAP)s, writing `var` before each; print
 * `done handled=<count>`. */
#include "common.h"
#include <signal.h>

volatile long var;
static volatile sig_atomic_t handled;

static void on_trap(int sig) { (void)sig; handled++; }

int main(int argc, char **argv)
{
	long k = argc > 1 ? atol(argv[1]) : 1;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_trap;
	sigaction(SIGTRAP, &sa, NULL);
	printf("addr=%p pid=%d\n", (void *)&var, getpid());
	fflush(stdout);
	gate();
	for (long i = 0; i < k; i++) {
		var = i;
		__asm__ volatile("int3");
	}
	for (long i = 0; i < k; i++) {
		var = i;
		__asm__ volatile(".byte 0xf1"); /* int1: TRAP_BRKPT, si_addr after it */
	}
	for (long i = 0; i < k; i++) {
		var = i;
		raise(SIGTRAP);
	}
	printf("done handled=%d\n", (int)handled);
	fflush(stdout);
	return 0;
}
