/* virtio-blk's data plane: serves the reads and writes at the head of a split virtqueue straight between
 * a raw image file and guest RAM, without Python (see blk_plane.py for when it is used and why).
 *
 * Everything the guest wrote is untrusted. This code never decides that a request is bad: whatever it
 * does not fully understand -- a flush, a discard, an odd layout, an index or address it cannot check, an
 * O_DIRECT request it cannot send unbounced, a write it may not do -- ends the call *before* that chain is
 * taken, and the Python device, which owns every error path, handles it from there. So a chain is either
 * served completely here (data moved, status byte written, used element filled) or not touched at all.
 *
 * Memory safety: every guest address goes through ram_ptr(), which returns a host pointer only when the
 * whole range lies inside one RAM region (overflow-safe), and every table index is checked against its
 * table's size before use. The used index is not published here: Python reports the DMA writes first
 * (the software CPU drops stale translations of that RAM) and then publishes it, as its own push does.
 */

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define BP_DESC_F_NEXT 1
#define BP_DESC_F_WRITE 2
#define BP_DESC_F_INDIRECT 4
#define BP_MAX_QUEUE 32768
#define BP_MAX_IOV 1024
#define BP_T_IN 0
#define BP_T_OUT 1
#define BP_SECTOR 512
#define BP_HEADER 16
#define BP_MAX_MERGED 32                /* blk.py's MAX_MERGED_REQUESTS */
#define BP_MAX_MERGED_BYTES (8u << 20)  /* blk.py's MAX_MERGED_BYTES */

struct pyemu_bp_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct pyemu_bp_range {
    uint64_t start;               /* a guest physical address, or a disk offset */
    uint64_t len;
};

struct pyemu_bp_call {
    /* in */
    const struct pyemu_bp_region *ram;
    uint32_t nram;
    uint64_t desc, avail, used;   /* ring addresses (guest physical) */
    uint32_t size;                /* queue size, a power of two */
    int32_t indirect, event_idx;
    int32_t fd;
    uint64_t file_offset;         /* where the disk starts in the file (raw offset=) */
    uint64_t disk_bytes;
    uint64_t direct_align;        /* 0: buffered descriptor; else O_DIRECT alignment */
    uint64_t direct_end;          /* O_DIRECT: file bytes from here on are not served (the partial tail) */
    int64_t write_floor;          /* writes only at disk bytes from here on; -1: no writes */
    uint32_t max_requests;
    struct pyemu_bp_range *wrote; /* guest ranges written, for the DMA report */
    uint32_t max_wrote;
    struct pyemu_bp_range *disk;  /* disk ranges written, for the dirty bitmaps */
    uint32_t max_disk;
    /* in/out */
    uint16_t last_avail, used_idx;
    /* out */
    uint32_t served, nwrote, ndisk;
    uint32_t merged;              /* requests served in an earlier request's preadv/pwritev */
    int32_t stop;                 /* see BP_STOP_* */
};

struct bp_seg { uint64_t gpa; uint8_t *host; uint32_t len; };

enum { BP_STOP_EMPTY = 0, BP_STOP_PYTHON = 1, BP_STOP_HOST_ERROR = 2, BP_STOP_LIMIT = 3, BP_TAKEN = -1 };

/* The data of a request as an iovec: ``skip`` bytes into the segments [first, end), ``length`` bytes. */
static int data_iov(const struct bp_seg *seg, uint32_t first, uint32_t end, uint64_t skip, uint64_t length,
                    struct iovec *iov)
{
    int cnt = 0;
    for (uint32_t i = first; i < end && length; i++) {
        uint64_t n = seg[i].len;
        if (skip >= n) {
            skip -= n;
            continue;
        }
        n -= skip;
        if (n > length)
            n = length;
        iov[cnt].iov_base = seg[i].host + skip;
        iov[cnt].iov_len = (size_t)n;
        cnt++;
        length -= n;
        skip = 0;
    }
    return cnt;
}

static uint8_t *ram_ptr(const struct pyemu_bp_call *c, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < c->nram; i++) {
        const struct pyemu_bp_region *r = &c->ram[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static inline uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t load_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void store_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void store_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* One chain's segments: a range of the call's shared segment array. */
struct bp_chain {
    uint32_t first, nseg, nread;  /* segments [first, first + nseg); the first nread are device-readable */
    uint64_t read_len, write_len;
};

/* Walk the chain from ``head`` by the rules of queue.py's Virtqueue._walk, appending its segments to
 * ``seg`` from index ``ch->first`` (``room`` entries left). 0: walked; -1: anything else (broken, or more
 * segments than one preadv takes): left to Python. */
static int walk(const struct pyemu_bp_call *c, const uint8_t *ring_table, uint16_t head, struct bp_seg *seg,
                uint32_t room, struct bp_chain *ch)
{
    const uint8_t *table = ring_table;
    uint32_t table_size = c->size, index = head, visited = 0;
    int in_indirect = 0;
    struct bp_seg *out = seg + ch->first;
    ch->nseg = ch->nread = 0;
    ch->read_len = ch->write_len = 0;
    for (;;) {
        if (++visited > table_size)
            return -1;
        const uint8_t *d = table + 16 * (uint64_t)index;
        uint64_t addr = load_u64(d);
        uint32_t len = load_u32(d + 8);
        uint16_t flags = load_u16(d + 12), next = load_u16(d + 14);
        if (flags & BP_DESC_F_INDIRECT) {
            if (!c->indirect || in_indirect || (flags & BP_DESC_F_NEXT))
                return -1;
            if (len == 0 || len % 16 || len / 16 > BP_MAX_QUEUE)
                return -1;
            table = ram_ptr(c, addr, len);
            if (table == NULL)
                return -1;
            table_size = len / 16;
            index = 0;
            visited = 0;
            in_indirect = 1;
            continue;
        }
        int writable = (flags & BP_DESC_F_WRITE) != 0;
        if (!writable && ch->nseg > ch->nread)
            return -1;            /* readable after writable */
        if (len) {
            uint8_t *host = ram_ptr(c, addr, len);
            if (host == NULL || ch->nseg >= room)
                return -1;
            if (writable) {
                ch->write_len += len;
                if (ch->write_len >= (1ull << 32))
                    return -1;
            } else {
                ch->read_len += len;
                if (ch->read_len >= (1ull << 32))
                    return -1;
                ch->nread++;
            }
            out[ch->nseg].gpa = addr;
            out[ch->nseg].host = host;
            out[ch->nseg].len = len;
            ch->nseg++;
        }
        if (!(flags & BP_DESC_F_NEXT))
            return 0;
        if (next >= table_size)
            return -1;
        index = next;
    }
}

/* The request header (type, reserved, sector), gathered from the readable segments. */
static void header(const struct bp_seg *seg, const struct bp_chain *ch, uint8_t out[BP_HEADER])
{
    uint32_t got = 0;
    for (uint32_t i = ch->first; i < ch->first + ch->nread && got < BP_HEADER; i++) {
        uint32_t n = seg[i].len < BP_HEADER - got ? seg[i].len : BP_HEADER - got;
        memcpy(out + got, seg[i].host, n);
        got += n;
    }
}

/* preadv (or pwritev) until ``length`` bytes moved. The end of the file reads as zeros
 * (hostio.read_full); a write that moves nothing is an error (hostio.write_full). */
static int transfer_all(int fd, int write, struct iovec *iov, int cnt, uint64_t offset, uint64_t length)
{
    while (length) {
        ssize_t n = write ? pwritev(fd, iov, cnt, (off_t)offset) : preadv(fd, iov, cnt, (off_t)offset);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno ? errno : EIO;
        }
        if (n == 0) {
            if (write)
                return EIO;
            for (int i = 0; i < cnt; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        offset += (uint64_t)n;
        length -= (uint64_t)n;
        while (cnt && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* One request the plane may serve: its chain, what it asks for and its data as iovecs. */
struct bp_request {
    uint16_t head;
    int write;
    uint64_t sector, length;
    struct bp_chain ch;
    uint32_t iov_first, iov_cnt;
};

/* Look at the chain ``k`` places after ``c->last_avail`` and decide whether the plane serves it as part of
 * the batch ``r[0..k)``: TAKEN into r[k], else the reason the batch ends before it (with k == 0: the stop
 * reason of the call). ``seg``/``iov`` are the batch's shared arrays, ``*nseg``/``*niov`` their fill. */
static int take(const struct pyemu_bp_call *c, const uint8_t *desc, const uint8_t *avail, uint32_t k,
                struct bp_request *r, struct bp_seg *seg, uint32_t *nseg, struct iovec *iov, uint32_t *niov,
                uint64_t *batch_bytes)
{
    uint32_t size = c->size;
    struct bp_request *q = &r[k];
    q->head = load_u16(avail + 4 + 2 * ((uint16_t)(c->last_avail + k) & (size - 1)));
    q->ch.first = *nseg;
    if (q->head >= size || walk(c, desc, q->head, seg, BP_MAX_IOV - *nseg, &q->ch) != 0
            || q->ch.read_len < BP_HEADER || q->ch.write_len < 1)
        return BP_STOP_PYTHON;
    if (c->nwrote + q->ch.first + q->ch.nseg > c->max_wrote)
        return BP_STOP_LIMIT;     /* no room to report its writes: not taken this call */
    uint8_t hdr[BP_HEADER];
    header(seg, &q->ch, hdr);
    uint32_t type = load_u32(hdr);
    q->sector = load_u64(hdr + 8);
    q->write = type == BP_T_OUT;
    q->length = q->write ? q->ch.read_len - BP_HEADER : q->ch.write_len - 1;
    if ((type != BP_T_IN && !q->write) || q->length == 0 || q->length % BP_SECTOR
            || q->sector > c->disk_bytes / BP_SECTOR || q->length > c->disk_bytes - q->sector * BP_SECTOR
            || (q->write && (c->write_floor < 0 || q->sector * BP_SECTOR < (uint64_t)c->write_floor)))
        return BP_STOP_PYTHON;
    if (q->write && c->ndisk >= c->max_disk)
        return BP_STOP_LIMIT;
    if (k) {                      /* merged with the batch: same direction, the very next sectors */
        const struct bp_request *p = &r[k - 1];
        if (q->write != p->write || q->sector != p->sector + p->length / BP_SECTOR
                || *batch_bytes + q->length > BP_MAX_MERGED_BYTES)
            return BP_STOP_PYTHON;
    }
    /* The data: a read's writable segments without their last byte (the status), a write's readable
     * segments after the header. */
    struct iovec *out = iov + *niov;
    uint32_t first = q->ch.first;
    int cnt = q->write ? data_iov(seg, first, first + q->ch.nread, BP_HEADER, q->length, out)
                       : data_iov(seg, first + q->ch.nread, first + q->ch.nseg, 0, q->length, out);
    if (c->direct_align) {
        uint64_t a = c->direct_align;
        uint64_t offset = c->file_offset + q->sector * BP_SECTOR;
        int ok = offset % a == 0 && q->length % a == 0 && offset + q->length <= c->direct_end;
        for (int i = 0; ok && i < cnt; i++)
            ok = (uintptr_t)out[i].iov_base % a == 0 && out[i].iov_len % a == 0;
        if (!ok)
            return BP_STOP_PYTHON;  /* Python bounces it */
    }
    q->iov_first = *niov;
    q->iov_cnt = (uint32_t)cnt;
    *nseg += q->ch.nseg;
    *niov += (uint32_t)cnt;
    *batch_bytes += q->length;
    return BP_TAKEN;
}

/* A request's completion: the status byte (the last writable byte), the written ranges, the used element. */
static void complete(struct pyemu_bp_call *c, uint8_t *used, const struct bp_request *q, const struct bp_seg *seg)
{
    const struct bp_seg *last = &seg[q->ch.first + q->ch.nseg - 1];
    last->host[last->len - 1] = 0;      /* VIRTIO_BLK_S_OK */
    if (q->write) {
        c->wrote[c->nwrote].start = last->gpa + last->len - 1;
        c->wrote[c->nwrote].len = 1;
        c->nwrote++;
    } else {
        for (uint32_t i = q->ch.first + q->ch.nread; i < q->ch.first + q->ch.nseg; i++) {
            c->wrote[c->nwrote].start = seg[i].gpa;
            c->wrote[c->nwrote].len = seg[i].len;
            c->nwrote++;
        }
    }
    uint8_t *elem = used + 4 + 8 * (c->used_idx & (c->size - 1));
    store_u32(elem, q->head);
    store_u32(elem + 4, q->write ? 1 : (uint32_t)q->ch.write_len);
    c->last_avail++;
    c->used_idx++;
    c->served++;
}

int pyemu_bp_serve(struct pyemu_bp_call *c)
{
    c->served = c->nwrote = c->ndisk = c->merged = 0;
    c->stop = BP_STOP_EMPTY;
    uint32_t size = c->size;
    if (size == 0 || size > BP_MAX_QUEUE || (size & (size - 1))) {
        c->stop = BP_STOP_PYTHON;
        return 0;
    }
    uint8_t *desc = ram_ptr(c, c->desc, 16ull * size);
    uint8_t *avail = ram_ptr(c, c->avail, 6 + 2ull * size);
    uint8_t *used = ram_ptr(c, c->used, 6 + 8ull * size);
    if (desc == NULL || avail == NULL || used == NULL) {
        c->stop = BP_STOP_PYTHON;
        return 0;
    }
    /* ~50 KiB of segments and iovecs: not on the I/O thread's stack */
    static __thread struct bp_seg seg[BP_MAX_IOV];
    static __thread struct iovec iov[BP_MAX_IOV];
    static __thread struct bp_request r[BP_MAX_MERGED];
    while (c->served < c->max_requests) {
        uint16_t avail_idx = __atomic_load_n((uint16_t *)(avail + 2), __ATOMIC_ACQUIRE);
        uint16_t pending = (uint16_t)(avail_idx - c->last_avail);
        if (pending == 0) {
            c->stop = BP_STOP_EMPTY;
            return (int)c->served;
        }
        if (pending > size) {
            c->stop = BP_STOP_PYTHON;
            return (int)c->served;
        }
        /* A batch: the chain at the head and those behind it that continue it (consecutive reads or
         * writes, as the Python path and QEMU merge them), moved with one preadv/pwritev. */
        uint32_t k = 0, nseg = 0, niov = 0;
        uint64_t bytes = 0;
        uint32_t limit = c->max_requests - c->served;
        if (limit > BP_MAX_MERGED)
            limit = BP_MAX_MERGED;
        if (limit > pending)
            limit = pending;
        int why = BP_TAKEN;
        while (k < limit && (why = take(c, desc, avail, k, r, seg, &nseg, iov, &niov, &bytes)) == BP_TAKEN)
            k++;
        if (k == 0) {
            c->stop = why;        /* Python's; or it did not fit the reports left (a later call takes it) */
            return (int)c->served;
        }
        int write = r[0].write;
        int err = transfer_all(c->fd, write, iov, (int)niov, c->file_offset + r[0].sector * BP_SECTOR, bytes);
        if (err) {
            c->stop = BP_STOP_HOST_ERROR;    /* Python serves them again, one by one, and reports the error */
            return (int)c->served;
        }
        if (write) {
            c->disk[c->ndisk].start = r[0].sector * BP_SECTOR;
            c->disk[c->ndisk].len = bytes;
            c->ndisk++;
        }
        for (uint32_t i = 0; i < k; i++)
            complete(c, used, &r[i], seg);
        c->merged += k - 1;
        if (c->event_idx) {
            /* avail_event: notify on the very next buffer; fenced before the next read of the index. */
            store_u16(used + 4 + 8 * size, c->last_avail);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        }
    }
    c->stop = BP_STOP_LIMIT;
    return (int)c->served;
}
