/* shlib_main: calls into libshared.so from its own function. Usage: shlib_main calls */
#include <stdio.h>
#include <stdlib.h>

int lib_entry(int);

__attribute__((noinline, noipa)) static int app_work(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) s += lib_entry(i);
    return s;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100;
    printf("%d\n", app_work(n));
    return 0;
}
