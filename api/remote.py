"""A VM in another process, driven over QMP with the same methods as the embedded :class:`~pyemu.api.vm.VM`.

``pyemu.connect("/run/vm1.qmp")`` returns a :class:`RemoteVM`; ``pyemu-remote`` is a command line over it.
The methods map one to one onto QMP commands, so it drives QEMU just as well as pyemu.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from pyemu.api.events import EventStream
from pyemu.api.qmp_client import DEFAULT_TIMEOUT, QmpConnection
from pyemu.system.runstate import RunState


class RemoteVM:
    """A running VM reached through its QMP socket (Unix path, or ``HOST:PORT``)."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.qmp = QmpConnection(address, timeout=timeout)

    @property
    def events(self) -> EventStream:
        return self.qmp.events

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.qmp.execute("query-status")
        return result

    @property
    def state(self) -> RunState:
        """The run state; a state this pyemu does not know (from a newer QEMU) raises ValueError."""
        return RunState(self.status()["status"])

    def pause(self) -> None:
        self.qmp.execute("stop")

    def resume(self) -> None:
        self.qmp.execute("cont")

    def reset(self) -> None:
        self.qmp.execute("system_reset")

    def powerdown(self) -> None:
        self.qmp.execute("system_powerdown")

    def quit(self) -> None:
        self.qmp.execute("quit")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Any QMP command by name."""
        return self.qmp.execute(command, arguments)

    def close(self) -> None:
        self.qmp.close()

    def __enter__(self) -> "RemoteVM":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def connect(address: str, *, timeout: float = DEFAULT_TIMEOUT) -> RemoteVM:
    """Connect to a VM's QMP monitor (``-qmp unix:PATH,server=on,wait=off`` or ``tcp:HOST:PORT,...``)."""
    return RemoteVM(address, timeout=timeout)
