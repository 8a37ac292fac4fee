"""The control plane under load: many simulated workers heartbeating against one master.

Three kinds of process:

* the master (``python -m benchmarks.control_plane serve``): a `ddp_launch.registry.Registry`
  served by a `ddp_launch.control.master.MasterServer`, exactly as the launcher builds them, alone in
  its process so that its CPU time and RSS can be read with psutil. The target is "on one
  core": besides its CPU %, the figure reports its CPU time per heartbeat and the rate that
  would fill one core. With BENCH_PIN=1 it is pinned to one CPU and the load to the others
  (off by default: on a shared machine a pinned master can sit on the busy CPU).
* load processes (``python -m benchmarks.control_plane load``): each simulates a few hundred
  workers with asyncio gRPC clients (no torch), one channel per worker as real workers
  have. Each worker registers, then does what a worker's heartbeat thread does: it opens
  one heartbeat stream and sends a heartbeat every 1/rate seconds on a fixed schedule (a
  late one is sent at once, never in a burst); one in every `ACK_EVERY_S` goes as an answered
  SendHeartbeat RPC instead. The latency is the round trip of those RPCs, measured while the
  streams load the master. One ticker per load process sends what is due every few
  milliseconds, so that the load, not the master, costs the least it can.
* this harness: starts them, opens the measured window at the same wall-clock time in every
  load process, reads the master's CPU time at both ends of the window, and kills them all
  by pid at the end.

There is no torchrun counterpart: torchrun's agent has no per-worker control channel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.stats import percentile

TOKEN_ENV = "BENCH_CONTROL_TOKEN"
WORKERS_PER_NODE = 64  # simulated nodes of 64 workers: registry slots (node_rank, local_rank)
RELAY_NODE_WORKERS = 8  # a relayed world: nodes of 8 workers (a node of 8 GPUs)
FAKE_PID_BASE = 1_000_000  # a distinct positive pid per simulated worker
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 3.0  # a process of the harness, its stdin closed, to end by itself
RPC_TIMEOUT_S = 5.0
MB = 1024 * 1024
TICK_S = 0.002  # how often a load process sends what is due
LAG_PROBE_S = 0.005  # how often the master's loop lag is sampled


@dataclass(frozen=True)
class LoadSettings:
    workers: int
    rate_hz: float
    warmup_s: float
    duration_s: float
    load_procs: int
    relayed: bool = False  # nodes of RELAY_NODE_WORKERS, their heartbeats relayed


def layout(workers: int, relayed: bool = False) -> tuple[int, int]:
    """(simulated nodes, workers per node) for `workers` registry slots."""
    per_node = RELAY_NODE_WORKERS if relayed else WORKERS_PER_NODE
    if relayed and (workers % per_node or workers < 2 * per_node):
        raise ValueError(f"a relayed world needs at least two nodes of {per_node} workers, not {workers}")
    if workers > per_node and workers % per_node == 0:
        return workers // per_node, per_node
    return 1, workers


# -- the master process ------------------------------------------------------------------


def serve(world_size: int, relayed: bool) -> None:
    """Serve a registry for `world_size` workers until stdin closes; print {"port": ...} first.

    Each line read from stdin is answered with {"t": wall time, "heartbeats": how many the
    registry has recorded so far, "loop_lag_ms": the master loop's lags since the last line}:
    the count the harness divides by the window, and how long a callback that was ready
    waited for the master's event loop (what the master itself adds to an RPC's latency,
    whatever the clients' own processes add).
    """
    from ddp_launch.control.master import MasterServer
    from ddp_launch.registry import Registry

    nnodes, local_world_size = layout(world_size, relayed)
    registry = Registry(
        run_id="bench-control-plane",
        nnodes=nnodes,
        local_world_size=local_world_size,
        max_restarts=0,
        ddp_addr="127.0.0.1",
    )
    recorded = 0
    record = registry.heartbeat

    def counted_heartbeat(**kwargs):
        # Called on the server's event loop only (every heartbeat RPC runs there): one writer.
        nonlocal recorded
        superseded = record(**kwargs)
        recorded += 1
        return superseded

    registry.heartbeat = counted_heartbeat  # type: ignore[method-assign]
    server = MasterServer(registry, os.environ[TOKEN_ENV], host="127.0.0.1", port=0)
    port = server.start()
    lags_ms: list[float] = []
    assert server._loop is not None
    asyncio.run_coroutine_threadsafe(_measure_loop_lag(lags_ms), server._loop)
    events_path = Path(tempfile.mkdtemp(prefix="bench-master-")) / "events.jsonl"
    stop = threading.Event()
    rounds = threading.Thread(target=_supervisor_rounds, args=(registry, events_path, stop), daemon=True)
    if os.environ.get("BENCH_NO_ROUNDS") != "1":  # to see the rounds' share of the latency
        rounds.start()
    try:
        print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
        for _ in sys.stdin:  # the harness closes our stdin (or dies) to stop us
            answer = {
                "t": time.time(),
                "heartbeats": recorded,
                "events_bytes": events_path.stat().st_size if events_path.exists() else 0,
                "loop_lag_ms": lags_ms[:],
            }
            lags_ms.clear()
            print(json.dumps(answer), flush=True)
    finally:
        stop.set()
        if rounds.is_alive():
            rounds.join(timeout=5)
        server.stop(0.2)
        shutil.rmtree(events_path.parent, ignore_errors=True)


async def _measure_loop_lag(lags_ms: list[float]) -> None:
    """Sleeps LAG_PROBE_S again and again on the master's loop; records how late it wakes."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PROBE_S
        await asyncio.sleep(LAG_PROBE_S)
        lags_ms.append((loop.time() - due) * 1e3)


def _supervisor_rounds(registry, events_path: Path, stop) -> None:
    """What the launcher's main thread does with the registry beside the master, at its
    pace for this world size: hang and straggler checks, then the snapshot that feeds the
    live view (a pipe here: its plain status line) and the event log."""
    from ddp_launch.config import RestartPolicy, RunConfig
    from ddp_launch.observe.events import EventLog
    from ddp_launch.observe.view import LiveView
    from ddp_launch.run.supervisor import round_interval_s

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    fraction, window_s = defaults["straggler_fraction"], defaults["straggler_window_s"]
    hang_timeout_s = RestartPolicy().hang_timeout_s
    with open(os.devnull, "w") as devnull:
        view = LiveView(devnull, enabled=True)
        events = EventLog(events_path, progress_interval_s=2.0)
        try:
            while not stop.wait(round_interval_s(registry.world_size)):
                registry.find_hung(hang_timeout_s)
                registry.update_stragglers(fraction, window_s)
                snap = registry.snapshot()
                view.update(snap)
                events.observe(snap)
        finally:
            view.close()
            events.close()


# -- a load process ----------------------------------------------------------------------


def serve_relay(master_address: str, node_rank: int, interval_s: float) -> None:
    """A node's real heartbeat relay (what a follower launcher runs) until stdin closes;
    prints {"port": ...} first, then answers each line with what it has forwarded."""
    from ddp_launch.control.relay import HeartbeatRelay

    relay = HeartbeatRelay(
        node_rank=node_rank, master_address=master_address, token=os.environ[TOKEN_ENV], interval_s=interval_s
    )
    port = relay.start()
    try:
        print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
        for _ in sys.stdin:
            print(json.dumps({"forwarded": relay.forwarded, "dropped": relay.dropped}), flush=True)
    finally:
        relay.stop()


async def _load(args: argparse.Namespace) -> dict:
    """Simulated workers. Each one's stream goes to --stream-address (the master, or its node's
    relay), or with --batches each simulated node sends what its relay would: one batch of
    its workers' heartbeats per interval. The answered heartbeats always go to the master."""
    import grpc

    from ddp_launch.control.heartbeat import ACK_EVERY_S
    from ddp_launch.control.wire import TOKEN_METADATA_KEY, channel_options
    from ddp_launch.proto import orchestrator_pb2 as pb
    from ddp_launch.proto import orchestrator_pb2_grpc as pb_grpc

    metadata = ((TOKEN_METADATA_KEY, os.environ[TOKEN_ENV]),)
    local_world_size = args.local_world_size
    ranks = list(range(args.first, args.first + args.count))
    nodes = sorted({rank // local_world_size for rank in ranks})
    channels = [grpc.aio.insecure_channel(args.address, options=channel_options()) for _ in ranks]
    stubs = [pb_grpc.OrchestratorStub(c) for c in channels]
    stream_address = args.stream_address or args.address
    if args.batches:  # one channel per simulated relay
        stream_channels = [grpc.aio.insecure_channel(args.address, options=channel_options()) for _ in nodes]
    elif stream_address != args.address:
        stream_channels = [grpc.aio.insecure_channel(stream_address, options=channel_options()) for _ in ranks]
    else:
        stream_channels = []
    stream_stubs = [pb_grpc.OrchestratorStub(c) for c in stream_channels] or stubs
    try:
        # Register, a few dozen at a time (as workers starting on many nodes would).
        register_latencies: list[float] = []
        gate = asyncio.Semaphore(64)

        async def register(stub, rank: int) -> None:
            request = pb.RegisterRequest(
                node_rank=rank // local_world_size,
                local_rank=rank % local_world_size,
                pid=FAKE_PID_BASE + rank,
                hostname=f"sim-{rank // local_world_size}",
                generation=0,
            )
            async with gate:
                t0 = time.perf_counter()
                await stub.Register(request, timeout=30.0, metadata=metadata, wait_for_ready=True)
                register_latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(register(s, r) for s, r in zip(stubs, ranks)))
        register_s = time.perf_counter() - t0
        print(json.dumps({"ready": True}), flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start_at = float(line)
        window = (start_at + args.warmup_s, start_at + args.warmup_s + args.duration_s)
        interval = 1.0 / args.rate_hz
        ack_every = max(1, round(ACK_EVERY_S * args.rate_hz))  # what a real worker asks for
        latencies: list[float] = []
        errors: dict[str, int] = {}
        sent = 0
        if args.batches:
            calls = [stub.StreamNodeHeartbeats(metadata=metadata) for stub in stream_stubs]
        else:
            calls = [stub.StreamHeartbeats(metadata=metadata) for stub in stream_stubs]
        answered: set[asyncio.Task] = set()

        async def answered_heartbeat(stub, request: pb.Heartbeat, begin_wall: float) -> None:
            begin = time.perf_counter()
            try:
                await stub.SendHeartbeat(request, timeout=RPC_TIMEOUT_S, metadata=metadata)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                return
            if window[0] <= begin_wall < window[1]:
                latencies.append(time.perf_counter() - begin)

        rng = random.Random(args.first)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        # A sender is a worker (its own stream) or, with --batches, a node (its relay's stream).
        if args.batches:
            senders = [[i for i, rank in enumerate(ranks) if rank // local_world_size == n] for n in nodes]
        else:
            senders = [[i] for i in range(len(ranks))]
        due = [t0 + rng.random() * interval for _ in senders]  # spread over the interval
        steps = [0] * len(ranks)
        cpu0 = psutil.Process().cpu_times()
        while time.time() < window[1]:
            now = time.perf_counter()
            now_wall = time.time()
            writes = []
            for s, members in enumerate(senders):
                if due[s] > now:
                    continue
                batch = []
                for i in members:
                    rank = ranks[i]
                    steps[i] += 1
                    step = steps[i]
                    request = pb.Heartbeat(
                        rank=rank,
                        generation=0,
                        pid=FAKE_PID_BASE + rank,
                        step=step,
                        samples=step * 64,
                        has_loss=True,
                        loss=1.0 / step,
                        total_steps=1_000_000,
                    )
                    # One in ack_every is an answered RPC to the master, at a phase of its own
                    # per worker (real workers start at different times), so that every
                    # second has some to time.
                    if (step + rank) % ack_every == 0:
                        task = asyncio.create_task(answered_heartbeat(stubs[i], request, now_wall))
                        answered.add(task)
                        task.add_done_callback(answered.discard)
                    else:
                        batch.append(request)
                    if window[0] <= now_wall < window[1]:
                        sent += 1
                if args.batches:
                    writes.append(calls[s].write(pb.HeartbeatBatch(node_rank=nodes[s], heartbeats=batch)))
                elif batch:
                    writes.append(calls[s].write(batch[0]))
                due[s] = max(due[s] + interval, now)
            results = await asyncio.gather(*writes, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    name = r.code().name if isinstance(r, grpc.aio.AioRpcError) else type(r).__name__
                    errors[name] = errors.get(name, 0) + 1
            await asyncio.sleep(TICK_S)
        cpu1 = psutil.Process().cpu_times()
        await asyncio.gather(*answered, return_exceptions=True)
        for call in calls:
            call.cancel()
        return {
            "ok": sent,
            "errors": errors,
            "latencies_us": [round(x * 1e6) for x in latencies],
            "register_s": register_s,
            "register_latencies_us": [round(x * 1e6) for x in register_latencies],
            "cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        }
    finally:
        for c in channels + stream_channels:
            await c.close()


# -- the harness -------------------------------------------------------------------------


def _read_json_line(proc: subprocess.Popen, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{what}: no answer within {timeout_s:.0f} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{what}: exited with code {proc.wait()}")
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)


def _kill(procs: list[subprocess.Popen]) -> None:
    """Stop the harness's processes: each one ends by itself once its stdin closes (the
    master then removes its temporary directory); whatever is left after STOP_GRACE_S is
    SIGKILLed, children included."""
    victims = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            victims += [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(Exception):
            if proc.stdin:
                proc.stdin.close()
    _, alive = psutil.wait_procs(victims, timeout=STOP_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                if stream:
                    stream.close()


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    """(master CPUs, load CPUs): one CPU for the master and the rest for the load, when there
    are at least two; else no pinning."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def _ask(proc: subprocess.Popen, what: str) -> dict:
    """One line to a serving process (the master, a relay), and its answer."""
    proc.stdin.write("\n")
    proc.stdin.flush()
    return _read_json_line(proc, 30.0, what)


def _heartbeats_seen(master: subprocess.Popen) -> tuple[float, int, int, list[float]]:
    """(when, how many heartbeats the master has recorded, the size of its event log, its
    loop's lags since the previous question)."""
    answer = _ask(master, "the master")
    return answer["t"], answer["heartbeats"], answer["events_bytes"], answer["loop_lag_ms"]


def _cpu_s(proc: subprocess.Popen | None) -> float:
    if proc is None:
        return 0.0
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


def measure(load: LoadSettings) -> dict:
    """Run the master and the load for one heartbeat rate; return the figure."""
    token = secrets.token_urlsafe(24)
    env = dict(os.environ, **{TOKEN_ENV: token})
    env.pop("OMP_NUM_THREADS", None)
    # GRPC_* variables of the caller (e.g. verbosity) would change what is measured.
    master_cpus, load_cpus = _cpus() if os.environ.get("BENCH_PIN") == "1" else (None, None)
    py = [sys.executable, "-m", "benchmarks.control_plane"]
    started: list[subprocess.Popen] = []
    try:
        master = subprocess.Popen(
            [*py, "serve", "--world-size", str(load.workers), *(["--relayed"] if load.relayed else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,
        )
        started.append(master)
        if master_cpus:
            os.sched_setaffinity(master.pid, master_cpus)
        port = _read_json_line(master, STARTUP_TIMEOUT_S, "the master")["port"]
        nnodes, local_world_size = layout(load.workers, load.relayed)
        address = f"127.0.0.1:{port}"
        relay = None
        # (first rank, count, extra arguments) of each load process.
        shares: list[tuple[int, int, list[str]]] = []
        if load.relayed:
            # Node 0's workers stream to the master (node 0 has no relay); node 1's go through
            # a real relay process; nodes 2.. are simulated relays, one batched stream each.
            relay = subprocess.Popen(
                [*py, "relay", "--master", address, "--node-rank", "1", "--interval-s", repr(1.0 / load.rate_hz)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, start_new_session=True,
            )  # fmt: skip
            started.append(relay)
            relay_port = _read_json_line(relay, STARTUP_TIMEOUT_S, "the relay")["port"]
            shares += [(0, local_world_size, []),
                       (local_world_size, local_world_size, ["--stream-address", f"127.0.0.1:{relay_port}"])]  # fmt: skip
            per_proc = -(-(nnodes - 2) // max(1, load.load_procs - 2)) * local_world_size
            shares += [(first, min(per_proc, load.workers - first), ["--batches"])
                       for first in range(2 * local_world_size, load.workers, per_proc)]  # fmt: skip
        else:
            per_proc = -(-load.workers // load.load_procs)
            shares = [(first, min(per_proc, load.workers - first), []) for first in range(0, load.workers, per_proc)]
        loaders = []
        for first, count, extra in shares:
            loader = subprocess.Popen(
                [*py, "load", "--address", address, "--first", str(first), "--count", str(count),
                 "--local-world-size", str(local_world_size), "--rate-hz", str(load.rate_hz),
                 "--warmup-s", str(load.warmup_s), "--duration-s", str(load.duration_s), *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, start_new_session=True,
            )  # fmt: skip
            started.append(loader)
            loaders.append(loader)
            if load_cpus:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(loader.pid, load_cpus)
        register_start = time.monotonic()
        for loader in loaders:
            _read_json_line(loader, STARTUP_TIMEOUT_S, "a load process")
        register_all_s = time.monotonic() - register_start
        start_at = time.time() + 0.3
        for loader in loaders:
            loader.stdin.write(f"{start_at!r}\n")
            loader.stdin.flush()
        mproc = psutil.Process(master.pid)
        window = (start_at + load.warmup_s, start_at + load.warmup_s + load.duration_s)
        time.sleep(max(0.0, window[0] - time.time()))
        c0 = mproc.cpu_times()
        r0 = _cpu_s(relay)
        t0, seen0, events0, _ = _heartbeats_seen(master)
        peak_rss = mproc.memory_info().rss
        while time.time() < window[1]:
            time.sleep(min(0.25, max(0.0, window[1] - time.time())))
            peak_rss = max(peak_rss, mproc.memory_info().rss)
        c1 = mproc.cpu_times()
        r1 = _cpu_s(relay)
        t1, seen1, events1, lags_ms = _heartbeats_seen(master)
        threads = mproc.num_threads()
        relayed = _ask(relay, "the relay")["forwarded"] if relay else None
        results = [
            _read_json_line(loader, load.duration_s + load.warmup_s + 30, "a load process") for loader in loaders
        ]
    finally:
        _kill(started)
    master_cpu_s = (c1.user + c1.system) - (c0.user + c0.system)
    latencies = sorted(x for r in results for x in r["latencies_us"])
    reg_latencies = sorted(x for r in results for x in r["register_latencies_us"])
    ok = sum(r["ok"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    per_s = (seen1 - seen0) / (t1 - t0)
    us_per_heartbeat = master_cpu_s * 1e6 / (seen1 - seen0) if seen1 > seen0 else None
    return {
        "workers": load.workers,
        "relayed": load.relayed,
        "nodes": nnodes,
        "relay_cpu_percent": 100 * (r1 - r0) / (t1 - t0) if relay else None,
        "relay_forwarded": relayed,
        "rate_hz": load.rate_hz,
        "offered_per_s": load.workers * load.rate_hz,
        "heartbeats_per_s": per_s,
        "sent_per_s": ok / load.duration_s,
        "p50_ms": (percentile(latencies, 50) or 0) / 1000 if latencies else None,
        "p99_ms": (percentile(latencies, 99) or 0) / 1000 if latencies else None,
        "max_ms": latencies[-1] / 1000 if latencies else None,
        "loop_lag_p99_ms": percentile(sorted(lags_ms), 99),
        "loop_lag_max_ms": max(lags_ms, default=None),
        "errors": errors,
        "master_cpu_percent": 100 * master_cpu_s / (t1 - t0),
        "master_rss_mb": peak_rss / MB,
        "master_threads": threads,
        "event_log_kb_per_min": (events1 - events0) / 1024 * 60 / (t1 - t0),
        "master_cpu_us_per_heartbeat": us_per_heartbeat,
        "one_core_capacity_per_s": 1e6 / us_per_heartbeat if us_per_heartbeat else None,
        "load_cpu_percent": 100 * sum(r["cpu_s"] for r in results) / (load.warmup_s + load.duration_s),
        "register_all_s": register_all_s,
        "register_p99_ms": (percentile(reg_latencies, 99) or 0) / 1000 if reg_latencies else None,
        "window_s": load.duration_s,
        "load_procs": len(results),
        "master_pinned_to_cpus": sorted(master_cpus) if master_cpus else None,
    }


def control_plane_figures(workers: int, rates: tuple[float, ...], relayed_rates: tuple[float, ...],
                          warmup_s: float, duration_s: float, load_procs: int, say) -> list[dict]:  # fmt: skip
    """One figure per rate with every worker streaming to the master (one node, or relays
    off), then one per relayed rate: nodes of 8 workers whose launchers relay their streams."""
    runs = [(rate, False) for rate in rates] + [(rate, True) for rate in relayed_rates]
    figures = []
    for rate, relayed in runs:
        nodes = f" on {workers // RELAY_NODE_WORKERS} nodes, relayed" if relayed else ""
        say(f"control plane: {workers} simulated workers{nodes} at {rate:g} Hz")
        figure = {
            "kind": "control_plane",
            "key": f"control_plane_{rate:g}hz" + ("_relayed" if relayed else ""),
            "title": f"control plane: {workers} simulated workers{nodes} heartbeating at {rate:g} Hz "
            "against one master",
            "target": ">= 10,000 heartbeats/s on one core, p99 RPC latency <= 50 ms",
            "note": "no torchrun counterpart (torchrun's agent has no per-worker control channel)",
            "torchrun": None,
        }
        try:
            settings = LoadSettings(workers, rate, warmup_s, duration_s, load_procs, relayed=relayed)
            figure["ddp_launch"] = measure(settings)
            figure["error"] = None
        except Exception as e:  # a figure that could not be measured is reported, not fatal
            figure["ddp_launch"] = None
            figure["error"] = f"{type(e).__name__}: {e}"
        figures.append(figure)
    return figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.control_plane")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--world-size", type=int, required=True)
    s.add_argument("--relayed", action="store_true", help="nodes of RELAY_NODE_WORKERS workers")
    r = sub.add_parser("relay")
    r.add_argument("--master", required=True)
    r.add_argument("--node-rank", type=int, required=True)
    r.add_argument("--interval-s", type=float, required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--address", required=True)
    lp.add_argument("--first", type=int, required=True)
    lp.add_argument("--count", type=int, required=True)
    lp.add_argument("--local-world-size", type=int, required=True)
    lp.add_argument("--rate-hz", type=float, required=True)
    lp.add_argument("--warmup-s", type=float, required=True)
    lp.add_argument("--duration-s", type=float, required=True)
    lp.add_argument("--stream-address", help="where the workers' streams go [default: --address]")
    lp.add_argument("--batches", action="store_true", help="each simulated node sends its relay's batches")
    args = p.parse_args(argv)
    if args.command == "serve":
        serve(args.world_size, args.relayed)
    elif args.command == "relay":
        serve_relay(args.master, args.node_rank, args.interval_s)
    else:
        result = asyncio.run(_load(args))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
