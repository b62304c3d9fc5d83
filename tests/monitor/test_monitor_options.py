"""The command-line options that come with QMP, parsed into VmConfig (no process, no sockets)."""

from __future__ import annotations

import pytest

from pyemu.errors import ConfigError
from pyemu.monitor.server import endpoints_from_config
from pyemu.chardev.spec import SocketSpec, StdioSpec
from pyemu.system.options import parse_args


def test_qmp_mon_name_uuid_and_no_ops():
    config = parse_args([
        "-qmp", "unix:/tmp/a.sock,server=on,wait=off", "-qmp", "tcp:127.0.0.1:4444,server,nowait",
        "-chardev", "socket,id=mon,path=/tmp/m.sock,server=on,wait=off", "-mon", "chardev=mon,mode=control",
        "-name", "guest=vm1,debug-threads=on", "-uuid", "0b5a3c3e-6f3b-4f0e-9d53-0123456789ab",
        "-nodefaults", "-no-user-config", "-display", "none"])
    assert config.name == "vm1" and config.uuid == "0b5a3c3e-6f3b-4f0e-9d53-0123456789ab"
    endpoints = endpoints_from_config(config)
    assert [e.spec for e in endpoints] == [
        SocketSpec("unix", path="/tmp/a.sock", server=True, wait=False),
        SocketSpec("tcp", host="127.0.0.1", port=4444, server=True, wait=False),
        SocketSpec("unix", path="/tmp/m.sock", server=True, wait=False)]
    assert parse_args(["-name", "plain"]).name == "plain"


def test_qmp_stdio_needs_serial_off_stdio():
    config = parse_args(["-qmp", "stdio", "-serial", "none"])
    assert isinstance(endpoints_from_config(config)[0].spec, StdioSpec)
    with pytest.raises(ConfigError, match="multiple character devices"):
        parse_args(["-qmp", "stdio"])


@pytest.mark.parametrize("argv,fragment", [
    (["-mon", "chardev=c"], "chardev 'c' not found"),
    (["-chardev", "null,id=c", "-mon", "chardev=c,mode=foo"], "Parameter 'mode' does not accept value 'foo'"),
    (["-monitor", "foo:bar"], "-monitor"),
    (["-mon", "mode=control"], "Parameter 'chardev' is missing"),
    (["-chardev", "null,id=c", "-mon", "chardev=c,mode=control", "-mon", "chardev=c,mode=control"],
     "already in use"),
    (["-uuid", "0b5a3c3e-6f3b-4f0e-9d53-0123456789"], "failed to parse UUID"),
    (["-display", "none,gl=on"], "only -display none"),
    (["-qmp", "tcp:localhost:1,server=maybe"], "expects 'on' or 'off'"),
])
def test_bad_options(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_args(argv)


def test_mon_on_a_file_chardev_is_refused_when_the_endpoints_are_built():
    config = parse_args(["-chardev", "file,id=f,path=/tmp/x", "-mon", "chardev=f,mode=control"])
    with pytest.raises(ConfigError, match="a monitor needs a socket"):
        endpoints_from_config(config)


def test_monitor_qmp_pretty_and_readline_mon():
    config = parse_args(["-monitor", "unix:/tmp/h.sock,server=on,wait=off", "-monitor", "none",
                         "-qmp-pretty", "tcp:127.0.0.1:4445,server=on,wait=off",
                         "-qmp", "unix:/tmp/out.sock,server=off",
                         "-chardev", "socket,id=hm,path=/tmp/hm.sock,server=on,wait=off", "-mon", "chardev=hm"])
    endpoints = endpoints_from_config(config)
    assert [(e.mode, e.pretty, e.chardev_label) for e in endpoints] == [
        ("readline", False, "compat_monitor0"), ("control", True, "compat_monitor1"),
        ("control", False, "compat_monitor2"), ("readline", False, "hm")]
    assert endpoints[2].spec == SocketSpec("unix", path="/tmp/out.sock", server=False)
