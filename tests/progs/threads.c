/* threads T N: after the gate start T threads; each prints `tid=N`, then writes the shared
 * `var` and its own `slots[i]` N times. The main thread joins them and prints done. */
#include "common.h"
#include <pthread.h>

#define MAXT 64
volatile long var;
__attribute__((aligned(64))) volatile long slots[MAXT * 8];
static long n;
static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg)
{
	long idx = (long)arg;
	pthread_mutex_lock(&out);
	printf("tid=%ld idx=%ld\n", gettid_(), idx);
	fflush(stdout);
	pthread_mutex_unlock(&out);
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
