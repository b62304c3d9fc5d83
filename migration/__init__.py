"""Whole-VM state: one versioned stream format, saving a VM into it and starting a VM from it.

:mod:`~pyemu.migration.stream` frames sections (length + CRC each), :mod:`~pyemu.migration.codec` turns the
device-state dataclasses into checked values and back, :mod:`~pyemu.migration.vmstate` collects a stopped
machine's state and applies a validated stream to a fresh one, :mod:`~pyemu.migration.transport` opens
QEMU's ``file:`` and ``exec:`` URIs and :mod:`~pyemu.migration.job` runs a save or a load as QMP's
``migrate``/``migrate-incoming`` with ``query-migrate`` status and MIGRATION events.
"""
