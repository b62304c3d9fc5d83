"""``-cpu MODEL[,prop=value...]``: the CPU model names management tools and QEMU's documentation write.

pyemu has one CPUID table today (:func:`~pyemu.target.x86.cpuid.default_cpuid`), shaped by the board and
the accelerator; named models and feature flags belong to the CPU-models issue. Until then the two
models that mean "the best this accelerator offers" are accepted and give that table: ``host`` (KVM only,
as in QEMU: "CPU model 'host' requires KVM or HVF") and ``max`` (any accelerator). Other model names and
feature flags fail with one line rather than being silently ignored, because a guest would see a CPU
other than the one asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.errors import ConfigError

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
        for key, value in self.props:
            if key.startswith(("+", "-")) or key not in POLICY_PROPS:
                raise ConfigError(f"-cpu {self.model}: CPU feature '{key.lstrip('+-')}' cannot be changed: "
                                  "pyemu's CPUID is fixed until named CPU models exist", option="-cpu")
            if value.lower() not in ("on", "off", "yes", "no", "true", "false"):
                raise ConfigError(f"-cpu {self.model}: Parameter '{key}' expects 'on' or 'off'", option="-cpu")

    def check_accelerator(self, accel_name: str) -> None:
        """QEMU refuses ``-cpu host`` without a hardware accelerator; so does pyemu, once it is chosen."""
        if self.model == "host" and accel_name != "kvm":
            raise ConfigError("CPU model 'host' requires KVM or HVF", option="-cpu")


def cpu_help() -> str:
    return "Available CPUs:\n" + "\n".join(f"x86 {name:<20} {text}" for name, text in MODELS.items())
