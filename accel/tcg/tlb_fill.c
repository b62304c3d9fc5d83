/* pyemu software CPU: the TLB-fill hook that keeps guest stores on Unicorn's fast path
 * (see tlb_fill.py for the measurements and the Unicorn 2.1.4 facts behind it).
 *
 * Registered as a UC_HOOK_TLB_FILL callback with the engine in UC_TLB_VIRTUAL mode. For each TLB miss:
 *   1. walk the guest page tables read-only (long mode, PAE, 32-bit) to find the page and what the CPU
 *      would permit (with protection keys: PKRU read from the engine's env); anything unusual, and any access the walk would refuse, is "not ours": switch the
 *      engine to its own MMU (UC_TLB_CPU) and report a miss, so the vCPU re-runs the instruction with
 *      Unicorn's page walk, which raises the architectural #PF (the block gate switches back);
 *   2. let Unicorn's own walk do the same translation (uc_vmem_translate with the engine briefly in
 *      UC_TLB_CPU mode), which sets the accessed/dirty bits and registers large pages for INVLPG;
 *   3. return the permissions, minus EXEC for a page no instruction was ever fetched from: Unicorn
 *      only marks a TLB entry's page dirty (fast stores) when the entry is not executable; and minus
 *      WRITE for a page another engine holds code from, until a store hands the page over.
 */
#include <stdint.h>
#include <stdbool.h>
#include <string.h>

#define PYEMU_RAM_SLOTS 8

struct pyemu_tlb_entry { uint64_t paddr; int perms; };

struct pyemu_ram_slot { uint64_t gpa; uint64_t size; uint8_t *host; };

/* Translated code shared knowledge between the engines of one VM (tlb_fill.py, "Several engines").
 * Only one engine runs at a time (the round-robin scheduler), so plain accesses suffice; the scheduler's
 * lock orders them between threads. */
#define PYEMU_MAX_ENGINES 8
#define PYEMU_INVAL_CAP 512

struct pyemu_code_map {
    uint8_t *owners;            /* per 4 KiB page of [0, page_count << 12): bit i = engine i may hold code */
    uint8_t *writers;           /* per page: bit i = engine i was granted WRITE since its last TLB flush */
    uint64_t page_count;
    uint64_t flush_requests;    /* statistics: TLB flushes asked of other engines */
    uint32_t engines;           /* engines sharing the map */
    int32_t flush_needed[PYEMU_MAX_ENGINES]; /* engine must flush its TLB before it runs again */
    uint32_t inval_count[PYEMU_MAX_ENGINES];
    int32_t inval_overflow[PYEMU_MAX_ENGINES];
    uint64_t inval_pages[PYEMU_MAX_ENGINES][PYEMU_INVAL_CAP];
    /* Dirty log (dirty_log.py): while `logging`, a page is granted WRITE only once it is marked here; a
     * write fill marks it. Cleared by pyemu_dirty_take while no engine runs (the sync holds the turn). */
    uint8_t *dirty;             /* per page: written since the last take */
    int32_t logging;
    uint64_t dirty_marks;       /* statistics: pages marked by write fills and page-table updates */
    uint64_t log_fallbacks;     /* statistics: write fills left to Unicorn's MMU while logging */
};

struct pyemu_tlb {
    int (*ctl)(void *uc, uint32_t control, ...);
    int (*vmem_translate)(void *uc, uint64_t address, int prot, uint64_t *paddr);
    int (*reg_read)(void *uc, int regid, void *value);
    uint32_t ctl_tlb_type;      /* UC_CTL_WRITE(UC_CTL_TLB_TYPE, 1) */
    uint32_t ctl_tlb_flush;     /* UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0) */
    int32_t fallback;           /* this hook switched the engine to UC_TLB_CPU; the gate switches back */
    int32_t fill_failed;        /* a fill reported a miss: emu_start returns UC_ERR_EXCEPTION */
    int32_t reg_cr0, reg_cr3, reg_cr4, reg_msr, reg_cs, reg_rflags;
    int32_t engine;             /* this engine's index in the code map (bit 1 << engine) */
    uint64_t fills, fallbacks, code_marks, invalidations_sent;
    struct pyemu_code_map *code;
    uint32_t ram_count;
    struct pyemu_ram_slot ram[PYEMU_RAM_SLOTS];
    const uint32_t *pkru;       /* QEMU's env->pkru of this engine (calibrated), or NULL: PKE left to Unicorn */
    int32_t *attention;         /* the block gate's attention word: a fallback needs the gate at the next block */
    int32_t own_walk;           /* pyemu's libunicorn: this walk sets accessed/dirty bits and reports large pages
                                   itself (no second walk by Unicorn); see pyemu_tlb_fill */
    const uint8_t *env;         /* QEMU's CPUX86State of this engine, or NULL: registers through reg_read */
    int32_t env_cr0, env_cr3, env_cr4, env_efer, env_cs, env_rflags; /* calibrated offsets in it */
};

struct pyemu_msr { uint32_t rid; uint64_t value; };

enum { PROT_R = 1, PROT_W = 2, PROT_X = 4 };
enum { MEM_READ = 16, MEM_WRITE = 17, MEM_FETCH = 18 };
enum { TLB_CPU = 0, TLB_VIRTUAL = 1 };

#define P_BIT   (1ULL << 0)
#define A_BIT   (1ULL << 5)
#define RW_BIT  (1ULL << 1)
#define US_BIT  (1ULL << 2)
#define D_BIT   (1ULL << 6)
#define PS_BIT  (1ULL << 7)
#define NX_BIT  (1ULL << 63)
#define ADDR_MASK 0x000FFFFFFFFFF000ULL
#define ADDR_RSVD 0x000FFF0000000000ULL /* entry address bits above the 40 physical bits */

#define CR0_WP (1ULL << 16)
#define CR0_PG (1ULL << 31)
#define CR4_PSE (1ULL << 4)
#define CR4_PAE (1ULL << 5)
#define CR4_LA57 (1ULL << 12)
#define CR4_SMEP (1ULL << 20)
#define CR4_SMAP (1ULL << 21)
#define CR4_PKE (1ULL << 22)
#define EFER_NXE (1ULL << 11)
#define EFER_LMA (1ULL << 10)
#define RFLAGS_AC (1ULL << 18)
#define RFLAGS_VM (1ULL << 17)

/* Where [gpa, gpa + width) is in this process, or NULL when it is not all in one RAM region. */
static uint8_t *host_pointer(const struct pyemu_tlb *s, uint64_t gpa, int width)
{
    for (uint32_t i = 0; i < s->ram_count; i++) {
        const struct pyemu_ram_slot *r = &s->ram[i];
        if (gpa >= r->gpa && gpa + width <= r->gpa + r->size) {
            return r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

static int read_phys(const struct pyemu_tlb *s, uint64_t gpa, int width, uint64_t *value)
{
    const uint8_t *p = host_pointer(s, gpa, width);
    if (p == NULL) {
        return 0; /* a table outside RAM: leave it to Unicorn */
    }
    if (width == 8) {
        *value = __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
    } else {
        *value = __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
    }
    return 1;
}

/* Walk state: 0 = ok (page, prot, size filled), -1 = not ours (fault or unusual: Unicorn decides). The
 * entries read on the way (guest-physical address and value, `width` bytes each; the last one is the
 * leaf) are where the accessed/dirty bits go, and let the dirty log see which page-table pages changed. */
struct walk {
    uint64_t page; uint64_t size; int prot; int width; int entries;
    uint64_t entry_gpa[4]; uint64_t entry_val[4];
};

/* With pyemu's libunicorn, the permissions a fill returns also say how large the guest's page is:
 * Unicorn then notes a large page, so that INVLPG of any address in it drops every entry it made. */
#define FILL_PAGE_2M 0x100
#define FILL_PAGE_1G 0x200

static void note_entry(struct walk *out, uint64_t gpa, uint64_t value)
{
    if (out->entries < 4) {
        out->entry_gpa[out->entries] = gpa;
        out->entry_val[out->entries] = value;
        out->entries++;
    }
}

static int walk(const struct pyemu_tlb *s, void *uc, uint64_t va, int type, struct walk *out)
{
    uint64_t cr0 = 0, cr3 = 0, cr4 = 0, cs = 0, rflags = 0;
    struct pyemu_msr efer = { 0xC0000080u, 0 };
    out->entries = 0;
    out->size = 0x1000;
    out->width = 8;
    if (s->env != NULL) {
        /* Read in place: each uc_reg_read is a call through Unicorn's register switch (RFLAGS also
         * computes the lazy flags), six per fill. Only the VM and AC flags are used, which QEMU keeps
         * in env->eflags itself. */
        cr0 = *(const uint64_t *)(s->env + s->env_cr0);
        cr3 = *(const uint64_t *)(s->env + s->env_cr3);
        cr4 = *(const uint64_t *)(s->env + s->env_cr4);
        efer.value = *(const uint64_t *)(s->env + s->env_efer);
        cs = *(const uint32_t *)(s->env + s->env_cs);
        rflags = *(const uint64_t *)(s->env + s->env_rflags);
    } else {
        s->reg_read(uc, s->reg_cr0, &cr0);
        s->reg_read(uc, s->reg_cr3, &cr3);
        s->reg_read(uc, s->reg_cr4, &cr4);
        s->reg_read(uc, s->reg_msr, &efer);
        s->reg_read(uc, s->reg_cs, &cs);
        s->reg_read(uc, s->reg_rflags, &rflags);
    }
    if (!(cr0 & CR0_PG)) {
        out->page = va & 0xFFFFF000ULL; /* paging off: linear = physical (32-bit) */
        out->prot = PROT_R | PROT_W | PROT_X;
        return 0;
    }
    if ((cr4 & CR4_LA57) || ((cr4 & CR4_PKE) && !s->pkru)) {
        return -1;
    }
    int user = (cs & 3) == 3 || (rflags & RFLAGS_VM);
    int nxe = (efer.value & EFER_NXE) != 0;
    uint64_t rw = RW_BIT, us = US_BIT, nx = 0, leaf = 0, page = 0;

    if (efer.value & EFER_LMA) {
        int64_t top = (int64_t)va >> 47;
        if (top != 0 && top != -1) {
            return -1;
        }
        uint64_t table = cr3 & ADDR_MASK;
        for (int level = 0; level < 4; level++) {
            int shift = 39 - 9 * level;
            uint64_t e;
            if (!read_phys(s, table + ((va >> shift) & 511) * 8, 8, &e) || !(e & P_BIT)) {
                return -1;
            }
            note_entry(out, table + ((va >> shift) & 511) * 8, e);
            if ((e & ADDR_RSVD) || ((e & NX_BIT) && !nxe)) {
                return -1;
            }
            rw &= e; us &= e; nx |= e & NX_BIT;
            if (level == 0 && (e & PS_BIT)) {
                return -1;
            }
            if (level == 1 && (e & PS_BIT)) {
                if (e & 0x3FFFE000ULL) {
                    return -1; /* reserved bits of a 1 GiB page: Unicorn raises the #PF */
                }
                leaf = e;
                page = (e & ADDR_MASK & ~0x3FFFFFFFULL) | (va & 0x3FFFF000ULL);
                out->size = 1ULL << 30;
                break;
            }
            if (level == 2 && (e & PS_BIT)) {
                if (e & 0x1FE000ULL) {
                    return -1;
                }
                leaf = e;
                page = (e & ADDR_MASK & ~0x1FFFFFULL) | (va & 0x1FF000ULL);
                out->size = 1ULL << 21;
                break;
            }
            if (level == 3) {
                leaf = e;
                page = e & ADDR_MASK;
            }
            table = e & ADDR_MASK;
        }
    } else if (cr4 & CR4_PAE) {
        uint64_t pdpte, table;
        va &= 0xFFFFFFFFULL;
        if (!read_phys(s, (cr3 & 0xFFFFFFE0ULL) + ((va >> 30) & 3) * 8, 8, &pdpte) || !(pdpte & P_BIT)) {
            return -1;
        }
        if (pdpte & (ADDR_RSVD | 0x1E6ULL | NX_BIT)) {
            return -1;
        }
        table = pdpte & ADDR_MASK;
        for (int level = 0; level < 2; level++) {
            int shift = 21 - 9 * level;
            uint64_t e;
            if (!read_phys(s, table + ((va >> shift) & 511) * 8, 8, &e) || !(e & P_BIT)) {
                return -1;
            }
            note_entry(out, table + ((va >> shift) & 511) * 8, e);
            if ((e & ADDR_RSVD) || ((e & NX_BIT) && !nxe)) {
                return -1;
            }
            rw &= e; us &= e; nx |= e & NX_BIT;
            if (level == 0 && (e & PS_BIT)) {
                if (e & 0x1FE000ULL) {
                    return -1;
                }
                leaf = e;
                page = (e & ADDR_MASK & ~0x1FFFFFULL) | (va & 0x1FF000ULL);
                out->size = 1ULL << 21;
                break;
            }
            if (level == 1) {
                leaf = e;
                page = e & ADDR_MASK;
            }
            table = e & ADDR_MASK;
        }
    } else {
        uint64_t pde, pte;
        va &= 0xFFFFFFFFULL;
        out->width = 4;
        if (!read_phys(s, (cr3 & 0xFFFFF000ULL) + (va >> 22) * 4, 4, &pde) || !(pde & P_BIT)) {
            return -1;
        }
        if ((pde & PS_BIT) && (cr4 & CR4_PSE)) {
            return -1; /* 4 MiB pages (PSE-36 address bits): leave to Unicorn */
        }
        if (!read_phys(s, (pde & 0xFFFFF000ULL) + ((va >> 12) & 1023) * 4, 4, &pte) || !(pte & P_BIT)) {
            return -1;
        }
        note_entry(out, (cr3 & 0xFFFFF000ULL) + (va >> 22) * 4, pde);
        note_entry(out, (pde & 0xFFFFF000ULL) + ((va >> 12) & 1023) * 4, pte);
        rw = pde & pte & RW_BIT;
        us = pde & pte & US_BIT;
        leaf = pte;
        page = pte & 0xFFFFF000ULL;
    }

    int prot = PROT_R | PROT_X;
    if (rw || (!user && !(cr0 & CR0_WP))) {
        prot |= PROT_W;
    }
    if (nx && nxe) {
        prot &= ~PROT_X;
    }
    if (user) {
        if (!us) {
            return -1;
        }
    } else if (us) {
        if (cr4 & CR4_SMEP) {
            prot &= ~PROT_X;
        }
        if ((cr4 & CR4_SMAP) && !(rflags & RFLAGS_AC)) {
            return -1; /* supervisor data access to a user page under SMAP: Unicorn decides */
        }
    }
    if ((cr4 & CR4_PKE) && us && (efer.value & EFER_LMA)) {
        /* Protection keys (IA-32e paging only): the leaf's key (bits 62:59) selects two PKRU bits. AD
         * forbids data reads and writes, WD writes (user accesses, and supervisor ones under CR0.WP);
         * fetches are not affected. Unicorn's WRPKRU flushes the TLB, so a grant does not outlive it. */
        uint32_t rights = __atomic_load_n(s->pkru, __ATOMIC_RELAXED) >> (2 * ((leaf >> 59) & 15));
        if (rights & 1) {
            prot &= ~(PROT_R | PROT_W);
        } else if ((rights & 2) && (user || (cr0 & CR0_WP))) {
            prot &= ~PROT_W;
        }
    }
    if (!(leaf & D_BIT) && type != MEM_WRITE) {
        prot &= ~PROT_W; /* as Unicorn: writable only once dirty, so the first store sets D */
    }
    int need = type == MEM_WRITE ? PROT_W : type == MEM_FETCH ? PROT_X : PROT_R;
    if (!(prot & need)) {
        return -1;
    }
    out->page = page;
    out->prot = prot;
    return 0;
}

static inline void mark_dirty(struct pyemu_code_map *m, uint64_t index)
{
    if (index < m->page_count && !m->dirty[index]) {
        m->dirty[index] = 1;
        m->dirty_marks++;
    }
}

/* Unicorn's walk (uc_vmem_translate) sets accessed/dirty bits in the entries: a write to guest RAM
 * that no TLB entry sees. Mark every table page whose entry changed. */
static void mark_changed_entries(struct pyemu_tlb *s, const struct walk *w)
{
    int width = w->width;
    for (int i = 0; i < w->entries; i++) {
        uint64_t now = 0;
        if (read_phys(s, w->entry_gpa[i], width, &now) && now != w->entry_val[i]) {
            mark_dirty(s->code, w->entry_gpa[i] >> 12);
        }
    }
}

/* While logging, WRITE only for a page already marked; a write fill marks it. */
static int log_permissions(struct pyemu_code_map *m, uint64_t index, int type, int prot)
{
    if (!(prot & PROT_W) || index >= m->page_count) {
        return prot;
    }
    if (type == MEM_WRITE) {
        mark_dirty(m, index);
    } else if (!m->dirty[index]) {
        prot &= ~PROT_W;
    }
    return prot;
}

static bool give_up(struct pyemu_tlb *s, void *uc)
{
    s->ctl(uc, s->ctl_tlb_type, TLB_CPU);
    __atomic_store_n(&s->fallback, 1, __ATOMIC_RELEASE);
    if (s->attention) {
        __atomic_store_n(s->attention, 1, __ATOMIC_RELEASE);
    }
    s->fill_failed = 1;
    s->fallbacks++;
    return false;
}

static bool give_up_fill(struct pyemu_tlb *s, void *uc, int type)
{
    if (s->code->logging && type == MEM_WRITE) {
        s->code->log_fallbacks++;
    }
    return give_up(s, uc);
}

/* Another engine may hold translations of the page a store is about to reach: it must drop them before
 * it runs again (its queue is served at the start of its next turn), and it stops being an owner. */
static void hand_over_page(struct pyemu_tlb *s, uint64_t index, uint8_t others)
{
    struct pyemu_code_map *m = s->code;
    for (int j = 0; j < PYEMU_MAX_ENGINES; j++) {
        if (!(others & (1u << j))) {
            continue;
        }
        uint32_t n = m->inval_count[j];
        if (n < PYEMU_INVAL_CAP) {
            m->inval_pages[j][n] = index << 12;
            m->inval_count[j] = n + 1;
        } else {
            m->inval_overflow[j] = 1; /* too many: that engine drops all its code instead */
        }
    }
    m->owners[index] &= (uint8_t)~others;
    s->invalidations_sent++;
}

/* The permissions to grant for a page, given who holds translated code from it:
 *  - EXEC only once this engine fetched from the page (stores to pages without code stay fast);
 *  - WRITE only while no other engine holds code from it, so a store that would make another engine's
 *    translations stale comes back here as a write fill, which hands the page over first. */
static int code_permissions(struct pyemu_tlb *s, uint64_t index, int type, int prot)
{
    struct pyemu_code_map *m = s->code;
    if (index >= m->page_count) {
        return prot;
    }
    uint8_t me = (uint8_t)(1u << s->engine);
    uint8_t owners = m->owners[index];
    uint8_t others = owners & (uint8_t)~me;
    if (type == MEM_FETCH) {
        if (!(owners & me)) {
            m->owners[index] = owners | me;
            s->code_marks++;
            uint8_t stale = m->writers[index] & (uint8_t)~me;
            if (stale) {
                /* Other engines may hold fast write entries for this page from before it held code. */
                for (int j = 0; j < PYEMU_MAX_ENGINES; j++) {
                    if (stale & (1u << j)) {
                        m->flush_needed[j] = 1;
                        m->flush_requests++;
                    }
                }
                m->writers[index] &= (uint8_t)~stale;
            }
        }
    } else if (!(owners & me)) {
        prot &= ~PROT_X;
    }
    if (others) {
        if (type == MEM_WRITE) {
            hand_over_page(s, index, others);
        } else {
            prot &= ~PROT_W;
        }
    }
    if (prot & PROT_W) {
        m->writers[index] |= me;
    }
    return prot;
}

/* Sets the bits the CPU sets when a walk succeeds: accessed in every entry, and dirty in the leaf for a
 * store, each entry written only when a bit is missing (a 4-byte store of the entry's low half, where
 * both bits are, as QEMU's walk does). The stores bypass the TLB, like the CPU's own, so the dirty log
 * marks the table page here. */
static void set_accessed_dirty(struct pyemu_tlb *s, const struct walk *w, int type)
{
    for (int i = 0; i < w->entries; i++) {
        uint64_t bits = A_BIT | (i == w->entries - 1 && type == MEM_WRITE ? D_BIT : 0);
        if ((w->entry_val[i] & bits) == bits) {
            continue;
        }
        uint32_t *low = (uint32_t *)host_pointer(s, w->entry_gpa[i], 4);
        if (low == NULL) {
            continue; /* the walk read it from RAM, so it is there */
        }
        __atomic_store_n(low, (uint32_t)(w->entry_val[i] | bits), __ATOMIC_RELAXED);
        if (s->code->logging) {
            mark_dirty(s->code, w->entry_gpa[i] >> 12);
        }
    }
}

/* Unicorn's own walk of the same address (uc_vmem_translate with the engine briefly in UC_TLB_CPU
 * mode): with PyPI's library it sets the accessed/dirty bits and notes large pages. False when it
 * disagrees with this walk (it then decides: a failed probe left its #PF pending). */
static bool unicorn_walk_agrees(struct pyemu_tlb *s, void *uc, uint64_t vaddr, int want, const struct walk *w)
{
    uint64_t paddr = 0;
    s->ctl(uc, s->ctl_tlb_type, TLB_CPU);
    int ok = s->vmem_translate(uc, vaddr, want, &paddr) == 0;
    s->ctl(uc, s->ctl_tlb_type, TLB_VIRTUAL);
    if (s->code->logging && w->entries) {
        mark_changed_entries(s, w);
    }
    return ok && (paddr & ~0xFFFULL) == w->page;
}

bool pyemu_tlb_fill(void *uc, uint64_t vaddr, int type, struct pyemu_tlb_entry *result, void *user_data)
{
    struct pyemu_tlb *s = (struct pyemu_tlb *)user_data;
    struct walk w;
    int want = type == MEM_WRITE ? PROT_W : type == MEM_FETCH ? PROT_X : PROT_R;
    s->fills++;
    if (walk(s, uc, vaddr, type, &w) != 0) {
        return give_up_fill(s, uc, type);
    }
    int size_bits = 0;
    if (s->own_walk) {
        set_accessed_dirty(s, &w, type);
        size_bits = w.size == (1ULL << 30) ? FILL_PAGE_1G : w.size == (1ULL << 21) ? FILL_PAGE_2M : 0;
    } else if (!unicorn_walk_agrees(s, uc, vaddr, want, &w)) {
        return give_up_fill(s, uc, type);
    }
    int prot = w.prot;
    if (s->code->logging) {
        prot = log_permissions(s->code, w.page >> 12, type, prot);
    }
    prot = code_permissions(s, w.page >> 12, type, prot);
    result->paddr = w.page;
    result->perms = prot | size_bits;
    return true;
}

/* Called by the block gate at a block start: back to this hook once the instruction that needed Unicorn's
 * own MMU has run (or raised its fault). */
void pyemu_tlb_resume(void *uc, struct pyemu_tlb *s)
{
    if (__atomic_load_n(&s->fallback, __ATOMIC_ACQUIRE)) {
        s->ctl(uc, s->ctl_tlb_type, TLB_VIRTUAL);
        __atomic_store_n(&s->fallback, 0, __ATOMIC_RELEASE);
        if (s->code->engines > 1 || s->code->logging) {
            /* Entries the engine's own MMU filled meanwhile were granted without the code map's (or the
             * dirty log's) say. */
            s->ctl(uc, s->ctl_tlb_flush);
        }
    }
}

/* An engine dropped every translation: it owns no page any more. */
void pyemu_code_forget(struct pyemu_code_map *m, int engine)
{
    uint8_t keep = (uint8_t)~(1u << engine);
    for (uint64_t i = 0; i < m->page_count; i++) {
        m->owners[i] &= keep;
    }
}

/* The index of the first (gpa, size) pair of `pairs` with size > 0 that touches a page some engine holds
 * translated code from, or -1: device DMA reports up to 256 scattered pages per request and almost never
 * code, and one pass here replaces a Python loop over them. Pages beyond the map hold no code. */
int64_t pyemu_code_first_hit(const struct pyemu_code_map *m, const uint64_t *pairs, uint64_t count)
{
    for (uint64_t i = 0; i < count; i++) {
        uint64_t gpa = pairs[2 * i], size = pairs[2 * i + 1];
        if (!size || gpa >> 12 >= m->page_count) {
            continue;
        }
        uint64_t last = gpa + (size - 1) < gpa ? UINT64_MAX >> 12 : (gpa + (size - 1)) >> 12;
        if (last >= m->page_count) {
            last = m->page_count - 1;
        }
        for (uint64_t page = gpa >> 12; page <= last; page++) {
            if (m->owners[page]) {
                return (int64_t)i;
            }
        }
    }
    return -1;
}

/* The DMA write screen (hw/core/dma.py's WriteScreen) over the code map: the index of the first written
 * range a device must report to Python, or -1 for none. While the dirty log runs every range is reported
 * (each page must be marked); otherwise only those from the first that touches code on, so a 1 MiB disk
 * read into the page cache -- 256 scattered pages, no code -- reaches Python as nothing at all. */
int64_t pyemu_dma_first_report(const void *map, const uint64_t *pairs, uint64_t count)
{
    const struct pyemu_code_map *m = map;
    if (!count) {
        return -1;
    }
    if (__atomic_load_n(&m->logging, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    return pyemu_code_first_hit(m, pairs, count);
}

/* An engine flushed its TLB: it holds no write entry any more. */
void pyemu_code_forget_writes(struct pyemu_code_map *m, int engine)
{
    uint8_t keep = (uint8_t)~(1u << engine);
    for (uint64_t i = 0; i < m->page_count; i++) {
        m->writers[i] &= keep;
    }
}

/* The guest's code bytes at a linear address, for the block gate's spin check: read through the
 * side-effect-free walk (no accessed bits, no pending #PF). 0 when the walk or RAM says no. */
int pyemu_read_code(void *uc, struct pyemu_tlb *s, uint64_t address, uint8_t *out, int len)
{
    struct walk w;
    if ((address & 0xFFF) + len > 0x1000 || walk(s, uc, address, MEM_FETCH, &w) != 0) {
        return 0;
    }
    uint64_t paddr = w.page | (address & 0xFFF);
    for (uint32_t i = 0; i < s->ram_count; i++) {
        const struct pyemu_ram_slot *r = &s->ram[i];
        if (paddr >= r->gpa && paddr + len <= r->gpa + r->size) {
            for (int k = 0; k < len; k++) {
                out[k] = r->host[paddr - r->gpa + k];
            }
            return 1;
        }
    }
    return 0;
}

/* Python marks (device DMA, the vCPU's own frame pushes): pages [first, last]. */
void pyemu_dirty_mark(struct pyemu_code_map *m, uint64_t first, uint64_t last)
{
    for (uint64_t i = first; i <= last && i < m->page_count; i++) {
        m->dirty[i] = 1;
    }
}

/* The marked pages' indices into `out` (room for page_count), clearing the marks; returns how many. */
uint64_t pyemu_dirty_take(struct pyemu_code_map *m, uint64_t *out)
{
    uint64_t n = 0;
    uint64_t whole = m->page_count / 8;
    for (uint64_t w = 0; w < whole; w++) {
        uint64_t word;
        memcpy(&word, m->dirty + w * 8, sizeof word);
        if (word) {
            for (uint64_t i = w * 8; i < w * 8 + 8; i++) {
                if (m->dirty[i]) {
                    out[n++] = i;
                    m->dirty[i] = 0;
                }
            }
        }
    }
    for (uint64_t i = whole * 8; i < m->page_count; i++) {
        if (m->dirty[i]) {
            out[n++] = i;
            m->dirty[i] = 0;
        }
    }
    return n;
}
