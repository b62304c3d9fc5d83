/* pyemu software CPU: the block-start gate (see block_gate.py for why it is written in C).
 *
 * Registered as a UC_HOOK_BLOCK callback on a Unicorn engine. It runs at the start of every translation
 * block, before any of the block's instructions, so a uc_emu_stop() issued here leaves RIP exactly at
 * the block start: nothing of the block has executed. Host threads only set flags in the gate.
 */
#include <stdint.h>
#include <sched.h>
#include <time.h>

/* Built together with tlb_fill.c, which comes first (struct pyemu_tlb, pyemu_tlb_resume). */

struct pyemu_gate {
    int32_t stop_request;  /* host: make run() return; stop at the next block start */
    int32_t irq_pending;   /* host: an interrupt may be pending; stop at the first block start with IF=1 */
    int32_t skip_first;    /* vCPU: ignore the first block after emu_start (the resume point itself) */
    int32_t stopped;       /* gate: this hook stopped the engine */
    int32_t rflags_regid;  /* UC_X86_REG_RFLAGS */
    int32_t service_request; /* host: the vCPU thread has engine work to do (code invalidation); stop */
    uint64_t stops;        /* statistics: stops issued */
    int (*reg_read)(void *uc, int regid, void *value);
    int (*emu_stop)(void *uc);
    struct pyemu_tlb *tlb; /* the TLB-fill hook's state (tlb_fill.c), or NULL */
    int32_t contended;     /* scheduler: another vCPU waits for this engine's turn to end */
    int32_t yielded;       /* gate: stopped because the guest spins in a PAUSE loop */
    uint64_t yields;       /* statistics: spin yields */
    uint64_t spin_anchor;  /* spin detector: a block start that keeps coming back */
    uint32_t spin_hits;    /* ... how often it came back */
    uint32_t spin_gap;     /* ... blocks since it last came back */
    uint32_t verify_left;  /* ... blocks of the loop still to look at for a PAUSE */
    uint64_t not_pause;    /* ... the last anchor found to be a loop without PAUSE (rep string, memset) */
    uint64_t last_block;   /* the start of the block running now (for sampling profilers) */
    const uint32_t *hflags2; /* QEMU's env->hflags2 of this engine (io_guard.py finds env), or NULL */
    int32_t nmi_held;      /* vCPU: an NMI waits for the end of NMI blocking; stop once HF2_NMI_MASK is clear */
    const uint64_t *cr4;   /* QEMU's env->cr[4] of this engine (or &cr4_seen until it is located) */
    uint64_t cr4_seen;     /* vCPU: CR4 at emu_start; gate: CR4 as of the last block start */
    uint64_t cr4_refused;  /* vCPU: bits reserved under this vCPU's CPUID (a MOV to CR4 setting one: #GP) */
    int32_t cr4_fault;     /* gate: stopped because CR4 gained a refused bit; cr4_old, fault_block say more */
    uint64_t cr4_old;      /* ... CR4 before the MOV */
    uint64_t fault_block;  /* ... the block that ended with the MOV to CR4 */
    int32_t attention;     /* host and gate: some flag above may be set; see "Attention" below */
    int (*raise_irq)(void *uc); /* pyemu's libunicorn: uc_pyemu_raise_interrupt, or NULL */
    int32_t engine_irq;    /* vCPU: a pending interrupt is raised in the engine instead of stopping it */
    uint64_t irq_raised;   /* statistics: interrupts raised in the engine */
    uint64_t raised_at;    /* gate: the block start where it raised one that the engine has not asked
                            * the vCPU for yet (UINT64_MAX: none); the vCPU resets it when asked */
    uint32_t spin_burst;   /* scheduler: block starts the spin detector may still look at (see below) */
    uint64_t halt_budget_ns; /* vCPU: how long a HLT with IF=1 spins in the engine (0: halt at once) */
    int32_t in_halt_poll;  /* gate: spinning at a HLT inside the run now (kickers publish late, as for poll) */
    int32_t halt_polled;   /* gate: the run ended in a HLT after spinning there for nothing (vCPU clears) */
    uint64_t halt_started_ns; /* ... when that spin began (CLOCK_MONOTONIC) */
    uint64_t halt_wakes;   /* statistics: HLTs an interrupt ended inside the run */
};

#define GATE_HF2_NMI_MASK (1u << 2)

/* Attention: with pyemu's libunicorn (accel/tcg/engine_patches.py), the translated code calls this hook
 * only when `attention` is non-zero or CR4 differs from `cr4_seen`, and stores each block's start in
 * `last_block` itself. Whoever sets a flag then sets `attention` (after the flag); the gate clears it on
 * entry, before it reads the flags, and sets it again on the way out while a flag still wants the gate at
 * the next block (a pending interrupt waiting for IF=1, a held NMI, a waiting vCPU, a TLB fallback, a stop
 * not yet taken). With PyPI's library the hook runs at every block and `attention` changes nothing. */
static inline int32_t gate_flags(const struct pyemu_gate *gate)
{
    const struct pyemu_tlb *tlb = gate->tlb;
    return gate->skip_first
        | __atomic_load_n(&gate->stop_request, __ATOMIC_ACQUIRE)
        | __atomic_load_n(&gate->service_request, __ATOMIC_ACQUIRE)
        | __atomic_load_n(&gate->irq_pending, __ATOMIC_ACQUIRE)
        | gate->nmi_held | (gate->contended & (gate->spin_burst != 0))
        | (tlb ? __atomic_load_n(&tlb->fallback, __ATOMIC_ACQUIRE) : 0);
}

static inline void gate_keep_attention(struct pyemu_gate *gate)
{
    if (gate_flags(gate)) {
        __atomic_store_n(&gate->attention, 1, __ATOMIC_RELEASE);
    }
}

/* Spin detection, only while another vCPU waits for the turn (the scheduler runs one engine at a time,
 * so a guest spinning on a lock held by a vCPU that is not running waits for nothing). A loop is a block
 * start that comes back within SPIN_GAP blocks, SPIN_HITS times (16 blocks: Linux's stop_machine loop,
 * with its watchdog and RCU calls and their return thunks, is about a dozen); it is a spin if one of its
 * blocks ends with PAUSE (F3 90), which Linux's cpu_relax() puts in every busy-wait, and which ends a
 * translation block in QEMU's x86 translator. Busy loops without PAUSE (rep movs, memset) are remembered and left
 * alone.
 *
 * The detector needs the gate at every block start, which costs as much as the rest of the engine's
 * per-block work (measured: a two-vCPU Linux boot spent 0.47 s of its 4.2 s in the gate, against 0.03 s
 * with one vCPU, because one vCPU or the other waits most of the time). So it looks in bursts: each time
 * the waiting vCPU's scheduler says "contended" (when it starts to wait, then every few hundred
 * microseconds while it waits) the detector gets spin_burst block starts; a spin found within them ends
 * the turn, and otherwise the engine runs on without the gate until the next burst. The common case, a
 * vCPU that sent an IPI and spins until it is handled, is found in the first burst: the spin has begun
 * before the woken vCPU asks for the turn. */
#define SPIN_GAP 16
#define SPIN_HITS 48

static int spin_check(void *uc, struct pyemu_gate *gate, uint64_t address, uint32_t size)
{
    if (gate->verify_left) {
        uint8_t tail[2];
        if (size >= 2 && pyemu_read_code(uc, gate->tlb, address + size - 2, tail, 2)
            && tail[0] == 0xF3 && tail[1] == 0x90) {
            gate->verify_left = 0;
            gate->spin_hits = 0;
            return 1;
        }
        if (--gate->verify_left == 0) {
            gate->not_pause = gate->spin_anchor;
            gate->spin_hits = 0;
        }
        return 0;
    }
    if (address == gate->spin_anchor) {
        gate->spin_gap = 0;
        if (++gate->spin_hits >= SPIN_HITS && address != gate->not_pause) {
            gate->verify_left = SPIN_GAP + 1;
        }
    } else if (++gate->spin_gap > SPIN_GAP) {
        gate->spin_anchor = address;
        gate->spin_hits = 0;
        gate->spin_gap = 0;
    }
    return 0;
}

/* End the run at this point (from the gate, or from the PAUSE hook below); `yield` marks a turn given up
 * because the guest spins. */
static void gate_stop(void *uc, struct pyemu_gate *gate, int yield)
{
    if (yield) {
        gate->yielded = 1;
        gate->yields++;
    }
    gate->stopped = 1;
    gate->stops++;
    gate_keep_attention(gate);
    gate->emu_stop(uc);
}

/* Everything but the common case: a CR4 change, the first block after emu_start, or a flag some thread
 * set. Kept out of line so that the common path below calls nothing and saves no registers: the gate runs
 * at every block start, and a boot executes a few hundred million of them (the call itself is then most
 * of the gate's cost, as for Unicorn's own per-block exit check). */
static __attribute__((noinline)) void gate_slow(void *uc, struct pyemu_gate *gate, uint64_t address,
                                                uint32_t size, uint64_t cr4, uint64_t previous_block)
{
    int first = gate->skip_first;
    if (cr4 != gate->cr4_seen) {
        /* A MOV to CR4 ends its block, so this is the first block start after it. Unicorn's CR4 helper
         * takes any value: a newly set bit this vCPU's CPUID does not offer is refused here (the vCPU
         * puts the old CR4 back and raises #GP at the MOV, the last instruction of the previous block). */
        if (cr4 & ~gate->cr4_seen & gate->cr4_refused) {
            gate->cr4_fault = 1;
            gate->cr4_old = gate->cr4_seen;
            gate->fault_block = previous_block;
            goto stop;
        }
        gate->cr4_seen = cr4;
    }
    if (first) {
        gate->skip_first = 0;
    }
    if (gate->tlb && !first && __atomic_load_n(&gate->tlb->fallback, __ATOMIC_ACQUIRE)) {
        pyemu_tlb_resume(uc, gate->tlb);
    }
    if (__atomic_load_n(&gate->stop_request, __ATOMIC_ACQUIRE)
        || __atomic_load_n(&gate->service_request, __ATOMIC_ACQUIRE)) {
        goto stop;
    }
    if (gate->nmi_held && !first && gate->hflags2
        && !(__atomic_load_n(gate->hflags2, __ATOMIC_RELAXED) & GATE_HF2_NMI_MASK)) {
        goto stop;   /* the first block after the NMI handler's IRET */
    }
    if (!first && __atomic_load_n(&gate->irq_pending, __ATOMIC_ACQUIRE)) {
        uint64_t rflags = 0;
        if (gate->reg_read(uc, gate->rflags_regid, &rflags) == 0 && (rflags & 0x200)) {
            if (!gate->engine_irq || !gate->raise_irq || gate->raised_at == address) {
                /* Back at the block where one was raised, and nobody was asked for its vector: the CPU
                 * did not accept it here (an interrupt shadow), so the vCPU decides, as without. */
                goto stop;
            }
            /* This hook runs before the block's exit check, so the engine leaves the block chain
             * right here and, if the CPU accepts an interrupt at this boundary, asks the vCPU's
             * interrupt controller for the vector (which clears irq_pending; block_gate.py). */
            gate->raise_irq(uc);
            gate->raised_at = address;
            gate->irq_raised++;
        }
    }
    if (gate->contended && gate->spin_burst && gate->tlb) {
        gate->spin_burst--;
        if (spin_check(uc, gate, address, size)) {
            gate_stop(uc, gate, 1);
            return;
        }
    }
    gate_keep_attention(gate);
    return;
stop:
    gate_stop(uc, gate, 0);
}

void pyemu_block_gate(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct pyemu_gate *gate = (struct pyemu_gate *)user_data;
    uint64_t cr4 = __atomic_load_n(gate->cr4, __ATOMIC_RELAXED);
    uint64_t previous_block = gate->last_block;
    int32_t attention;
    if (__atomic_load_n(&gate->attention, __ATOMIC_RELAXED)) {
        /* A full barrier before the flags are read: a flag set after this sets attention again. */
        __atomic_exchange_n(&gate->attention, 0, __ATOMIC_SEQ_CST);
    }
    /* Every reason to look closer, in one test: the loads are independent and share a cache line or two
     * (acquire loads are plain loads on x86-64). */
    attention = gate_flags(gate);
    gate->last_block = address;
    if (__builtin_expect(cr4 == gate->cr4_seen && !attention, 1)) {
        return;
    }
    gate_slow(uc, gate, address, size, cr4, previous_block);
}

/* PAUSE, with pyemu's libunicorn (the engine calls this from the instruction's helper, on this engine's
 * thread): the guest waits in a busy loop for something another CPU does. While another vCPU waits for
 * the turn, give it up at once, as QEMU's single-threaded TCG moves on to the next vCPU at every PAUSE.
 * The spin detector above needs a burst of block starts after each "contended" and finds a spin only if
 * it began within it; with the vCPU threads sharing one host CPU (vcpu_placement.py) the waiter cannot
 * say "contended" again while this engine runs, so a spin that began later went on until the host
 * preempted the engine's thread (measured, two-vCPU Linux boot: 0.19-0.34 s of guest time in
 * smp_call_function_many_cond, 0.08-0.11 s with this). The detector stays for PyPI's library. */
void pyemu_gate_pause(void *uc, void *opaque)
{
    struct pyemu_gate *gate = (struct pyemu_gate *)opaque;
    if (__atomic_load_n(&gate->contended, __ATOMIC_ACQUIRE) && !gate->stopped) {
        gate_stop(uc, gate, 1);
    }
}

/* Halt polling (block_gate.py, BlockGate.poll; accel/tcg/halt_poll.py says why): with the engine not
 * running, wait up to budget_ns for some thread to set `attention` (every flag setter does), spinning
 * rather than sleeping, so that the setter wakes nobody (a cross-CPU wake-up costs the waker ~18 us on
 * this project's hosts) and the vCPU sees the interrupt within a microsecond. cffi releases the GIL for
 * the call. Returns 1 when `attention` was set, 0 when the budget ran out. */

static inline uint64_t gate_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* The spin both waits share: ``look`` until it answers non-zero or ``deadline`` passes (one last look
 * then), yielding the CPU between bursts. */
static inline int gate_spin(const struct pyemu_gate *gate, uint64_t deadline, int (*look)(const struct pyemu_gate *))
{
    for (;;) {
        for (int i = 0; i < 32; i++) {
            int seen = look(gate);
            if (seen) {
                return seen;
            }
            __builtin_ia32_pause();
        }
        /* Give the CPU to any runnable thread here (the I/O thread about to raise the interrupt, the
         * other end of a network transfer): spinning must not delay what it waits for. */
        sched_yield();
        if (gate_now_ns() >= deadline) {
            return look(gate);
        }
    }
}

static int attention_set(const struct pyemu_gate *gate)
{
    return __atomic_load_n(&gate->attention, __ATOMIC_ACQUIRE) ? 1 : 0;
}

int pyemu_gate_poll(struct pyemu_gate *gate, uint64_t budget_ns)
{
    return gate_spin(gate, gate_now_ns() + budget_ns, attention_set);
}

enum { HALT_WAIT = 0, HALT_INTERRUPT = 1, HALT_VCPU_WORK = 2 };

/* At a HLT: what ends the spin. Work for the vCPU thread comes first: it must leave the run for it. */
static int halt_ended(const struct pyemu_gate *gate)
{
    if (__atomic_load_n(&gate->stop_request, __ATOMIC_ACQUIRE)
        || __atomic_load_n(&gate->service_request, __ATOMIC_ACQUIRE)
        || __atomic_load_n(&gate->contended, __ATOMIC_ACQUIRE)) {
        return HALT_VCPU_WORK;
    }
    return __atomic_load_n(&gate->irq_pending, __ATOMIC_ACQUIRE) ? HALT_INTERRUPT : HALT_WAIT;
}

/* HLT with IF=1, with pyemu's libunicorn (the engine calls this from the instruction's helper, on this
 * engine's thread, GIL released; block_gate.py, BlockGate.poll_halts_in_engine, says why). Spin as
 * pyemu_gate_poll does, for the budget the vCPU left, until an interrupt is pending: 1 then, and the engine
 * takes it at once (asking the interrupt controller for the vector, as for one the gate raises). Anything
 * else the vCPU thread must see to (a stop, code to invalidate, an NMI or INIT, another vCPU waiting for
 * the turn this one holds) or the budget running out: 0, and the engine halts and ends the run as before,
 * with halt_polled telling the vCPU that its window was spent here. */
int pyemu_gate_halt(void *uc, void *opaque)
{
    struct pyemu_gate *gate = (struct pyemu_gate *)opaque;
    uint64_t budget = gate->halt_budget_ns;
    (void)uc;
    if (!budget || !gate->engine_irq || !gate->raise_irq || gate->nmi_held) {
        return 0;
    }
    uint64_t start = gate_now_ns();
    __atomic_store_n(&gate->in_halt_poll, 1, __ATOMIC_SEQ_CST);
    int ended = gate_spin(gate, start + budget, halt_ended);
    __atomic_store_n(&gate->in_halt_poll, 0, __ATOMIC_SEQ_CST);
    if (ended == HALT_INTERRUPT) {
        gate->halt_wakes++;
        gate->raised_at = UINT64_MAX;
        return 1;
    }
    gate->halt_started_ns = start;
    gate->halt_polled = 1;
    return 0;
}

/* The engine's INTA answered in C by the interrupt controller (BlockGate.take_interrupts_in_engine with
 * a native controller; hw/intc/apic_core.c says why): ``controller_ack`` moves the vector to in-service
 * and keeps the vCPU's irq_pending flag as the Python vCPU's _take_vector does. When it says only its
 * Python model may answer (-2, e.g. a PIC passed through), the Python acknowledge runs instead. */
struct pyemu_gate_ack {
    struct pyemu_gate *gate;
    int (*controller_ack)(void *controller, int32_t *irq_pending);
    void *controller;
    int (*fallback)(void *opaque);
    uint64_t acks;          /* vectors the controller gave in C */
};

int pyemu_gate_acknowledge(void *opaque)
{
    struct pyemu_gate_ack *a = (struct pyemu_gate_ack *)opaque;
    int vector = a->controller_ack(a->controller, &a->gate->irq_pending);
    if (vector == -2)
        return a->fallback(NULL);
    a->gate->raised_at = UINT64_MAX;  /* BlockGate.interrupt_taken */
    if (vector >= 0)
        a->acks++;
    return vector;
}
