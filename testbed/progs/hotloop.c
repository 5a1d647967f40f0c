/*
 * hotloop: threads calling three functions in a tight loop, a known number of times each, for
 * the test that rebuilds uprobe links under load (no call lost or counted twice).
 *
 *   hot_a, hot_b, hot_c  plain functions (each called `calls` times per thread)
 *   locked_fn            starts with `lock orq $0,(%rsp)`, an instruction uprobes refuse
 *                        (ENOTSUPP): the agent must leave it out and say so.
 *
 * Usage: hotloop threads calls
 * Starts calling after it reads a line on stdin, so a tracer can attach while the program is
 * mapped (the kernel checks a probed instruction only in processes that map the file).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

__asm__(
    ".text\n"
    ".globl locked_fn\n.type locked_fn,@function\n"
    "locked_fn:\n"
    "  lock orq $0,(%rsp)\n"
    "  lea 1(%rdi),%rax\n"
    "  ret\n"
    ".size locked_fn,.-locked_fn\n");
long locked_fn(long);

__attribute__((noinline)) long hot_a(long x) { return x + 1; }
__attribute__((noinline)) long hot_b(long x) { return x ^ 3; }
__attribute__((noinline)) long hot_c(long x) { return x * 5; }

static long calls;

static void *loop(void *arg) {
    long acc = (long)arg;
    for (long i = 0; i < calls; i++) {
        acc += hot_a(i);
        acc += hot_b(acc);
        acc += hot_c(i);
    }
    acc += locked_fn(acc);
    return (void *)acc;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: hotloop threads calls\n");
        return 2;
    }
    int n = atoi(argv[1]);
    calls = atol(argv[2]);
    pthread_t t[64];
    if (n < 1 || n > 64) return 2;
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 3;
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, loop, (void *)(long)i);
    for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
    return 0;
}
