/* sigtrap K: install a SIGTRAP handler that counts; after the gate execute K `int3`s, K
 * `int1`s (icebp, byte 0xF1) and K raise(SIGTRAP)s, writing `var` before each; print
 * `done handled=<count>`.
 *
 * int1 is a trap on most CPUs (the saved rip follows the 0xF1 byte) and a fault on some
 * (an AMD EPYC under KVM: rip *at* the byte, so returning from the handler would execute it
 * again, for ever). The handler steps over the byte in the fault case, as a robust program
 * must, so the program ends on both kinds. */
#include "common.h"
#include <signal.h>
#include <ucontext.h>

volatile long var;
static volatile sig_atomic_t handled;

static void on_trap(int sig, siginfo_t *info, void *ctx)
{
	ucontext_t *uc = ctx;
	unsigned char *rip = (unsigned char *)uc->uc_mcontext.gregs[REG_RIP];
	(void)sig;
	if (info->si_code == TRAP_BRKPT && *rip == 0xf1)
		uc->uc_mcontext.gregs[REG_RIP]++;
	handled++;
}

int main(int argc, char **argv)
{
	long k = argc > 1 ? atol(argv[1]) : 1;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_trap;
	sa.sa_flags = SA_SIGINFO;
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
		__asm__ volatile(".byte 0xf1"); /* int1: TRAP_BRKPT */
	}
	for (long i = 0; i < k; i++) {
		var = i;
		raise(SIGTRAP);
	}
	printf("done handled=%d\n", (int)handled);
	fflush(stdout);
	return 0;
}
