"""QMP, QEMU's JSON management protocol, served for one pyemu VM.

``schema`` is the one table of commands and events; ``qmp`` is the protocol of one session over a byte
stream; ``server`` holds the listeners; ``control`` wraps the machine's run control for the commands in
``commands``.
"""
