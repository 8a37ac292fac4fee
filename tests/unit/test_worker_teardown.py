"""The worker's guard against torch's gloo teardown deadlock: once destroy_process_group()
has returned, the main thread lets go of the GIL, so that a thread that needs it from then
on (gloo's worker thread, freeing its last collective) gets it before the DDP model's
reducer can block on that thread with the GIL held.

Shown with the switch interval raised to 10 s: then the main thread hands the GIL over only
when it blocks, and a thread made ready by the destroy runs before the call returns or not
at all. The destroy itself is a stand-in that makes the waiting thread ready as its last act.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import pytest

dist = pytest.importorskip("torch.distributed")

from torch.distributed import distributed_c10d  # noqa: E402

from ddp_launch.run.worker import _yield_gil_after_destroy_process_group  # noqa: E402


def _waiter_ran_before_return(destroy_entry: Callable[[], None], ready: threading.Event) -> bool:
    ran = threading.Event()

    def waiter() -> None:
        ready.wait()
        ran.set()  # needs the GIL, which only a blocking main thread hands over

    t = threading.Thread(target=waiter, daemon=True)
    old = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        t.start()
        destroy_entry()
        got_it = ran.is_set()
    finally:
        sys.setswitchinterval(old)
    t.join(5)
    return got_it


@pytest.mark.timeout(60)
def test_after_destroy_process_group_a_thread_waiting_for_the_gil_gets_it(monkeypatch):
    calls: list[object] = []
    ready = threading.Event()

    def destroy(group=None) -> None:
        calls.append(group)
        ready.set()

    monkeypatch.setattr(distributed_c10d, "destroy_process_group", destroy)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)

    # Without the guard the thread made ready by the destroy does not run before it returns.
    assert not _waiter_ran_before_return(lambda: destroy("plain"), ready)

    ready.clear()
    _yield_gil_after_destroy_process_group()
    assert _waiter_ran_before_return(lambda: dist.destroy_process_group("guarded"), ready)
    assert calls == ["plain", "guarded"]  # the guard calls the real destroy, arguments and all
    assert distributed_c10d.destroy_process_group is dist.destroy_process_group
