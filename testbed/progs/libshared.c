/* libshared: a shared library traced by path, like libsqlite3.so inside a server. */
#define NOINLINE __attribute__((noinline, noipa))

NOINLINE int lib_leaf(int x) { return x + 7; }
NOINLINE static int lib_inner(int x) { return lib_leaf(x) * 2; }
NOINLINE int lib_entry(int x) { return lib_inner(x) + 1; }
