/* How an I/O thread waits for its next event (see iothread_wait.py for why it is C). cffi releases the GIL
 * for the call, so everything below runs without it.
 *
 * 1. The wake-up flags its handlers left (wake_publish.py) are stored first: a vCPU spinning on one sees
 *    it with the GIL already free.
 * 2. Up to ``spin_ns`` it polls the epoll set without sleeping (epoll_wait with a zero timeout, a few PAUSEs
 *    and a sched_yield per round, so a runnable thread on this CPU -- the vCPU the event will come from --
 *    is never held up). An event that comes within the window is seen without the sleep and the cross-CPU
 *    wake-up that would cost its sender ~18 us inside the waking system call on this project's hosts.
 * 3. Then it sleeps in epoll_wait for at most ``timeout_ms`` (-1: no limit).
 * 4. A ready descriptor that has a native handler (``native``: a device's C code, e.g. virtio-blk's leased
 *    queue in blk_plane.c) is offered to it first; one it served (it returns 1) is not reported, and when
 *    nothing else is ready the wait starts again at 2, spin window and all, without going back to Python.
 * The ready descriptors go to ``ready`` (their count is returned, -1 on EINTR); ``waited_ns`` receives the
 * time from the last start of the wait to the event (or the timeout), which the caller's adaptive window
 * learns from; ``served`` counts the events native handlers took. */

#include <stdint.h>
#include <sched.h>
#include <sys/epoll.h>
#include <time.h>

static inline uint64_t now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

struct pyemu_native_fd {
    int32_t fd;
    int (*handle)(void *arg);   /* 1: served; 0: report the descriptor to Python */
    void *arg;
};

/* Offer the ready descriptors to their native handlers; returns how many are left for Python (compacted). */
static int offer_native(struct epoll_event *events, int n, const struct pyemu_native_fd *native, int nnative,
                        uint64_t *served)
{
    int left = 0;
    for (int i = 0; i < n; i++) {
        int taken = 0;
        for (int j = 0; j < nnative; j++) {
            if (native[j].fd == events[i].data.fd) {
                taken = native[j].handle(native[j].arg);
                break;
            }
        }
        if (taken)
            (*served)++;
        else
            events[left++] = events[i];
    }
    return left;
}

int pyemu_iothread_wait(int epfd, const intptr_t *flags, int count, uint64_t spin_ns, int timeout_ms,
                        int *ready, int max_ready, uint64_t *waited_ns,
                        const struct pyemu_native_fd *native, int nnative, uint64_t *served)
{
    struct epoll_event events[64];
    if (max_ready > 64)
        max_ready = 64;
    for (int i = 0; i < count; i++)
        __atomic_store_n((int32_t *)flags[i], 1, __ATOMIC_RELEASE);
    uint64_t start;
    int n;
again:
    start = now_ns();
    n = 0;
    if (spin_ns) {
        uint64_t deadline = start + spin_ns;
        for (;;) {
            n = epoll_wait(epfd, events, max_ready, 0);
            if (n != 0)
                break;
            for (int i = 0; i < 16; i++)
                __builtin_ia32_pause();
            sched_yield();
            if (now_ns() >= deadline)
                break;
        }
    }
    if (n == 0)
        n = epoll_wait(epfd, events, max_ready, timeout_ms);
    if (n > 0 && nnative) {
        n = offer_native(events, n, native, nnative, served);
        if (n == 0)
            goto again;
    }
    *waited_ns = now_ns() - start;
    for (int i = 0; i < n; i++)
        ready[i] = events[i].data.fd;
    return n;
}
