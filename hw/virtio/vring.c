/* Split-virtqueue access shared by the C data planes (blk_plane.c, net_rx_plane.c): guest RAM lookup and
 * the descriptor-chain walk, by the rules of queue.py's Virtqueue. A plane's module is this file followed by
 * the plane's own (pyemu.system.native.load_native concatenates them).
 *
 * Everything the guest wrote is untrusted. Every guest address goes through vr_ram_ptr(), which returns a
 * host pointer only when the whole range lies inside one RAM region (overflow-safe), and every table index
 * is checked against its table's size before use. A chain the walk cannot vouch for is refused whole; the
 * plane then leaves it to the Python device, which owns every error path.
 */

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define VR_DESC_F_NEXT 1
#define VR_DESC_F_WRITE 2
#define VR_DESC_F_INDIRECT 4
#define VR_MAX_QUEUE 32768
#define VR_MAX_IOV 1024               /* segments one preadv/readv takes (IOV_MAX) */

struct pyemu_vr_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct pyemu_vr_range {
    uint64_t start;               /* a guest physical address, or a disk offset */
    uint64_t len;
};

/* What a plane's call says about the queue it serves (the first member of every call structure). */
struct pyemu_vr_queue {
    const struct pyemu_vr_region *ram;
    uint32_t nram;
    uint64_t desc, avail, used;   /* ring addresses (guest physical) */
    uint32_t size;                /* queue size, a power of two */
    int32_t indirect, event_idx;
};

struct vr_seg { uint64_t gpa; uint8_t *host; uint32_t len; };

/* One chain's segments: a range of a shared segment array. */
struct vr_chain {
    uint32_t first, nseg, nread;  /* segments [first, first + nseg); the first nread are device-readable */
    uint64_t read_len, write_len;
};

/* A queue's rings, resolved to host pointers. */
struct vr_ring {
    const struct pyemu_vr_region *ram;
    uint32_t nram;
    uint32_t size;
    int indirect;
    uint8_t *desc, *avail, *used;
};

static uint8_t *vr_ram_ptr(const struct pyemu_vr_region *ram, uint32_t nram, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < nram; i++) {
        const struct pyemu_vr_region *r = &ram[i];
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

/* Resolve a queue's rings; -1 when the size is not a power of two up to 32768 or a ring is not in RAM. */
static int vr_resolve(struct vr_ring *r, const struct pyemu_vr_queue *q)
{
    uint32_t size = q->size;
    if (size == 0 || size > VR_MAX_QUEUE || (size & (size - 1)))
        return -1;
    r->ram = q->ram;
    r->nram = q->nram;
    r->size = size;
    r->indirect = q->indirect;
    r->desc = vr_ram_ptr(q->ram, q->nram, q->desc, 16ull * size);
    r->avail = vr_ram_ptr(q->ram, q->nram, q->avail, 6 + 2ull * size);
    r->used = vr_ram_ptr(q->ram, q->nram, q->used, 6 + 8ull * size);
    return r->desc && r->avail && r->used ? 0 : -1;
}

/* The head the driver made available at ``index`` (a free-running avail index). */
static inline uint16_t vr_avail_head(const struct vr_ring *r, uint16_t index)
{
    return load_u16(r->avail + 4 + 2 * (index & (r->size - 1)));
}

static inline uint16_t vr_avail_idx(const struct vr_ring *r)
{
    return __atomic_load_n((uint16_t *)(r->avail + 2), __ATOMIC_ACQUIRE);
}

/* Fill used element ``used_idx`` (the index is published by Python, after the DMA report). */
static inline void vr_put_used(const struct vr_ring *r, uint16_t used_idx, uint32_t head, uint32_t len)
{
    uint8_t *elem = r->used + 4 + 8 * (used_idx & (r->size - 1));
    store_u32(elem, head);
    store_u32(elem + 4, len);
}

/* Publish used index ``used_idx`` (after the used elements and the data they describe) and decide, as
 * queue.py's Virtqueue.should_interrupt does, whether the driver wants an interrupt for what was used since
 * the last decision. ``signalled``: the used index at that decision, -1 for none yet (updated). */
static int vr_publish_used(const struct vr_ring *r, int event_idx, uint16_t used_idx, int32_t *signalled)
{
    __atomic_store_n((uint16_t *)(r->used + 2), used_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* the index out before the driver's flags are read */
    if (!event_idx)
        return !(__atomic_load_n((uint16_t *)r->avail, __ATOMIC_RELAXED) & 1);  /* VRING_AVAIL_F_NO_INTERRUPT */
    int32_t old = *signalled;
    *signalled = used_idx;
    if (old < 0)
        return 1;
    uint16_t used_event = __atomic_load_n((uint16_t *)(r->avail + 4 + 2 * r->size), __ATOMIC_RELAXED);
    /* vring_need_event: used_event in [old, used_idx) */
    return (uint16_t)(used_idx - used_event - 1) < (uint16_t)(used_idx - (uint16_t)old);
}

/* avail_event: "notify me on the very next buffer", fenced before the next read of the available index. */
static inline void vr_set_avail_event(const struct vr_ring *r, uint16_t last_avail)
{
    store_u16(r->used + 4 + 8 * r->size, last_avail);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Walk the chain from ``head``, appending its segments to ``seg`` from index ``ch->first`` (``room``
 * entries left). 0: walked; -1: anything else (broken, or more segments than fit): not for the plane. */
static int vr_walk(const struct vr_ring *r, uint16_t head, struct vr_seg *seg, uint32_t room, struct vr_chain *ch)
{
    const uint8_t *table = r->desc;
    uint32_t table_size = r->size, index = head, visited = 0;
    int in_indirect = 0;
    struct vr_seg *out = seg + ch->first;
    ch->nseg = ch->nread = 0;
    ch->read_len = ch->write_len = 0;
    if (head >= r->size)
        return -1;
    for (;;) {
        if (++visited > table_size)
            return -1;
        const uint8_t *d = table + 16 * (uint64_t)index;
        uint64_t addr = load_u64(d);
        uint32_t len = load_u32(d + 8);
        uint16_t flags = load_u16(d + 12), next = load_u16(d + 14);
        if (flags & VR_DESC_F_INDIRECT) {
            if (!r->indirect || in_indirect || (flags & VR_DESC_F_NEXT))
                return -1;
            if (len == 0 || len % 16 || len / 16 > VR_MAX_QUEUE)
                return -1;
            table = vr_ram_ptr(r->ram, r->nram, addr, len);
            if (table == NULL)
                return -1;
            table_size = len / 16;
            index = 0;
            visited = 0;
            in_indirect = 1;
            continue;
        }
        int writable = (flags & VR_DESC_F_WRITE) != 0;
        if (!writable && ch->nseg > ch->nread)
            return -1;            /* readable after writable */
        if (len) {
            uint8_t *host = vr_ram_ptr(r->ram, r->nram, addr, len);
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
        if (!(flags & VR_DESC_F_NEXT))
            return 0;
        if (next >= table_size)
            return -1;
        index = next;
    }
}
