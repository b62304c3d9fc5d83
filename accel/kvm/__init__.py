"""``-accel kvm``: pyemu's accelerator on Linux KVM (x86-64), driven through ioctls declared with cffi.

Modules, each with one job:

* :mod:`~pyemu.accel.kvm.abi` - the ``<linux/kvm.h>`` structures and ioctl numbers (cffi cdef)
* :mod:`~pyemu.accel.kvm.fd` - one KVM file descriptor and the ioctl call (typed :class:`KvmError`)
* :mod:`~pyemu.accel.kvm.system` - ``/dev/kvm``: version, capabilities, supported CPUID and MSRs
* :mod:`~pyemu.accel.kvm.vm` - a VM: memory slots, split irqchip, MSI, GSI routes, irqfd/ioeventfd
* :mod:`~pyemu.accel.kvm.cpuid` - pyemu's CPUID table filtered through what KVM supports
* :mod:`~pyemu.accel.kvm.state` - X86CpuState <-> kvm_regs / kvm_sregs / MSRs / FPU-XSAVE / LAPIC / events /
  MP state
* :mod:`~pyemu.accel.kvm.kick` - getting a vCPU thread out of KVM_RUN (immediate_exit + SIGUSR1)
* :mod:`~pyemu.accel.kvm.vcpu` - a vCPU and its run loop (exits -> the shared dispatcher)
* :mod:`~pyemu.accel.kvm.accel` - :class:`KvmAccelerator`, what a board plugs in
"""
