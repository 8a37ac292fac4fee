"""Records what a training script can observe about the process it runs in, as JSON.

Run as a script (`probe.py`) or a module (`-m probe`), under torchrun or ddp-launch; each
rank writes $PROBE_DIR/rank<RANK>.json. test_transparency.py compares the two launchers'
records. No guard on purpose: scripts written for torchrun often have none.
"""

import faulthandler
import gc
import json
import multiprocessing
import os
import resource
import signal
import stat
import sys
import threading
import warnings

import __main__

TORCH_PRELOADED = "torch" in sys.modules  # the warm start's one visible trace

POOL_GLOBAL = "set after the pool's function was defined"


def _from_pool(i):
    return (i, getattr(sys.modules["__main__"], "POOL_GLOBAL", None), multiprocessing.current_process().name[:11])


def _stream(s):
    return {
        "type": type(s).__name__,
        "encoding": s.encoding,
        "errors": s.errors,
        "line_buffering": s.line_buffering,
        "write_through": getattr(s, "write_through", None),
        "isatty": s.isatty(),
        "fileno": s.fileno(),
        "buffer": type(getattr(s, "buffer", None)).__name__,
    }


def _fd_kind(fd):
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    for name in ("S_ISFIFO", "S_ISCHR", "S_ISREG", "S_ISSOCK"):
        if getattr(stat, name)(mode):
            return name[4:]
    return "other"


def _signals():
    found = {}
    for sig in sorted(signal.valid_signals()):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if handler is None:
            continue
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        found[name] = handler.__name__ if callable(handler) else repr(handler)
    return found


def _cmdline():
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def _comm():
    with open(f"/proc/{os.getpid()}/comm") as f:
        return f.read().strip()


def _annotated(x: int) -> str:  # a script's annotations are objects, not strings
    return str(x)


def _devnull_fds():
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) > 2 and os.readlink(f"/proc/self/fd/{name}") == os.devnull:
                found.append(int(name))
        except OSError:
            continue
    return found


def _late_thread_marker():
    """A non-daemon thread still running when the script ends: the interpreter waits for it."""
    import time

    def finish():
        time.sleep(0.5)
        with open(os.path.join(os.environ["PROBE_DIR"], f"thread{os.environ.get('RANK', '0')}.done"), "w") as f:
            f.write("done")

    threading.Thread(target=finish, daemon=False).start()


def _parent_cmdline():
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def record():
    import torch  # noqa: F401  (scripts import it; the thread count is torch's)

    rank = os.environ.get("RANK", "?")
    main = sys.modules["__main__"]
    loader = getattr(main, "__loader__", None)
    spec = getattr(main, "__spec__", None)
    script_dir = os.path.dirname(os.path.realpath(__file__))
    with multiprocessing.Pool(2) as pool:
        pool_result = pool.map(_from_pool, range(3))
    from multiprocessing import forkserver, resource_tracker

    reads = os.environ.get("PROBE_READ_STDIN") == rank and sys.stdin is not None
    stdin_line = sys.stdin.readline() if reads else None
    return {
        "torch_preloaded": TORCH_PRELOADED,
        "argv": sys.argv,
        "argv0_is_abs": os.path.isabs(sys.argv[0]),
        "path0": sys.path[0],
        "path_rest": [p for p in sys.path[1:] if "ddp_launch" not in p],
        "script_dir": script_dir,
        "cwd": os.getcwd(),
        "executable": sys.executable,
        "orig_argv": sys.orig_argv[1:],
        "flags": {
            k: getattr(sys.flags, k) for k in dir(sys.flags) if not k.startswith("_") and k not in ("count", "index")
        },
        "main": {
            "is_this_module": main is __main__ or getattr(main, "record", None) is record,
            "__name__": main.__name__,
            "__file__": getattr(main, "__file__", None),
            "__package__": getattr(main, "__package__", None),
            "__spec__": None if spec is None else {"name": spec.name, "origin": spec.origin},
            "__loader__": None if loader is None else type(loader).__name__,
            "__loader__.name": getattr(loader, "name", None),
            "__loader__.path": getattr(loader, "path", None),
            "__cached__": getattr(main, "__cached__", "unset"),
            "__builtins__": type(getattr(main, "__builtins__", None)).__name__,
        },
        "mp": {
            "start_method_allow_none": multiprocessing.get_start_method(allow_none=True),
            "start_method": multiprocessing.get_start_method(),
            "current_process": multiprocessing.current_process().name,
            "parent_process": None if multiprocessing.parent_process() is None else "set",
            "forkserver_address": forkserver._forkserver._forkserver_address,
            "forkserver_alive_fd": forkserver._forkserver._forkserver_alive_fd,
            "resource_tracker_fd": resource_tracker._resource_tracker._fd,
            "pool": pool_result,
        },
        "stdin": None
        if sys.stdin is None
        else {"kind": _fd_kind(0), "isatty": os.isatty(0), "line": stdin_line, **_stream(sys.stdin)},
        "stdout": _stream(sys.stdout),
        "stderr": _stream(sys.stderr),
        "same_std_objects": [sys.stdin is sys.__stdin__, sys.stdout is sys.__stdout__, sys.stderr is sys.__stderr__],
        "stdin_is_none": sys.stdin is None,
        "signals": _signals(),
        "blocked_signals": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "session_leader": os.getsid(0) == os.getpid(),
        "group_leader": os.getpgid(0) == os.getpid(),
        "torch_threads": __import__("torch").get_num_threads(),
        "omp_env": os.environ.get("OMP_NUM_THREADS"),
        "env": {
            k: os.environ.get(k)
            for k in (
                "RANK",
                "LOCAL_RANK",
                "WORLD_SIZE",
                "LOCAL_WORLD_SIZE",
                "GROUP_RANK",
                "GROUP_WORLD_SIZE",
                "ROLE_RANK",
                "ROLE_WORLD_SIZE",
                "ROLE_NAME",
                "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS",
                "TORCHELASTIC_SIGNALS_TO_HANDLE",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                "OMP_NUM_THREADS",
            )
        },
        "env_keys": sorted(os.environ),
        "annotations": {k: repr(v) for k, v in _annotated.__annotations__.items()},
        "devnull_fds": _devnull_fds(),
        "cmdline_has_script": "probe" in _cmdline(),
        "parent_is_forkserver": "forkserver" in _parent_cmdline(),
        "comm": _comm(),
        "umask": os.umask(os.umask(0o22)),
        "nice": os.nice(0),
        "affinity": sorted(os.sched_getaffinity(0)),
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "faulthandler": faulthandler.is_enabled(),
        "gc": [gc.isenabled(), gc.get_threshold()],
        "recursionlimit": sys.getrecursionlimit(),
        "switchinterval": sys.getswitchinterval(),
        "warnings_filters": [str(f[0]) + ":" + str(f[2].__name__) for f in warnings.filters],
        "main_thread_name": threading.main_thread().name,
        "dont_write_bytecode": sys.dont_write_bytecode,
    }


result = record()
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(result, f, indent=1, sort_keys=True, default=repr)
if os.fork() == 0:  # a script that forks: no gRPC output may follow
    os._exit(0)
os.wait()
_late_thread_marker()
print(f"probe rank {os.environ.get('RANK')} done")
