/* notify_ref: the C reference of `watch(..., mode="notify")`.
 *
 *   notify_ref PID ADDR [RING_PAGES [WAKEUP_EVENTS]]
 * opens a sampling breakpoint event (sample_period 1, IP|TID|TIME on CLOCK_MONOTONIC),
 * mmaps a 1+RING_PAGES ring, asks for one wake-up per WAKEUP_EVENTS samples and drains
 * the ring in batches from poll().  Prints "ready"; on a line from stdin it drains what
 * is left and prints "samples S lost L wakeups W" (lost = sum of PERF_RECORD_LOST).
 */
#include "common.h"
#include <poll.h>
#include <sys/mman.h>

static struct perf_event_mmap_page *meta;
static char *data;
static uint64_t data_size;
static uint64_t samples, lost, wakeups;

static void drain(void)
{
	uint64_t head = __atomic_load_n(&meta->data_head, __ATOMIC_ACQUIRE);
	uint64_t tail = meta->data_tail;
	while (tail < head) {
		struct perf_event_header hdr;
		uint64_t off = tail % data_size;
		/* a record may wrap around the end of the ring: copy it out piecewise */
		char rec[64];
		size_t first = (size_t)(data_size - off);
		if (first >= sizeof(hdr)) {
			memcpy(&hdr, data + off, sizeof(hdr));
		} else {
			memcpy(&hdr, data + off, first);
			memcpy((char *)&hdr + first, data, sizeof(hdr) - first);
		}
		if (hdr.type == PERF_RECORD_SAMPLE) {
			samples++;
		} else if (hdr.type == PERF_RECORD_LOST && hdr.size <= sizeof(rec)) {
			size_t n = hdr.size;
			if (first >= n) {
				memcpy(rec, data + off, n);
			} else {
				memcpy(rec, data + off, first);
				memcpy(rec + first, data, n - first);
			}
			/* struct { header; u64 id; u64 lost; } */
			uint64_t l;
			memcpy(&l, rec + sizeof(hdr) + 8, sizeof(l));
			lost += l;
		}
		tail += hdr.size;
	}
	__atomic_store_n(&meta->data_tail, tail, __ATOMIC_RELEASE);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: notify_ref PID ADDR [RING_PAGES [WAKEUP_EVENTS]]\n");
		return 2;
	}
	pid_t pid = (pid_t)atoi(argv[1]);
	long pages = argc > 3 ? atol(argv[3]) : 128;
	long wake = argc > 4 ? atol(argv[4]) : 64;
	struct perf_event_attr attr;
	bp_attr(&attr, parse_u64(argv[2]), HW_BREAKPOINT_LEN_8);
	attr.sample_period = 1;
	attr.sample_type = PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME;
	attr.use_clockid = 1;
	attr.clockid = CLOCK_MONOTONIC;
	attr.wakeup_events = (uint32_t)wake;
	int fd = perf_open(&attr, pid);
	if (fd < 0)
		die("perf_event_open");
	long psz = sysconf(_SC_PAGESIZE);
	void *ring = mmap(NULL, (size_t)((pages + 1) * psz), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (ring == MAP_FAILED)
		die("mmap ring");
	meta = ring;
	data = (char *)ring + psz;
	data_size = (uint64_t)(pages * psz);
	printf("ready\n");
	fflush(stdout);
	struct pollfd p[2] = { { fd, POLLIN, 0 }, { 0, POLLIN, 0 } };
	int hup = 0;
	for (;;) {
		p[0].fd = hup ? -1 : fd;
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[0].revents & POLLIN) {
			wakeups++;
			drain();
		}
		if (p[0].revents & POLLHUP)
			hup = 1; /* target exited */
		if (p[1].revents)
			break;
	}
	drain();
	printf("samples %" PRIu64 " lost %" PRIu64 " wakeups %" PRIu64 "\n", samples, lost, wakeups);
	fflush(stdout);
	return 0;
}
