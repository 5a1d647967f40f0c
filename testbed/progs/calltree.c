/*
 * calltree: a small program with a known call tree, traced by afetm's end-to-end tests and demo.
 *
 *   main -> run_main -> dispatch -> (pointer) op_add -> leaf
 *                    -> chain2 -> chain3 -> leaf
 *                    -> fib -> fib (recursion) -> leaf
 *   worker thread: worker -> chain1 -> chain2 -> chain3 -> leaf
 *                         -> dispatch -> (pointer) op_mul -> chain3 -> leaf
 *                         -> fib -> ...
 *
 * Usage: calltree [iterations] [seconds]   (seconds > 0: repeat the work every 10 ms that long)
 * Build with -O1 -fno-inline -fno-optimize-sibling-calls so every call stays a call.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NOINLINE __attribute__((noinline, noipa))

static volatile int sink;

NOINLINE static int leaf(int x) { return x * 3 + 1; }
NOINLINE static int chain3(int x) { return leaf(x) + 1; }
NOINLINE static int chain2(int x) { return chain3(x) * 2; }
NOINLINE static int chain1(int x) { return chain2(x) - 1; }
NOINLINE static int fib(int n) { return n < 2 ? leaf(n) : fib(n - 1) + fib(n - 2); }
NOINLINE int op_add(int x) { return leaf(x) + 2; }
NOINLINE int op_mul(int x) { return chain3(x) * 3; }

/* A table the compiler cannot see through: calls through it stay indirect. */
static int (*volatile ops[2])(int) = {op_add, op_mul};

NOINLINE static int dispatch(int which, int x) {
    int r = ops[which](x);
    return r + 1;
}

struct work {
    int iterations;
    double seconds;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

NOINLINE static void worker_round(int n) {
    for (int i = 0; i < n; i++) sink += chain1(i) + dispatch(1, i) + fib(4);
}

NOINLINE static void *worker(void *arg) {
    struct work *w = arg;
    double end = now() + w->seconds;
    do {
        worker_round(w->iterations);
        if (w->seconds > 0) {
            struct timespec pause = {0, 10 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
    } while (now() < end);
    return NULL;
}

NOINLINE static void run_main(int n) {
    for (int i = 0; i < n; i++) sink += dispatch(0, i) + chain2(i) + fib(5);
}

int main(int argc, char **argv) {
    struct work w = {argc > 1 ? atoi(argv[1]) : 100, argc > 2 ? atof(argv[2]) : 0};
    pthread_t t;
    if (pthread_create(&t, NULL, worker, &w) != 0) return 1;
    double end = now() + w.seconds;
    do {
        run_main(w.iterations);
        if (w.seconds > 0) {
            struct timespec pause = {0, 10 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
    } while (now() < end);
    pthread_join(t, NULL);
    printf("%d\n", sink);
    return 0;
}
