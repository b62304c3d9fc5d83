"""``-smp [cpus=]N[,maxcpus=M][,sockets=S][,dies=D][,cores=C][,threads=T]``: QEMU's CPU topology rules.

Management tools always write the full topology (libvirt: ``-smp 4,sockets=1,dies=1,cores=4,threads=1``)
and expect QEMU's arithmetic: omitted values are computed from the given ones (QEMU 7.2 prefers cores
over sockets for machine types newer than 6.1, microvm among them), the product must equal ``maxcpus``
and ``maxcpus`` may not be below the CPU count. The messages are QEMU's. pyemu has no CPU hotplug, so
``maxcpus`` above the CPU count is accepted and means nothing more; the topology is not yet reflected in
CPUID (that is the CPU-models issue): the guest sees ``cpus`` single-thread cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.errors import ConfigError

SMP_KEYS = ("cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads")


@dataclass(frozen=True)
class SmpTopology:
    """A resolved, consistent topology: ``sockets * cores * threads == maxcpus >= cpus``."""

    cpus: int = 1
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    maxcpus: int = 1

    def __post_init__(self) -> None:
        if self.sockets * self.cores * self.threads != self.maxcpus:
            raise ConfigError("Invalid CPU topology: product of the hierarchy must match maxcpus: "
                              f"{self._hierarchy()} != maxcpus ({self.maxcpus})", option="-smp")
        if self.maxcpus < self.cpus:
            raise ConfigError("Invalid CPU topology: maxcpus must be equal to or greater than smp: "
                              f"{self._hierarchy()} == maxcpus ({self.maxcpus}) < smp_cpus ({self.cpus})",
                              option="-smp")

    def _hierarchy(self) -> str:
        return f"sockets ({self.sockets}) * cores ({self.cores}) * threads ({self.threads})"


def parse_count(key: str, text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError(f"-smp: Parameter '{key}' expects a number", option="-smp") from None
    if value <= 0:  # QEMU 7.2 warns and ignores a 0; later QEMUs refuse it with this message
        raise ConfigError("-smp: Invalid CPU topology: CPU topology parameters must be greater than zero",
                          option="-smp")
    return value


def resolve_topology(values: dict[str, int]) -> SmpTopology:
    """QEMU's ``machine_parse_smp_config`` for a machine without dies/clusters (microvm): ``values`` maps
    the given keys of :data:`SMP_KEYS` to positive numbers; a missing key is computed."""
    if values.get("dies", 0) > 1:
        raise ConfigError("-smp: dies not supported by this machine's CPU topology", option="-smp")
    if values.get("clusters", 0) > 1:
        raise ConfigError("-smp: clusters not supported by this machine's CPU topology", option="-smp")
    cpus = values.get("cpus", 0)
    maxcpus = values.get("maxcpus", 0)
    sockets = values.get("sockets", 0)
    cores = values.get("cores", 0)
    threads = values.get("threads", 0)
    if cpus == 0 and maxcpus == 0:
        sockets = sockets or 1
        cores = cores or 1
        threads = threads or 1
    else:
        maxcpus = maxcpus or cpus
        if cores == 0:
            sockets = sockets or 1
            threads = threads or 1
            cores = maxcpus // (sockets * threads)
        elif sockets == 0:
            threads = threads or 1
            sockets = maxcpus // (cores * threads)
        threads = threads or maxcpus // (sockets * cores)
    total = sockets * cores * threads
    maxcpus = maxcpus or total
    cpus = cpus or maxcpus
    return SmpTopology(cpus=cpus, sockets=sockets, cores=cores, threads=threads, maxcpus=maxcpus)
