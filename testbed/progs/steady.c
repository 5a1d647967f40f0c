/*
 * steady: a request loop at a fixed rate, for the soak (`cargo xtask soak`): each request is
 * soak_request() calling soak_parse() and soak_reply(), so a plan tracing the three sees exactly
 * three events per request.
 *
 * Usage: steady RATE   (requests per second, single thread)
 * Starts after it reads a line on stdin (so the tracer can attach first), stops at the next line
 * or at EOF, and prints the number of requests it made on stdout.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile long sink;

__attribute__((noinline)) long soak_parse(long x) { sink += x; return x * 3; }
__attribute__((noinline)) long soak_reply(long x) { sink ^= x; return x + 7; }
__attribute__((noinline)) long soak_request(long x) { return soak_reply(soak_parse(x)); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int stdin_ready(void) {
    struct pollfd p = {.fd = 0, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

int main(int argc, char **argv) {
    if (argc != 2 || atol(argv[1]) <= 0) {
        fprintf(stderr, "usage: steady RATE\n");
        return 2;
    }
    long rate = atol(argv[1]);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    double start = now();
    long done = 0;
    for (;;) {
        long due = (long)((now() - start) * rate);
        while (done < due) soak_request(done++);
        if (stdin_ready()) break; /* a line or EOF: stop */
        usleep(1000);
    }
    printf("%ld\n", done);
    return 0;
}
