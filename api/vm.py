"""A VM inside the calling Python process: ``pyemu.VM``.

No daemon and no child process: the board, its vCPU threads and its devices live in this process, built
from the same command-line words (and the same :class:`~pyemu.system.config.VmConfig`) the ``pyemu``
command takes, and driven through the same control API that serves QMP. So a test, a notebook or a CI
job boots a guest, types at its console and powers it off with ordinary method calls and typed errors::

    with pyemu.VM("-m", "256M", "-accel", "tcg") as vm:
        vm.start()
        vm.console.expect("# ")
        vm.console.send("uname -r\\n")

Unless the words say where COM1 goes (``-serial``), the console is a socket private to this object
(:class:`~pyemu.api.console.Console`). ``-qmp`` still works, so other programs can watch the same VM.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pyemu.api.console import Console
from pyemu.api.errors import CommandError, ConsoleError, VmStateError, VmTimeout
from pyemu.api.events import EventStream
from pyemu.errors import ConfigError
from pyemu.system.config import VmConfig
from pyemu.system.options import parse_args
from pyemu.system.runstate import RunState, ShutdownCause

if TYPE_CHECKING:  # the machine is imported only when a VM starts
    from pyemu.monitor.control import ControlApi
    from pyemu.system.instance import VmInstance

CONSOLE_SOCKET = "console.sock"
CONSOLE_ACCEPT_TIMEOUT = 30.0


class VM:
    """One virtual machine. Create, :meth:`start`, drive, :meth:`wait` or :meth:`close`.

    ``args`` are ``pyemu`` command-line words (``"-m", "512M", "-smp", "2"``); with none, the default
    Debian guest boots under the first available accelerator. ``config`` takes a ready VmConfig instead.
    The config is parsed here, so a bad option raises ConfigError before anything starts.
    """

    def __init__(self, *args: str, config: VmConfig | None = None) -> None:
        if config is not None and args:
            raise TypeError("VM() takes command-line words or a config, not both")
        self._workdir: str | None = None
        self._console_path: str | None = None
        if config is None:
            words = list(args)
            if not any(word in ("-serial", "-nographic", "-nodefaults") for word in words):
                self._workdir = tempfile.mkdtemp(prefix="pyemu-vm-")
                self._console_path = str(Path(self._workdir) / CONSOLE_SOCKET)
                words += ["-serial", f"unix:{self._console_path},server=on,wait=off"]
            config = parse_args(words)
        if config.daemonize:
            raise ConfigError("-daemonize: a VM in this process cannot detach from it; run the pyemu command "
                              "instead", option="-daemonize")
        self.config = config
        self.notices: list[str] = list(config.warnings())
        """Warnings and notes the command would print (accelerator fallback, accepted-but-ignored options)."""
        self.events = EventStream()
        """Every event of this VM (STOP, RESUME, RESET, POWERDOWN, SHUTDOWN) from the moment it starts."""
        self._console: Console | None = None
        self._instance: VmInstance | None = None
        self._runner: threading.Thread | None = None
        self._exit_status: int | None = None
        self._failure: BaseException | None = None
        self._finished = threading.Event()

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> "VM":
        """Build the board and run it (stay in prelaunch with ``-S`` until :meth:`resume`). Errors in the
        configuration or the host (no KVM, a missing kernel) raise here and leave nothing running."""
        if self._instance is not None:
            raise VmStateError("this VM has already been started")
        from pyemu.system.instance import VmInstance

        instance = VmInstance(self.config, notice=self.notices.append)
        try:
            instance.control.subscribe(self.events.emit)
            if self._console_path is not None:
                self._console = Console.connect_unix(self._console_path)
                self._await_console_accepted(instance)
            instance.start()
        except BaseException:
            instance.close()
            if self._console is not None:
                self._console.close()
            raise
        self._instance = instance
        self._runner = threading.Thread(target=self._run, name="pyemu-vm", daemon=True)
        self._runner.start()
        return self

    def _await_console_accepted(self, instance: VmInstance) -> None:
        """The chardev accepts on its own thread: until it has, what the guest prints is dropped (no
        client yet, as with QEMU's wait=off), so the vCPUs start only after it took our connection."""
        from pyemu.chardev.socket import SocketBackend

        for backend in instance.machine.backends:
            if isinstance(backend, SocketBackend) and backend.address == self._console_path:
                if not backend.wait_connected(CONSOLE_ACCEPT_TIMEOUT):
                    raise ConsoleError("the serial console did not accept the connection")
                return
        raise ConsoleError("the VM has no serial console socket")  # a board without COM1

    def _run(self) -> None:
        instance = self._instance
        assert instance is not None
        try:
            self._exit_status = instance.run()
        except BaseException as error:  # reported by wait(); a daemon thread must not die silently
            self._failure = error
        finally:
            instance.close()
            self.events.close()
            self._finished.set()

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the VM ends; its exit status (the guest's power-off gives 0). VmTimeout if it is
        still running after ``timeout`` seconds."""
        self._started()
        if not self._finished.wait(timeout):
            raise VmTimeout(f"the VM is still {self.state.value} after {timeout} s")
        if self._failure is not None:
            raise self._failure
        assert self._exit_status is not None
        return self._exit_status

    def close(self, timeout: float = 30.0) -> None:
        """End the VM if it still runs (as ``quit``), wait for it, release its console and files."""
        if self._instance is not None and not self._finished.is_set():
            self._instance.terminate(ShutdownCause.HOST_QMP_QUIT)
            self._finished.wait(timeout)
        if self._console is not None:
            self._console.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- control (the same operations QMP and pyemu-remote offer) ---------------------------------------
    @property
    def state(self) -> RunState:
        """The run state as QMP's query-status names it (``RunState.PRELAUNCH`` before :meth:`start`)."""
        if self._instance is None:
            return RunState.PRELAUNCH
        state: RunState = self._instance.control.state
        return state

    @property
    def running(self) -> bool:
        return self.state is RunState.RUNNING

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run any QMP command in-process, validated against the same schema table as over a socket
        (``vm.execute("query-block")``); CommandError with QEMU's error class when it is refused."""
        from pyemu.monitor import schema
        from pyemu.monitor.commands import Reply, make_executor

        control = self._control()
        args = dict(arguments or {})
        spec = schema.COMMANDS_BY_NAME.get(command)
        try:
            if spec is None or command == "qmp_capabilities":  # negotiation belongs to QMP sessions
                raise schema.QmpError(f"The command {command} has not been found", "CommandNotFound")
            schema.validate_arguments(spec, args)
            value = make_executor(control)(command, args)
        except schema.QmpError as error:
            raise CommandError(error.error_class, error.desc) from None
        if isinstance(value, Reply):
            if value.after is not None:
                value.after()
            value = value.value
        return value

    def status(self) -> dict[str, Any]:
        """``query-status``: ``{"status": "running", "running": True, "singlestep": False}``."""
        return dict(self.execute("query-status"))

    def pause(self) -> None:
        """Stop every vCPU and the guest's clock (QMP ``stop``); returns once they are stopped."""
        self.execute("stop")

    def resume(self) -> None:
        """Run again (QMP ``cont``); CommandError after a shutdown until :meth:`reset`."""
        self.execute("cont")

    def reset(self) -> None:
        """The reset button (QMP ``system_reset``)."""
        self.execute("system_reset")

    def powerdown(self) -> None:
        """The ACPI power button (QMP ``system_powerdown``): the guest decides to shut down."""
        self.execute("system_powerdown")

    def quit(self) -> None:
        """End the VM now (QMP ``quit``); :meth:`wait` then returns 0."""
        self.execute("quit")

    @property
    def console(self) -> Console:
        """COM1 as a :class:`Console`. ConsoleError when the words decide COM1 themselves (``-serial``,
        ``-nographic``, ``-nodefaults``)."""
        if self._console is None:
            if self._console_path is None:
                raise ConsoleError("this VM's words say where COM1 goes (-serial, -nographic or -nodefaults); "
                                   "it has no console object")
            raise VmStateError("the console exists once the VM is started")
        return self._console

    def _control(self) -> ControlApi:
        return self._started().control

    def _started(self) -> VmInstance:
        if self._instance is None:
            raise VmStateError("the VM has not been started (call start() first)")
        return self._instance
