"""Long-running operations of a VM (backup jobs now, snapshot jobs later) on QEMU's job state machine."""
