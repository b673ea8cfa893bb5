/* Shared library for tests/test_symbols.py: one global object, one function.

   lib_counter_addr() reports the address the library's own code uses for lib_counter,
   which is the executable's copy when the executable has a copy relocation for it. */

long lib_counter;

void lib_bump(void) { lib_counter++; }

void *lib_counter_addr(void) { return &lib_counter; }

void *lib_bump_addr(void) { return (void *)&lib_bump; }
