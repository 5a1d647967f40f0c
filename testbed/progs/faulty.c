/*
 * faulty: a small, deterministic program for the fault injection tests. After a line on stdin
 * (so an injector and a tracer can attach first) it runs `rounds` rounds of
 *     main -> step(i) -> work(i, i+1) -> leaf(x)    (and pick() decides odd/even)
 * printing one line per round, 10 ms apart. A fault in work() shows in what it prints and in
 * the call trees: after a crash or a hang leaf() is never called again.
 *
 * Usage: faulty rounds
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) long leaf(long x) { return x * 3; }
__attribute__((noinline)) long even(long x) { return leaf(x) + 2; }
__attribute__((noinline)) long odd(long x) { return leaf(x) + 1; }
__attribute__((noinline)) long pick(long x) { return x & 1; }

__attribute__((noinline)) long work(long a, long b) {
    long s = a * 1000 + b;
    return pick(s) ? odd(s) : even(s);
}

__attribute__((noinline)) long step(long i) { return work(i, i + 1); }

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: faulty rounds\n");
        return 2;
    }
    long rounds = atol(argv[1]);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 3;
    struct timespec pause = {0, 10 * 1000 * 1000};
    for (long i = 0; i < rounds; i++) {
        printf("%ld %ld\n", i, step(i));
        fflush(stdout);
        nanosleep(&pause, NULL);
    }
    return 0;
}
