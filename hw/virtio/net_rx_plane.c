/* virtio-net's receive plane: frames from the TAP into the driver's receive buffers without Python (see
 * net_rx_plane.py for when it is used and why). Built after vring.c, which it walks chains with.
 *
 * The plane only takes the plain path: a frame read from the TAP into the device's host buffer (the one
 * the Python path uses, so a frame left there is simply pending for whoever looks next), copied into as
 * many buffers as it needs (one without mergeable buffers), each buffer's used element filled. Anything
 * else ends the call before it touches the ring -- a chain the walk refuses or that is shorter than the
 * header, a frame no set of buffers could hold, a read error or end of file, a frame of an impossible
 * size -- and the Python path, which owns those rules and their reports, takes it from there (for what
 * was read, a failed read or a bad frame, the call says what it saw and Python reports it). Frames wait
 * in the TAP while the ring is empty (the host's queue applies back-pressure), as in the Python path.
 */

#define NRX_NUM_BUFFERS_OFFSET 10     /* virtio_net_hdr_v1.num_buffers */

struct pyemu_nrx_call {
    /* in */
    struct pyemu_vr_queue queue;
    int32_t fd;                   /* the TAP, non-blocking */
    int32_t vnet;                 /* the TAP reads start with the virtio-net header */
    int32_t mergeable;            /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    int32_t guest_csum;           /* VIRTIO_NET_F_GUEST_CSUM negotiated (else the header's flags read 0) */
    uint32_t hdr_len, min_frame, max_frame;
    uint8_t *buf;                 /* the host frame buffer: hdr_len + max_frame + 1 bytes */
    uint32_t max_frames;
    struct pyemu_vr_range *wrote; /* guest ranges written, for the DMA report */
    uint32_t max_wrote;
    /* in/out */
    uint32_t buf_len;             /* a frame pending in buf (header included), 0: none */
    uint16_t last_avail, used_idx;
    /* out */
    uint32_t frames, chains, nwrote;
    uint64_t bytes;               /* frame bytes delivered, headers included */
    int32_t stop;                 /* see NRX_STOP_* */
    int32_t err;                  /* NRX_STOP_READ_ERROR: the errno */
};

enum {
    NRX_STOP_NO_FRAME = 0,        /* the TAP has nothing now: watch it */
    NRX_STOP_NO_BUFFERS = 1,      /* the ring has too few buffers (a pending frame stays in buf) */
    NRX_STOP_PYTHON = 2,          /* the next step is the Python path's (see above) */
    NRX_STOP_BAD_FRAME = 3,       /* buf holds a frame of an impossible size (buf_len): Python drops it */
    NRX_STOP_LIMIT = 4,           /* the frame budget or the report room is used up */
    NRX_STOP_END = 5,             /* the backend reads as ended (a read of 0 bytes): Python reports it */
    NRX_STOP_READ_ERROR = 6,      /* a read failed with ``err``: Python reports it */
};

/* One frame from the TAP into buf: 1 read, 0 nothing now (*stop set), -1 the call ends (*stop set). */
static int nrx_read(struct pyemu_nrx_call *c)
{
    uint32_t skip = c->vnet ? 0 : c->hdr_len;
    ssize_t n;
    do {
        n = read(c->fd, c->buf + skip, c->hdr_len + c->max_frame + 1 - skip);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        c->stop = NRX_STOP_NO_FRAME;
        return 0;
    }
    if (n <= 0) {
        /* What was read is gone either way, so the report is Python's, not a second read. */
        c->err = n < 0 ? errno : 0;
        c->stop = n < 0 ? NRX_STOP_READ_ERROR : NRX_STOP_END;
        return -1;
    }
    uint64_t total = (uint64_t)n + skip;
    c->buf_len = (uint32_t)total;
    if (total > (uint64_t)c->hdr_len + c->max_frame || total < (uint64_t)c->hdr_len + c->min_frame) {
        c->stop = NRX_STOP_BAD_FRAME;
        return -1;
    }
    if (!c->vnet)
        memset(c->buf, 0, c->hdr_len);
    return 1;
}

int pyemu_nrx_serve(struct pyemu_nrx_call *c)
{
    c->frames = c->chains = c->nwrote = 0;
    c->bytes = 0;
    c->stop = NRX_STOP_LIMIT;
    struct vr_ring ring;
    if (vr_resolve(&ring, &c->queue) != 0) {
        c->stop = NRX_STOP_PYTHON;
        return 0;
    }
    static __thread struct vr_seg seg[VR_MAX_IOV];
    static __thread struct vr_chain ch[VR_MAX_IOV];
    static __thread uint16_t heads[VR_MAX_IOV];
    while (c->frames < c->max_frames) {
        uint16_t pending = (uint16_t)(vr_avail_idx(&ring) - c->last_avail);
        if (pending > c->queue.size) {
            c->stop = NRX_STOP_PYTHON;
            return (int)c->frames;
        }
        if (c->buf_len == 0) {
            if (pending == 0) {
                c->stop = NRX_STOP_NO_BUFFERS;
                return (int)c->frames;
            }
            if (nrx_read(c) <= 0)
                return (int)c->frames;
        }
        /* The buffers this frame needs. */
        uint32_t total = c->buf_len, k = 0, nseg = 0;
        uint64_t capacity = 0;
        while (capacity < total && k < pending) {
            if (k == VR_MAX_IOV) {    /* more buffers than one call tracks: the Python path's */
                c->stop = NRX_STOP_PYTHON;
                return (int)c->frames;
            }
            heads[k] = vr_avail_head(&ring, (uint16_t)(c->last_avail + k));
            ch[k].first = nseg;
            if (vr_walk(&ring, heads[k], seg, VR_MAX_IOV - nseg, &ch[k]) != 0 || ch[k].write_len < c->hdr_len) {
                c->stop = NRX_STOP_PYTHON;
                return (int)c->frames;
            }
            nseg += ch[k].nseg;
            capacity += ch[k].write_len;
            k++;
            if (!c->mergeable)
                break;
        }
        if (capacity < total) {
            if (k > 0 && (!c->mergeable || k >= c->queue.size)) {
                c->stop = NRX_STOP_PYTHON;    /* no buffers could ever hold it: Python drops and reports it */
                return (int)c->frames;
            }
            if (k > 0 && c->queue.event_idx) {
                /* Too few buffers now. As the Python path's pops do, ask to be notified for the buffer after
                 * the ones looked at: with avail_event left at last_avail the driver, which has gone past
                 * it already, would never notify again. Then look once more (fenced): buffers added
                 * meanwhile may have been offered without a notification. */
                vr_set_avail_event(&ring, (uint16_t)(c->last_avail + k));
                if ((uint16_t)(vr_avail_idx(&ring) - c->last_avail) > k)
                    continue;
            }
            c->stop = NRX_STOP_NO_BUFFERS;
            return (int)c->frames;
        }
        if (c->nwrote + nseg > c->max_wrote) {
            c->stop = NRX_STOP_LIMIT;
            return (int)c->frames;
        }
        store_u16(c->buf + NRX_NUM_BUFFERS_OFFSET, (uint16_t)k);
        if (!c->guest_csum)
            c->buf[0] = 0;        /* without GUEST_CSUM the driver must see flags == 0 */
        uint32_t offset = 0;
        for (uint32_t j = 0; j < k; j++) {
            uint32_t take = ch[j].write_len < total - offset ? (uint32_t)ch[j].write_len : total - offset;
            uint32_t left = take;
            for (uint32_t i = ch[j].first + ch[j].nread; i < ch[j].first + ch[j].nseg && left; i++) {
                uint32_t n = seg[i].len < left ? seg[i].len : left;
                memcpy(seg[i].host, c->buf + offset, n);
                c->wrote[c->nwrote].start = seg[i].gpa;
                c->wrote[c->nwrote].len = n;
                c->nwrote++;
                offset += n;
                left -= n;
            }
            vr_put_used(&ring, c->used_idx, heads[j], take);
            c->used_idx++;
            c->last_avail++;
        }
        if (c->queue.event_idx)
            vr_set_avail_event(&ring, c->last_avail);
        c->frames++;
        c->chains += k;
        c->bytes += total;
        c->buf_len = 0;
    }
    c->stop = NRX_STOP_LIMIT;
    return (int)c->frames;
}
