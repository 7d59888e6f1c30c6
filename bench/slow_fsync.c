/* LD_PRELOAD shim for the benchmarks (bench/slow_disk.py builds and loads it): fsync(2) and fdatasync(2)
 * first sleep SLOW_FSYNC_US microseconds, then make the real call and return what it returns. This VM's
 * flush is nearly free (~85 us a SQLite commit); an ordinary disk's costs ~0.5-2 ms, and that is where a
 * group commit pays. Nothing else changes: every flush still happens, in the same order, with its result.
 * SQLite's WAL commit with synchronous=FULL calls fdatasync (strace), its checkpoint fsync; it makes no
 * sync_file_range call. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static long delay_ns;

__attribute__((constructor)) static void find_the_real_calls(void) {
    real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (!real_fsync || !real_fdatasync) {
        fprintf(stderr, "slow_fsync: no real fsync/fdatasync to call: %s\n", dlerror());
        abort(); /* never a flush that does not reach the disk */
    }
    const char *us = getenv("SLOW_FSYNC_US");
    delay_ns = us ? atol(us) * 1000L : 0;
}

/* Sleeps (no CPU, as a thread waiting on a disk does) until the delay has passed, signals or not. */
static void wait_as_a_disk_would(void) {
    if (delay_ns <= 0) return;
    int saved_errno = errno;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += (until.tv_nsec + delay_ns) / 1000000000L;
    until.tv_nsec = (until.tv_nsec + delay_ns) % 1000000000L;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR) {
    }
    errno = saved_errno;
}

int fsync(int fd) {
    wait_as_a_disk_would();
    return real_fsync(fd);
}

int fdatasync(int fd) {
    wait_as_a_disk_would();
    return real_fdatasync(fd);
}
