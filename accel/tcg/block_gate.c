/* pyemu software CPU: the block-start gate (see block_gate.py for why it is written in C).
 *
 * Registered as a UC_HOOK_BLOCK callback on a Unicorn engine. It runs at the start of every translation
 * block, before any of the block's instructions, so a uc_emu_stop() issued here leaves RIP exactly at
 * the block start: nothing of the block has executed. Host threads only set flags in the gate.
 */
#include <stdint.h>

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
};

void pyemu_block_gate(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct pyemu_gate *gate = (struct pyemu_gate *)user_data;
    int first = gate->skip_first;
    (void)address;
    (void)size;
    if (first) {
        gate->skip_first = 0; /* no store per block on the common path */
    }
    if (gate->tlb && !first && __atomic_load_n(&gate->tlb->fallback, __ATOMIC_ACQUIRE)) {
        pyemu_tlb_resume(uc, gate->tlb);
    }
    if (__atomic_load_n(&gate->stop_request, __ATOMIC_ACQUIRE)
        || __atomic_load_n(&gate->service_request, __ATOMIC_ACQUIRE)) {
        goto stop;
    }
    if (!first && __atomic_load_n(&gate->irq_pending, __ATOMIC_ACQUIRE)) {
        uint64_t rflags = 0;
        if (gate->reg_read(uc, gate->rflags_regid, &rflags) == 0 && (rflags & 0x200)) {
            goto stop;
        }
    }
    return;
stop:
    gate->stopped = 1;
    gate->stops++;
    gate->emu_stop(uc);
}
