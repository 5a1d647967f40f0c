/*
 * probebench: calls one function in a tight loop and prints the mean ns per call.
 *
 *   emu_fn  starts with `push %rbp`: the kernel emulates a probe there.
 *   ss_fn   starts with `lea`, which the kernel single-steps, followed by `push %rbx`: afetm
 *           moves its probe onto the push; a probe at the entry (bpftrace) single-steps.
 *
 * Both carry CFI (as compiled functions do), so afetm can unwind their call stacks in the
 * kernel once it has learnt the steps.
 *
 * Usage: probebench emu|ss calls
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__asm__(
    ".text\n"
    ".globl emu_fn\n.type emu_fn,@function\n"
    "emu_fn:\n"
    "  .cfi_startproc\n"
    "  push %rbp\n"
    "  .cfi_def_cfa_offset 16\n"
    "  .cfi_offset %rbp,-16\n"
    "  mov %rsp,%rbp\n"
    "  .cfi_def_cfa_register %rbp\n"
    "  lea 1(%rdi),%rax\n"
    "  pop %rbp\n"
    "  .cfi_def_cfa %rsp,8\n"
    "  ret\n"
    "  .cfi_endproc\n"
    ".size emu_fn,.-emu_fn\n"
    ".globl ss_fn\n.type ss_fn,@function\n"
    "ss_fn:\n"
    "  .cfi_startproc\n"
    "  lea 1(%rdi),%rax\n"
    "  push %rbx\n"
    "  .cfi_def_cfa_offset 16\n"
    "  .cfi_offset %rbx,-16\n"
    "  mov %rax,%rbx\n"
    "  mov %rbx,%rax\n"
    "  pop %rbx\n"
    "  .cfi_def_cfa_offset 8\n"
    "  ret\n"
    "  .cfi_endproc\n"
    ".size ss_fn,.-ss_fn\n");

long emu_fn(long);
long ss_fn(long);

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: probebench emu|ss calls\n");
        return 2;
    }
    long (*volatile f)(long) = strcmp(argv[1], "ss") == 0 ? ss_fn : emu_fn;
    long n = atol(argv[2]), acc = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) acc += f(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / n);
    return acc == 42; /* keep acc alive */
}
