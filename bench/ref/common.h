/* Shared helpers of the benchmark reference programs (the .c files in bench/ref).
 *
 * Each reference does, in C with raw syscalls, the kernel work the daemon does for the
 * same scenario, so `python -m bench` can report daemon/reference ratios measured in the
 * same run.  Output is line-oriented "key value ..." text read by bench/_harness.py.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/hw_breakpoint.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void die(const char *what)
{
	fprintf(stderr, "error: %s: %s\n", what, strerror(errno));
	exit(2);
}

static inline int perf_open(struct perf_event_attr *attr, pid_t tid)
{
	return (int)syscall(SYS_perf_event_open, attr, tid, -1, -1, PERF_FLAG_FD_CLOEXEC);
}

/* A user-space-only 8-byte write breakpoint on `addr`.  sample_period 0 = counting only. */
static inline void bp_attr(struct perf_event_attr *attr, uint64_t addr, int len)
{
	memset(attr, 0, sizeof(*attr));
	attr->type = PERF_TYPE_BREAKPOINT;
	attr->size = sizeof(*attr);
	attr->bp_type = HW_BREAKPOINT_W;
	attr->bp_addr = addr;
	attr->bp_len = (uint64_t)len;
	attr->exclude_kernel = 1;
	attr->exclude_hv = 1;
}

static inline uint64_t parse_u64(const char *s)
{
	return strtoull(s, NULL, 0);
}

/* The thread ids of process `pid`, from /proc/PID/task.  Returns the count. */
static inline int list_tids(pid_t pid, pid_t **out)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	DIR *d = opendir(path);
	if (!d)
		die("opendir /proc/PID/task");
	int n = 0, cap = 256;
	pid_t *tids = malloc(sizeof(pid_t) * (size_t)cap);
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] < '0' || e->d_name[0] > '9')
			continue;
		if (n == cap) {
			cap *= 2;
			tids = realloc(tids, sizeof(pid_t) * (size_t)cap);
		}
		tids[n++] = (pid_t)atoi(e->d_name);
	}
	closedir(d);
	*out = tids;
	return n;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Sorts v in place; prints "<name> median min max" (ns). */
static inline void print_stats(const char *name, uint64_t *v, int n)
{
	if (n <= 0) {
		printf("%s 0 0 0\n", name);
		return;
	}
	qsort(v, (size_t)n, sizeof(*v), cmp_u64);
	printf("%s %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", name, v[n / 2], v[0], v[n - 1]);
}

/* VmRSS of this process in KiB. */
static inline long self_rss_kb(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kb = -1;
	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	if (f)
		fclose(f);
	return kb;
}
#endif
