"""Whole-VM state: one versioned stream format, saving a VM into it and starting a VM from it.

:mod:`~pyemu.migration.stream` frames sections (length + CRC each), :mod:`~pyemu.migration.codec` turns the
device-state dataclasses into checked values and back, :mod:`~pyemu.migration.vmstate` collects a stopped
machine's state and applies a validated stream to a fresh one, :mod:`~pyemu.migration.transport` opens
QEMU's ``file:``, ``exec:``, ``tcp:`` and ``unix:`` URIs, :mod:`~pyemu.migration.params` keeps
migrate-set-parameters/-capabilities (max-bandwidth is a rate limit) and :mod:`~pyemu.migration.job` runs a save or a load as QMP's
``migrate``/``migrate-incoming`` with ``query-migrate`` status and MIGRATION events.

A running VM is migrated live (:mod:`~pyemu.migration.precopy`: changed pages from KVM's dirty log, or under
TCG by comparing RAM with what was sent; no TCG write-tracking hook yet). Not done yet: ``fd:`` URIs,
loading a stream under the other accelerator (refused as a mismatch), and devices other than the board's
own, virtio-blk and virtio-rng (virtio-net, vsock and virtio-serial block migration by name). Input typed
at a serial chardev but not yet taken into the UART's FIFO stays with the source, as in QEMU.
"""
