"""Device state as data: frozen, versioned dataclasses that a device hands out and takes back.

Why data and not pickles: snapshots, migration (also between KVM and the software CPU), QMP's
introspection and unit tests all read the same objects, and a state coming from a file or another host is
untrusted input. So every state class carries a ``VERSION``, every device checks a state before it applies
any of it (:meth:`Stateful.from_state` raises :class:`StateError` and leaves the device unchanged), and
the helpers below make those checks one line each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

from pyemu.errors import PyemuError


class StateError(PyemuError):
    """A saved device state cannot be applied: wrong type or version, or a field out of range."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"{device}: invalid saved state: {reason}")
        self.device = device
        self.reason = reason


@dataclass(frozen=True)
class DeviceState:
    """Base of every device state. Subclasses are frozen dataclasses and set ``VERSION``; the
    ``version`` field records which layout a saved state was written with."""

    VERSION: ClassVar[int] = 1
    version: int = 0

    def __post_init__(self) -> None:
        if self.version == 0:
            object.__setattr__(self, "version", type(self).VERSION)


S = TypeVar("S", bound=DeviceState)


def check_state(device: str, state: object, expected: type[S]) -> S:
    """``state`` if it is an ``expected`` of the current version, else StateError."""
    if not isinstance(state, expected):
        raise StateError(device, f"expected {expected.__name__}, got {type(state).__name__}")
    if state.version != expected.VERSION:
        raise StateError(device, f"{expected.__name__} version {state.version} is not supported "
                                 f"(this pyemu reads version {expected.VERSION})")
    return state


def check_range(device: str, field: str, value: int, low: int, high: int) -> int:
    """``value`` if ``low <= value <= high``, else StateError naming ``field``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise StateError(device, f"{field}={value!r} is outside {low}..{high}")
    return value


def check_bits(device: str, field: str, value: int, mask: int) -> int:
    """``value`` if it is an int using only the bits in ``mask``, else StateError."""
    check_range(device, field, value, 0, mask)
    if value & ~mask:
        raise StateError(device, f"{field}={value:#x} sets bits outside {mask:#x}")
    return value


def check_bool(device: str, field: str, value: object) -> bool:
    """``value`` if it is a bool (a state read from a file must not smuggle in other truthy values)."""
    if not isinstance(value, bool):
        raise StateError(device, f"{field}={value!r} is not a bool")
    return value


class Stateful(Protocol):
    """A device model whose state can be saved and restored."""

    def state(self) -> DeviceState:
        """The device's whole guest-visible state, as a frozen dataclass."""
        ...

    def from_state(self, state: DeviceState) -> None:
        """Validate ``state`` and then apply it; on StateError the device is unchanged."""
        ...
