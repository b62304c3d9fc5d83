"""pyemu: a QEMU-shaped virtual machine monitor written in Python.

Boards in :mod:`pyemu.machines` combine device models from :mod:`pyemu.hw` with one of two accelerators:
:mod:`pyemu.accel.kvm` (Linux KVM) or :mod:`pyemu.accel.tcg` (a software CPU on the Unicorn engine).

As a library: ``pyemu.VM(...)`` runs a VM in this process and ``pyemu.connect(qmp_socket)`` drives one in
another (see :mod:`pyemu.api`). Those names load on first use, so importing a submodule such as
``pyemu.block`` does not pull in the whole machine.
"""

from typing import Any

from pyemu.system.dataclass_code import install as _install_dataclass_code

__version__ = "0.1.0"

_install_dataclass_code()  # before any of pyemu's dataclasses is made (see the module)

_API_NAMES = frozenset({
    "CommandError", "Console", "ConsoleClosed", "ConsoleError", "ConsoleTimeout", "Event", "EventStream",
    "RemoteError", "RemoteVM", "VM", "VmError", "VmStateError", "VmTimeout", "connect",
})


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from pyemu import api

        return getattr(api, name)
    raise AttributeError(f"module 'pyemu' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API_NAMES)
