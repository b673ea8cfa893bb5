/* Target for tests/test_symbols.py: prints the real addresses of its symbols, one
   "name 0xADDR" per line, then "ready", and waits until stdin is closed.

   Build: gcc -O0 -g -fno-toplevel-reorder [-fPIE -pie | -no-pie] symtarget.c
          -L. -lsymlib -Wl,-rpath,'$ORIGIN'
   -fno-toplevel-reorder keeps odd_pad and odd6 in source order, so odd6 lands 3 bytes
   past an 8-aligned address (odd, and split 1 + 4 + 1 by DESIGN §5.8); the test checks it. */

#include <stdio.h>

extern long lib_counter;
void lib_bump(void);
void *lib_counter_addr(void);
void *lib_bump_addr(void);

struct pair {
    long a, b;
};

long counter;
struct pair pair16;
__thread long tls_counter;

__attribute__((section(".data.odd"), aligned(8), used)) char odd_pad[3] = {1, 2, 3};
__attribute__((section(".data.odd"), aligned(1), used)) char odd6[6] = "abcde";

void bump(void) {
    counter++;
    pair16.a++;
    odd6[0]++;
    tls_counter++;
}

int main(void) {
    printf("counter %p\n", (void *)&counter);
    printf("pair16 %p\n", (void *)&pair16);
    printf("odd6 %p\n", (void *)odd6);
    printf("bump %p\n", (void *)&bump);
    printf("lib_counter %p\n", (void *)&lib_counter);
    printf("lib_counter_in_lib %p\n", lib_counter_addr());
    printf("lib_bump %p\n", lib_bump_addr());
    printf("ready\n");
    fflush(stdout);
    while (getchar() != EOF) {
        bump();
        lib_bump();
    }
    return 0;
}
