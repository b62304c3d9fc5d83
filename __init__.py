"""pyemu: a QEMU-shaped virtual machine monitor written in Python.

Boards in :mod:`pyemu.machines` combine device models from :mod:`pyemu.hw` with one of two accelerators:
:mod:`pyemu.accel.kvm` (Linux KVM) or :mod:`pyemu.accel.tcg` (a software CPU on the Unicorn engine).
"""

__version__ = "0.1.0"
