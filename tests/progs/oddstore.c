/* oddstore N [bytes]: `odd` is an 8-byte variable at an address 1 mod 8, which gdb's split
 * covers with four slots (1 + 2 + 4 + 1 bytes). After the gate, N times: one 8-byte store of
 * the loop index to `odd` (one access touching all four pieces), then a 1 ms pause. In mode
 * "bytes" each iteration instead stores the 8 bytes one at a time from one instruction in a
 * loop (eight accesses, same ip). Then it prints `done` and waits on a second gate. */
#include "common.h"

struct __attribute__((packed, aligned(8))) odd_block {
	char pad[1];
	volatile long odd;
	char tail[7];
};
struct odd_block odd_block;

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1;
	int bytes = argc > 2 && strcmp(argv[2], "bytes") == 0;
	volatile char *p = (volatile char *)&odd_block.odd;
	printf("odd=%p pid=%d\n", (void *)&odd_block.odd, getpid());
	fflush(stdout);
	gate();
	for (long i = 1; i <= n; i++) {
		if (bytes) {
			for (volatile int k = 0; k < 8; k++)
				p[k] = (char)i;
		} else {
			odd_block.odd = i;
		}
		usleep(1000);
	}
	printf("done\n");
	fflush(stdout);
	gate();
	return 0;
}
