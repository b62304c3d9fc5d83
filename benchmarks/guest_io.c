/* guest_io: the in-guest half of benchmarks/virtio.py (also run on the host, inside the benchmark's network
 * namespace, as the other end of the TCP transfers).
 *
 * Built at benchmark time with `gcc -O2 -static` and appended to the guest initramfs as /bin/guest_io; never
 * committed as a binary. Every mode prints one line
 *     GIO op=<mode> bytes=<n> ops=<n> secs=<s> mbps=<MB/s, MB = 10^6 bytes> iops=<ops/s>
 * timed with clock_gettime(CLOCK_MONOTONIC) around the transfer only, or "GIO-ERROR ..." and exit status 1.
 * Every mode is bounded by alarm($GIO_TIMEOUT, default 300 s): a stuck transfer ends the process (SIGALRM)
 * instead of hanging the console.
 *
 *   guest_io seqread  DEV MAX_MIB MAX_SECS       O_DIRECT 1 MiB reads from offset 0 (wraps at the end)
 *   guest_io seqwrite DEV MAX_MIB MAX_SECS       O_DIRECT 1 MiB writes from offset 0, then fdatasync (timed)
 *   guest_io randread DEV SECS SEED              O_DIRECT 4 KiB reads at random aligned offsets, QD 1
 *   guest_io send     HOST PORT MIB              connect, send MIB MiB, shut down writing, wait for the peer's EOF
 *   guest_io recv     HOST PORT                  connect, read until EOF, close
 *   guest_io serve-recv PORT                     listen on PORT, accept one, read until EOF, close
 *   guest_io serve-send PORT MIB                 listen on PORT, accept one, send MIB MiB, shut down, wait for EOF
 * The serve-* modes print "GIO-LISTENING" once they listen. Addresses are IPv4 literals (no resolver).
 * Just before its clock starts every mode prints "GIO-START": the host timestamps that line and the result line
 * as they arrive on the serial console, which times the run with the host's clock as well (the guest's clock
 * is jiffies-based, and slow, once its clocksource watchdog has declared the TSC unstable under host load).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MiB (1024L * 1024L)
#define BLOCK (1 * MiB)
#define NET_CHUNK (256 * 1024)

static void started(void) {
    printf("GIO-START\n");
    fflush(stdout);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int fail(const char *what) {
    printf("GIO-ERROR %s: %s\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

/* kB of this process's anonymous memory in transparent huge pages (0 if unknown). */
static long huge_kb(void) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long kb = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    fclose(f);
    return kb;
}

static void report(const char *op, long long bytes, long long ops, double secs) {
    if (secs <= 0) secs = 1e-9;
    printf("GIO op=%s bytes=%lld ops=%lld secs=%.6f mbps=%.3f iops=%.1f thp_kb=%ld\n", op, bytes, ops, secs,
           bytes / secs / 1e6, ops / secs, huge_kb());
    fflush(stdout);
}

static void *aligned(size_t size, int fill) {
    void *buf;
    if (posix_memalign(&buf, 4096, size) != 0) return NULL;
    memset(buf, fill, size);
    return buf;
}

/* A buffer in one transparent huge page where the guest can give one, so a 1 MiB request is one physically
 * contiguous segment in every VM. With 4 KiB pages the request's segment count depends on where the guest's
 * allocator happened to find free pages (measured: 255 scattered pages in one VM, 1-2 segments in the other,
 * and the host's O_DIRECT read of 255 scattered pages is ~40% slower), which is the guest's luck, not the
 * device's speed. Falls back to 4 KiB pages; the result line's thp_kb= says which it was. */
static void *huge_aligned(size_t size, int fill) {
    const size_t huge = 2 * MiB;
    size_t span = (size + huge - 1) / huge * huge;
    char *area = mmap(NULL, span + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) return aligned(size, fill);
    char *buf = (char *)(((uintptr_t)area + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(buf, span, MADV_HUGEPAGE);
    memset(buf, fill, size);
    return buf;
}

static long long device_size(int fd) {
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) == 0) return (long long)size;
    struct stat st;
    if (fstat(fd, &st) == 0) return st.st_size;
    return -1;
}

static int sequential(const char *dev, long max_mib, double max_secs, int writing) {
    int fd = open(dev, (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) return fail("open");
    long long size = device_size(fd) / BLOCK * BLOCK;
    if (size <= 0) return fail("device size");
    char *buf = huge_aligned(BLOCK, 0x5a);
    if (!buf) return fail("posix_memalign");
    long long done = 0, ops = 0, offset = 0, limit = max_mib * MiB;
    started();
    double start = now(), t = start;
    while (done < limit && t - start < max_secs) {
        ssize_t n = writing ? pwrite(fd, buf, BLOCK, offset) : pread(fd, buf, BLOCK, offset);
        if (n != BLOCK) return fail(writing ? "pwrite" : "pread");
        done += n;
        ops++;
        offset = (offset + BLOCK) % size;
        t = now();
    }
    if (writing && fdatasync(fd) != 0) return fail("fdatasync");
    report(writing ? "seqwrite" : "seqread", done, ops, now() - start);
    close(fd);
    return 0;
}

static int random_read(const char *dev, double secs, uint64_t seed) {
    int fd = open(dev, O_RDONLY | O_DIRECT);
    if (fd < 0) return fail("open");
    long long blocks = device_size(fd) / 4096;
    if (blocks <= 0) return fail("device size");
    char *buf = aligned(4096, 0);
    if (!buf) return fail("posix_memalign");
    uint64_t x = seed ? seed : 1;
    long long ops = 0;
    started();
    double start = now(), t = start;
    while (t - start < secs) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;  /* xorshift64: the same offsets for every run */
        if (pread(fd, buf, 4096, (off_t)(x % (uint64_t)blocks) * 4096) != 4096) return fail("pread");
        ops++;
        t = now();
    }
    report("randread", ops * 4096, ops, t - start);
    close(fd);
    return 0;
}

static int connect_to(const char *host, int port) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { errno = EINVAL; return -1; }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    for (int tries = 0; tries < 50; tries++) {  /* the listener may come up a moment later */
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) return fd;
        if (errno != ECONNREFUSED && errno != ENETUNREACH && errno != EHOSTUNREACH) break;
        usleep(100000);
    }
    close(fd);
    return -1;
}

static int accept_one(int port) {
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (ls < 0) return -1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = INADDR_ANY};
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(ls, 1) != 0) return -1;
    printf("GIO-LISTENING port=%d\n", port);
    fflush(stdout);
    int fd = accept(ls, NULL, NULL);
    close(ls);
    return fd;
}

/* Send `mib` MiB, then shut down writing and wait for the peer to close: the time covers delivery of every
 * byte to the receiving application, not just the copy into the local socket buffer. */
static int send_all(int fd, long mib, const char *op) {
    char *buf = aligned(NET_CHUNK, 0x6b);
    long long total = mib * MiB, done = 0;
    started();
    double start = now();
    while (done < total) {
        size_t want = total - done < NET_CHUNK ? (size_t)(total - done) : NET_CHUNK;
        ssize_t n = send(fd, buf, want, 0);
        if (n < 0) { if (errno == EINTR) continue; return fail("send"); }
        done += n;
    }
    shutdown(fd, SHUT_WR);
    while (recv(fd, buf, NET_CHUNK, 0) > 0) {}
    report(op, done, done / NET_CHUNK, now() - start);
    close(fd);
    return 0;
}

/* Read until EOF; the clock starts at the first byte (connection setup and the sender's start-up excluded). */
static int recv_all(int fd, const char *op) {
    char *buf = aligned(NET_CHUNK, 0);
    long long done = 0, calls = 0;
    double start = 0;
    for (;;) {
        ssize_t n = recv(fd, buf, NET_CHUNK, 0);
        if (n < 0) { if (errno == EINTR) continue; return fail("recv"); }
        if (n == 0) break;
        if (done == 0) { started(); start = now(); }
        done += n;
        calls++;
    }
    double secs = done ? now() - start : 0;
    close(fd);
    report(op, done, calls, secs);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *limit = getenv("GIO_TIMEOUT");  /* seconds; the process ends by then whatever happens */
    alarm(limit ? (unsigned)atoi(limit) : 300);
    if (argc == 5 && !strcmp(argv[1], "seqread")) return sequential(argv[2], atol(argv[3]), atof(argv[4]), 0);
    if (argc == 5 && !strcmp(argv[1], "seqwrite")) return sequential(argv[2], atol(argv[3]), atof(argv[4]), 1);
    if (argc == 5 && !strcmp(argv[1], "randread"))
        return random_read(argv[2], atof(argv[3]), strtoull(argv[4], NULL, 0));
    if (argc == 5 && !strcmp(argv[1], "send")) {
        int fd = connect_to(argv[2], atoi(argv[3]));
        return fd < 0 ? fail("connect") : send_all(fd, atol(argv[4]), "send");
    }
    if (argc == 4 && !strcmp(argv[1], "recv")) {
        int fd = connect_to(argv[2], atoi(argv[3]));
        return fd < 0 ? fail("connect") : recv_all(fd, "recv");
    }
    if (argc == 3 && !strcmp(argv[1], "serve-recv")) {
        int fd = accept_one(atoi(argv[2]));
        return fd < 0 ? fail("listen/accept") : recv_all(fd, "serve-recv");
    }
    if (argc == 4 && !strcmp(argv[1], "serve-send")) {
        int fd = accept_one(atoi(argv[2]));
        return fd < 0 ? fail("listen/accept") : send_all(fd, atol(argv[3]), "serve-send");
    }
    fprintf(stderr, "usage: see the comment at the top of guest_io.c\n");
    return 2;
}
