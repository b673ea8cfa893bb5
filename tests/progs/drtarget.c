/* Target for tests/test_vdr_kernel.py: two words the loop writes forever.
 *
 * Prints "a=0xADDR b=0xADDR" and then writes a_word and b_word in turn, so a write
 * watchpoint on either fires within a few instructions of PTRACE_CONT. */
#include <stdio.h>

volatile unsigned long a_word;
volatile unsigned long b_word;

int main(void)
{
    printf("a=%p b=%p\n", (void *)&a_word, (void *)&b_word);
    fflush(stdout);
    for (;;) {
        a_word++;
        b_word++;
    }
    return 0;
}
