"""Prometheus metrics of a run (`--metrics-port`), read from the registry at scrape time.

Nothing is computed between scrapes: a custom collector turns the registry's snapshot into
metric families when Prometheus asks, so heartbeats cost the same with metrics on or off.
prometheus-client is an optional dependency (`pip install 'ddp-launch[metrics]'`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ddp_launch.registry import RankState, Registry


class _RunCollector:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._registry.snapshot()
        per_rank = {
            "step": GaugeMetricFamily("ddp_launch_rank_step", "Training step of the rank", labels=["rank"]),
            "rate": GaugeMetricFamily("ddp_launch_rank_steps_per_second", "Recent step rate", labels=["rank"]),
            "loss": GaugeMetricFamily("ddp_launch_rank_loss", "Last loss the rank reported", labels=["rank"]),
            "rss": GaugeMetricFamily("ddp_launch_rank_rss_bytes", "Resident memory of the worker", labels=["rank"]),
            "cpu": GaugeMetricFamily("ddp_launch_rank_cpu_percent", "CPU use of the worker", labels=["rank"]),
            "age": GaugeMetricFamily(
                "ddp_launch_rank_heartbeat_age_seconds", "Seconds since the last heartbeat", labels=["rank"]
            ),
            "straggler": GaugeMetricFamily("ddp_launch_rank_straggler", "1 when flagged a straggler", labels=["rank"]),
        }
        for r in snap.ranks:
            label = [str(r.rank)]
            per_rank["step"].add_metric(label, r.step)
            per_rank["rate"].add_metric(label, r.steps_per_s)
            if r.loss is not None:
                per_rank["loss"].add_metric(label, r.loss)
            per_rank["rss"].add_metric(label, r.rss_bytes)
            per_rank["cpu"].add_metric(label, r.cpu_percent)
            if r.heartbeat_age_s is not None:
                per_rank["age"].add_metric(label, r.heartbeat_age_s)
            per_rank["straggler"].add_metric(label, 1.0 if r.straggler else 0.0)
        yield from per_rank.values()
        by_state = GaugeMetricFamily("ddp_launch_ranks", "Ranks by state", labels=["state"])
        counts = Counter(r.state for r in snap.ranks)
        for state in RankState:
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state
        restarts = CounterMetricFamily("ddp_launch_restarts", "Restarts of the worker group so far")
        restarts.add_metric([], snap.generation)
        yield restarts
        world = GaugeMetricFamily("ddp_launch_world_size", "Ranks in the run")
        world.add_metric([], snap.world_size)
        yield world


class MetricsServer:
    """An HTTP endpoint serving the run's metrics; `stop()` shuts it down."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self._collectors = CollectorRegistry(auto_describe=False)
        self._collectors.register(_RunCollector(registry))
        self._server, self._thread = start_http_server(port, addr=host, registry=self._collectors)
        self.port = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
