/*
 * fates: two threads whose ends the agent's fate reports must see. After a line on stdin (so
 * the tracer attaches first) the main thread and a worker each call tick() -> leaf() every
 * 2 ms; after 50 rounds:
 *   segv:   the worker calls boom(), which writes through a null pointer: SIGSEGV kills both;
 *   handler: as segv, with a SIGSEGV handler (a crash reporter, as redis has) that makes
 *           traced calls (report() -> tick()) before it restores the default and re-raises;
 *   exit:   main calls exit(3), which ends the worker too;
 *   silent: the worker blocks in pause() for good (no traced call any more) while main ticks
 *           on for `seconds`, then returns 0;
 *   run:    both tick until a signal ends or stops them (SIGKILL, SIGSTOP from the test).
 *
 * Usage: fates segv|handler|exit|silent|run [seconds]
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *mode = "run";
static double seconds = 3.0;
/* Written by every call: keeps the compiler from dropping calls whose result is unused. */
static volatile long sink;

__attribute__((noinline)) long leaf(long x) { sink = x; return x * 3 + 1; }
__attribute__((noinline)) long tick(long i) { sink = i; return leaf(i) + 1; }

__attribute__((noinline)) void boom(long *p) { *p = 42; }

/* The crash reporter's traced work: what a handler does after the fault. */
__attribute__((noinline)) long report(long i) { sink = i; return tick(i); }

static void on_fault(int sig) {
    for (long i = 0; i < 5; i++) report(i);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void nap(void) {
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

__attribute__((noinline)) void *worker(void *arg) {
    (void)arg;
    for (long i = 0;; i++) {
        tick(i);
        if (i == 50 && (strcmp(mode, "segv") == 0 || strcmp(mode, "handler") == 0)) {
            long *volatile p = NULL;
            boom(p);
        }
        if (i == 50 && strcmp(mode, "silent") == 0) {
            for (;;) pause();
        }
        nap();
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) mode = argv[1];
    if (argc > 2) seconds = atof(argv[2]);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 2;
    if (strcmp(mode, "handler") == 0) signal(SIGSEGV, on_fault);
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    long rounds = (long)(seconds * 500);
    for (long i = 0;; i++) {
        tick(i);
        if (i == 50 && strcmp(mode, "exit") == 0) exit(3);
        if (strcmp(mode, "silent") == 0 && i >= rounds) return 0;
        nap();
    }
}
