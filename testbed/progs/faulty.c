/*
 * faulty: a small, deterministic program for the fault injection tests. After a line on stdin
 * (so an injector and a tracer can attach first) it runs `rounds` rounds of
 *     main -> step(i) -> work(i, i+1) -> pick, odd|even -> leaf
 *                     -> check()
 * printing one line per round, 10 ms apart. mark() is only ever called on a faulty path:
 *   - work(a, b) calls mark when b is huge (input corruption of b, a high bit), and so does
 *     many() for its seventh parameter g, which is passed on the stack;
 *   - step calls mark when check() does not return 1: check's second instruction jumps over
 *     `return 2`, so IP moved past it (IP+N) or a flipped return value (output corruption)
 *     both lead to mark.
 * A crash or hang in work() ends the trees there: pick and leaf are never reached.
 *
 * Usage: faulty rounds
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__asm__(
    ".text\n"
    ".globl check\n.type check,@function\n"
    "check:\n"
    "  push %rbp\n"
    "  jmp 1f\n"
    "  mov $2,%eax\n"
    "  pop %rbp\n"
    "  ret\n"
    "1:\n"
    "  mov $1,%eax\n"
    "  pop %rbp\n"
    "  ret\n"
    ".size check,.-check\n");
long check(void);

__attribute__((noinline)) long leaf(long x) { return x * 3; }
__attribute__((noinline)) long even(long x) { return leaf(x) + 2; }
__attribute__((noinline)) long odd(long x) { return leaf(x) + 1; }
__attribute__((noinline)) long pick(long x) { return x & 1; }
__attribute__((noinline)) long mark(long x) { return -x; }

__attribute__((noinline)) long work(long a, long b) {
    if (b > (1L << 20)) return mark(b);
    long s = a * 1000 + b;
    return pick(s) ? odd(s) : even(s);
}

/* Eight parameters: g and h are passed on the stack. */
__attribute__((noinline)) long many(long a, long b, long c, long d, long e, long f, long g, long h) {
    if (g > (1L << 20)) return mark(g);
    return a + b + c + d + e + f + g + h;
}

__attribute__((noinline)) long step(long i) {
    long r = work(i, i + 1);
    if (check() != 1) r += mark(i);
    return r + many(i, 1, 2, 3, 4, 5, 6, 7);
}

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
