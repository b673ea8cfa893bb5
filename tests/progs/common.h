/* Shared helpers of the test target programs in tests/progs.
 *
 * Every program prints one info line (`key=0xHEX key=N ...`), flushes, and then waits on a
 * "gate": it reads one line from stdin. The test releases it with a newline. EOF on stdin
 * makes the program exit 3, so a test that dies never leaves a program blocked forever. */
#ifndef HWBKPT_PROGS_COMMON_H
#define HWBKPT_PROGS_COMMON_H
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline void gate(void)
{
	char buf[64];
	if (!fgets(buf, sizeof buf, stdin))
		exit(3);
}

static inline long gettid_(void) { return syscall(SYS_gettid); }
#endif
