"""``pyemu-img``: the image tool (QEMU's qemu-img, command for command).

One module per subcommand (:mod:`.create`, :mod:`.info`, :mod:`.convert`, ...) plus the pieces they share:
:mod:`.cli` (entry point, dispatch, exit codes), :mod:`.getopts` (qemu-img's option syntax), :mod:`.sizes`
(size arguments and human-readable sizes), :mod:`.qjson` (JSON output in qemu-img's key order),
:mod:`.images` (opening and creating images through :mod:`pyemu.block.image`), :mod:`.chain` (allocation
status through a backing chain), :mod:`.createopts` (``-o`` option lists) and :mod:`.progress`.

Outputs, JSON keys and exit codes follow qemu-img 7.2 so scripts written for one work with the other and
the two tools can check each other's images.
"""
