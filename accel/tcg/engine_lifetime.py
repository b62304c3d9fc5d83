"""An engine is freed when Python collects it, not by the interpreter's exit handlers.

Why: the ``unicorn`` binding frees each engine (``uc_close``) through a ``weakref.finalize`` that also runs
at interpreter exit, so ``pyemu``'s exit handlers spent 11 ms closing the vCPU's engine (tens of
thousands of translated blocks) right before ``_exit`` handed all of it back to the kernel anyway:
a third of the time between the guest's power-off and the end of the process (QEMU: 7 ms). An engine
dropped while the process goes on (a closed VM of the Python API, a scratch engine) is still freed.
"""

from __future__ import annotations

import weakref

from unicorn import Uc


def free_when_collected_only(uc: Uc) -> None:
    """Keep ``uc``'s release for garbage collection (no-op on a binding without that finalizer)."""
    finalizer = getattr(uc, "_Uc__finalizer", None)  # the binding's own, see unicorn_py3/unicorn.py
    if isinstance(finalizer, weakref.finalize):
        finalizer.atexit = False
