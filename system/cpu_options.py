"""``-cpu MODEL[,+feat|-feat|feat=on|off...]`` and ``-cpu help``, as QEMU 7.2.

Models (:mod:`pyemu.target.x86.cpu_models`): ``qemu64``, ``kvm64``, ``Nehalem``, ``Westmere``, ``max``
(every feature the accelerator provides) and ``host`` (KVM only: "CPU model 'host' requires KVM or HVF").
Without ``-cpu`` the guest sees pyemu's historical default table (family-6 Intel with SSE4.2), which the
boot tests and existing snapshots rely on.

Feature names are QEMU's, in any of its spellings (``sse4.1``, ``sse4_1``, ``sse4-1``, ``pni``). A feature
the model or the switches ask for that the accelerator cannot provide is dropped with QEMU's warning
("TCG doesn't support requested feature: CPUID.01H:ECX.vmx [bit 5]"; under KVM "host doesn't support
requested feature: ..."), or refused with ``enforce=on``. A name QEMU does not know fails as QEMU fails:
"can't apply global qemu64-x86_64-cpu.foo=on: Property 'qemu64-x86_64-cpu.foo' not found".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyemu.errors import ConfigError
from pyemu.target.x86.cpu_models import (
    MODELS,
    POLICY_PROPS,
    TCG_FEATURES,
    CpuModel,
    feature_key,
    model_cpuid,
    qemu_name,
    recognized_flags,
    where,
)
from pyemu.target.x86.cpuid import FEATURES, CpuidTable

#: Features pyemu's KVM setup can pass to a guest when KVM supports them (the rest of FEATURES too: KVM's
#: supported CPUID filters the table afterwards, see pyemu.accel.kvm.cpuid).
_KVM_NEVER = frozenset({"vmx", "svm", "tsc_deadline"})  # nested virtualisation; TSC-deadline decided by KVM cap
_ON = ("on", "yes", "true")
_OFF = ("off", "no", "false")


@dataclass(frozen=True)
class CpuOptions:
    """``model=None``: no ``-cpu`` given, pyemu's default table (with ``props`` still applied)."""

    model: str | None = None
    props: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.model is not None and self.model not in MODELS:
            raise ConfigError(f"unable to find CPU model '{self.model}'", option="-cpu")
        self.feature_switches()  # validates every property

    @property
    def _qom_type(self) -> str:
        return f"{self.model or 'max'}-x86_64-cpu"

    def _flag(self, key: str, value: str) -> tuple[str, bool] | None:
        """(feature key, wanted) for one property, None for a policy property."""
        bare = key[:1] in ("+", "-") and value == "on"  # "+avx" arrives as a bare flag: ("+avx", "on")
        name = key[1:] if bare else key
        if bare:
            wanted = key[0] == "+"
        else:
            lowered = value.lower()
            if lowered not in _ON + _OFF:
                raise ConfigError(f"Parameter '{key}' expects 'on' or 'off'", option="-cpu")
            wanted = lowered in _ON
        policy = name.lower().replace("-", "_")
        if policy in POLICY_PROPS or policy == "enforce":
            return None
        feature = feature_key(name)
        if feature is None:
            missing = f"Property '{self._qom_type}.{name}' not found"
            raise ConfigError(missing if bare else f"can't apply global {self._qom_type}.{name}={value}: {missing}",
                              option="-cpu")
        return feature, wanted

    def feature_switches(self) -> dict[str, bool]:
        """The CPUID features switched on (True) or off (False), by pyemu's feature key; the last wins."""
        switches: dict[str, bool] = {}
        for key, value in self.props:
            flag = self._flag(key, value)
            if flag is not None:
                switches[flag[0]] = flag[1]
        return switches

    @property
    def enforce(self) -> bool:
        return any(k.lower() == "enforce" and v.lower() in _ON for k, v in self.props)

    @property
    def cpu_model(self) -> CpuModel | None:
        return None if self.model is None else MODELS[self.model]

    def describe(self) -> str:
        """The guest-visible choice in canonical form (for the migration stream's header): model and the
        effective switches, sorted; ``"default"`` without ``-cpu``."""
        flags = ",".join(f"{'+' if on else '-'}{qemu_name(f)}" for f, on in sorted(self.feature_switches().items()))
        return (self.model or "default") + (f",{flags}" if flags else "")

    def apply(self, table: CpuidTable, accel_name: str = "tcg",
              warn: Callable[[str], None] | None = None,
              available: frozenset[str] | None = None) -> CpuidTable:
        """``table`` (pyemu's default table shaped by the board) turned into this option's CPU for the
        accelerator: the model's identity and features, the switches, minus what the accelerator cannot
        provide (QEMU's warning for each, or a ConfigError with ``enforce=on``). ``available``: what the
        accelerator reports it can present on this host (``Accelerator.cpu_features``); without it, what
        pyemu knows of the accelerator in general."""
        switches = self.feature_switches()
        model = self.cpu_model
        supported = self.supported(accel_name)
        if available is not None:
            supported &= available
        if model is None:  # pyemu's default table: only the switches change it
            wanted = set(table.features()) | {f for f, on in switches.items() if on}
            supported = supported | table.features()
        elif model.every_supported:
            wanted = set(supported) | {f for f, on in switches.items() if on}
        else:
            wanted = set(model.features) | {f for f, on in switches.items() if on}
        wanted -= {f for f, on in switches.items() if not on}
        missing = sorted(wanted - supported, key=lambda f: FEATURES[f])
        if missing:
            who = "TCG" if accel_name == "tcg" else "host"
            for feature in missing:
                text = f"{who} doesn't support requested feature: {where(feature)}"
                if self.enforce:
                    raise ConfigError(text, option="-cpu")
                if warn is not None:
                    warn(text)
            wanted -= set(missing)
        if model is None:
            return table.without(*(table.features() - wanted)).with_features(*sorted(wanted - table.features()))
        return model_cpuid(model, table, frozenset(wanted))

    @staticmethod
    def supported(accel_name: str) -> frozenset[str]:
        """What the accelerator can provide, as far as pyemu knows before asking KVM."""
        if accel_name == "tcg":
            return TCG_FEATURES
        return frozenset(FEATURES) - _KVM_NEVER

    def check_accelerator(self, accel_name: str) -> None:
        """QEMU refuses ``-cpu host`` without a hardware accelerator; so does pyemu, once it is chosen."""
        model = self.cpu_model
        if model is not None and model.kvm_only and accel_name != "kvm":
            raise ConfigError("CPU model 'host' requires KVM or HVF", option="-cpu")


def cpu_help() -> str:
    """``-cpu help`` in QEMU's layout: the models, then the recognized flags wrapped as QEMU wraps them."""
    lines = ["Available CPUs:"]
    # QEMU's order: named models by strcmp (capitals first), then host and max.
    lines += [f"x86 {m.name:<22}{m.description}" for m in sorted(MODELS.values(),
                                                              key=lambda m: (m.every_supported, m.name))]
    lines += ["", "Recognized CPUID flags:"]
    row = " "
    for flag in recognized_flags():
        if len(row) + len(flag) + 1 > 76:
            lines.append(row)
            row = " "
        row += " " + flag
    lines.append(row)
    return "\n".join(lines)

