/* virtio-blk's data plane: serves the reads and writes at the head of a split virtqueue straight between
 * a raw image file and guest RAM, without Python (see blk_plane.py for when it is used and why); and the
 * reads of a qcow2 image whose clusters its read map places in the file (block/qcow2/read_map.py).
 *
 * Everything the guest wrote is untrusted. This code never decides that a request is bad: whatever it
 * does not fully understand -- a flush, a discard, an odd layout, an index or address it cannot check, an
 * O_DIRECT request it cannot send unbounced, a write it may not do -- ends the call *before* that chain is
 * taken, and the Python device, which owns every error path, handles it from there. So a chain is either
 * served completely here (data moved, status byte written, used element filled) or not touched at all.
 *
 * Guest memory is reached only through vring.c (built in front of this file), which checks every address
 * and index. The used index is published here only when nothing needs Python first: a call that wrote no
 * disk range a dirty bitmap records (the bitmaps hear of writes from Python) and whose guest writes the
 * DMA write screen passes whole (no translated code in them, no dirty log running). Otherwise Python
 * reports the DMA writes first (the software CPU drops stale translations of that RAM) and then publishes
 * it, as its own push does.
 */

#include <sched.h>

#define BP_T_IN 0
#define BP_T_OUT 1
#define BP_SECTOR 512
#define BP_HEADER 16
#define BP_MAX_MERGED 32                /* blk.py's MAX_MERGED_REQUESTS */
#define BP_MAX_MERGED_BYTES (8u << 20)  /* blk.py's MAX_MERGED_BYTES */
#define BP_MAP_ZEROES 1                 /* read_map.py's ZEROES: the cluster reads as zeros */

struct pyemu_bp_call {
    /* in */
    struct pyemu_vr_queue queue;
    int32_t fd;
    uint64_t file_offset;         /* where the disk starts in the file (raw offset=) */
    uint64_t disk_bytes;
    uint64_t direct_align;        /* 0: buffered descriptor; else O_DIRECT alignment */
    uint64_t direct_end;          /* O_DIRECT: file bytes from here on are not served (the partial tail) */
    int64_t write_floor;          /* writes only at disk bytes from here on; -1: no writes */
    const uint64_t *read_map;     /* NULL: the disk is the file from file_offset on. Else (qcow2) the host
                                   * offset of each cluster of the disk, 0 where Python must serve */
    uint64_t map_clusters;
    uint32_t cluster_bits;
    uint32_t max_requests;
    struct pyemu_vr_range *wrote; /* guest ranges written, for the DMA report */
    uint32_t max_wrote;
    struct pyemu_vr_range *disk;  /* disk ranges written, for the dirty bitmaps */
    uint32_t max_disk;
    int32_t report_disk;          /* a dirty bitmap records writes: the driver sees a write only after
                                   * Python marked its disk range */
    const uint64_t *recording;    /* dirty_bitmap.py's RecordingChanges count; with report_disk 0, a write
                                   * is published here only while it still reads recording_seen */
    uint64_t recording_seen;
    /* in/out */
    uint16_t last_avail, used_idx;
    /* out */
    uint32_t served, nwrote, ndisk;
    uint32_t merged;              /* requests served in an earlier request's preadv/pwritev */
    int32_t stop;                 /* see BP_STOP_* */
    /* in: completion here (see the top of the file) */
    int64_t (*screen)(const void *state, const uint64_t *pairs, uint64_t count); /* NULL: none */
    const void *screen_state;
    /* in/out: the used index at the queue's last interrupt decision, -1 for none */
    int32_t signalled;
    /* out */
    int32_t published;            /* the used index is out; ``interrupt`` says whether the driver wants one */
    int32_t interrupt;
    /* in: where that interrupt may be posted in C (hw/intc/apic_core.c, pyemu_irq_route_post), or NULL */
    int (*post)(void *route);
    void *route;
    /* out */
    int32_t posted;               /* the interrupt is in the APIC's IRR: the caller kicks the vCPU */
};

enum { BP_STOP_EMPTY = 0, BP_STOP_PYTHON = 1, BP_STOP_HOST_ERROR = 2, BP_STOP_LIMIT = 3, BP_TAKEN = -1 };

/* The data of a request as an iovec: ``skip`` bytes into the segments [first, end), ``length`` bytes. */
static int data_iov(const struct vr_seg *seg, uint32_t first, uint32_t end, uint64_t skip, uint64_t length,
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

/* The request header (type, reserved, sector), gathered from the readable segments. */
static void header(const struct vr_seg *seg, const struct vr_chain *ch, uint8_t out[BP_HEADER])
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

/* A read map's entry (written by Python on other threads: one aligned word, read once). */
static uint64_t map_entry(const struct pyemu_bp_call *c, uint64_t cluster)
{
    return cluster < c->map_clusters ? __atomic_load_n(&c->read_map[cluster], __ATOMIC_RELAXED) : 0;
}

/* May ``length`` bytes at ``in`` bytes into the cluster that starts at host offset ``entry`` be read
 * here? Not where the map says 0; under O_DIRECT not past ``direct_end`` (the file's partial tail is
 * Python's); a buffered descriptor reads zeros past the end of the file, as Python does. */
static int host_ok(const struct pyemu_bp_call *c, uint64_t entry, uint64_t in, uint64_t length)
{
    if (entry == BP_MAP_ZEROES)
        return 1;
    return entry && (!c->direct_align
                     || ((entry + in) % c->direct_align == 0 && entry + in + length <= c->direct_end));
}

/* Is every cluster of disk bytes [offset, offset+length) in the read map? */
static int mapped(const struct pyemu_bp_call *c, uint64_t offset, uint64_t length)
{
    uint64_t size = 1ull << c->cluster_bits;
    for (uint64_t pos = offset; pos < offset + length; pos = (pos | (size - 1)) + 1) {
        uint64_t in = pos & (size - 1), end = pos - in + size;
        if (end > offset + length)
            end = offset + length;
        if (!host_ok(c, map_entry(c, pos >> c->cluster_bits), in, end - pos))
            return 0;
    }
    return 1;
}

/* preadv of disk bytes [offset, offset+length) through the read map: one call per run of clusters that
 * lie one after the other in the file, each given its share of ``iov``; a run of clusters that read as
 * zeros is a memset. Returns an errno, or -1 when an
 * entry vanished since take() looked (Python changed the map meanwhile): nothing is completed then. */
static int read_mapped(const struct pyemu_bp_call *c, const struct iovec *iov, uint64_t offset, uint64_t length)
{
    static __thread struct iovec part[VR_MAX_IOV];
    uint64_t size = 1ull << c->cluster_bits;
    int i = 0;
    size_t skip = 0;
    while (length) {
        uint64_t cluster = offset >> c->cluster_bits, in = offset & (size - 1);
        uint64_t first = map_entry(c, cluster), step = first == BP_MAP_ZEROES ? 0 : size, next = first + step;
        uint64_t run = size - in;
        for (uint64_t k = cluster + 1; run < length && first && map_entry(c, k) == next; k++) {
            run += size;
            next += step;
        }
        if (run > length)
            run = length;
        if (!host_ok(c, first, in, run))
            return -1;
        int n = 0;
        for (uint64_t need = run; need; n++) {
            size_t avail = iov[i].iov_len - skip, piece = avail < need ? avail : (size_t)need;
            part[n].iov_base = (uint8_t *)iov[i].iov_base + skip;
            part[n].iov_len = piece;
            need -= piece;
            skip += piece;
            if (skip == iov[i].iov_len) {
                i++;
                skip = 0;
            }
        }
        if (first == BP_MAP_ZEROES) {
            for (int j = 0; j < n; j++)
                memset(part[j].iov_base, 0, part[j].iov_len);
        } else {
            int err = transfer_all(c->fd, 0, part, n, first + in, run);
            if (err)
                return err;
        }
        offset += run;
        length -= run;
    }
    return 0;
}

/* One request the plane may serve: its chain, what it asks for and its data as iovecs. */
struct bp_request {
    uint16_t head;
    int write;
    uint64_t sector, length;
    struct vr_chain ch;
    uint32_t iov_first, iov_cnt;
};

/* Look at the chain ``k`` places after ``c->last_avail`` and decide whether the plane serves it as part of
 * the batch ``r[0..k)``: TAKEN into r[k], else the reason the batch ends before it (with k == 0: the stop
 * reason of the call). ``seg``/``iov`` are the batch's shared arrays, ``*nseg``/``*niov`` their fill. */
static int take(const struct pyemu_bp_call *c, const struct vr_ring *ring, uint32_t k,
                struct bp_request *r, struct vr_seg *seg, uint32_t *nseg, struct iovec *iov, uint32_t *niov,
                uint64_t *batch_bytes)
{
    struct bp_request *q = &r[k];
    q->head = vr_avail_head(ring, (uint16_t)(c->last_avail + k));
    q->ch.first = *nseg;
    if (vr_walk(ring, q->head, seg, VR_MAX_IOV - *nseg, &q->ch) != 0
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
    if (c->read_map && (q->write || !mapped(c, q->sector * BP_SECTOR, q->length)))
        return BP_STOP_PYTHON;
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
        int ok = offset % a == 0 && q->length % a == 0
                 && (c->read_map ? (1ull << c->cluster_bits) % a == 0 : offset + q->length <= c->direct_end);
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
static void complete(struct pyemu_bp_call *c, const struct vr_ring *ring, const struct bp_request *q,
                     const struct vr_seg *seg)
{
    const struct vr_seg *last = &seg[q->ch.first + q->ch.nseg - 1];
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
    vr_put_used(ring, c->used_idx, q->head, q->write ? 1 : (uint32_t)q->ch.write_len);
    c->last_avail++;
    c->used_idx++;
    c->served++;
}

static int serve_batches(struct pyemu_bp_call *c, const struct vr_ring *ring)
{
    uint32_t size = c->queue.size;
    /* ~50 KiB of segments and iovecs: not on the I/O thread's stack */
    static __thread struct vr_seg seg[VR_MAX_IOV];
    static __thread struct iovec iov[VR_MAX_IOV];
    static __thread struct bp_request r[BP_MAX_MERGED];
    while (c->served < c->max_requests) {
        uint16_t pending = (uint16_t)(vr_avail_idx(ring) - c->last_avail);
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
        while (k < limit && (why = take(c, ring, k, r, seg, &nseg, iov, &niov, &bytes)) == BP_TAKEN)
            k++;
        if (k == 0) {
            c->stop = why;        /* Python's; or it did not fit the reports left (a later call takes it) */
            return (int)c->served;
        }
        int write = r[0].write;
        int err = c->read_map ? read_mapped(c, iov, r[0].sector * BP_SECTOR, bytes)
                              : transfer_all(c->fd, write, iov, (int)niov, c->file_offset + r[0].sector * BP_SECTOR,
                                             bytes);
        if (err < 0) {
            c->stop = BP_STOP_PYTHON;        /* the map changed under the batch: Python serves it whole */
            return (int)c->served;
        }
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
            complete(c, ring, &r[i], seg);
        c->merged += k - 1;
        if (c->queue.event_idx)
            vr_set_avail_event(ring, c->last_avail);
    }
    c->stop = BP_STOP_LIMIT;
    return (int)c->served;
}

/* Nothing for Python to do before the driver may see the requests: no disk range written that a dirty
 * bitmap records, and no guest range the DMA write screen picks (translated code, the dirty log). */
static int may_publish_here(const struct pyemu_bp_call *c)
{
    if (c->ndisk && (c->report_disk || !c->recording ||
                     __atomic_load_n(c->recording, __ATOMIC_ACQUIRE) != c->recording_seen))
        return 0;
    if (!c->nwrote)
        return 1;
    return c->screen && c->screen(c->screen_state, (const uint64_t *)c->wrote, c->nwrote) < 0;
}

int pyemu_bp_serve(struct pyemu_bp_call *c)
{
    c->served = c->nwrote = c->ndisk = c->merged = 0;
    c->published = c->interrupt = c->posted = 0;
    c->stop = BP_STOP_EMPTY;
    struct vr_ring ring;
    if (vr_resolve(&ring, &c->queue) != 0) {
        c->stop = BP_STOP_PYTHON;
        return 0;
    }
    int served = serve_batches(c, &ring);
    if (served > 0 && may_publish_here(c)) {
        c->interrupt = vr_publish_used(&ring, c->queue.event_idx, c->used_idx, &c->signalled);
        c->published = 1;
        if (c->interrupt && c->post && c->post(c->route))
            c->posted = 1;
    }
    return served;
}

/* A queue leased to this file between the device's Python passes (blk_plane.py, Lease, says why and
 * when). The I/O thread's C wait (system/iothread_wait.c) offers the queue's kicks here first: with the
 * lease granted, the kick is served without Python -- the eventfd cleared, the call made with the set-up
 * and indices Python's last pass left in it, the interrupt posted and the vCPU woken in C -- as long as
 * nothing in the result needs Python. Anything that does (a chain Python must serve, a disk range a dirty
 * bitmap must hear of, guest writes to report, an interrupt the models must raise or a vCPU only Python
 * can wake) ends the lease with ``left`` set: the descriptor goes to Python, whose pass finishes the call.
 * Python revokes the lease (pyemu_bp_lease_revoke) before it touches the queue or the drive in any other
 * way; the revoke waits for a call in progress. */
enum { BP_LEASE_REVOKED = 0, BP_LEASE_GRANTED = 1, BP_LEASE_SERVING = 2 };

struct pyemu_bp_lease {
    int32_t state;
    int32_t fd;                     /* the queue's notifier (an eventfd) */
    struct pyemu_bp_call *call;     /* set up by Python's last pass */
    int (*kick)(void *route);       /* apic_core.c's pyemu_irq_route_kick for call->route, or NULL */
    int32_t left;                   /* the last call needs Python to finish it (the lease ended) */
    /* what calls finished here did since Python last folded them into its counters and indices */
    uint64_t calls, served, merged, screened, posted;
};

static int finished_here(const struct pyemu_bp_call *c, int served)
{
    if (c->stop != BP_STOP_EMPTY)
        return 0;
    return served == 0 || (c->published && (!c->interrupt || c->posted));
}

int pyemu_bp_lease_kick(void *opaque)
{
    struct pyemu_bp_lease *l = (struct pyemu_bp_lease *)opaque;
    int32_t expected = BP_LEASE_GRANTED;
    if (!__atomic_compare_exchange_n(&l->state, &expected, BP_LEASE_SERVING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return 0;
    uint64_t count;
    if (read(l->fd, &count, sizeof count) < 0) {
        /* EAGAIN: the kick was consumed already; looking at the ring again is harmless */
    }
    struct pyemu_bp_call *c = l->call;
    int served = pyemu_bp_serve(c);
    int done = finished_here(c, served);
    if (done && c->posted && !(l->kick && l->kick(c->route)))
        done = 0;
    if (!done) {
        l->left = 1;
        __atomic_store_n(&l->state, BP_LEASE_REVOKED, __ATOMIC_RELEASE);
        return 0;
    }
    l->calls++;
    l->served += (uint64_t)served;
    l->merged += c->merged;
    l->screened += c->nwrote;
    l->posted += (uint64_t)c->posted;
    __atomic_store_n(&l->state, BP_LEASE_GRANTED, __ATOMIC_RELEASE);
    return 1;
}

/* End the lease (any thread, without the GIL): waits for a call in progress. Returns the state it ended
 * (GRANTED, or REVOKED when it had ended already). */
int pyemu_bp_lease_revoke(struct pyemu_bp_lease *l)
{
    for (;;) {
        int32_t state = __atomic_load_n(&l->state, __ATOMIC_ACQUIRE);
        if (state == BP_LEASE_SERVING) {   /* a host read or write: up to a few milliseconds */
            for (int i = 0; i < 16; i++)
                __builtin_ia32_pause();
            sched_yield();
            continue;
        }
        if (__atomic_compare_exchange_n(&l->state, &state, BP_LEASE_REVOKED, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return state;
    }
}
