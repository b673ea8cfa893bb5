/* drsleep: an idle target for tests/test_rawdr.py's differential test.
 *
 * Re-executes itself once with ADDR_NO_RANDOMIZE (personality(2), what `setarch -R` does),
 * so two instances of this binary have the very same address-space layout: the same
 * random DR0-3 address means the same thing in both. Prints "var=0xADDR pid=N norand=1",
 * then sleeps in pause() forever: it never touches memory a breakpoint could watch, so no
 * debug trap ever changes DR6 behind the test's back. */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/personality.h>
#include <unistd.h>

volatile unsigned long var;

int main(int argc, char **argv)
{
	(void)argc;
	int pers = personality(0xffffffff);
	if (pers != -1 && !(pers & ADDR_NO_RANDOMIZE)) {
		if (personality(pers | ADDR_NO_RANDOMIZE) != -1)
			execv("/proc/self/exe", argv);
		/* fall through: randomized, and the info line says so */
	}
	pers = personality(0xffffffff);
	printf("var=%p pid=%d norand=%d\n", (void *)&var, getpid(),
	       pers != -1 && (pers & ADDR_NO_RANDOMIZE) ? 1 : 0);
	fflush(stdout);
	for (;;)
		pause();
	return 0;
}
