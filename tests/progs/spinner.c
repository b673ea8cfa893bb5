/* spinner [pause_us [busy]]: after the gate write `var` in a loop until stdin reaches EOF or
 * gets another line; with pause_us > 0 sleep that long between writes; with busy > 0 also
 * count a volatile to `busy` between writes (user-mode time between hits, no syscall).
 * Prints the count. */
#include "common.h"
#include <poll.h>

volatile long var;

static int stdin_ready(void)
{
	struct pollfd p = {.fd = 0, .events = POLLIN};
	return poll(&p, 1, 0) > 0;
}

int main(int argc, char **argv)
{
	long pause_us = argc > 1 ? atol(argv[1]) : 0;
	long busy = argc > 2 ? atol(argv[2]) : 0;
	volatile long spin;
	printf("addr=%p pid=%d\n", (void *)&var, getpid());
	fflush(stdout);
	gate();
	long i = 0;
	for (;;) {
		var = ++i;
		for (spin = 0; spin < busy; spin++)
			;
		if (pause_us > 0)
			usleep(pause_us);
		if ((pause_us > 0 || (i & 0xffff) == 0) && stdin_ready())
			break;
	}
	printf("done var=%ld\n", var);
	fflush(stdout);
	return 0;
}
