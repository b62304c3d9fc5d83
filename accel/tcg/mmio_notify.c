/* pyemu software CPU: ioeventfds, the software CPU's twin of KVM_IOEVENTFD (see mmio_notify.py for why),
 * and the virtio-mmio interrupt status registers served without Python.
 *
 * Every device window's write callback is pyemu_mmio_write. A 4-byte write whose address and value match a
 * bound notifier (a virtio QueueNotify register and the queue's index) becomes one eventfd write here, on
 * the vCPU's thread and without Python: the I/O thread that serves the queue wakes at once instead of
 * waiting for the vCPU thread to leave the Python callback and hand over the GIL. A 4-byte write to a bound
 * InterruptACK register (the word after InterruptStatus) clears its bits in the device's shared word, and
 * the read callback pyemu_mmio_read returns a bound InterruptStatus the same way. A 4-byte write to this
 * vCPU's local APIC EOI register goes to the APIC's C EOI (hw/intc/apic_core.c), which ends an
 * edge-triggered vector and says whether to flag the vCPU for the next one. Any other access goes to the
 * window's Python callback, as before.
 */
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#define MMIO_NOTIFY_SLOTS 64
#define MMIO_STATUS_SLOTS 64

/* The VM's bindings, shared by every vCPU's windows. A slot is written address, value and fd first, count
 * last (release), so a vCPU never sees a half-made slot; slots are never reused while the VM runs. */
struct pyemu_mmio_notify {
    uint32_t count;
    uint64_t addr[MMIO_NOTIFY_SLOTS];
    uint32_t value[MMIO_NOTIFY_SLOTS];
    int32_t fd[MMIO_NOTIFY_SLOTS];  /* -1: unbound (the write goes to Python again) */
    uint64_t hits;                  /* statistics: writes that became an eventfd write here */
    /* InterruptStatus registers (their InterruptACK is the next word): address and the device's word,
     * published like the notifier slots (word, then the count); a NULL word is unbound. */
    uint32_t status_count;
    uint64_t status_addr[MMIO_STATUS_SLOTS];
    uint32_t *status_word[MMIO_STATUS_SLOTS];
    uint64_t status_hits;           /* statistics: status reads and ACK writes served here */
};

/* This vCPU's local APIC EOI register, served in C (memory_map.py, LocalEoi). */
struct pyemu_mmio_eoi {
    uint64_t addr;                      /* guest-physical address of the EOI register */
    int (*eoi)(void *core);             /* the APIC's C EOI: vector | kick << 9, -1 none, -2 Python's */
    void *core;
    int32_t *irq_pending;               /* the vCPU's block gate: flagged when another vector is deliverable */
    int32_t *attention;
    uint64_t hits;                      /* statistics: EOI writes served here */
};

/* One device window of one engine: where it starts, and the Python callback for everything else. */
struct pyemu_mmio_window {
    uint64_t base;
    struct pyemu_mmio_notify *notify;
    void (*py_write)(void *uc, uint64_t offset, unsigned size, uint64_t value, void *key);
    uint64_t (*py_read)(void *uc, uint64_t offset, unsigned size, void *key);
    struct pyemu_mmio_eoi *eoi;         /* NULL: no local APIC EOI in this window */
};

/* The bound interrupt status word at ``addr`` (``ack``: the InterruptACK word after it), or NULL. */
static uint32_t *status_word_at(struct pyemu_mmio_notify *n, uint64_t addr, int ack)
{
    uint32_t count = __atomic_load_n(&n->status_count, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < count && i < MMIO_STATUS_SLOTS; i++) {
        if (n->status_addr[i] + (ack ? 4 : 0) == addr)
            return __atomic_load_n(&n->status_word[i], __ATOMIC_ACQUIRE);
    }
    return 0;
}

uint64_t pyemu_mmio_read(void *uc, uint64_t offset, unsigned size, void *user_data)
{
    struct pyemu_mmio_window *w = (struct pyemu_mmio_window *)user_data;
    struct pyemu_mmio_notify *n = w->notify;
    if (n && size == 4) {
        uint32_t *word = status_word_at(n, w->base + offset, 0);
        if (word) {
            __atomic_add_fetch(&n->status_hits, 1, __ATOMIC_RELAXED);
            return __atomic_load_n(word, __ATOMIC_SEQ_CST);
        }
    }
    return w->py_read(uc, offset, size, 0);
}

void pyemu_mmio_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data)
{
    struct pyemu_mmio_window *w = (struct pyemu_mmio_window *)user_data;
    struct pyemu_mmio_notify *n = w->notify;
    struct pyemu_mmio_eoi *e = w->eoi;
    if (e && size == 4 && w->base + offset == e->addr) {
        int ended = e->eoi(e->core);
        if (ended != -2) {
            if (ended >= 0 && (ended >> 9) & 1) {
                __atomic_store_n(e->irq_pending, 1, __ATOMIC_SEQ_CST);  /* as BlockGate.signal_interrupt */
                __atomic_store_n(e->attention, 1, __ATOMIC_RELEASE);
            }
            e->hits++;
            return;
        }
    }
    if (n && size == 4) {
        uint64_t addr = w->base + offset;
        uint32_t *word = status_word_at(n, addr, 1);
        if (word) {
            __atomic_fetch_and(word, ~(uint32_t)value, __ATOMIC_SEQ_CST);
            __atomic_add_fetch(&n->status_hits, 1, __ATOMIC_RELAXED);
            return;
        }
        uint32_t count = __atomic_load_n(&n->count, __ATOMIC_ACQUIRE);
        for (uint32_t i = 0; i < count && i < MMIO_NOTIFY_SLOTS; i++) {
            if (n->addr[i] != addr || (uint64_t)n->value[i] != value)
                continue;
            int32_t fd = __atomic_load_n(&n->fd[i], __ATOMIC_ACQUIRE);
            if (fd < 0)
                break;
            uint64_t one = 1;
            /* EAGAIN: the counter is at its limit, so the notifier is signalled already. */
            if (write(fd, &one, sizeof one) == (ssize_t)sizeof one || errno == EAGAIN) {
                __atomic_add_fetch(&n->hits, 1, __ATOMIC_RELAXED);
                return;
            }
            break;  /* a closed descriptor: let the device see the write (and log it) */
        }
    }
    w->py_write(uc, offset, size, value, 0);
}
