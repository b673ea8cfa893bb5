/* regions N: globals that are not one aligned 1/2/4/8-byte piece, for region watches.
 * `pair16` is 16 bytes (two 8-byte pieces); `odd6` is 6 bytes at an address 3 mod 8
 * (gdb's split: 1 + 4 + 1). After the gate, each of the N iterations writes both halves of
 * pair16 and each of the six bytes of odd6 separately, then it prints `done` and waits on a
 * second gate. Symbols are global so that the symbol resolver finds them by name. */
#include "common.h"

struct pair {
	volatile long a, b;
};
__attribute__((aligned(16))) struct pair pair16;

/* 3 bytes of padding, then odd6: packed, in an 8-aligned block, so odd6 is 3 mod 8. */
struct __attribute__((packed, aligned(8))) odd_block {
	char pad[3];
	volatile char odd6[6];
};
struct odd_block odd_block;

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1;
	printf("pair16=%p odd6=%p\n", (void *)&pair16, (void *)odd_block.odd6);
	fflush(stdout);
	gate();
	for (long i = 1; i <= n; i++) {
		pair16.a = i;
		pair16.b = i;
		for (int k = 0; k < 6; k++)
			odd_block.odd6[k] = (char)i;
	}
	printf("done\n");
	fflush(stdout);
	gate();
	return 0;
}
