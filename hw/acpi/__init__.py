"""ACPI for pyemu's boards: tables and AML generated in code, plus the hardware-reduced platform device.

* :mod:`.aml` / :mod:`.resources` -- AML byte code and ``_CRS`` resource descriptors,
* :mod:`.sdt`, :mod:`.tables`, :mod:`.fadt`, :mod:`.madt` -- the individual tables,
* :mod:`.dsdt` -- DSDT content (serial ports, virtio-mmio ``LNRO0005`` slots, GED, power button, ``_S5``),
* :mod:`.builder` -- :func:`~.builder.build_acpi` lays everything out at a guest-physical address,
* :mod:`.ged` -- :class:`~.ged.GedDevice`, the event/sleep/reset register block the tables describe.
"""
