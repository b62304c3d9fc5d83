"""Size arguments, human sizes, JSON key order and the CLI's error handling -- no images needed. Expected
values were taken from qemu-img 7.2 (``qemu-img create -f raw x SIZE``, ``qemu-img info``)."""

from __future__ import annotations

import pytest

from pyemu.img import qjson
from pyemu.img.errors import ImgError
from pyemu.img.sizes import SizeRangeError, SizeSyntaxError, format_size, parse_image_size, parse_size


@pytest.mark.parametrize("text, expected", [
    ("1G", 1 << 30), ("512k", 512 << 10), ("512K", 512 << 10), ("1.5M", 1572864), ("1000", 1000),
    ("1b", 1), ("1B", 1), ("0x10", 16), ("0X10", 16), ("+5", 5), (" 1k", 1024), ("1.5k", 1536),
    ("1.0001k", 1024), ("1T", 1 << 40), ("1P", 1 << 50), ("7E", 7 << 60), ("0", 0), ("1.k", 1024),
    ("010", 10), ("1.9999999999k", 2048), ("8191P", 8191 << 50), ("0.5k", 512), ("1.0", 1), ("1.0b", 1),
    ("1.55555M", 1631112), ("9223372036854775807", (1 << 63) - 1), ("1.00048828125k", 1025),
    ("1.000488k", 1024), ("3.99999999999999999k", 3072), ("0.00048828125k", 1), ("1m", 1 << 20),
])
def test_sizes_match_qemu_img(text: str, expected: int) -> None:
    assert parse_size(text, warn=False) == expected


@pytest.mark.parametrize("text", ["1.5", "1e3", "1k ", "1Gb", "1KiB", "1.1", "", "1kk", ".5k", "1.5b", "0x1.8k",
                                  "0x", "1.5e3k", "1.-5k", "1.5 k", "1,5k", "-1", "x"])
def test_invalid_sizes(text: str) -> None:
    with pytest.raises(SizeSyntaxError):
        parse_size(text)


@pytest.mark.parametrize("text", ["8E", "16E", "8192P", "9223372036854775808", "99999999999999999999999"])
def test_sizes_out_of_range(text: str) -> None:
    with pytest.raises(SizeRangeError):
        parse_size(text)
    with pytest.raises(ImgError, match=r"^Invalid image size specified\. Must be between 0 and 9223372036854775807\.$"):
        parse_image_size(text)


def test_image_size_message() -> None:
    with pytest.raises(ImgError, match=r"^Invalid image size specified\. You may use k, M, G, T, P or E suffixes"):
        parse_image_size("1.5")


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (4096, "4 KiB"), (200704, "196 KiB"), (1335296, "1.27 MiB"), (67108864, "64 MiB"),
    (1000, "0.977 KiB"), (999, "999 B"), (1073741824, "1 GiB"), (197120, "192 KiB"),
])
def test_human_sizes(value: int, text: str) -> None:
    assert format_size(value) == text


def test_json_key_order_is_qemus() -> None:
    # The order qemu-img 7.2 prints for an overlay's info and for a snapshot entry.
    info = {"virtual-size": 1, "filename": "x", "cluster-size": 2, "format": "qcow2", "actual-size": 3,
            "format-specific": {}, "full-backing-filename": "b", "backing-filename": "b",
            "backing-filename-format": "qcow2", "dirty-flag": False}
    assert [k for k, _ in qjson.ordered_items(info)] == [
        "backing-filename-format", "virtual-size", "filename", "cluster-size", "format", "actual-size",
        "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"]
    snap = {"id": "1", "name": "s", "vm-state-size": 0, "date-sec": 1, "date-nsec": 2, "vm-clock-sec": 0,
            "vm-clock-nsec": 0, "icount": 0}
    assert [k for k, _ in qjson.ordered_items(snap)] == [
        "icount", "vm-clock-nsec", "name", "date-sec", "date-nsec", "vm-clock-sec", "id", "vm-state-size"]


def test_json_strings_escape_like_qemu() -> None:
    assert qjson.quote('\u00e9 x"\\.q/\n\U0001f600') == '"\\u00E9 x\\"\\\\.q/\\n\\uD83D\\uDE00"'
    assert qjson.dumps({"a": [1, True], "b": {}}) == '{\n    "a": [\n        1,\n        true\n    ],\n    "b": {}\n}'


@pytest.mark.parametrize("argv, message", [
    ([], "Not enough arguments"),
    (["frob"], "Command not found: frob"),
    (["info"], "Expecting one image file name"),
    (["info", "-z", "x"], "invalid option -- 'z'"),
    (["info", "--frob", "x"], "unrecognized option '--frob'"),
    (["info", "--output=xml", "x"], "--output must be used with human or json as argument."),
    (["create", "-f", "qcow2", "x", "1.5"], "Invalid image size specified."),
    (["create", "-f", "vmdk", "x", "1M"], "Unknown file format 'vmdk'"),
    (["info", "does-not-exist"], "Could not open 'does-not-exist'"),
    (["convert", "-m", "0", "a", "b"], "Invalid number of coroutines"),
    (["convert", "-S", "1000", "a", "b"], "Invalid buffer size for sparse output specified"),
    (["check", "-r", "foo", "x"], "Unknown option value for -r"),
    (["bench", "-d", "x", "y"], "Invalid queue depth specified"),
    (["measure"], "Either --size N or one filename must be specified."),
])
def test_errors_are_one_line_exit_1(pimg, error_line, argv: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    result = pimg(*argv)
    assert result.rc == 1
    assert message in error_line(result)


def test_help_and_version(pimg) -> None:  # type: ignore[no-untyped-def]
    result = pimg("--help")
    assert result.rc == 0 and "Command syntax:" in result.out and "convert" in result.out
    result = pimg("--version")
    assert result.rc == 0 and result.out.startswith("pyemu-img version ")
    assert pimg("info", "-h").rc == 0
