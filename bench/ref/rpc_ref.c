/* rpc_ref: the floor of a watch+unwatch round trip over a Unix socket.
 *
 *   rpc_ref PID ADDR ITERS TID...      (one client per TID)
 * A single-threaded epoll server (as the daemon has one event loop) and one client
 * process with one thread and one AF_UNIX stream connection per TID.  Each client does
 * ITERS times: send "watch" -> the server perf_event_open()s a counting breakpoint on that
 * client's thread and answers; send "unwatch" -> the server close()s it and answers.
 * Fixed 16-byte binary messages: no msgpack, no authorization, no bookkeeping, so this is
 * the floor any daemon pays.  The client prints
 * "pairs P wall_ns W p50_ns A p99_ns B" (latency of one watch+unwatch pair).
 */
#include "common.h"
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>

struct msg {
	int32_t op; /* 1 watch, 2 unwatch */
	int32_t arg;
	int64_t val;
};

static int iters;
static uint64_t *lat;
static pthread_barrier_t go;

struct cl {
	int s, idx;
};

static void xfer(int s, struct msg *m)
{
	if (write(s, m, sizeof(*m)) != sizeof(*m))
		die("client write");
	size_t got = 0;
	while (got < sizeof(*m)) {
		ssize_t r = read(s, (char *)m + got, sizeof(*m) - got);
		if (r <= 0)
			die("client read");
		got += (size_t)r;
	}
	if (m->val < 0) {
		errno = (int)-m->val;
		die("server perf_event_open");
	}
}

static void *client(void *arg)
{
	struct cl *c = arg;
	pthread_barrier_wait(&go);
	for (int i = 0; i < iters; i++) {
		uint64_t t0 = now_ns();
		struct msg m = { 1, 0, 0 };
		xfer(c->s, &m);
		m.op = 2;
		m.arg = (int32_t)m.val;
		xfer(c->s, &m);
		lat[(size_t)c->idx * (size_t)iters + (size_t)i] = now_ns() - t0;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: rpc_ref PID ADDR ITERS TID...\n");
		return 2;
	}
	uint64_t addr = parse_u64(argv[2]);
	iters = atoi(argv[3]);
	int n = argc - 4;
	int *srv = calloc((size_t)n, sizeof(int)), *cli = calloc((size_t)n, sizeof(int));
	pid_t *tid = calloc((size_t)n, sizeof(pid_t));
	for (int i = 0; i < n; i++) {
		int sv[2];
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
			die("socketpair");
		srv[i] = sv[0];
		cli[i] = sv[1];
		tid[i] = (pid_t)atoi(argv[4 + i]);
	}
	pid_t kid = fork();
	if (kid < 0)
		die("fork");
	if (kid == 0) {
		for (int i = 0; i < n; i++)
			close(srv[i]);
		lat = calloc((size_t)n * (size_t)iters, sizeof(uint64_t));
		pthread_barrier_init(&go, NULL, (unsigned)n + 1);
		pthread_t *th = calloc((size_t)n, sizeof(pthread_t));
		struct cl *cs = calloc((size_t)n, sizeof(struct cl));
		for (int i = 0; i < n; i++) {
			cs[i].s = cli[i];
			cs[i].idx = i;
			pthread_create(&th[i], NULL, client, &cs[i]);
		}
		uint64_t t0 = now_ns();
		pthread_barrier_wait(&go);
		for (int i = 0; i < n; i++)
			pthread_join(th[i], NULL);
		uint64_t wall = now_ns() - t0;
		size_t total = (size_t)n * (size_t)iters;
		qsort(lat, total, sizeof(uint64_t), cmp_u64);
		printf("pairs %zu wall_ns %" PRIu64 " p50_ns %" PRIu64 " p99_ns %" PRIu64 "\n", total,
		       wall, lat[total / 2], lat[(total * 99) / 100]);
		fflush(stdout);
		_exit(0);
	}
	for (int i = 0; i < n; i++)
		close(cli[i]);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	for (int i = 0; i < n; i++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
		epoll_ctl(ep, EPOLL_CTL_ADD, srv[i], &ev);
	}
	struct perf_event_attr attr;
	bp_attr(&attr, addr, HW_BREAKPOINT_LEN_8);
	int open = n;
	while (open > 0) {
		struct epoll_event evs[64];
		int k = epoll_wait(ep, evs, 64, -1);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int j = 0; j < k; j++) {
			int i = (int)evs[j].data.u32;
			struct msg m;
			ssize_t r = read(srv[i], &m, sizeof(m));
			if (r <= 0) {
				epoll_ctl(ep, EPOLL_CTL_DEL, srv[i], NULL);
				close(srv[i]);
				open--;
				continue;
			}
			if (r != sizeof(m))
				die("short request");
			if (m.op == 1) {
				int fd = perf_open(&attr, tid[i]);
				m.val = fd < 0 ? -errno : fd;
			} else {
				close(m.arg);
				m.val = 0;
			}
			if (write(srv[i], &m, sizeof(m)) != sizeof(m))
				die("server write");
		}
	}
	waitpid(kid, NULL, 0);
	return 0;
}
