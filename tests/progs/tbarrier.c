/* tbarrier T N: after the gate start T threads that all wait for each other before they
 * write `var` and their own `slots[i * 8]` N times (i = 0..T-1), and again before they exit.
 * So every thread exists at every stop a debugger sees, whatever the scheduling, and a
 * debugger numbers them in creation order either way. Prints done when all are joined. */
#include "common.h"
#include <pthread.h>

#define MAXT 16
volatile long var;
__attribute__((aligned(64))) volatile long slots[MAXT * 8];
static long n;
static pthread_barrier_t start, end;

static void *worker(void *arg)
{
	long idx = (long)arg;
	pthread_barrier_wait(&start);
	for (long i = 1; i <= n; i++) {
		var = i;
		slots[idx * 8] = i;
	}
	pthread_barrier_wait(&end);
	return NULL;
}

int main(int argc, char **argv)
{
	long t = argc > 1 ? atol(argv[1]) : 2;
	pthread_t th[MAXT];
	n = argc > 2 ? atol(argv[2]) : 1;
	if (t > MAXT)
		t = MAXT;
	if (t < 1)
		t = 1;
	pthread_barrier_init(&start, NULL, (unsigned)t);
	pthread_barrier_init(&end, NULL, (unsigned)t);
	printf("addr=%p slots=%p stride=64 pid=%d\n", (void *)&var, (void *)slots, getpid());
	fflush(stdout);
	gate();
	for (long i = 0; i < t; i++)
		pthread_create(&th[i], NULL, worker, (void *)i);
	for (long i = 0; i < t; i++)
		pthread_join(th[i], NULL);
	printf("done var=%ld\n", var);
	fflush(stdout);
	return 0;
}
