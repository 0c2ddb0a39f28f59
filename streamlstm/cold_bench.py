"""``streamlstm bench cold``: RocksDB (``rocksdict``) against LMDB (``lmdb``) on the cold
tier's workload, in one run on the same values.

The workload is what the cold tier does (``cold_store.py``): values are real
state bytes (``encode_many``: a 2 x 128 LSTM's ``h`` and ``c``, float32, with
the header and model name, about 2.1 KB), keys stream ids of 16 bytes. Per
backend, in a fresh directory:

* fill: ``keys`` states written in batches of ``write_batch`` (evictions for room
  arrive in bursts);
* read: multi-gets of ``read_batch`` random present keys (the returning streams
  of one poll, one batched read);
* miss: multi-gets of ``read_batch`` absent keys (streams never seen: every new
  stream is looked for in the cold tier first);
* cycle: the tier's steady state, per poll: a multi-get of ``read_batch``
  returning streams, their delete, and as many new states written (the streams
  evicted to make room for them);
* delete: a tenth of the keys, in batches of ``write_batch``;
* disk: the bytes the directory takes on disk (allocated blocks, after a flush).

``run_engine_cold`` (``bench cold --engine``) times the engine itself with a
cold tier, a share of its ticks from streams on disk, against one stepping
only streams in memory.

The backends run ``repeats`` times, alternately (the machine is shared and
rates drift): each figure is the best of its repeats.

Both run without their durability machinery (RocksDB without its write-ahead
log, LMDB without syncs): the changelog is the durable copy. The machine's page
cache holds the whole set at these sizes, so reads are a memory-speed bound,
not a disk's; the figures compare the bindings' and engines' overheads.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamlstm.cold_store import disk_bytes, rocks_options
from streamlstm.errors import DependencyError
from streamlstm.stream_state import encode_many

__all__ = [
    "BACKENDS",
    "format_cold_bench",
    "format_engine_cold",
    "run_cold_bench",
    "run_engine_cold",
]

#: Both backends' packages (the bench needs at least one).
BACKENDS = ("rocksdict", "lmdb")
_LMDB_MAP = 1 << 40  # a terabyte of address space: LMDB's file grows as it is written


class _Kv(Protocol):
    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None: ...
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...
    def delete_many(self, keys: Sequence[bytes]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class _Rocks:
    """rocksdict with the cold store's options (``rocks_options``: raw mode, bytes in and
    out, no pickling; bloom filters; no compression), no write-ahead log."""

    def __init__(self, path: Path) -> None:
        rocksdict: Any = importlib.import_module("rocksdict")
        self._mod = rocksdict
        self._db = rocksdict.Rdict(str(path), rocks_options(rocksdict))
        self._write = rocksdict.WriteOptions()
        self._write.disable_wal = True

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        batch = self._mod.WriteBatch(raw_mode=True)
        for key, value in items:
            batch.put(key, value)
        self._db.write(batch, self._write)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        found: list[bytes | None] = self._db.get(list(keys))
        return found

    def delete_many(self, keys: Sequence[bytes]) -> None:
        batch = self._mod.WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key)
        self._db.write(batch, self._write)

    def flush(self) -> None:
        self._db.flush()

    def close(self) -> None:
        self._db.close()


class _Lmdb:
    """lmdb without syncs (``sync=False``, ``metasync=False``), one transaction a batch."""

    def __init__(self, path: Path) -> None:
        lmdb: Any = importlib.import_module("lmdb")
        self._env = lmdb.open(
            str(path), map_size=_LMDB_MAP, sync=False, metasync=False, readahead=False
        )

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        with self._env.begin(write=True) as txn:
            txn.cursor().putmulti(items)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._env.begin(buffers=False) as txn:
            return [txn.get(key) for key in keys]

    def delete_many(self, keys: Sequence[bytes]) -> None:
        with self._env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key)

    def flush(self) -> None:
        self._env.sync(True)

    def close(self) -> None:
        self._env.close()


_OPEN: dict[str, Callable[[Path], _Kv]] = {"rocksdict": _Rocks, "lmdb": _Lmdb}


def _values(count: int, rng: np.random.Generator) -> list[bytes]:
    """``count`` distinct states of a 2 x 128 LSTM as the changelog encodes them."""
    hidden = (128, 128)
    return encode_many(
        h=[rng.standard_normal((count, s)).astype(np.float32) for s in hidden],
        c=[rng.standard_normal((count, s)).astype(np.float32) for s in hidden],
        step=np.arange(count, dtype=np.int64),
        offset=np.arange(count, dtype=np.int64),
        last_seen=np.full(count, 1.7e9),
        extra=np.zeros((count, 0)),
        partition=np.zeros(count, dtype=np.int64),
        model="0123456789abcdef",
    )


def _key(i: int) -> bytes:
    return b"sensor-%09d" % i


def _bench_one(
    kv: _Kv, values: list[bytes], *, keys: int, write_batch: int, read_batch: int, polls: int
) -> dict[str, float]:
    rng = np.random.default_rng(1)
    pool = len(values)
    start = time.perf_counter()
    for lo in range(0, keys, write_batch):
        hi = min(lo + write_batch, keys)
        kv.put_many([(_key(i), values[i % pool]) for i in range(lo, hi)])
    kv.flush()
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(polls):
        got = kv.get_many([_key(i) for i in rng.integers(0, keys, read_batch).tolist()])
        assert all(v is not None for v in got)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(polls):  # new streams: looked up, not there
        got = kv.get_many([_key(i) for i in rng.integers(2 * keys, 4 * keys, read_batch).tolist()])
        assert all(v is None for v in got)
    miss_s = time.perf_counter() - start
    present = np.arange(keys)  # the cycle: returning streams out, as many evicted in
    next_key, start = keys, time.perf_counter()
    for _ in range(polls):
        picks = rng.choice(present.size, read_batch, replace=False)
        back = [_key(i) for i in present[picks].tolist()]
        assert all(v is not None for v in kv.get_many(back))
        kv.delete_many(back)
        fresh = np.arange(next_key, next_key + read_batch)
        kv.put_many([(_key(i), values[i % pool]) for i in fresh.tolist()])
        present[picks], next_key = fresh, next_key + read_batch
    cycle_s = time.perf_counter() - start
    gone = present[: keys // 10].tolist()
    start = time.perf_counter()
    for lo in range(0, len(gone), write_batch):
        kv.delete_many([_key(i) for i in gone[lo : lo + write_batch]])
    kv.flush()
    delete_s = time.perf_counter() - start
    return {
        "writes_per_s": keys / fill_s,
        "reads_per_s": polls * read_batch / read_s,
        "read_ms_per_batch": 1e3 * read_s / polls,
        "misses_per_s": polls * read_batch / miss_s,
        "cycle_returns_per_s": polls * read_batch / cycle_s,
        "cycle_ms_per_poll": 1e3 * cycle_s / polls,
        "deletes_per_s": len(gone) / delete_s,
    }


def run_cold_bench(
    *,
    keys: int = 1_000_000,
    write_batch: int = 5000,
    read_batch: int = 1000,
    polls: int = 200,
    backends: Sequence[str] = BACKENDS,
    directory: str | None = None,
    repeats: int = 2,
) -> dict[str, Any]:
    """Each installed backend of ``backends`` on the workload; figures per backend."""
    present = [b for b in backends if importlib.util.find_spec(b) is not None]
    if not present:
        raise DependencyError(
            "bench cold needs rocksdict or lmdb: pip install 'streamlstm[cold]' (rocksdict), "
            "pip install lmdb"
        )
    values = _values(min(keys, 20_000), np.random.default_rng(0))
    result: dict[str, Any] = {
        "keys": keys,
        "value_bytes": len(values[0]),
        "write_batch": write_batch,
        "read_batch": read_batch,
        "polls": polls,
        "repeats": repeats,
        "missing": [b for b in backends if b not in present],
        "backends": {},
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in present}
    for _ in range(repeats):
        for name in present:
            runs[name].append(
                _timed_run(name, values, directory, keys, write_batch, read_batch, polls)
            )
    for name, figures in runs.items():
        best = {
            k: (min if k.endswith(("ms_per_batch", "ms_per_poll")) else max)(f[k] for f in figures)
            for k in figures[0]
        }
        best["disk_bytes_per_key"] = best["disk_bytes"] / (keys - keys // 10)
        result["backends"][name] = {**best, "version": _version(name)}
    return result


def _timed_run(
    name: str,
    values: list[bytes],
    directory: str | None,
    keys: int,
    write_batch: int,
    read_batch: int,
    polls: int,
) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"cold-{name}-", dir=directory))
    try:
        kv = _OPEN[name](root / "db")
        figures = _bench_one(
            kv, values, keys=keys, write_batch=write_batch, read_batch=read_batch, polls=polls
        )
        kv.close()
        figures["disk_bytes"] = float(disk_bytes(root))
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def format_engine_cold(r: dict[str, float]) -> str:
    ratio = r["with_cold_ticks_per_s"] / r["all_hot_ticks_per_s"]
    lines = [
        f"engine, {r['layers']:.0f} x {r['hidden']:.0f} LSTM "
        f"({r['state_bytes']:,.0f} B a state), {r['streams']:,.0f} streams in room for "
        f"{r['room']:,.0f}: {r['hot']:,.0f} hot, {r['cold_share']:.0%} of ticks from "
        f"{r['pool']:,.0f} more",
        f"filled in {r['fill_s']:,.0f} s ({r['fill_streams_per_s']:,.0f} new streams/s)",
        f"{r['with_cold_ticks_per_s']:,.0f} ticks/s against {r['all_hot_ticks_per_s']:,.0f} "
        f"all hot ({ratio:.2f}x); {r['ticks_read_from_disk']:.1%} of ticks read back from disk "
        f"({r['device_read_bytes_per_tick']:,.0f} B a tick from the device)",
        f"{r['streams_on_disk']:,.0f} streams on disk in {r['disk_bytes'] / 1e9:,.2f} GB "
        f"({r['disk_bytes'] / max(r['streams_on_disk'], 1):,.0f} B a stream); "
        f"peak RSS {r['peak_rss_bytes'] / 2**30:,.1f} GiB",
    ]
    if r["sample"]:
        lines.append(
            f"oracle: {r['sample']:.0f} streams evicted and back from disk, "
            f"{r['sample_ticks']:.0f} ticks each, max |error| {r['sample_max_error']:.2e}"
        )
    return "\n".join(lines)


def format_cold_bench(result: dict[str, Any]) -> str:
    lines = [
        f"cold tier: {result['keys']:,} keys of {result['value_bytes']} B, writes in batches "
        f"of {result['write_batch']}, multi-gets of {result['read_batch']}, "
        f"{result['polls']} polls, best of {result['repeats']} alternate runs "
        f"(cpu count {os.cpu_count()})",
        f"{'backend':<18}{'writes/s':>11}{'reads/s':>11}{'ms/get':>8}"
        f"{'misses/s':>11}{'cycle/s':>10}{'ms/poll':>9}{'deletes/s':>11}{'disk B/key':>12}",
    ]
    for name, f in result["backends"].items():
        lines.append(
            f"{name + ' ' + f['version']:<18}{f['writes_per_s']:>11,.0f}{f['reads_per_s']:>11,.0f}"
            f"{f['read_ms_per_batch']:>8.2f}{f['misses_per_s']:>11,.0f}"
            f"{f['cycle_returns_per_s']:>10,.0f}"
            f"{f['cycle_ms_per_poll']:>9.2f}{f['deletes_per_s']:>11,.0f}"
            f"{f['disk_bytes_per_key']:>12,.0f}"
        )
    if result["missing"]:
        lines.append(f"not installed: {', '.join(result['missing'])}")
    return "\n".join(lines)


def _fill(engine: Any, ids: list[str], batch: int) -> None:
    x = np.ones((batch, 1), np.float32)
    for lo in range(0, len(ids), batch):
        part = ids[lo : lo + batch]
        engine.step(part, x[: len(part)])


class _Passes:
    """Shuffled passes over a set of streams: each once a pass, none twice in a take."""

    def __init__(self, ids: list[str], rng: np.random.Generator) -> None:
        self._ids = ids
        self._order = rng.permutation(len(ids))
        self._at = 0

    def take(self, count: int) -> list[str]:
        if self._at + count > self._order.size:
            self._at = 0
        picked = self._order[self._at : self._at + count].tolist()
        self._at += count
        return [self._ids[i] for i in picked]


class _Sample:
    """Streams checked against the oracle (``Bundle.predict_sequence``, torch's own cell):
    ``ticks`` ticks each before they are evicted to disk (``before``, first of all) and
    as many after they return (``after``, last of all)."""

    def __init__(self, count: int, ticks: int, rng: np.random.Generator) -> None:
        self.ids = [f"sample-{i}" for i in range(count)]
        self.ticks = ticks
        self._x = rng.normal(size=(2 * ticks, count, 1)).astype(np.float32)
        self._got: list[np.ndarray] = []

    def _step(self, engine: Any, rows: range) -> None:
        for t in rows:
            self._got.append(engine.step(self.ids, self._x[t]).predictions)

    def before(self, engine: Any) -> None:
        self._step(engine, range(self.ticks))

    def after(self, engine: Any) -> float:
        """The ticks after the return, checked: the largest error against the oracle.
        Raises if a sample stream was not read back from disk on its return."""
        hits = engine.stats.cold.hits
        self._step(engine, range(self.ticks, 2 * self.ticks))
        if engine.stats.cold.hits - hits != len(self.ids):
            raise AssertionError("a sample stream was not read back from disk")
        got = np.stack(self._got)  # [2 * ticks, count, outputs]
        error = 0.0
        for i in range(len(self.ids)):
            want = engine.bundle.predict_sequence(self._x[:, i])
            error = max(error, float(np.abs(got[:, i] - want).max()))
        return error


def _hot_for_room(room: int, batch: int, cold_n: int) -> int:
    """The largest hot set that ``room`` holds with the pool streams of two passes over it
    (``_room``'s inverse)."""
    hot = int(room / (1 + 2 * cold_n / (batch - cold_n)))
    while _room(hot, batch, cold_n) > room:
        hot -= 1
    return hot


def _room(hot: int, batch: int, cold_n: int) -> int:
    # Room for the hot set and for the pool streams of two passes over it: a pool stream
    # read back then goes out before any hot one. With less, LRU meets its cyclic worst
    # case (the hot streams not yet ticked this pass are the least recently used, and
    # are evicted just before their tick) and nearly every tick is read from disk.
    return hot + 2 * cold_n * -(-hot // (batch - cold_n))


def _timed(
    engines: dict[str, Any], batch_of: Callable[[bool], list[str]], batch: int, seconds: float
) -> tuple[dict[str, float], float, float]:
    """Ticks/s of each engine (``all_hot``, ``with_cold``), timed alternately, best of 3;
    the share of ``with_cold``'s ticks read back from disk; and the bytes the process
    read from the device (not the page cache) a tick while ``with_cold`` ran (its reads
    and RocksDB's compactions)."""
    x = np.ones((batch, 1), np.float32)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    cold = engines["with_cold"]
    hits = ticks = blocks = 0
    for _ in range(3):
        for name, engine in engines.items():
            mixed = name == "with_cold"
            before, inblock = cold.stats.cold.hits, _inblock()
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                engine.step(batch_of(mixed), x)
                done += batch
            rates[name].append(done / (time.perf_counter() - start))
            if mixed:
                hits += cold.stats.cold.hits - before
                blocks += _inblock() - inblock
                ticks += done
    rate = {name: max(r) for name, r in rates.items()}
    return rate, hits / max(ticks, 1), blocks * 512 / max(ticks, 1)


def _inblock() -> int:
    """Blocks of 512 B this process read from its devices so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_inblock


def run_engine_cold(
    *,
    hot: int = 50_000,
    pool: int = 200_000,
    cold_share: float = 0.1,
    batch: int = 1024,
    seconds: float = 3.0,
    directory: str | None = None,
    streams: int | None = None,
    max_streams: int | None = None,
    sample: int = 20,
    sample_ticks: int = 3,
    hidden: int = 128,
    layers: int = 2,
) -> dict[str, float]:
    """The engine with a cold tier, ``cold_share`` of its ticks from a ``pool`` of
    streams that memory (room for ``hot``) cannot hold, against an engine without one
    stepping only its ``hot`` streams: ticks/s of each, timed alternately, and the
    share of ticks whose stream was read back from disk. ``streams`` and
    ``max_streams`` instead: that many streams in all, in that room (the hot set the
    largest it holds, the rest the pool). ``sample`` streams are checked against the
    oracle (torch), with ticks before their eviction and after their return."""
    from streamlstm.bundle import Bundle
    from streamlstm.config import ModelConfig

    cold_n = int(batch * cold_share)
    if max_streams is not None:
        hot = _hot_for_room(max_streams, batch, cold_n)
    if streams is not None:
        pool = streams - hot - sample
    config = ModelConfig(input_size=1, hidden_sizes=(hidden,) * layers)
    bundle = Bundle.random(config, seed=0)
    room = _room(hot, batch, cold_n) if max_streams is None else max_streams
    if pool < room:
        raise ValueError(f"the pool ({pool:,}) must not fit in memory (room {room:,})")
    root = Path(tempfile.mkdtemp(prefix="cold-engine-", dir=directory))
    try:
        figures = _engine_run(bundle, root, hot, pool, room, cold_n, batch, seconds, sample)
        figures.update(hidden=hidden, layers=layers, cold_share=cold_share)
        figures.update(sample=sample, sample_ticks=sample_ticks if sample else 0)
        return figures
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _engine_run(
    bundle: Any,
    root: Path,
    hot: int,
    pool: int,
    room: int,
    cold_n: int,
    batch: int,
    seconds: float,
    sample: int,
) -> dict[str, float]:
    from streamlstm.cold_tier import ColdConfig
    from streamlstm.engine import Engine

    cold = ColdConfig(directory=root, max_disk_streams=max(pool + hot, 1))
    plain = Engine(bundle, max_streams=room)
    tiered = Engine(bundle, max_streams=room, cold=cold)
    rng = np.random.default_rng(0)
    checked = _Sample(sample, 3, rng)
    hot_ids = [f"h{i}" for i in range(hot)]
    pool_ids = [f"p{i}" for i in range(pool)]
    checked.before(tiered)  # first: the pool's fill moves them to disk
    start = time.perf_counter()
    _fill(tiered, pool_ids, batch)  # the pool on disk first, then the hot set in memory
    _fill(tiered, hot_ids, batch)
    fill_s = time.perf_counter() - start
    _fill(plain, hot_ids, batch)
    hot_passes = _Passes(hot_ids, rng)
    pool_passes = _Passes(pool_ids, rng)

    def batch_of(mixed: bool) -> list[str]:
        if not mixed:
            return hot_passes.take(batch)
        return hot_passes.take(batch - cold_n) + pool_passes.take(cold_n)

    engines = {"all_hot": plain, "with_cold": tiered}
    rates, share, device_read = _timed(engines, batch_of, batch, seconds)
    error = checked.after(tiered) if sample else 0.0
    on_disk = tiered.stats.cold.streams if tiered.stats.cold else 0
    state_bytes = len(tiered.store.snapshot(hot_ids[:1])[hot_ids[0]].to_bytes())
    tiered.close()  # flushes: the bytes below are all on disk
    return {
        "hot": hot,
        "room": room,
        "pool": pool,
        "streams": hot + pool + sample,
        "fill_s": fill_s,
        "fill_streams_per_s": (hot + pool) / fill_s,
        "all_hot_ticks_per_s": rates["all_hot"],
        "with_cold_ticks_per_s": rates["with_cold"],
        "ticks_read_from_disk": share,
        "device_read_bytes_per_tick": device_read,
        "disk_bytes": float(disk_bytes(root)),
        "streams_on_disk": float(on_disk),
        "sample_max_error": error,
        "state_bytes": float(state_bytes),
        "peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }
