"""``pyemu-img amend [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename``.

Changes format options of an existing qcow2 image in place: ``compat`` (0.10/v2 or 1.1/v3, downgrading
converts what v2 cannot express), ``lazy_refcounts`` and ``size`` (grows or shrinks the disk). A different
backing file is refused (that is ``rebase``'s job), and so are options that only make sense at creation
(cluster_size, extended_l2, ...), as in qemu-img.
"""

from __future__ import annotations

from pyemu.block.errors import BlockError
from pyemu.img.createopts import AMEND_OPTIONS, CREATE_OPTIONS, OptionSet, help_text, split_options, wants_help
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import Qcow2Node, as_qcow2, check_format, close_checked, close_quietly, open_image, probe_format

SPEC = OptionSpec("f:ho:pqt:", ("force",))


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    option_strings = p.all("-o")
    fmt = check_format(p.last("-f"))
    if wants_help(option_strings):
        if fmt is None and p.args:
            fmt = probe_format(p.args[0])
        if fmt is None:
            raise UsageError("Specify the format (-f) or the image to list its amend options")
        if fmt not in AMEND_OPTIONS:
            raise ImgError(f"Format driver '{fmt}' does not support option amendment")
        print(help_text(fmt, AMEND_OPTIONS[fmt], title=f"Amend options for '{fmt}':"))
        return 0
    if not option_strings:
        raise UsageError("Must specify options (-o)")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    filename = p.args[0]
    node = open_image(filename, fmt=fmt, writable=True, cache=p.last("-t"), resize=True)
    try:
        image = as_qcow2(node)
        if image is None:
            raise ImgError(f"Format driver '{node.name}' does not support option amendment")
        _amend(image, _options(option_strings))
    except BaseException:
        close_quietly(node)
        raise
    close_checked(node, filename)
    return 0


def _options(option_strings: list[str]) -> OptionSet:
    creation_only = {d.name for d in CREATE_OPTIONS["qcow2"]} - {d.name for d in AMEND_OPTIONS["qcow2"]}
    for text in option_strings:
        for key, _ in split_options(text):
            if key in creation_only:
                raise ImgError(f"Invalid parameter '{key}' (this option is only supported for image creation)")
    return OptionSet(AMEND_OPTIONS["qcow2"], option_strings)


def _amend(image: Qcow2Node, options: OptionSet) -> None:
    header = image.header
    try:
        refcount_bits = options.get("refcount_bits")
        if refcount_bits is not None and refcount_bits != getattr(header, "refcount_bits", 16):
            raise ImgError("Changing refcount_bits of an existing image is not supported yet")
        if "backing_file" in options or "backing_fmt" in options:
            if (options.get("backing_file") != getattr(header, "backing_file", None)
                    or options.get("backing_fmt") != getattr(header, "backing_format", None)):
                raise ImgError("Cannot amend the backing file (you can use 'pyemu-img rebase' instead)")
        compat = options.get("compat")
        lazy = options.get("lazy_refcounts")
        if compat is not None or lazy is not None:
            image.amend(compat=None if compat is None else str(compat),
                        lazy_refcounts=None if lazy is None else bool(lazy))
        if "size" in options and options.get_int("size", 0) != image.size():
            image.truncate(options.get_int("size", 0), shrink=True)
    except BlockError as exc:
        raise ImgError(str(exc)) from exc
