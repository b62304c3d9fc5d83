"""Virtio devices over the virtio-mmio transport (version 2, split virtqueues).

* :mod:`~pyemu.hw.virtio.queue` - split virtqueues: descriptor chains walked with every guest value
  treated as untrusted input;
* :mod:`~pyemu.hw.virtio.mmio` - the virtio-mmio register window, feature negotiation, status machine,
  queue notifications (event notifiers served by I/O threads) and the interrupt;
* :mod:`~pyemu.hw.virtio.device` - what a device type (block, rng, console, net, vsock) implements;
* one module per device type.
"""
