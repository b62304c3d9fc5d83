"""``-cpu MODEL[,prop=value...]``: the CPU model names management tools and QEMU's documentation write.

pyemu has one CPUID table today (:func:`~pyemu.target.x86.cpuid.default_cpuid`), shaped by the board and
the accelerator; named models and feature flags belong to the CPU-models issue. Until then the two
models that mean "the best this accelerator offers" are accepted and give that table: ``host`` (KVM only,
as in QEMU: "CPU model 'host' requires KVM or HVF") and ``max`` (any accelerator). Other model names fail
with one line rather than being silently ignored, because a guest would see a CPU other than the one
asked for.

Feature flags in QEMU's spellings (``-feat``/``feat=off`` and ``+feat``/``feat=on``, names with ``-``, ``_``
or ``.``): switching a feature off clears its CPUID bit; switching one on is accepted when the table already
has it (``-cpu host,+x2apic`` under KVM) and refused otherwise -- the software CPU and pyemu's KVM setup
provide exactly what the table says, so a bit set without the feature behind it would crash a guest.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.errors import ConfigError
from pyemu.target.x86.cpuid import FEATURES, CpuidTable

MODELS = {
    "host": "processor with all supported host features (KVM only)",
    "max": "enables all features supported by the accelerator in the current host",
}
#: Properties of QEMU's host/max models that describe migration policy, not the guest's CPUID.
POLICY_PROPS = ("migratable", "host-cache-info", "l3-cache")


@dataclass(frozen=True)
class CpuOptions:
    model: str = "max"
    props: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"-cpu: unable to find CPU model '{self.model}' (pyemu has: "
                              f"{', '.join(MODELS)} until named CPU models exist)", option="-cpu")
        self.feature_switches()  # validates every property

    def feature_switches(self) -> dict[str, bool]:
        """The CPUID features switched on (True) or off (False), by pyemu's feature name."""
        switches: dict[str, bool] = {}
        for key, value in self.props:
            if key[:1] in ("+", "-") and value == "on":  # "+avx" arrives as a bare flag: ("+avx", "on")
                name, wanted = key[1:], key[0] == "+"
            else:
                name = key
                lowered = value.lower()
                if lowered not in ("on", "off", "yes", "no", "true", "false"):
                    raise ConfigError(f"-cpu {self.model}: Parameter '{key}' expects 'on' or 'off'", option="-cpu")
                wanted = lowered in ("on", "yes", "true")
            if name in POLICY_PROPS:
                continue
            feature = name.replace("-", "_").replace(".", "_")
            if feature not in FEATURES:
                raise ConfigError(f"-cpu {self.model}: CPU feature '{name}' is unknown to pyemu's CPUID (it knows "
                                  f"{', '.join(sorted(FEATURES))})", option="-cpu")
            switches[feature] = wanted
        return switches

    def apply(self, table: CpuidTable) -> CpuidTable:
        """``table`` (what the board and accelerator offer) with this option's feature switches."""
        switches = self.feature_switches()
        missing = sorted(f for f, on in switches.items() if on and not table.has(f))
        if missing:
            raise ConfigError(f"-cpu {self.model}: CPU feature '{missing[0]}' is not available with this "
                              "accelerator in pyemu (it can only be switched off)", option="-cpu")
        off = [f for f, on in switches.items() if not on]
        return table.without(*off) if off else table

    def check_accelerator(self, accel_name: str) -> None:
        """QEMU refuses ``-cpu host`` without a hardware accelerator; so does pyemu, once it is chosen."""
        if self.model == "host" and accel_name != "kvm":
            raise ConfigError("CPU model 'host' requires KVM or HVF", option="-cpu")


def cpu_help() -> str:
    return "Available CPUs:\n" + "\n".join(f"x86 {name:<20} {text}" for name, text in MODELS.items())
