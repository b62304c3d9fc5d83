"""The KVM userspace ABI from ``<linux/kvm.h>`` (x86-64), declared once with cffi.

Why cffi's ABI mode: the structures are declared as C (``ffi.cdef``), so their layout, padding and sizes
come from cffi's C layout rules instead of hand-computed offsets, and the ioctl numbers are derived from
``ffi.sizeof`` of the very structures they carry, exactly as ``_IOW``/``_IOR``/``_IOWR`` do in the header.
No compiler is needed at run time. ``tests/kvm/test_kvm_abi.py`` checks every size and field offset here
against the system header with the C compiler when one is installed.

ioctls go through libc's ``ioctl`` (``ffi.dlopen(None)``) on cffi-owned buffers: no copy between Python
bytes and the kernel's structure, and cffi releases the GIL around the call, which ``KVM_RUN`` needs (other
vCPU threads and the device threads keep running while a vCPU is in the guest). Only the subset of the
header that pyemu uses is declared; names and values follow the header so they can be looked up there.
"""

from __future__ import annotations

from typing import Any

from cffi import FFI

ffi = FFI()
ffi.cdef(
    r"""
    /* ---- vCPU registers (asm/kvm.h) ---------------------------------------------------------------- */
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8,  r9,  r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };
    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t  type;
        uint8_t  present, dpl, db, s, l, g, avl;
        uint8_t  unusable;
        uint8_t  padding;
    };
    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };
    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];
    };
    struct kvm_fpu {
        uint8_t  fpr[8][16];
        uint16_t fcw;
        uint16_t fsw;
        uint8_t  ftwx;
        uint8_t  pad1;
        uint16_t last_opcode;
        uint64_t last_ip;
        uint64_t last_dp;
        uint8_t  xmm[16][16];
        uint32_t mxcsr;
        uint32_t pad2;
    };
    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };
    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };
    struct kvm_msr_list {
        uint32_t nmsrs;
        uint32_t indices[];
    };
    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax;
        uint32_t ebx;
        uint32_t ecx;
        uint32_t edx;
        uint32_t padding[3];
    };
    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };
    struct kvm_lapic_state {
        char regs[1024];
    };
    struct kvm_vcpu_events {
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t has_error_code;
            uint8_t pending;
            uint32_t error_code;
        } exception;
        struct {
            uint8_t injected;
            uint8_t nr;
            uint8_t soft;
            uint8_t shadow;
        } interrupt;
        struct {
            uint8_t injected;
            uint8_t pending;
            uint8_t masked;
            uint8_t pad;
        } nmi;
        uint32_t sipi_vector;
        uint32_t flags;
        struct {
            uint8_t smm;
            uint8_t pending;
            uint8_t smm_inside_nmi;
            uint8_t latched_init;
        } smi;
        struct {
            uint8_t pending;
        } triple_fault;
        uint8_t reserved[26];
        uint8_t exception_has_payload;
        uint64_t exception_payload;
    };
    struct kvm_xsave {
        uint32_t region[1024];
    };
    struct kvm_xcr {
        uint32_t xcr;
        uint32_t reserved;
        uint64_t value;
    };
    struct kvm_xcrs {
        uint32_t nr_xcrs;
        uint32_t flags;
        struct kvm_xcr xcrs[16];
        uint64_t padding[16];
    };
    struct kvm_debugregs {
        uint64_t db[4];
        uint64_t dr6;
        uint64_t dr7;
        uint64_t flags;
        uint64_t reserved[9];
    };

    /* ---- VM-level structures (linux/kvm.h) ---------------------------------------------------------- */
    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };
    struct kvm_irq_routing_irqchip {
        uint32_t irqchip;
        uint32_t pin;
    };
    struct kvm_irq_routing_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t devid;
    };
    struct kvm_irq_routing_entry {
        uint32_t gsi;
        uint32_t type;
        uint32_t flags;
        uint32_t pad;
        union {
            struct kvm_irq_routing_irqchip irqchip;
            struct kvm_irq_routing_msi msi;
            uint32_t pad[8];
        } u;
    };
    struct kvm_irq_routing {
        uint32_t nr;
        uint32_t flags;
        struct kvm_irq_routing_entry entries[];
    };
    struct kvm_msi {
        uint32_t address_lo;
        uint32_t address_hi;
        uint32_t data;
        uint32_t flags;
        uint32_t devid;
        uint8_t  pad[12];
    };
    struct kvm_irqfd {
        uint32_t fd;
        uint32_t gsi;
        uint32_t flags;
        uint32_t resamplefd;
        uint8_t  pad[16];
    };
    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t  fd;
        uint32_t flags;
        uint8_t  pad[36];
    };
    struct kvm_mp_state {
        uint32_t mp_state;
    };
    struct kvm_enable_cap {
        uint32_t cap;
        uint32_t flags;
        uint64_t args[4];
        uint8_t  pad[64];
    };
    struct kvm_interrupt {
        uint32_t irq;
    };
    struct kvm_device_attr {
        uint32_t flags;
        uint32_t group;
        uint64_t attr;
        uint64_t addr;
    };
    struct kvm_dirty_log {
        uint32_t slot;
        uint32_t padding1;
        uint64_t dirty_bitmap;
    };
    struct kvm_clock_data {
        uint64_t clock;
        uint32_t flags;
        uint32_t pad0;
        uint64_t realtime;
        uint64_t host_tsc;
        uint32_t pad[4];
    };

    /* ---- the shared vCPU page (mmap of the vCPU fd) --------------------------------------------------- */
    struct kvm_run {
        uint8_t  request_interrupt_window;
        uint8_t  immediate_exit;
        uint8_t  padding1[6];
        uint32_t exit_reason;
        uint8_t  ready_for_interrupt_injection;
        uint8_t  if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct { uint64_t hardware_exit_reason; } hw;
            struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
            struct { uint32_t exception; uint32_t error_code; } ex;
            struct {
                uint8_t  direction;
                uint8_t  size;
                uint16_t port;
                uint32_t count;
                uint64_t data_offset;
            } io;
            struct {
                uint64_t phys_addr;
                uint8_t  data[8];
                uint32_t len;
                uint8_t  is_write;
            } mmio;
            struct {
                uint32_t suberror;
                uint32_t ndata;
                uint64_t data[16];
            } internal;
            struct {
                uint32_t type;
                uint32_t ndata;
                uint64_t data[16];
            } system_event;
            struct {
                uint8_t  error;
                uint8_t  pad[7];
                uint32_t reason;
                uint32_t index;
                uint64_t data;
            } msr;
            struct { uint8_t vector; } eoi;
            char padding[256];
        };
        uint64_t kvm_valid_regs;
        uint64_t kvm_dirty_regs;
        union {
            char padding[2048];
        } s;
    };

    /* ---- libc ---------------------------------------------------------------------------------------- */
    int ioctl(int fd, unsigned long request, ...);
    """
)

libc: Any = ffi.dlopen(None)

# ---- ioctl number encoding (asm-generic/ioctl.h) ------------------------------------------------------
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


# /dev/kvm (system) ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
KVM_SIGNAL_MSI = _iow(0xA5, "struct kvm_msi")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")  # VM and vCPU
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_INTERRUPT = _iow(0x86, "struct kvm_interrupt")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_NMI = _io(0x9A)
KVM_SET_DEVICE_ATTR = _iow(0xE1, "struct kvm_device_attr")  # also on vCPU fds
KVM_GET_DEVICE_ATTR = _iow(0xE2, "struct kvm_device_attr")
KVM_HAS_DEVICE_ATTR = _iow(0xE3, "struct kvm_device_attr")
KVM_VCPU_TSC_CTRL = 0  # vCPU attribute group
KVM_VCPU_TSC_OFFSET = 0  # its attribute: the guest TSC offset (Linux 5.16+)
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")

IOCTL_NAMES: dict[int, str] = {
    value: name for name, value in dict(globals()).items() if name.startswith("KVM_") and isinstance(value, int)
}
"""ioctl number -> name, for error messages. The numbers are distinct (the size field separates
KVM_SET_TSC_KHZ from KVM_SET_DEBUGREGS and KVM_SIGNAL_MSI from KVM_SET_XSAVE); a test checks it."""

KVM_API_VERSION = 12

# ---- capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP) ---------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_VM_TSC_CONTROL = 214
KVM_CAP_X86_APIC_BUS_CYCLES_NS = 237  # Linux 6.10; newer than the build host's header

# ---- kvm_run.exit_reason ----------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

EXIT_NAMES: dict[int, str] = {
    value: name for name, value in dict(globals()).items() if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
INTERNAL_ERROR_NAMES = {
    KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    KVM_INTERNAL_ERROR_SIMUL_EX: "exception raised while delivering an exception",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected hardware exit reason",
}

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
SYSTEM_EVENT_NAMES = {
    KVM_SYSTEM_EVENT_SHUTDOWN: "guest requested shutdown",
    KVM_SYSTEM_EVENT_RESET: "guest requested reset",
    KVM_SYSTEM_EVENT_CRASH: "guest crashed",
    KVM_SYSTEM_EVENT_WAKEUP: "guest wakeup",
    KVM_SYSTEM_EVENT_SUSPEND: "guest suspend",
}

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
