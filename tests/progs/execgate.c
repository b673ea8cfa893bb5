/* execgate N: like `execer`, but the new image waits too. After the gate write `var` N
 * times, print `done var=N`, then exec itself with "--execd N"; the new image prints
 * `execd addr=... pid=...`, waits on a second gate, writes var N times, prints
 * `done2 var=N` and exits 0. */
#include "common.h"

volatile long var;

int main(int argc, char **argv)
{
	if (argc > 2 && !strcmp(argv[1], "--execd")) {
		long n = atol(argv[2]);
		printf("execd addr=%p pid=%d\n", (void *)&var, getpid());
		fflush(stdout);
		gate();
		for (long i = 1; i <= n; i++)
			var = i;
		printf("done2 var=%ld\n", var);
		fflush(stdout);
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
	char count[32];
	snprintf(count, sizeof count, "%ld", n);
	char *args[] = {argv[0], "--execd", count, NULL};
	execv("/proc/self/exe", args);
	perror("execv");
	return 1;
}
