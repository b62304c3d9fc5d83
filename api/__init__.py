"""The Python API: a VM in this process (:class:`VM`) or in another one over QMP (:func:`connect`).

Both offer the same operations (status, pause, resume, reset, powerdown, quit, events); the embedded VM
also has a serial :class:`Console` and :meth:`VM.wait`. ``import pyemu`` re-exports these names.
"""

from pyemu.api.console import Console
from pyemu.api.errors import (CommandError, ConsoleClosed, ConsoleError, ConsoleTimeout, RemoteError,
                              VmError, VmStateError, VmTimeout)
from pyemu.api.events import Event, EventStream
from pyemu.api.remote import RemoteVM, connect
from pyemu.api.vm import VM

__all__ = [
    "CommandError", "Console", "ConsoleClosed", "ConsoleError", "ConsoleTimeout", "Event", "EventStream",
    "RemoteError", "RemoteVM", "VM", "VmError", "VmStateError", "VmTimeout", "connect",
]
