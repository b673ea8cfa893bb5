/* execer N: after the gate write `var` N times, then exec itself with "--execd"; the new
 * image prints `execd addr=...`, writes var once and exits 0. */
#include "common.h"

volatile long var;

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "--execd")) {
		printf("execd addr=%p pid=%d\n", (void *)&var, getpid());
		fflush(stdout);
		var = 42;
		return 0;
	}
	long n = argc > 1 ? atol(argv[1]) : 3;
	printf("addr=%p pid=%d\n", (void *)&var, getpid());
	fflush(stdout);
	gate();
	for (long i = 1; i <= n; i++)
		var = i;
	printf("done var=%ld\n", var);
	fflush(stdout);
	char *args[] = {argv[0], "--execd", NULL};
	execv("/proc/self/exe", args);
	perror("execv");
	return 1;
}
