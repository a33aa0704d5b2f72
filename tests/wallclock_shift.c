/* Steps one process's wall clock, and only its wall clock, for the clock-jump drill
 * (tests/test_clock_jump.py).
 *
 * Loaded with LD_PRELOAD.  QNODED_WALLCLOCK_SHIFT_FILE names an 8-byte file holding
 * a signed little-endian count of nanoseconds; it is mapped shared, so the test
 * steps the clock of a running process by rewriting it.  CLOCK_REALTIME (and its
 * coarse variant), gettimeofday() and time() are shifted; CLOCK_MONOTONIC and
 * CLOCK_BOOTTIME are not, as when NTP or an operator steps a real clock.
 *
 * libfaketime would be the usual tool, but with its monotonic clock left alone
 * (FAKETIME_DONT_FAKE_MONOTONIC=1) Debian 12's 0.9.10 fails Python's time.sleep
 * with EINVAL, and without that it moves the monotonic clock too.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const volatile int64_t *shift_ns;
static int (*real_clock_gettime)(clockid_t, struct timespec *);

__attribute__((constructor)) static void wallclock_shift_init(void)
{
    real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    const char *path = getenv("QNODED_WALLCLOCK_SHIFT_FILE");
    if (path == NULL)
        return;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    void *map = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map != MAP_FAILED)
        shift_ns = (const volatile int64_t *)map;
}

static int64_t current_shift(void)
{
    return shift_ns == NULL ? 0 : __atomic_load_n(shift_ns, __ATOMIC_RELAXED);
}

static void add_shift(struct timespec *ts)
{
    int64_t shift = current_shift(); /* read once: the test may rewrite it meanwhile */
    int64_t ns = (int64_t)ts->tv_nsec + shift % 1000000000;
    ts->tv_sec += (time_t)(shift / 1000000000);
    if (ns < 0) {
        ns += 1000000000;
        ts->tv_sec -= 1;
    } else if (ns >= 1000000000) {
        ns -= 1000000000;
        ts->tv_sec += 1;
    }
    ts->tv_nsec = (long)ns;
}

int clock_gettime(clockid_t id, struct timespec *ts)
{
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        add_shift(ts);
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz)
{
    (void)tz;
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0) { /* glibc declares tv nonnull */
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out != NULL)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
