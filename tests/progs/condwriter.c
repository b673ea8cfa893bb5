/* condwriter LEN V1 V2 ...: after the gate, store each value (hex) to `var` as a LEN-byte
 * store, in order. condwriter seq N: after the gate, store 0, 1, ..., N-1 to `var` (8 bytes).
 * `var` starts as 0. Prints "done" after the last store; in seq mode it then waits on a second
 * gate before it exits (so the watches can be read). */
#include <stdint.h>
#include "common.h"

__attribute__((aligned(8))) volatile uint64_t var;

int main(int argc, char **argv)
{
	int seq = argc > 1 && !strcmp(argv[1], "seq");
	long len = argc > 1 && !seq ? atol(argv[1]) : 8;
	printf("addr=%p pid=%d\n", (void *)&var, getpid());
	fflush(stdout);
	gate();
	if (seq) {
		long n = argc > 2 ? atol(argv[2]) : 0;
		for (long i = 0; i < n; i++)
			var = (uint64_t)i;
	} else {
		for (int i = 2; i < argc; i++) {
			uint64_t v = strtoull(argv[i], NULL, 16);
			switch (len) {
			case 1: *(volatile uint8_t *)&var = (uint8_t)v; break;
			case 2: *(volatile uint16_t *)&var = (uint16_t)v; break;
			case 4: *(volatile uint32_t *)&var = (uint32_t)v; break;
			default: var = v; break;
			}
		}
	}
	printf("done\n");
	fflush(stdout);
	if (seq)
		gate();
	return 0;
}
