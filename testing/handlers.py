"""Ready-made guest snippets for exception tests: a handler that records its stack frame, and an exit.

:func:`recording_handler` returns the source of an IDT handler that saves the frame the CPU pushed (error
code, RIP, CS, RFLAGS, RSP, SS), the handler's own RSP/CS/RFLAGS and a delivery count into a 0x100-byte
slot of the ``data`` area, optionally advances the saved RIP past the faulting instruction, and returns
with ``iretq``/``iretd``. :func:`read_frame` reads such a slot back from a
:class:`~pyemu.testing.runner.ProgramResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.testing.environment import DATA

SLOT_SIZE = 0x100
_FIELDS = ("error_code", "rip", "cs", "rflags", "rsp", "ss", "handler_rsp", "handler_cs", "handler_rflags",
           "count")


def slot_address(slot: int) -> int:
    return DATA + 0x1000 + slot * SLOT_SIZE


def exit_with(value: int | str) -> str:
    """Write ``value`` (a number or a register name) to the exit port."""
    source = f"mov eax, {value}" if value != "eax" else ""
    return f"{source}\nmov dx, exit_port\nout dx, eax\n"


def recording_handler(slot: int, *, error_code: bool, skip: int = 0, bits: int = 64,
                      then: str | None = None) -> str:
    """Handler source. ``skip`` bytes are added to the saved RIP (to step over a faulting instruction);
    ``then`` replaces the return (e.g. an :func:`exit_with` to end the program from the handler)."""
    if bits == 64:
        ax, bx, sp, word, width, ret = "rax", "rbx", "rsp", "qword", 8, "iretq"
    else:
        ax, bx, sp, word, width, ret = "eax", "ebx", "esp", "dword", 4, "iretd"
    saved = 2 * width  # the two registers the handler pushes first
    frame = saved + (width if error_code else 0)
    lines = [
        f"push {ax}", f"push {bx}",
        f"mov {bx}, {slot_address(slot)}",
        f"mov [{bx} + 0x30], {sp}",
        f"mov {ax}, cs", f"mov [{bx} + 0x38], {ax}",
        "pushfq" if bits == 64 else "pushfd", f"pop {ax}", f"mov [{bx} + 0x40], {ax}",
    ]
    if error_code:
        lines += [f"mov {ax}, [{sp} + {saved}]", f"mov [{bx}], {ax}"]
    for index, offset in enumerate((0x08, 0x10, 0x18, 0x20, 0x28)):
        lines += [f"mov {ax}, [{sp} + {frame + index * width}]", f"mov [{bx} + {offset}], {ax}"]
    lines.append(f"inc {word} ptr [{bx} + 0x48]")
    if skip:
        lines.append(f"add {word} ptr [{sp} + {frame}], {skip}")
    if then is not None:
        lines.append(then)
    lines += [f"pop {bx}", f"pop {ax}"]
    if error_code:
        lines.append(f"add {sp}, {width}")
    lines.append(ret)
    return "\n".join(lines)


@dataclass(frozen=True)
class RecordedFrame:
    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int
    handler_rsp: int   # RSP right after the CPU pushed the frame (before the handler's own pushes)
    handler_cs: int
    handler_rflags: int
    count: int


def read_frame(result: object, slot: int, *, bits: int = 64) -> RecordedFrame:
    """The frame a :func:`recording_handler` saved in ``slot``."""
    base = slot_address(slot)
    values = [result.u64(base + 8 * i) for i in range(len(_FIELDS))]  # type: ignore[attr-defined]
    if bits == 32:
        values = [v & 0xFFFF_FFFF for v in values]
    fields = dict(zip(_FIELDS, values))
    fields["handler_rsp"] += 2 * (8 if bits == 64 else 4)
    return RecordedFrame(**fields)
