"""I/O permission checks for IN/OUT/INS/OUTS: #GP(0) where a CPU raises it, from a C hook.

Why: Unicorn 2.1.4 translates port I/O without QEMU's ``gen_check_io`` (its source says "Unicorn: allow
all I/O instructions"), so its IN/OUT hooks serve a port even at CPL 3 with IOPL 0 and no grant in the
TSS I/O bitmap. Measured with a guest program: a CPL-3 ``in al, dx`` with IOPL 0 and an empty bitmap
reached the device. Linux's ``ioperm``/``iopl`` selftests fail on that.

Why in C and not in the Python IN/OUT hook: a hook cannot make the instruction fault. Writing RIP or
calling ``uc_emu_stop`` from the hook lets the rest of the instruction (the register write of IN, the
RDI/RCX updates of INS/OUTS) and the following instructions of the translated block run before the
engine stops (measured: the next ``inc rbx`` ran). QEMU's own helpers raise #GP by restoring the CPU
state from the translated block's return address and leaving with a longjmp; libunicorn exports those
functions (``cpu_restore_state``, ``raise_exception_err_ra``, ``cpu_lduw_mmuidx_ra``), and a C hook may do
what a QEMU helper does. ``io_guard.c`` therefore runs as the IN and OUT hooks, checks CPL/IOPL in
QEMU's CPU state (nothing else is looked at in the common case of CPL <= IOPL), reads the bitmap of the
64-bit or 32-bit TSS, and either hands the access to the Python callbacks or raises #GP(0); the fault
then reaches ``UC_HOOK_INTR`` with RIP at the IN/OUT instruction like any other, and
:mod:`pyemu.accel.tcg.traps` delivers it.

What it needs from the engine, found per engine (:func:`locate_cpu`): the address of ``CPUX86State``
(``env``) and of its ``CPUState``. ``uc_struct`` holds a pointer to the CPU object, whose ``env`` starts with
the general registers: pointers stored in the first 16 KiB of ``uc_struct`` are followed (read through
``/proc/self/mem``, which fails instead of crashing on an unmapped address) to the nearest object that
contains this engine's register file, a pointer back to the engine and a pointer to ``env`` (QEMU's
``CPUState.env_ptr``); the whole calibrated blob must then equal the bytes at ``env``. Offsets found for the
first engine are reused for the next ones, and by later processes with the same library
(:mod:`pyemu.accel.tcg.engine_facts`), and checked again each time.

Known differences from hardware, both from where Unicorn calls the hook (after the memory access of the
string forms, where QEMU's own check comes before it): an INS that faults leaves zero in its destination
(QEMU writes a dummy zero there before the port read, to be restartable on #PF), and an INS/OUTS whose
memory operand faults raises that #PF (or #GP) instead of the I/O #GP a CPU checks first.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from typing import Any, Callable, Iterator

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn import x86_const as x86

from pyemu.accel.tcg.block_gate import BlockGate, native_function
from pyemu.accel.tcg.calibration import BlobLayout
from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.errors import CalibrationError, EngineError
from pyemu.accel.tcg.engine_facts import store_pairs, stored_pairs

_UC_SCAN = 0x4000          # bytes of uc_struct searched for the CPU pointer
_CPU_WINDOW = 0x20000      # bytes of the CPU object searched for env
_MARK = 0x5A17_C0DE_0000_0000
_CODE_SLACK = 0x10000      # code_gen_buffer_size may exceed its mapping by a guard page or two
_CODE_WATCH = 0x40000      # bytes at a code buffer's start compared before and after translating
# Where the first engine had them, as (offset of a pointer in uc_struct, offset from that pointer):
# the CPU pointer and env - cpu.
_cache: dict[str, tuple[int, int]] = {}
# The ways from ``uc_struct`` to the TCG context's code_gen_buffer field, most trustworthy first.
_code_paths: dict[str, list[tuple[int, int]]] = {}
# Their names in the facts kept on disk per library build (engine_facts.py).
CPU_FACTS = "cpu-path"
CODE_FACTS = "code-buffer-paths"
_cache_lock = threading.Lock()

_HELPERS = tuple(f"helper_{kind}{width}_x86_64" for kind in ("in", "out") for width in "bwl")
InCallback = Callable[[Uc, int, int, Any], int]
OutCallback = Callable[[Uc, int, int, int, Any], None]
PostedCallback = Callable[[int, bytes], None]
"""Posted one-byte writes to a port, oldest first: ``(port, data)``."""
_FLUSH_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)


class _ProcessMemory:
    """Reads of this process's memory through ``/proc/self/mem``: an unmapped address is None, not a crash."""

    def __enter__(self) -> "_ProcessMemory":
        self._fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        return self

    def __exit__(self, *_exc: object) -> None:
        os.close(self._fd)

    def read(self, address: int, size: int) -> bytes | None:
        try:
            return os.pread(self._fd, size, address)
        except (OSError, OverflowError, ValueError):
            return None

    def word(self, address: int) -> int | None:
        data = self.read(address, 8)
        return None if data is None else int(struct.unpack("<Q", data)[0])

    def pointers(self, handle: int) -> Iterator[tuple[int, int]]:
        """(offset, value) of the words in ``uc_struct`` that look like heap pointers, in order."""
        data = self.read(handle, _UC_SCAN) or b""
        for offset in range(0, len(data) - 7, 8):
            pointer = struct.unpack_from("<Q", data, offset)[0]
            if 0x10000 <= pointer < 1 << 47 and not pointer & 7:
                yield offset, pointer


def _cached(name: str) -> tuple[int, int] | None:
    with _cache_lock:
        return _cache.get(name)


def _remember(name: str, value: tuple[int, int]) -> None:
    with _cache_lock:
        _cache[name] = value


def handle_of(uc: Uc) -> int:
    """The engine's ``uc_struct`` address."""
    return ctypes.cast(uc._uch, ctypes.c_void_p).value or 0


def locate_cpu(uc: Uc, blob: CpuBlob) -> tuple[int, int]:
    """(``CPUState`` address, ``CPUX86State`` address) of ``uc``'s vCPU; CalibrationError if not found."""
    layout = blob.layout
    header = layout.gpr["rax"]   # env starts with regs[]; the blob has a header before it
    blob.pull()
    saved = blob.snapshot()
    handle = handle_of(uc)
    for index, name in enumerate(layout.gpr):   # a register file no other memory holds
        blob.set_gpr(name, _MARK | ((handle >> 3) & 0xFF_FFFF) << 8 | index)
    blob.push()
    image = blob.snapshot()[header:]
    try:
        with _ProcessMemory() as memory:
            cached = _cached("cpu")
            for path in [cached] if cached is not None else stored_pairs(CPU_FACTS, _UC_SCAN, _CPU_WINDOW):
                cpu = memory.word(handle + path[0])
                if cpu is not None and memory.read(cpu + path[1], len(image)) == image:
                    _remember("cpu", path)
                    return cpu, cpu + path[1]
            cpu, env, offset = _scan_for_env(memory, handle, image)
            _remember("cpu", (offset, env - cpu))
            store_pairs(CPU_FACTS, [(offset, env - cpu)])
            return cpu, env
    finally:
        blob.restore(saved)
        blob.push()


def _scan_for_env(memory: _ProcessMemory, handle: int, image: bytes) -> tuple[int, int, int]:
    registers = image[:128]
    best: tuple[int, int, int] | None = None
    for offset, pointer in memory.pointers(handle):
        window = memory.read(pointer, _CPU_WINDOW)
        start = -1 if window is None else window.find(registers)
        if window is None or start < 0 or start & 7:
            continue
        env = pointer + start
        before = window[:start]
        if struct.pack("<Q", handle) not in before or struct.pack("<Q", env) not in before:
            continue
        if best is None or start < best[1] - best[0]:
            best = (pointer, env, offset)
    if best is None:
        raise CalibrationError("the engine's CPUX86State was not found", field="env")
    if memory.read(best[1], len(image)) != image:
        raise CalibrationError("the CPU state at the located env differs from the blob", field="env")
    return best


def _rwx_regions() -> dict[int, int]:
    regions = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 2 and fields[1].startswith("rwx"):
                low, high = (int(part, 16) for part in fields[0].split("-"))
                regions[low] = high
    return regions


def _code_buffer_at(memory: _ProcessMemory, context: int, inner: int,
                    regions: dict[int, int]) -> tuple[int, int] | None:
    """The rwx mapping described at ``context + inner`` as (``code_gen_buffer``, ``code_gen_buffer_size``)."""
    pair = memory.read(context + inner, 16)
    if pair is None:
        return None
    start, size = struct.unpack("<QQ", pair)
    end = regions.get(start)
    if end is None or not end - start <= size <= end - start + _CODE_SLACK:
        return None
    return start, end


def _translating_paths(scratch: Uc, memory: _ProcessMemory) -> list[tuple[int, int]]:
    """Every (offset in ``uc_struct``, offset from that pointer) at which ``scratch`` reaches a code-buffer
    pair whose buffer receives the code ``scratch`` translates."""
    handle = handle_of(scratch)
    regions = _rwx_regions()
    candidates = []
    for offset, pointer in memory.pointers(handle):
        window = memory.read(pointer, 0x1000) or b""
        for inner in range(0, len(window) - 15, 8):
            if struct.unpack_from("<Q", window, inner)[0] in regions:
                found = _code_buffer_at(memory, pointer, inner, regions)
                if found is not None:
                    candidates.append((offset, inner, found[0]))
    before = {start: memory.read(start, _CODE_WATCH) for _o, _i, start in candidates}
    scratch.mem_write(0x100, bytes([0x48, 0xFF, 0xC3] * 4 + [0xF4]))   # inc rbx (x4); hlt
    scratch.emu_start(0x100, 0x10C)
    return [(offset, inner) for offset, inner, start in candidates
            if memory.read(start, _CODE_WATCH) != before[start]]


def _code_buffer_paths() -> list[tuple[int, int]]:
    """Where ``uc_struct`` holds its TCG context and the context its code buffer, found on scratch engines,
    most trustworthy first.

    Why by translating code: with several engines in a process, pointers in one engine's ``uc_struct`` lead
    to heap objects that hold another engine's buffer and size (measured with two and three engines: the
    first such pair, and even one with a pointer back to the engine nearby, was another engine's). Only the
    engine's own buffer receives the code it translates.

    Why two scratch engines and the shortest reach: the 4 KiB window read from each pointer also covers the
    heap objects beside it, so a neighbour of the TCG context reaches the same field (measured: in about
    half of the scratch engines one to three such paths came before the real one in ``uc_struct`` order).
    Such a path holds only while the allocator places the two objects side by side, and once in about a
    hundred processes it did not for a later engine. A path must therefore work in two engines alive at
    once, and the one with the smallest offset from its pointer (the pointer to the object that owns the
    field) is tried first."""
    scratches = [Uc(UC_ARCH_X86, UC_MODE_64) for _ in range(2)]
    for scratch in scratches:
        scratch.mem_map(0, 0x1000)
    with _ProcessMemory() as memory:
        first, second = (_translating_paths(scratch, memory) for scratch in scratches)
    paths = sorted(set(first) & set(second), key=lambda path: (path[1], path[0]))
    if not paths:
        raise CalibrationError("the engine's TCG code buffer was not found", field="code_gen_buffer")
    return paths


def locate_code_buffer(uc: Uc) -> tuple[int, int]:
    """[start, end) of the engine's TCG code buffer: the writable-and-executable mapping that ``uc_struct``
    reaches through its TCG context's ``code_gen_buffer`` and ``code_gen_buffer_size`` (paths found once
    per library build, see :func:`_code_buffer_paths` and :mod:`pyemu.accel.tcg.engine_facts`; the first that leads to
    such a mapping is taken)."""
    with _cache_lock:
        paths = _code_paths.get("code")
    if paths is not None:   # found or borne out in this process already
        return _found_or_raise(_buffer_by_paths(uc, paths))
    paths = stored_pairs(CODE_FACTS, _UC_SCAN, 0x1000)
    found = _buffer_by_paths(uc, paths) if paths else None
    if found is None:       # none stored, or a stored set this engine does not bear out
        paths = _code_buffer_paths()
        store_pairs(CODE_FACTS, paths)
        found = _buffer_by_paths(uc, paths)
    with _cache_lock:
        _code_paths["code"] = paths
    return _found_or_raise(found)


def _found_or_raise(found: tuple[int, int] | None) -> tuple[int, int]:
    if found is None:
        raise CalibrationError("the engine's TCG code buffer is not where the scratch engines had it",
                               field="code_gen_buffer")
    return found


def _buffer_by_paths(uc: Uc, paths: list[tuple[int, int]]) -> tuple[int, int] | None:
    regions = _rwx_regions()
    with _ProcessMemory() as memory:
        for offset, inner in paths:
            context = memory.word(handle_of(uc) + offset)
            found = None if context is None else _code_buffer_at(memory, context, inner, regions)
            if found is not None:
                return found
    return None


class IoGuard:
    """The IN/OUT hooks of one engine: the C guard in front of the Python callbacks ``on_in``/``on_out``
    (same signatures as Unicorn's IN/OUT hook callbacks; exceptions they raise stop the engine and are
    raised again by ``emu_start``, as with ``uc.hook_add``) and ``on_posted`` (posted writes, see
    :meth:`use_fast_paths`)."""

    def __init__(self, uc: Uc, blob: CpuBlob, gate: BlockGate, on_in: InCallback, on_out: OutCallback,
                 on_posted: PostedCallback) -> None:
        from unicorn.unicorn_py3.arch.intel import HOOK_INSN_IN_CFUNC, HOOK_INSN_OUT_CFUNC
        from unicorn.unicorn_py3.unicorn import uccallback

        module = gate.module
        self._ffi: Any = module.ffi
        self._uc = uc
        self.state: Any = self._ffi.new("struct pyemu_io_guard *")
        library = gate.library
        self._library = library
        # The binding's own wrapper: an exception in a callback is recorded and emu_start raises it.
        binding: Any = uc  # the py3 binding's class; its stubs name another one
        self._py_in = uccallback(binding, HOOK_INSN_IN_CFUNC)(on_in)
        self._py_out = uccallback(binding, HOOK_INSN_OUT_CFUNC)(on_out)
        self._on_posted = on_posted
        self._py_flush = uccallback(binding, _FLUSH_CFUNC)(self._on_flush)
        state = self.state
        state.py_in = self._ffi.cast("uint32_t (*)(void *, uint32_t, int, void *)",
                                     ctypes.cast(self._py_in, ctypes.c_void_p).value)
        state.py_out = self._ffi.cast("void (*)(void *, uint32_t, int, uint32_t, void *)",
                                      ctypes.cast(self._py_out, ctypes.c_void_p).value)
        state.py_flush = self._ffi.cast("void (*)(void *, uint32_t, void *)",
                                        ctypes.cast(self._py_flush, ctypes.c_void_p).value)
        self._configure(uc, blob, library)
        self._handles: list[ctypes.c_size_t] = []
        self._fast: Any = None
        user_data = ctypes.c_void_p(int(self._ffi.cast("uintptr_t", state)))
        for name, insn in (("pyemu_io_in", x86.UC_X86_INS_IN), ("pyemu_io_out", x86.UC_X86_INS_OUT)):
            handle = ctypes.c_size_t()
            status = library.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INSN,
                                         ctypes.c_void_p(native_function(module, name)), user_data,
                                         ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
            if status != 0:
                raise EngineError(f"uc_hook_add(UC_HOOK_INSN) failed with error {status}", operation="hook_add")
            self._handles.append(handle)

    def _configure(self, uc: Uc, blob: CpuBlob, library: ctypes.CDLL) -> None:
        layout: BlobLayout = blob.layout
        header = layout.gpr["rax"]
        cpu, env = locate_cpu(uc, blob)
        self.env = env
        state = self.state
        state.env = self._ffi.cast("uint8_t *", env)
        state.cpu = self._ffi.cast("void *", cpu)
        state.off_hflags = layout.hflags - header
        state.off_eflags = layout.rflags - header
        state.off_tr_base = layout.tr + layout.seg.base - header
        state.off_tr_limit = layout.tr + layout.seg.limit - header
        state.off_tr_flags = layout.tr + layout.seg.flags - header

        def function(name: str, ctype: str) -> Any:
            address = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
            if not address:
                raise CalibrationError(f"libunicorn does not export {name}", field="io_guard")
            return self._ffi.cast(ctype, address)

        state.restore_state = function("cpu_restore_state_x86_64", "_Bool (*)(void *, uintptr_t, _Bool)")
        state.raise_err_ra = function("raise_exception_err_ra_x86_64", "void (*)(void *, int, int, uintptr_t)")
        state.lduw_mmuidx_ra = function("cpu_lduw_mmuidx_ra_x86_64",
                                        "uint32_t (*)(void *, uint64_t, int, uintptr_t)")
        for index, name in enumerate(_HELPERS):
            state.helpers[index] = int(self._ffi.cast("uintptr_t", function(name, "void *")))
        state.code_lo, state.code_hi = locate_code_buffer(uc)
        state.enabled = 1

    def use_fast_paths(self, fast: Any) -> None:
        """Serve port accesses through ``fast`` (a :class:`pyemu.accel.tcg.port_fast_paths.PortFastPaths`)
        where its devices allow (None: every access goes to Python). Posted writes still queued are
        delivered first."""
        self.flush_posted()
        self._fast = fast   # the C table must live as long as the guard points at it
        self.state.fast = fast.state if fast is not None else self._ffi.NULL

    def flush_posted(self) -> None:
        """Deliver the posted writes this vCPU queued (its own thread, outside the engine: at the end of
        a run and before its state is read)."""
        count = self.state.ring_used
        if count:
            self._deliver(count)
            self.state.ring_used = 0

    @property
    def posted_pending(self) -> int:
        """Posted writes queued now (read from any thread: a snapshot)."""
        return int(self.state.ring_used)

    def _on_flush(self, _uc: Uc, count: int, _key: object) -> None:
        self._deliver(count)   # the guard resets its count after this returns

    def _deliver(self, count: int) -> None:
        """``ring[0..count)`` as runs of bytes to one port, oldest first, to ``on_posted``."""
        entries = self._ffi.unpack(self.state.ring, min(count, len(self.state.ring)))
        start = 0
        while start < len(entries):
            port = entries[start] >> 8
            end = start + 1
            while end < len(entries) and entries[end] >> 8 == port:
                end += 1
            self._on_posted(port, bytes(entry & 0xFF for entry in entries[start:end]))
            start = end

    @property
    def statistics(self) -> dict[str, int]:
        """Bitmap look-ups, #GP raised, and faults raised without a restored state (should stay 0)."""
        return {"checks": int(self.state.checks), "faults": int(self.state.faults),
                "unrestored": int(self.state.unrestored)}

    def close(self) -> None:
        for handle in self._handles:
            self._library.uc_hook_del(self._uc._uch, handle)
        self._handles = []
