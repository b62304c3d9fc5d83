/* pyemu: a local APIC's interrupt registers -- IRR, ISR, TMR and the TPR -- in memory that C reaches
 * without Python (see apic_core.py for why).
 *
 * Every access takes the core's spinlock, so the two sides never see half an update: the Python model
 * (under the board's lock) and the software CPU's INTA, which the engine asks for inside a run on the
 * vCPU's thread without the GIL (pyemu_apic_engine_ack). Vectors are bits of eight 32-bit words, bit n of
 * the whole = vector n, as the xAPIC page shows them. */

#include <stdint.h>

struct pyemu_apic_core {
    int32_t lock;
    uint32_t irr[8], isr[8], tmr[8];
    uint32_t tpr;
    int32_t python_ack;   /* INTA needs the Python model (PIC pass-through, an owed timer tick) */
    uint64_t engine_acks; /* INTAs answered here for the engine */
    uint64_t engine_eois; /* EOI writes served here for the software CPU's device window */
};

enum { CORE_IRR = 0, CORE_ISR = 1, CORE_TMR = 2 };

static inline void core_lock(struct pyemu_apic_core *c)
{
    while (__atomic_exchange_n(&c->lock, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&c->lock, __ATOMIC_RELAXED))
            __builtin_ia32_pause();
}

static inline void core_unlock(struct pyemu_apic_core *c)
{
    __atomic_store_n(&c->lock, 0, __ATOMIC_RELEASE);
}

static uint32_t *bank(struct pyemu_apic_core *c, int which)
{
    return which == CORE_IRR ? c->irr : which == CORE_ISR ? c->isr : c->tmr;
}

static int highest(const uint32_t *words)
{
    for (int i = 7; i >= 0; i--)
        if (words[i])
            return 32 * i + 31 - __builtin_clz(words[i]);
    return -1;
}

static uint32_t ppr_locked(const struct pyemu_apic_core *c)
{
    int isrv = highest(c->isr);
    uint32_t isr_class = isrv < 0 ? 0 : (uint32_t)isrv & 0xF0;
    return (c->tpr >> 4) >= (isr_class >> 4) ? c->tpr : isr_class;
}

/* The highest requested vector whose priority class beats the PPR, or -1. */
static int deliverable_locked(const struct pyemu_apic_core *c)
{
    int vector = highest(c->irr);
    if (vector < 0 || ((uint32_t)vector >> 4) <= (ppr_locked(c) >> 4))
        return -1;
    return vector;
}

static void set_bit(uint32_t *words, int vector, int on)
{
    uint32_t mask = 1u << (vector & 31);
    if (on)
        words[vector >> 5] |= mask;
    else
        words[vector >> 5] &= ~mask;
}

void pyemu_apic_accept(struct pyemu_apic_core *c, int vector, int level_triggered)
{
    core_lock(c);
    set_bit(c->irr, vector, 1);
    set_bit(c->tmr, vector, level_triggered);
    core_unlock(c);
}

int pyemu_apic_deliverable(struct pyemu_apic_core *c)
{
    core_lock(c);
    int vector = deliverable_locked(c);
    core_unlock(c);
    return vector;
}

/* INTA under the lock: the deliverable vector moves from IRR to ISR; -1 when none is deliverable. */
static int ack_locked(struct pyemu_apic_core *c)
{
    int vector = deliverable_locked(c);
    if (vector >= 0) {
        set_bit(c->irr, vector, 0);
        set_bit(c->isr, vector, 1);
    }
    return vector;
}

static int level_triggered(const struct pyemu_apic_core *c, int vector)
{
    return (c->tmr[vector >> 5] >> (vector & 31)) & 1;
}

int pyemu_apic_ack(struct pyemu_apic_core *c)
{
    core_lock(c);
    int vector = ack_locked(c);
    core_unlock(c);
    return vector;
}

/* EOI: the highest in-service vector ends; returns it with bit 8 set when TMR says level-triggered, or -1. */
int pyemu_apic_eoi(struct pyemu_apic_core *c)
{
    core_lock(c);
    int vector = highest(c->isr);
    int level = 0;
    if (vector >= 0) {
        set_bit(c->isr, vector, 0);
        level = level_triggered(c, vector);
    }
    core_unlock(c);
    return vector < 0 ? -1 : vector | (level << 8);
}

uint32_t pyemu_apic_ppr(struct pyemu_apic_core *c)
{
    core_lock(c);
    uint32_t ppr = ppr_locked(c);
    core_unlock(c);
    return ppr;
}

void pyemu_apic_get(struct pyemu_apic_core *c, int which, uint32_t *out)
{
    core_lock(c);
    const uint32_t *words = bank(c, which);
    for (int i = 0; i < 8; i++)
        out[i] = words[i];
    core_unlock(c);
}

void pyemu_apic_set(struct pyemu_apic_core *c, int which, const uint32_t *in)
{
    core_lock(c);
    uint32_t *words = bank(c, which);
    for (int i = 0; i < 8; i++)
        words[i] = in[i];
    core_unlock(c);
}

uint32_t pyemu_apic_get_tpr(struct pyemu_apic_core *c)
{
    return __atomic_load_n(&c->tpr, __ATOMIC_ACQUIRE);
}

void pyemu_apic_set_tpr(struct pyemu_apic_core *c, uint32_t tpr)
{
    core_lock(c);
    c->tpr = tpr & 0xFF;
    core_unlock(c);
}

/* The software CPU's INTA inside a run (the engine's thread, no GIL): as the Python model's
 * ``acknowledge_interrupt`` after ``interrupt_pending``, with the vCPU's interrupt flag (the block gate's
 * ``irq_pending``) cleared, as the vCPU's ``_take_vector`` does. It would set the flag again while more is
 * deliverable, which without a PIC passed through never happens: the vector taken is the highest
 * requested, and in service it blocks every other of its class and below. -2 when only the Python model
 * may answer (``python_ack``): the caller asks it instead. */
int pyemu_apic_engine_ack(struct pyemu_apic_core *c, int32_t *irq_pending)
{
    if (__atomic_load_n(&c->python_ack, __ATOMIC_ACQUIRE))
        return -2;
    core_lock(c);
    if (c->python_ack) {
        core_unlock(c);
        return -2;
    }
    __atomic_store_n(irq_pending, 0, __ATOMIC_SEQ_CST);
    int vector = ack_locked(c);
    if (vector >= 0)
        c->engine_acks++;
    core_unlock(c);
    return vector;
}

/* The guest's write to the EOI register, for the software CPU's device window (no Python, no GIL): the
 * highest in-service vector ends, as the Python model's ``eoi`` does for an edge-triggered one. Returns
 * the vector, with bit 9 set when a requested vector is deliverable now (the caller flags the vCPU, as the
 * model's kick does); -1 when nothing was in service (nothing happens, as in the model); -2, with nothing
 * changed, when the Python model must do it: a level-triggered vector (the IOAPIC and LINT inputs hear of
 * its end) or ``python_ack`` set (a PIC passed through decides what is pending). */
int pyemu_apic_engine_eoi(struct pyemu_apic_core *c)
{
    if (__atomic_load_n(&c->python_ack, __ATOMIC_ACQUIRE))
        return -2;
    core_lock(c);
    int vector = highest(c->isr);
    if (c->python_ack || (vector >= 0 && level_triggered(c, vector))) {
        core_unlock(c);
        return -2;
    }
    if (vector < 0) {
        core_unlock(c);
        return -1;
    }
    set_bit(c->isr, vector, 0);
    int kick = deliverable_locked(c) >= 0;
    c->engine_eois++;
    core_unlock(c);
    return vector | (kick << 9);
}

/* Device interrupts posted in C (apic_core.py, NativeRoute): an edge-triggered, fixed interrupt whose
 * route -- an IOAPIC pin's redirection entry and the one APIC it names -- the Python models aimed it at.
 * ``generation`` counts every change that could move or stop such a route (redirection entries, APIC IDs,
 * destination formats, enables); a route aimed under an older count posts nothing, and its device raises
 * the interrupt through the models again. */
uint32_t pyemu_irq_route_generation;

void pyemu_irq_routes_changed(void)
{
    __atomic_add_fetch(&pyemu_irq_route_generation, 1, __ATOMIC_SEQ_CST);
}

uint32_t pyemu_irq_routes_now(void)
{
    return __atomic_load_n(&pyemu_irq_route_generation, __ATOMIC_SEQ_CST);
}

struct pyemu_irq_route {
    uint32_t aimed_at;                  /* the generation the route was computed under */
    int32_t armed;
    struct pyemu_apic_core *core;
    int32_t vector;
    uint32_t *status;                   /* the device's interrupt status word (virtio InterruptStatus), or NULL */
    uint32_t status_bits;
    uint64_t posts;
    /* the vCPU of that APIC (its block gate's words), for pyemu_irq_route_kick; NULL: kicks need Python */
    int32_t *halt_poll;
    int32_t *irq_pending;
    int32_t *attention;
    uint64_t kicks;
};

/* 1: the interrupt is in the APIC's IRR (and the status bits set); the caller kicks the vCPU. 0: nothing
 * done, the route is stale or unarmed. */
int pyemu_irq_route_post(void *opaque)
{
    struct pyemu_irq_route *r = (struct pyemu_irq_route *)opaque;
    if (!__atomic_load_n(&r->armed, __ATOMIC_ACQUIRE)
        || __atomic_load_n(&pyemu_irq_route_generation, __ATOMIC_SEQ_CST) != r->aimed_at)
        return 0;
    if (r->status)
        __atomic_fetch_or(r->status, r->status_bits, __ATOMIC_SEQ_CST);
    pyemu_apic_accept(r->core, r->vector, 0);
    r->posts++;
    return 1;
}

/* After a post from a thread without the GIL (an I/O thread's C handler, iothread_wait.c): wake the vCPU
 * here when that needs no Python. 1: done -- nothing is deliverable yet (the EOI that unblocks it flags the
 * vCPU, as the model's kick would), or the vCPU spins at a HLT inside its run (block_gate.c's
 * pyemu_gate_halt) and now sees the flags its Python kick would set. 0: the caller kicks through Python (the
 * vCPU runs, sleeps or is in Python; the model must decide). The post comes before the load of halt_poll,
 * both sequentially consistent: a vCPU that stops spinning after that load reads IRR afterwards, in its
 * wait's look at the controller, and sees the interrupt. */
int pyemu_irq_route_kick(void *opaque)
{
    struct pyemu_irq_route *r = (struct pyemu_irq_route *)opaque;
    if (!r->halt_poll || __atomic_load_n(&r->core->python_ack, __ATOMIC_ACQUIRE))
        return 0;
    if (pyemu_apic_deliverable(r->core) < 0)
        return 1;
    if (!__atomic_load_n(r->halt_poll, __ATOMIC_SEQ_CST))
        return 0;
    __atomic_store_n(r->irq_pending, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(r->attention, 1, __ATOMIC_SEQ_CST);
    r->kicks++;
    return 1;
}
