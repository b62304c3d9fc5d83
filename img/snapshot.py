"""``pyemu-img snapshot [-U] [-q] [-l | -a name | -c name | -d name] [-f fmt] filename``.

Internal (qcow2) snapshots: list them (qemu-img's table, nothing at all when there are none), create one,
revert the disk to one (``-a``, by ID or name) or delete one (``-d``, by name, as qemu-img 7.2 looks it up).
Without an action nothing happens, as in qemu-img.
"""

from __future__ import annotations

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import as_qcow2, check_format, close_checked, close_quietly, open_image
from pyemu.img.info import snapshot_table

SPEC = OptionSpec("Ua:c:d:f:hlq", ("force-share",))

_ACTIONS = ("-l", "-a", "-c", "-d")


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    actions = [(name, value) for name, value in p.options if name in _ACTIONS]
    if len({name for name, _ in actions}) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    filename = p.args[0]
    fmt = check_format(p.last("-f"))
    action, name = actions[-1] if actions else (None, "")
    writable = action in ("-a", "-c", "-d")
    node = open_image(filename, fmt=fmt, writable=writable, force_share=p.has("-U", "--force-share"))
    try:
        _act(node, action, name)
    except BaseException:
        close_quietly(node)
        raise
    close_checked(node, filename)
    return 0


def _act(node: BlockDriver, action: str | None, name: str) -> None:
    if action is None:
        return
    image = as_qcow2(node)
    if action == "-l":
        snapshots = image.snapshots() if image is not None else []
        if snapshots:
            print("\n".join(snapshot_table(snapshots)))
        return
    if image is None:
        verb = {"-c": "create", "-a": "apply", "-d": "delete"}[action]
        raise ImgError(f"Could not {verb} snapshot '{name}': -95 (Operation not supported)")
    try:
        if action == "-c":
            image.create_snapshot(name)
        elif action == "-a":
            image.apply_snapshot(name)
        else:
            matches = [sn for sn in image.snapshots() if sn.name == name]
            if not matches:
                raise ImgError(f"Could not delete snapshot '{name}': snapshot not found")
            image.delete_snapshot(matches[0].id)
    except BlockError as exc:
        verb = {"-c": "create", "-a": "apply", "-d": "delete"}[action]
        raise ImgError(f"Could not {verb} snapshot '{name}': {exc}") from exc
