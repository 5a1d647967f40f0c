/* shlib_main: calls into libshared.so from its own function. Usage: shlib_main calls [linger]
 * With "linger" it then waits for end of input before it exits, as a server outlives its first
 * calls: the agent names callers outside the traced library from /proc/<pid>/maps, which is gone
 * once the process is. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int lib_entry(int);

__attribute__((noinline, noipa)) static int app_work(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s += lib_entry(i);
    return s;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100;
    printf("%d\n", app_work(n));
    fflush(stdout);
    if (argc > 2 && strcmp(argv[2], "linger") == 0)
        while (getchar() != EOF) {
        }
    return 0;
}
