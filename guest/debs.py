"""Getting Debian packages with the host's own apt tools, and unpacking them without installing.

``apt-get download`` fetches a .deb into the current directory without root and without touching the
host's installed packages; ``dpkg-deb -x`` unpacks one into a directory. The kernel metapackage
(``linux-image-amd64``) only depends on the real, versioned package (``linux-image-6.1.0-NN-amd64``),
which we read from the downloaded metapackage's own ``Depends`` field so the two always match.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pyemu.guest.errors import OWN_ASSETS_HINT, AptError, PackageContentError, ToolMissingError

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
COMMAND_TIMEOUT = 900  # seconds; a slow mirror can take minutes for the ~70 MB kernel package


@dataclass(frozen=True)
class DebPackage:
    """A .deb file on disk with its control fields."""

    path: Path
    name: str
    version: str


def require_tool(tool: str) -> str:
    """Full path of ``tool``; ToolMissingError (with the way out) when it is not installed."""
    found = shutil.which(tool)
    if found is None:
        raise ToolMissingError(
            f"'{tool}' is not installed: pyemu-guest fetch needs Debian's apt tools to download the guest "
            f"kernel and busybox; {OWN_ASSETS_HINT}",
            tool=tool,
        )
    return found


def run_tool(command: list[str], *, cwd: Path | None = None, what: str) -> str:
    """Run a host tool, returning its stdout; AptError with its output tail when it fails."""
    executable = require_tool(command[0])
    try:
        completed = subprocess.run(
            [executable, *command[1:]], cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise AptError(
            f"{what} timed out after {COMMAND_TIMEOUT} s ({' '.join(command)}); {OWN_ASSETS_HINT}",
            command=command, returncode=-1, output=str(exc.stderr or ""),
        ) from exc
    except OSError as exc:
        raise AptError(
            f"{what}: cannot run {command[0]}: {exc.strerror}; {OWN_ASSETS_HINT}",
            command=command, returncode=-1, output="",
        ) from exc
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip()
        tail = "\n".join(output.splitlines()[-5:])
        advice = ""
        if "Unable to locate package" in output or "No packages found" in output:
            advice = " (is this a Debian/Ubuntu host with up-to-date package lists? try 'apt-get update')"
        raise AptError(
            f"{what} failed ({' '.join(command)}, exit {completed.returncode}){advice}:\n{tail}\n{OWN_ASSETS_HINT}",
            command=command, returncode=completed.returncode, output=output,
        )
    return completed.stdout


def deb_fields(deb: Path, *fields: str) -> dict[str, str]:
    """Control fields of a .deb (``dpkg-deb -f``)."""
    output = run_tool(["dpkg-deb", "-f", str(deb), *fields], what=f"reading {deb.name}")
    values: dict[str, str] = {}
    if len(fields) == 1:
        values[fields[0]] = output.strip()
        return values
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def describe_deb(deb: Path) -> DebPackage:
    fields = deb_fields(deb, "Package", "Version")
    return DebPackage(deb, fields.get("Package", ""), fields.get("Version", ""))


def kernel_package_from_depends(depends: str) -> str:
    """The versioned ``linux-image-*`` package named in a metapackage's Depends field."""
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
        if name.startswith("linux-image-") and name != KERNEL_METAPACKAGE:
            return name
    raise PackageContentError(
        f"the {KERNEL_METAPACKAGE} metapackage depends on no linux-image package (Depends: {depends!r}); "
        f"{OWN_ASSETS_HINT}"
    )


def find_local_deb(directory: Path, package: str) -> Path | None:
    """A ``<package>_*.deb`` in ``directory`` (the newest by name if several), for offline fetches."""
    candidates = sorted(directory.glob(f"{package}_*.deb"))
    return candidates[-1] if candidates else None


def obtain_deb(package: str, workdir: Path, *, local_dir: Path | None = None) -> DebPackage:
    """The .deb of ``package``: from ``local_dir`` when present there, else by ``apt-get download``."""
    if local_dir is not None:
        local = find_local_deb(local_dir, package)
        if local is not None:
            return describe_deb(local)
    run_tool(["apt-get", "download", package], cwd=workdir, what=f"downloading {package}")
    found = find_local_deb(workdir, package)
    if found is None:
        raise PackageContentError(f"apt-get download {package} produced no .deb file; {OWN_ASSETS_HINT}")
    return describe_deb(found)


def extract_deb(deb: Path, destination: Path) -> Path:
    """Unpack the files of ``deb`` into ``destination`` (created); returns it."""
    destination.mkdir(parents=True, exist_ok=True)
    run_tool(["dpkg-deb", "-x", str(deb), str(destination)], what=f"unpacking {deb.name}")
    return destination
