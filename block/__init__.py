"""The block layer: drivers (format over protocol, as in QEMU), the BlockBackend devices hold, -drive options.

``file`` (:mod:`.file`) reads a host file or block device; ``raw`` (:mod:`.raw`) presents it, or a window of
it, as a disk; :class:`~.backend.BlockBackend` adds the drive's policies (read-only, cache mode, discard) and
is the only thing a device model touches. :func:`~.options.open_drive` builds that stack from ``-drive``.
Modules are imported on demand; nothing here opens files at import time.
"""
