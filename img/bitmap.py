"""``pyemu-img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
[-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [-f fmt] filename bitmap``.

Changes a persistent dirty bitmap of a qcow2 image offline, with qemu-img's syntax and messages: the
actions run in command-line order on the image opened read-write, each failure is reported as
"Operation ACTION on bitmap NAME failed: REASON", and the bitmaps are stored when the image is closed
(through the same :mod:`pyemu.block.qcow2.bitmaps` code a running VM uses). ``--add`` makes a persistent,
enabled bitmap (``-g`` sets its granularity, default as QEMU: the cluster size within [4 KiB, 64 KiB]);
``--merge SOURCE`` ORs bitmap SOURCE -- of this image, or of ``-b source_file`` -- into it.

``--object`` is accepted for command-line compatibility and not used: objects (secrets for encrypted
images) have nothing to do for the formats pyemu opens.
"""

from __future__ import annotations

from pyemu.block.dirty_bitmap import BitmapError, bitmaps_of, check_modifiable, default_granularity
from pyemu.block.driver import BlockDriver
from pyemu.img.errors import ImgError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import check_format, close_checked, close_quietly, open_image
from pyemu.img.sizes import parse_size

SPEC = OptionSpec("b:f:F:g:hq", ("add", "remove", "clear", "enable", "disable", "merge=", "object=",
                                 "granularity="))
_ACTIONS = {"--add": "add", "--remove": "remove", "--clear": "clear", "--enable": "enable",
            "--disable": "disable", "--merge": "merge"}


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    actions = [(_ACTIONS[name], value) for name, value in p.options if name in _ACTIONS]
    if not actions:
        raise ImgError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    kinds = {kind for kind, _ in actions}
    granularity_text = p.last("-g", "--granularity")
    if granularity_text is not None and "add" not in kinds:
        raise ImgError("granularity only supported with --add")
    source_file = p.last("-b")
    source_fmt = check_format(p.last("-F"))
    if source_fmt is not None and source_file is None:
        raise ImgError("-F only supported with -b")
    if source_file is not None and "merge" not in kinds:
        raise ImgError("Merge bitmap source file only supported with --merge")
    if len(p.args) != 2:
        raise ImgError("Expecting filename and bitmap name")
    filename, name = p.args
    fmt = check_format(p.last("-f"))
    granularity = 0
    if granularity_text is not None:
        try:
            granularity = parse_size(granularity_text)
        except (ValueError, ImgError):
            raise ImgError("Invalid granularity specified") from None
    node = open_image(filename, fmt=fmt, writable=True)
    source: BlockDriver | None = None
    try:
        if source_file is not None:
            source = open_image(source_file, fmt=source_fmt, writable=False)
        for kind, value in actions:
            try:
                _apply(node, kind, name, value, granularity=granularity, source=source or node,
                       label=filename)
            except BitmapError as exc:
                raise ImgError(f"Operation {kind} on bitmap {name} failed: {exc}") from None
    except BaseException:
        close_quietly(source)
        close_quietly(node)
        raise
    close_quietly(source)
    close_checked(node, filename)
    return 0


def _apply(node: BlockDriver, kind: str, name: str, value: str, *, granularity: int, source: BlockDriver,
           label: str) -> None:
    bitmaps = bitmaps_of(node)
    if kind == "add":
        bitmaps.create(name, granularity=granularity or default_granularity(node), persistent=True,
                       node_label=label)
    elif kind == "remove":
        bitmaps.remove(name)
    elif kind == "clear":
        bitmaps.clear(name)
    elif kind in ("enable", "disable"):
        bitmaps.set_enabled(name, kind == "enable")
    else:
        target = bitmaps.find(name)
        check_modifiable(target)
        origin = bitmaps_of(source).find(value)
        if origin.inconsistent:
            raise BitmapError(f"Bitmap '{value}' is inconsistent and cannot be used")
        target.merge_from(origin)

