"""``bench kafka``'s helpers: the passthrough engine, CPU per tick of each process (from
/proc), the mean step, and the report."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from streamlstm import Bundle, EngineStats, StepResult
from streamlstm.consumers.engine.process import EngineFactory
from streamlstm.consumers.engine.protocol import (
    Change,
    CheckpointedReply,
    CountsReply,
    InspectStream,
    ListStreams,
    LocalReply,
    LocalRestore,
    PageReply,
    Read,
    ReadReply,
    RestoreReport,
    StepReply,
    StepRequest,
    StreamReply,
    SwapModel,
    SwapReply,
)
from streamlstm.consumers.engine.spool import Spool
from streamlstm.consumers.settings import ServeConfig

__all__ = [
    "Passthrough",
    "Watched",
    "broker_pids",
    "cpu_per_tick",
    "cpu_seconds",
    "mean_step",
    "report",
]


class Passthrough:
    """An engine client that answers each tick with its own values: no inference, no child.

    The daemon's loop, batching, encoding and producing stay the same.
    """

    def __init__(self, bundle: Bundle, config: ServeConfig, shadow: Bundle | None = None) -> None:
        self._outputs = bundle.config.output_size
        self.stats: EngineStats | None = None

    @property
    def alive(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        return None

    async def start(self) -> EngineStats:
        self.stats = EngineStats(0, 0, 0, 0, 0, 0, 0, {})
        return self.stats

    async def step(self, request: StepRequest) -> StepReply:
        n = len(request.stream_ids)
        values = np.asarray(request.features, dtype=np.float32)[:, : self._outputs]
        ones = np.ones(n, dtype=bool)
        assert self.stats is not None
        return StepReply(StepResult(values, np.ones(n, np.int64), ones, ones), self.stats, 0.0)

    async def drop_partitions(self, partitions: Sequence[int]) -> int:
        return 0

    async def checkpoint(self) -> list[Change]:
        return []

    async def read(self, query: Read) -> ReadReply:
        # It holds no stream: every read finds none.
        if isinstance(query, InspectStream):
            return StreamReply(None, {})
        if isinstance(query, ListStreams):
            return PageReply([], -1, {})
        return CountsReply({}, {})

    async def swap_model(self, request: SwapModel) -> SwapReply:
        assert self.stats is not None
        return SwapReply(request.model_id, 0, 0.0, self.stats)

    async def reserve(self, streams: int) -> None:
        return None

    async def restore(
        self,
        partition: int,
        states: dict[str, bytes],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        return RestoreReport(0, 0, 0, 0, 0)  # holds no state: --state memory only

    def spool(self, expected_records: int) -> Spool:
        return Spool(expected_records)

    async def restore_spooled(
        self,
        partition: int,
        spool: Spool,
        rows: dict[str, int],
        policy: str,
        local: LocalRestore | None = None,
    ) -> RestoreReport:
        return RestoreReport(0, 0, 0, 0, 0)

    async def open_local(self, partitions: Sequence[int]) -> LocalReply:
        return LocalReply({}, {p: "off" for p in partitions})

    async def checkpointed(self, offsets: dict[int, int]) -> CheckpointedReply:
        return CheckpointedReply(0, 0, 0, 0.0)

    def kill(self) -> None:
        return None

    async def close(self, timeout_s: float = 10.0) -> None:
        return None


class Watched:
    """An engine factory that remembers the engine it made (for the child's pid)."""

    def __init__(self, factory: EngineFactory) -> None:
        self.factory = factory
        self.engine: Any = None

    def __call__(self, bundle: Bundle, config: ServeConfig, shadow: Bundle | None = None) -> Any:
        self.engine = self.factory(bundle, config, shadow)
        return self.engine

    def pids(self, others: dict[str, list[int]]) -> dict[str, list[int]]:
        child = getattr(self.engine, "pid", 0)
        return {
            "daemon_parent": [os.getpid()],
            **({"engine_child": [child]} if child else {}),
            **others,
        }


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` from /proc (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


def cpu_per_tick(
    before: dict[str, float], pids: dict[str, list[int]], ticks: int
) -> dict[str, float]:
    """CPU µs per tick of each process since ``before``."""
    return {
        name: round((cpu_seconds(group) - before[name]) * 1e6 / max(ticks, 1), 2)
        for name, group in pids.items()
        if name in before
    }


def mean_step(registry: CollectorRegistry) -> float:
    """Ticks per engine step so far, from a daemon's ``streamlstm_batch_size`` histogram."""
    total = registry.get_sample_value("streamlstm_batch_size_sum") or 0.0
    count = registry.get_sample_value("streamlstm_batch_size_count") or 0.0
    return round(total / count, 1) if count else 0.0


def broker_pids(broker: Any, bootstrap: str) -> list[int]:
    """The broker's processes: those of the local broker started, else those listening on
    the bootstrap ports on this machine (none for a remote broker)."""
    if broker is None:
        ports = {int(a.rsplit(":", 1)[1]) for a in bootstrap.split(",") if ":" in a}
        return _listening(ports)
    if hasattr(broker, "node_pids"):  # Apache Kafka: a JVM a node
        return [pid for pid in broker.node_pids.values() if pid]
    proc = getattr(broker, "_proc", None)  # Tansu: one process
    return [proc.pid] if proc is not None else []


def _listening(ports: set[int]) -> list[int]:
    """Pids of this machine's processes with a listening TCP socket on one of ``ports``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        for row in rows:  # local address "ADDR:PORT" in hex, state 0A is LISTEN
            if row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) in ports:
                inodes.add(f"socket:[{row[9]}]")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in fds):
                pids.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _cpu_line(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {us:.2f}" for name, us in cpu.items())


def report(result: dict[str, Any], drains: int) -> str:
    lines = [
        f"{result['streams']:,} streams, {result['ticks']:,} ticks, batches of "
        f"{result['max_records']}, {result['cpu_cores']} CPU cores shared by the daemon, "
        f"the broker ({result['broker']}) and the load generator",
        f"best of {drains} drains of the filled topic each (CPU us per tick of each process):",
    ]
    target = result.get("latency_target_ms")
    for name, label in (
        ("passthrough", "passthrough (no inference)"),
        ("engine", "engine end to end"),
        ("engine_no_quality", "engine without live quality figures (--quality-metrics off)"),
        ("engine_target", f"engine, --latency-target-ms {target:g}" if target else ""),
        ("durable", "durable state, at-least-once (1 s checkpoints)"),
        ("exactly_once", "durable state, exactly-once (1 s transactions)"),
    ):
        if f"{name}_ticks_per_s" not in result:
            continue
        ratio = {
            "engine": f" ({result['engine_over_passthrough']:.3f} x passthrough, "
            f"{result['engine_over_engine_no_quality']:.3f} x without quality)",
            "engine_target": f" ({result.get('engine_target_over_engine', 0):.3f} x fixed)",
            "durable": f" ({result['durable_over_engine']:.3f} x memory-only)",
            "exactly_once": f" ({result['exactly_once_over_engine']:.3f} x memory-only)",
        }.get(name, "")
        lines.append(f"  {label}: {result[f'{name}_ticks_per_s']:,} ticks/s{ratio}")
        lines.append(f"    CPU: {_cpu_line(result['drain_cpu_us_per_tick'][name])}")
    if "restore_seconds" in result:
        lines.append(
            f"restore: {result['restored_streams']:,} streams in {result['restore_seconds']} s "
            f"({result['restore_streams_per_s']:,} streams/s)"
        )
    asked = "half max" if result["latency_rate_is_half_max"] else "--latency-rate"
    for label, what in (("", asked), ("half_max_", "half max")):
        if f"{label}engine_latency" in result:
            lines += _latency_lines(result, label, what)
    if target:
        lines += _target_lines(result, target)
    return "\n".join(lines)


def _latency_lines(result: dict[str, Any], label: str, what: str) -> list[str]:
    """The latency runs of one rate (keys prefixed ``label``), each kind's and the transport's."""
    lat = result[f"{label}engine_latency"]
    lines = [
        f"latency at {lat['rate_ticks_per_s']:,.0f} ticks/s ({what}, after a "
        f"{lat['warmup_s']:.0f} s warm-up): event time to ack / daemon-added (receipt to ack)"
    ]
    for name in ("engine", "engine_target", "passthrough"):
        if f"{label}{name}_latency" not in result:
            continue
        r = result[f"{label}{name}_latency"]
        lines.append(
            f"  {name.replace('_', ', ')}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms / daemon "
            f"p50 {r['daemon_p50_ms']} ms, p99 {r['daemon_p99_ms']} ms over {r['ticks']:,} "
            f"ticks, {r['mean_step_ticks']:g} a step"
        )
        lines.append(
            f"    CPU: {_cpu_line(r['cpu_us_per_tick'])}; "
            f"{r['cores_busy']:.2f} of {result['cpu_cores']} cores busy"
        )
    wire = result[f"{label}transport_latency"]
    lines.append(
        f"  transport (generator -> broker -> consumer, no daemon): p50 {wire['p50_ms']} ms, "
        f"p99 {wire['p99_ms']} ms over {wire['ticks']:,} ticks"
    )
    return lines


def _ratio(new: float, old: float) -> str:
    return f"{new / old:.2f} x" if old else "n/a"


def _target_lines(result: dict[str, Any], target: float) -> list[str]:
    """``--latency-target-ms``: the targeted engine beside the fixed polls, figure by figure."""
    fixed, sized = result["engine_ticks_per_s"], result["engine_target_ticks_per_s"]
    lines = [
        f"--latency-target-ms {target:g} against fixed polls of {result['max_records']} "
        "(targeted / fixed):",
        f"  maximum: {sized:,} / {fixed:,} ticks/s ({_ratio(sized, fixed)})",
    ]
    for label in ("", "half_max_"):
        if f"{label}engine_target_latency" not in result:
            continue
        a, b = result[f"{label}engine_target_latency"], result[f"{label}engine_latency"]
        lines.append(
            f"  at {a['rate_ticks_per_s']:,.0f} ticks/s: daemon-added p99 {a['daemon_p99_ms']} / "
            f"{b['daemon_p99_ms']} ms ({_ratio(a['daemon_p99_ms'], b['daemon_p99_ms'])}), end to "
            f"end p99 {a['p99_ms']} / {b['p99_ms']} ms ({_ratio(a['p99_ms'], b['p99_ms'])}), "
            f"{a['mean_step_ticks']:g} / {b['mean_step_ticks']:g} ticks a step"
        )
    return lines
