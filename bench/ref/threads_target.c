/* threads_target: a program with many idle threads, for the threads, memory and rpc runs.
 *
 *   threads_target NTHREADS
 * starts NTHREADS threads that block on a condition variable, then prints
 * "pid P addr 0xA threads T" (A = &watched[0]; watched[1..3] follow, 8 bytes apart).
 * Commands on stdin, one per line:
 *   spawn K   K times: take the time, pthread_create a thread whose first act is to take
 *             the time and write watched[0], join it; prints "spawn_ns median min max"
 *             (creation to the new thread's first instruction) and "spawned K".
 *   quit/EOF  exits 0 (the idle threads end with the process).
 */
#include "common.h"
#include <pthread.h>

volatile uint64_t watched[4] __attribute__((aligned(64)));
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t started;

static void *idle(void *arg)
{
	(void)arg;
	pthread_barrier_wait(&started);
	pthread_mutex_lock(&mu);
	for (;;)
		pthread_cond_wait(&cv, &mu);
	return NULL;
}

static void *fresh(void *arg)
{
	*(uint64_t *)arg = now_ns();
	watched[0] = 1;
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: threads_target NTHREADS\n");
		return 2;
	}
	int n = atoi(argv[1]);
	pthread_attr_t a;
	pthread_attr_init(&a);
	pthread_attr_setstacksize(&a, 64 * 1024);
	pthread_barrier_init(&started, NULL, (unsigned)n + 1);
	for (int i = 0; i < n; i++) {
		pthread_t t;
		if (pthread_create(&t, &a, idle, NULL) != 0)
			die("pthread_create");
	}
	pthread_barrier_wait(&started);
	printf("pid %d addr 0x%lx threads %d\n", (int)getpid(), (unsigned long)&watched[0], n);
	fflush(stdout);
	char line[128];
	while (fgets(line, sizeof(line), stdin)) {
		int k;
		if (sscanf(line, "spawn %d", &k) == 1 && k > 0) {
			uint64_t *lat = calloc((size_t)k, sizeof(uint64_t));
			for (int i = 0; i < k; i++) {
				uint64_t t1 = 0;
				pthread_t t;
				uint64_t t0 = now_ns();
				if (pthread_create(&t, &a, fresh, &t1) != 0)
					die("pthread_create");
				pthread_join(t, NULL);
				lat[i] = t1 - t0;
			}
			print_stats("spawn_ns", lat, k);
			printf("spawned %d\n", k);
			fflush(stdout);
			free(lat);
		} else if (!strncmp(line, "quit", 4)) {
			break;
		}
	}
	return 0;
}
