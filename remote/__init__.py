"""``pyemu-remote``: drive a running VM from the shell over its QMP socket (see :mod:`pyemu.remote.cli`)."""
