"""After the fork: make a worker look like the `python -u script.py` torchrun starts.

A worker forked from the warm forkserver inherits the forkserver's state: multiprocessing
believes it is a forkserver child (its default start method forced to "forkserver", its
process named after the launcher's Process object, a handle on the launcher's forkserver
and resource tracker), `__main__` is the launcher's entry module, sys.path[0] is the
launcher's, stdin is /dev/null and `ps` shows the forkserver's command line. Scripts notice:
DataLoader workers and Pools start through a forkserver that re-runs the script's top level
and must pickle what they are given (lambdas fail), Pool children miss `__main__`'s globals,
and a Pool.map of 100 integers takes seconds instead of milliseconds.

Each function here undoes one part of that. What cannot be undone (the modules already
imported, the interpreter's own flags such as `-u`) is listed in the README's allow-list.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.machinery
import io
import itertools
import os
import sys
import types
from typing import Any


def reset_multiprocessing() -> None:
    """multiprocessing as a fresh interpreter has it: the platform's default start method,
    no forkserver or resource tracker yet, this process the main process, no parent."""
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    # Private names: multiprocessing has no public way to forget its parent.
    process: Any = importlib.import_module("multiprocessing.process")

    multiprocessing.set_start_method(None, force=True)
    parent = process._parent_process
    process._parent_process = None
    process._current_process = _main_process(process)
    process._process_counter = itertools.count(1)
    process._children = set()
    _close_quietly(getattr(parent, "_sentinel", None))  # the forkserver's dup of our status pipe
    # A fresh forkserver and resource tracker, started when the script needs one. The old
    # ones' fds go: while this worker held the launcher's forkserver "alive" pipe, the
    # forkserver never saw the launcher die; the launcher's tracker would track (and
    # outlive) this worker's semaphores and shared memory.
    _replace_singleton(
        forkserver,
        "_forkserver",
        forkserver.ForkServer,
        "_forkserver_alive_fd",
        ("ensure_running", "get_inherited_fds", "connect_to_new_process", "set_forkserver_preload"),
    )
    _replace_singleton(
        resource_tracker,
        "_resource_tracker",
        resource_tracker.ResourceTracker,
        "_fd",
        ("ensure_running", "register", "unregister", "getfd"),
    )


def _replace_singleton(module: Any, name: str, factory: Any, fd_name: str, bound: tuple[str, ...]) -> None:
    """Put a new `factory()` where `module.name` was, closing the old one's fd, and rebind
    the module-level functions that are bound methods of it."""
    _close_quietly(getattr(getattr(module, name), fd_name, None))
    new = factory()
    setattr(module, name, new)
    for method in bound:
        setattr(module, method, getattr(new, method))


def _close_quietly(fd: object) -> None:
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)


def _main_process(process: Any) -> Any:
    """A new process object like the one multiprocessing makes for an interpreter's main
    process (its own class is deleted once the module has made it)."""

    class _MainProcess(process.BaseProcess):
        def __init__(self) -> None:
            self._identity = ()
            self._name = "MainProcess"
            self._parent_pid = None
            self._popen = None
            self._closed = False
            self._config = {"authkey": process.AuthenticationString(os.urandom(32)), "semprefix": "/mp"}

        def _close(self) -> None:
            pass

    return _MainProcess()


def restore_environment(before: dict[str, str]) -> None:
    """Undo what the warm process's imports did to os.environ (`before` is its snapshot)."""
    for name in [n for n in os.environ if n not in before]:
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def install_stdio(stdin_fd: int | None, stdout_fd: int, stderr_fd: int) -> None:
    """fds 0-2 and sys.std* as `python -u` makes them: stdin the launcher's own (the
    terminal, as torchrun's workers share it, so pdb works), stdout and stderr unbuffered
    (write-through) on the launcher's pipes, with Python's default encodings and errors."""
    _close_parked_stdin(keep={stdin_fd, stdout_fd, stderr_fd})
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    encoding = getattr(sys.__stdout__, "encoding", None) or "utf-8"
    if stdin_fd is None:  # the launcher has none: Python's sys.stdin for a closed fd 0
        _close_quietly(0)
        sys.stdin = sys.__stdin__ = None  # type: ignore[misc]
    else:
        os.dup2(stdin_fd, 0)
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(  # type: ignore[misc]
            io.BufferedReader(io.FileIO(0, "r", closefd=False)),
            encoding=getattr(sys.__stdin__, "encoding", None) or encoding,
            errors=getattr(sys.__stdin__, "errors", None) or "strict",
            line_buffering=os.isatty(0),
            write_through=True,  # as -u sets it on every standard stream
        )
    out_errors = getattr(sys.__stdout__, "errors", None) or "strict"
    sys.stdout = sys.__stdout__ = _unbuffered(1, encoding, out_errors)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = _unbuffered(2, encoding, "backslashreplace")  # type: ignore[misc]


def _close_parked_stdin(keep: set[int | None]) -> None:
    """multiprocessing parks stdin on /dev/null in the forkserver and again in each child,
    and leaves the fds open: a fresh interpreter holds none beyond 0-2. `keep`: the fds
    handed over by the launcher (its stdin may be /dev/null itself)."""
    if not os.path.isdir("/proc/self/fd"):
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == os.devnull:
                    os.close(fd)


def _unbuffered(fd: int, encoding: str, errors: str) -> io.TextIOWrapper:
    # What `python -u` gives: no buffer below the text layer, every write goes out at once.
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False),  # type: ignore[arg-type]
        encoding=encoding,
        errors=errors,
        write_through=True,
    )


def set_title(rank: int, argv: list[str], is_module: bool) -> None:
    """`ps`, `pgrep -f train.py` and htop show the script and its rank; top (which shows the
    15-character process name) shows the rank. Without setproctitle only the name is set."""
    python = os.path.basename(sys.executable) or "python"
    command = " ".join([python, *(["-m"] if is_module else []), *argv])
    title = f"ddp-launch rank {rank}: {command}"
    name = f"rank{rank} {os.path.basename(argv[0]) if argv else python}"[:15]
    users = os.environ.get("SPT_NOENV")
    try:
        # SPT_NOENV: leave /proc/<pid>/environ readable; the title fits in the forkserver's
        # long command line.
        os.environ["SPT_NOENV"] = "1"
        import setproctitle

        setproctitle.setproctitle(title)
        setproctitle.setthreadtitle(name)
        return
    except ImportError:
        pass
    finally:
        if users is None:
            os.environ.pop("SPT_NOENV", None)
        else:
            os.environ["SPT_NOENV"] = users
    _set_process_name(name)


def set_standby_title(local_rank: str) -> None:
    """`ps` shows a worker forked ahead of a restart for what it is, not as the forkserver."""
    try:
        import setproctitle

        setproctitle.setproctitle(f"ddp-launch standby (local rank {local_rank}, idle until a restart)")
    except ImportError:
        pass
    _set_process_name(f"standby{local_rank}")


def _set_process_name(name: str) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_name = 15
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(pr_set_name, name.encode()[:15], 0, 0, 0)


def new_main_module() -> types.ModuleType:
    """A fresh, empty `__main__` in sys.modules, as the interpreter makes one."""
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    main.__spec__ = None
    main.__package__ = None
    main.__loader__ = None
    sys.modules["__main__"] = main
    return main


def run_script(path: str, args: tuple[str, ...]) -> None:
    """Run a file as `python path args...` does: argv[0] as typed, `__file__` absolute,
    sys.path[0] the script's real directory, a SourceFileLoader as `__loader__`."""
    absolute = os.path.abspath(path)
    main = new_main_module()
    main.__file__ = absolute
    main.__cached__ = None  # type: ignore[attr-defined]
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", absolute)
    sys.argv = [path, *args]
    sys.orig_argv = [sys.executable, "-u", path, *args]  # the command line torchrun runs
    _set_path0(os.path.dirname(os.path.realpath(absolute)))
    with io.open_code(absolute) as f:
        source = f.read()
    # dont_inherit: this module's `from __future__ import annotations` must not reach the script.
    code = compile(source, absolute, "exec", dont_inherit=True)
    exec(code, main.__dict__)


def run_module(name: str, args: tuple[str, ...]) -> None:
    """Run a module as `python -m name args...` does (runpy's own entry for -m)."""
    import runpy

    new_main_module()
    sys.argv = [name, *args]
    sys.orig_argv = [sys.executable, "-u", "-m", name, *args]
    _set_path0(os.getcwd())
    runpy._run_module_as_main(name, alter_argv=True)  # type: ignore[attr-defined]


def _set_path0(entry: str) -> None:
    # The forkserver's sys.path[0] is the launcher's (its console script's directory).
    if sys.path:
        sys.path[0] = entry
    else:
        sys.path.append(entry)
