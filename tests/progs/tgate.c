/* tgate T N: like `threads`, but every step waits for the test. After the first gate start
 * T threads; each prints `tid=N idx=I` and waits; once all have printed, the main thread
 * prints `ready` and waits on a second gate, then lets the threads run: each writes the
 * shared `var` and its own `slots[idx * 8]` N times. The main thread joins them, prints
 * `done var=N` and waits on a third gate before exiting 0 (so counts can be read while the
 * process still exists). */
#include "common.h"
#include <pthread.h>

#define MAXT 64
volatile long var;
__attribute__((aligned(64))) volatile long slots[MAXT * 8];
static long n;
static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t printed, start;

static void *worker(void *arg)
{
	long idx = (long)arg;
	pthread_mutex_lock(&out);
	printf("tid=%ld idx=%ld\n", gettid_(), idx);
	fflush(stdout);
	pthread_mutex_unlock(&out);
	pthread_barrier_wait(&printed);
	pthread_barrier_wait(&start);
	for (long i = 1; i <= n; i++) {
		var = i;
		slots[idx * 8] = i;
	}
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
	printf("addr=%p slots=%p stride=64 pid=%d\n", (void *)&var, (void *)slots, getpid());
	fflush(stdout);
	gate();
	pthread_barrier_init(&printed, NULL, (unsigned)t + 1);
	pthread_barrier_init(&start, NULL, (unsigned)t + 1);
	for (long i = 0; i < t; i++)
		pthread_create(&th[i], NULL, worker, (void *)i);
	pthread_barrier_wait(&printed);
	printf("ready\n");
	fflush(stdout);
	gate();
	pthread_barrier_wait(&start);
	for (long i = 0; i < t; i++)
		pthread_join(th[i], NULL);
	printf("done var=%ld\n", var);
	fflush(stdout);
	gate();
	return 0;
}
