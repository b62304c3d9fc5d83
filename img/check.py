"""``pyemu-img check [-q] [-f fmt] [--output=human|json] [-r leaks|all] [-T src_cache] [-U] filename``.

Runs the format driver's consistency check and reports it as qemu-img does, with its exit codes: 0 no
problems, 1 the check could not be completed (internal errors), 2 corruptions, 3 only leaked clusters, 63
the format has no check (raw). With ``-r`` the image is repaired and then checked again ("Double checking
the fixed image now..."), and the second pass is what gets reported, plus the counts that were fixed.
"""

from __future__ import annotations

import sys
from typing import Any

from pyemu.block.errors import BlockError
from pyemu.img import qjson
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import as_qcow2, close_checked, close_quietly, format_of, open_image
from pyemu.img.info import output_format

SPEC = OptionSpec("T:Uf:hqr:", ("output=", "repair=", "force-share"))

EXIT_CLEAN = 0
EXIT_NOT_COMPLETED = 1
EXIT_CORRUPTIONS = 2
EXIT_LEAKS = 3
EXIT_UNSUPPORTED = 63


def report_dict(filename: str, fmt: str, result: Any, fixed: Any | None) -> dict[str, Any]:
    """qemu-img's ImageCheck: numbers that are zero are left out, except check-errors."""
    out: dict[str, Any] = {"filename": filename, "format": fmt, "check-errors": result.check_errors}
    optional = (("image-end-offset", result.image_end_offset),
                ("corruptions", result.corruptions),
                ("leaks", result.leaks),
                ("corruptions-fixed", fixed.corruptions_fixed if fixed else 0),
                ("leaks-fixed", fixed.leaks_fixed if fixed else 0),
                ("total-clusters", result.total_clusters),
                ("allocated-clusters", result.allocated_clusters),
                ("fragmented-clusters", result.fragmented_clusters),
                ("compressed-clusters", result.compressed_clusters))
    for key, value in optional:
        if value:
            out[key] = value
    return out


def human_report(result: Any) -> list[str]:
    lines: list[str] = []
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if result.corruptions:
            lines += ["", f"{result.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if result.leaks:
            lines += ["", f"{result.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if result.check_errors:
            lines += ["", f"{result.check_errors} internal errors have occurred during the check."]
    if result.total_clusters and result.allocated_clusters:
        total, alloc = result.total_clusters, result.allocated_clusters
        lines.append(f"{alloc}/{total} = {alloc * 100.0 / total:.2f}% allocated, "
                     f"{result.fragmented_clusters * 100.0 / alloc:.2f}% fragmented, "
                     f"{result.compressed_clusters * 100.0 / alloc:.2f}% compressed clusters")
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return lines


def exit_status(result: Any) -> int:
    if result.check_errors:
        return EXIT_NOT_COMPLETED
    if result.corruptions:
        return EXIT_CORRUPTIONS
    if result.leaks:
        return EXIT_LEAKS
    return EXIT_CLEAN


def _print_messages(result: Any) -> None:
    for message in getattr(result, "messages", ()):
        print(message, file=sys.stderr)


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    ofmt = output_format(p.last("--output"))
    repair = p.last("-r", "--repair")
    if repair is not None and repair not in ("leaks", "all"):
        raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    filename = p.args[0]
    quiet = p.has("-q")
    node = open_image(filename, fmt=p.last("-f"), writable=repair is not None,
                      force_share=p.has("-U", "--force-share"), cache=p.last("-T"), repairing=repair is not None)
    try:
        image = as_qcow2(node)
        if image is None:
            raise ImgError("This image format does not support checks", exit_code=EXIT_UNSUPPORTED)
        fixed = None
        try:
            result = image.check(repair)
            _print_messages(result)
            if repair is not None and (result.leaks_fixed or result.corruptions_fixed):
                fixed = result
                if ofmt == "human" and not quiet:
                    print("The following inconsistencies were found and repaired:\n\n"
                          f"    {result.leaks_fixed} leaked clusters\n"
                          f"    {result.corruptions_fixed} corruptions\n\n"
                          "Double checking the fixed image now...")
                result = image.check(None)
                _print_messages(result)
        except BlockError as exc:
            raise ImgError(f"Check failed: {exc}") from exc
        fmt = format_of(node)
    except BaseException:
        close_quietly(node)
        raise
    close_checked(node, filename)
    if ofmt == "json":
        print(qjson.dumps(report_dict(filename, fmt, result, fixed)))
    elif not quiet:
        print("\n".join(human_report(result)))
    return exit_status(result)
