/* signals [mode]: handlers count SIGUSR1, SIGUSR2 and SIGALRM. After the gate the program
 * sends itself SIGUSR1 twice, then SIGALRM and SIGUSR2 (each from send_self, a system call
 * written inline so that a debugger's stop is in this file), prints
 * `done usr1=N usr2=N alrm=N` and exits with usr1 + 4 * usr2 + 16 * alrm.
 * mode "segv": instead of exiting, store through a null pointer and die of SIGSEGV (no
 * core file: RLIMIT_CORE is set to 0). */
#include "common.h"
#include <signal.h>
#include <sys/resource.h>

static volatile sig_atomic_t usr1, usr2, alrm;
static long self_pid, self_tid; /* not arguments: a debugger prints those in the frame */

static void on_signal(int sig)
{
	if (sig == SIGUSR1)
		usr1++;
	else if (sig == SIGUSR2)
		usr2++;
	else if (sig == SIGALRM)
		alrm++;
}

__attribute__((noinline)) static void send_self(long sig)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "0"((long)SYS_tgkill), "D"(self_pid), "S"(self_tid), "d"(sig)
			 : "rcx", "r11", "memory");
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	struct rlimit none = {0, 0};
	self_pid = getpid();
	self_tid = gettid_();
	setrlimit(RLIMIT_CORE, &none);
	signal(SIGUSR1, on_signal);
	signal(SIGUSR2, on_signal);
	signal(SIGALRM, on_signal);
	printf("pid=%ld tid_addr=%p\n", self_pid, (void *)&self_tid);
	fflush(stdout);
	gate();
	send_self(SIGUSR1);
	send_self(SIGUSR1);
	send_self(SIGALRM);
	send_self(SIGUSR2);
	printf("done usr1=%d usr2=%d alrm=%d\n", (int)usr1, (int)usr2, (int)alrm);
	fflush(stdout);
	if (!strcmp(mode, "segv"))
		*(volatile int *)0 = 1;
	return usr1 + 4 * usr2 + 16 * alrm;
}
