/* pyemu software CPU: the I/O permission guard (see io_guard.py for why it is written in C).
 *
 * Registered as the UC_HOOK_INSN callbacks for IN and OUT (which also serve INS/OUTS). Unicorn 2.1.4
 * translates IN/OUT without QEMU's gen_check_io ("Unicorn: allow all I/O instructions"), so a CPL-3
 * program with IOPL 0 reaches the port. The guard runs first: in protected mode with CPL > IOPL (or in
 * virtual-8086 mode) it looks up the port in the TSS I/O permission bitmap and, when the access is not
 * allowed, raises #GP(0) the way a QEMU helper does: it puts the CPU state back to the start of the
 * instruction (cpu_restore_state with the return address into the translated block, found on the stack)
 * and leaves through raise_exception_err_ra, so nothing of the instruction or of the rest of its block
 * has executed. Allowed accesses are handed to the Python callbacks.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* pthread_getattr_np (Python.h, included first by cffi, defines it already) */
#endif
#include <pthread.h>
#include <stdint.h>

/* Port accesses handled without the Python callbacks, as the device allows from moment to moment
 * (system/bus.py RegisterFastPath): a one-byte read answered with read_value (-1: ask the device), and a
 * one-byte write queued in the vCPU's ring of posted writes (posted != 0), delivered in order before the
 * vCPU's next other access and at the end of its run. Shared by every vCPU of a VM; written by whichever
 * thread publishes, under the device's lock. A slot is filled port first, then its settings, then count,
 * so a reader never sees a half-made slot. */
#define IO_FAST_SLOTS 8
#define IO_POSTED_RING 512
struct pyemu_port_fast {
    uint32_t count;
    uint32_t port[IO_FAST_SLOTS];
    int32_t read_value[IO_FAST_SLOTS];
    int32_t posted[IO_FAST_SLOTS];
    uint64_t read_hits;           /* statistics: reads answered here */
    uint64_t posted_writes;       /* statistics: writes queued */
};

struct pyemu_io_guard {
    uint8_t *env;                 /* QEMU's CPUX86State of this engine */
    void *cpu;                    /* its CPUState */
    int32_t off_hflags;           /* offsets into env (calibrated) */
    int32_t off_eflags;
    int32_t off_tr_base;
    int32_t off_tr_limit;
    int32_t off_tr_flags;
    int32_t enabled;              /* 0: hand every access on without looking (no env found) */
    uint32_t (*py_in)(void *uc, uint32_t port, int size, void *key);
    void (*py_out)(void *uc, uint32_t port, int size, uint32_t value, void *key);
    _Bool (*restore_state)(void *cpu, uintptr_t host_pc, _Bool will_exit);
    void (*raise_err_ra)(void *env, int intno, int error_code, uintptr_t retaddr);
    uint32_t (*lduw_mmuidx_ra)(void *env, uint64_t addr, int mmu_idx, uintptr_t retaddr);
    uint64_t checks;              /* statistics: accesses looked up in the bitmap */
    uint64_t faults;              /* statistics: #GP raised */
    uint64_t unrestored;          /* statistics: faults raised without finding the block's return address */
    uint64_t code_lo, code_hi;    /* this engine's TCG code buffer */
    uint64_t helpers[6];          /* helper_in{b,w,l} and helper_out{b,w,l}: what the block calls */
    struct pyemu_port_fast *fast; /* NULL: every access goes to Python */
    void (*py_flush)(void *uc, uint32_t count, void *key);  /* delivers ring[0..count) */
    uint32_t reads_since_post;    /* fast reads since the last posted write */
    uint32_t ring_used;           /* posted writes waiting: port << 8 | value, oldest first */
    uint32_t ring[IO_POSTED_RING];
};

#define IO_HF_CPL_MASK 3u
#define IO_HF_PE (1u << 7)
#define IO_HF_SMAP (1u << 23)
#define IO_EFLAGS_IOPL_SHIFT 12
#define IO_EFLAGS_VM (1ull << 17)
#define IO_EFLAGS_AC (1ull << 18)
#define IO_MMU_KSMAP_IDX 0
#define IO_MMU_KNOSMAP_IDX 2
#define IO_GP 13
#define IO_STACK_WORDS 2048

static uint32_t io_u32(const uint8_t *p) { uint32_t v; __builtin_memcpy(&v, p, 4); return v; }
static uint64_t io_u64(const uint8_t *p) { uint64_t v; __builtin_memcpy(&v, p, 8); return v; }

static int io_in_code(struct pyemu_io_guard *g, uint64_t address, uint64_t size)
{
    return address >= g->code_lo && address + size <= g->code_hi && address + size > address;
}

/* Is ``word`` the address after a call from translated code to one of the I/O helpers? TCG's x86-64
 * backend calls a helper with ``call rel32`` when it is within 2 GiB, else ``call [rip + disp32]`` through
 * a constant pool inside the block. */
static int io_is_helper_return(struct pyemu_io_guard *g, uint64_t word)
{
    uint64_t target = 0;
    if (!io_in_code(g, word - 6, 6))
        return 0;
    const uint8_t *code = (const uint8_t *)(uintptr_t)word;
    int32_t disp;
    __builtin_memcpy(&disp, code - 4, 4);
    if (code[-5] == 0xE8) {
        target = word + (int64_t)disp;
    } else if (code[-6] == 0xFF && code[-5] == 0x15) {
        uint64_t slot = word + (int64_t)disp;
        if (!io_in_code(g, slot, 8))
            return 0;
        target = io_u64((const uint8_t *)(uintptr_t)slot);
    } else {
        return 0;
    }
    for (int i = 0; i < 6; i++)
        if (g->helpers[i] && target == g->helpers[i])
            return 1;
    return 0;
}

/* Put env back to the start of the IN/OUT instruction (RIP and QEMU's lazy-flags state) from the return
 * address into the translated block, the value QEMU's GETPC() gives the helper: the innermost stack word
 * that points into this engine's code buffer right after a call to an I/O helper. Stale words left in
 * frames by earlier calls (block hooks) point elsewhere in the block and are not taken. */
/* The highest address of this thread's stack (0 when unknown): the walk below must not read past it. A
 * vCPU thread's C stack can be shallow (Python 3.11 runs nested Python calls in one C frame), so a fixed
 * walk of IO_STACK_WORDS could leave the stack mapping and crash when no return address matches. */
static __thread uintptr_t io_stack_top;

static uintptr_t io_thread_stack_top(void)
{
    if (!io_stack_top) {
        pthread_attr_t attr;
        void *low;
        size_t size;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            if (pthread_attr_getstack(&attr, &low, &size) == 0)
                io_stack_top = (uintptr_t)low + size;
            pthread_attr_destroy(&attr);
        }
    }
    return io_stack_top;
}

static __attribute__((noinline)) int io_restore(struct pyemu_io_guard *g)
{
    uint64_t *frame = (uint64_t *)__builtin_frame_address(0);
    uintptr_t top = io_thread_stack_top();
    int words = IO_STACK_WORDS;
    if (!top || top <= (uintptr_t)frame)
        return 0;
    if ((top - (uintptr_t)frame) / 8 < (uintptr_t)words)
        words = (int)((top - (uintptr_t)frame) / 8);
    for (int i = 0; i < words; i++) {
        uint64_t word = frame[i];
        if (io_is_helper_return(g, word))
            return g->restore_state(g->cpu, (uintptr_t)word, 0) ? 1 : 0;
    }
    return 0;
}

/* SDM 19.5.2 and QEMU's check_io: the 16-bit bitmap offset at TSS+0x66, two bytes read at offset +
 * port/8, both inside the TSS limit, and every bit of the access clear. A busy TSS is accepted too (the
 * cached TR type is busy on hardware; QEMU caches the available type). */
static int io_bitmap_allows(struct pyemu_io_guard *g, uint32_t hflags, uint64_t eflags, uint32_t port, int size)
{
    uint8_t *env = g->env;
    uint32_t flags = io_u32(env + g->off_tr_flags);
    uint32_t type = (flags >> 8) & 0x1F;   /* with the S bit, which must be clear */
    uint32_t limit = io_u32(env + g->off_tr_limit);
    uint64_t base = io_u64(env + g->off_tr_base);
    if (!(flags & (1u << 15)) || (type != 9 && type != 11) || limit < 103)
        return 0;
    int mmu_idx = !(hflags & IO_HF_SMAP) ? IO_MMU_KNOSMAP_IDX
                  : ((hflags & IO_HF_CPL_MASK) < 3 && (eflags & IO_EFLAGS_AC)) ? IO_MMU_KNOSMAP_IDX
                  : IO_MMU_KSMAP_IDX;
    uint32_t offset = g->lduw_mmuidx_ra(env, base + 0x66, mmu_idx, 0) + (port >> 3);
    if (offset + 1 > limit)
        return 0;
    uint32_t bits = g->lduw_mmuidx_ra(env, base + offset, mmu_idx, 0) >> (port & 7);
    return (bits & ((1u << size) - 1)) == 0;
}

static void io_check(struct pyemu_io_guard *g, uint32_t port, int size)
{
    if (!g->enabled)
        return;
    uint8_t *env = g->env;
    uint32_t hflags = io_u32(env + g->off_hflags);
    if (!(hflags & IO_HF_PE))
        return;
    uint64_t eflags = io_u64(env + g->off_eflags);
    if (!(eflags & IO_EFLAGS_VM) && (hflags & IO_HF_CPL_MASK) <= ((eflags >> IO_EFLAGS_IOPL_SHIFT) & 3))
        return;
    g->checks++;
    /* Restore first: a #PF while reading the bitmap leaves through the same path. */
    if (!io_restore(g))
        g->unrestored++;
    if (io_bitmap_allows(g, hflags, eflags, port & 0xFFFF, size))
        return;
    g->faults++;
    g->raise_err_ra(env, IO_GP, 0, 0);
}

static int io_fast_slot(struct pyemu_port_fast *f, uint32_t port)
{
    uint32_t count = __atomic_load_n(&f->count, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < count && i < IO_FAST_SLOTS; i++)
        if (f->port[i] == port)
            return (int)i;
    return -1;
}

/* Hand the posted writes to Python (on this vCPU's thread, like every hook). */
static void io_flush(struct pyemu_io_guard *g, void *uc)
{
    uint32_t count = g->ring_used;
    if (count) {
        g->py_flush(uc, count, 0);
        g->ring_used = 0;
    }
}

uint32_t pyemu_io_in(void *uc, uint32_t port, int size, void *user_data)
{
    struct pyemu_io_guard *g = (struct pyemu_io_guard *)user_data;
    io_check(g, port, size);
    struct pyemu_port_fast *f = g->fast;
    if (f && size == 1) {
        int slot = io_fast_slot(f, port);
        if (slot >= 0) {
            int32_t value = __atomic_load_n(&f->read_value[slot], __ATOMIC_ACQUIRE);
            if (value >= 0) {
                f->read_hits++;
                /* A second read in a row with writes still queued: the guest polls (for input, say)
                 * instead of writing on, so what it wrote must be out now. A console that reads LSR
                 * once per byte it writes keeps its bytes queued. */
                if (g->ring_used && ++g->reads_since_post >= 2)
                    io_flush(g, uc);
                return (uint32_t)value;
            }
        }
    }
    io_flush(g, uc);
    return g->py_in(uc, port, size, 0);
}

void pyemu_io_out(void *uc, uint32_t port, int size, uint32_t value, void *user_data)
{
    struct pyemu_io_guard *g = (struct pyemu_io_guard *)user_data;
    io_check(g, port, size);
    struct pyemu_port_fast *f = g->fast;
    if (f && size == 1) {
        int slot = io_fast_slot(f, port);
        if (slot >= 0 && __atomic_load_n(&f->posted[slot], __ATOMIC_ACQUIRE)) {
            if (g->ring_used == IO_POSTED_RING)
                io_flush(g, uc);
            g->ring[g->ring_used++] = (port & 0xFFFF) << 8 | (value & 0xFF);
            g->reads_since_post = 0;
            f->posted_writes++;
            return;
        }
    }
    io_flush(g, uc);
    g->py_out(uc, port, size, value, 0);
}
