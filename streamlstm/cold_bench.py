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
    return (
        f"engine, 2 x 128 LSTM, {r['hot']:,.0f} hot streams in room for {r['room']:,.0f}, "
        f"{r['cold_share']:.0%} of ticks from {r['pool']:,.0f} more: "
        f"{r['with_cold_ticks_per_s']:,.0f} ticks/s against "
        f"{r['all_hot_ticks_per_s']:,.0f} all hot ({ratio:.2f}x); "
        f"{r['ticks_read_from_disk']:.1%} of ticks read back from disk; "
        f"{r['streams_on_disk']:,.0f} streams on disk in {r['disk_bytes'] / 1e6:,.0f} MB"
    )


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
    for lo in range(0, len(ids), batch):
        part = ids[lo : lo + batch]
        engine.step(part, np.ones((len(part), 1), np.float32))


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


def run_engine_cold(
    *,
    hot: int = 50_000,
    pool: int = 200_000,
    cold_share: float = 0.1,
    batch: int = 1024,
    seconds: float = 3.0,
    directory: str | None = None,
) -> dict[str, float]:
    """The engine with a cold tier, ``cold_share`` of its ticks from a ``pool`` of
    streams that memory (room for ``hot``) cannot hold, against an engine without one
    stepping only its ``hot`` streams: ticks/s of each, timed alternately, and the
    share of ticks whose stream was read back from disk."""
    from streamlstm.bundle import Bundle
    from streamlstm.cold_tier import ColdConfig
    from streamlstm.config import ModelConfig
    from streamlstm.engine import Engine

    bundle = Bundle.random(ModelConfig(input_size=1), seed=0)  # 2 x 128 LSTM
    root = Path(tempfile.mkdtemp(prefix="cold-engine-", dir=directory))
    cold_n = int(batch * cold_share)
    # Room for the hot set and for the pool streams of two passes over it: a pool stream
    # read back then goes out before any hot one. With less, LRU meets its cyclic worst
    # case (the hot streams not yet ticked this pass are the least recently used, and
    # are evicted just before their tick) and nearly every tick is read from disk.
    room = hot + 2 * cold_n * -(-hot // (batch - cold_n))
    try:
        plain = Engine(bundle, max_streams=room)
        tiered = Engine(bundle, max_streams=room, cold=ColdConfig(directory=root))
        rng = np.random.default_rng(0)
        hot_ids = [f"h{i}" for i in range(hot)]
        pool_ids = [f"p{i}" for i in range(pool)]
        _fill(tiered, pool_ids, batch)  # the pool on disk first, then the hot set in memory
        _fill(tiered, hot_ids, batch)
        _fill(plain, hot_ids, batch)
        hot_passes = _Passes(hot_ids, rng)
        pool_passes = _Passes(pool_ids, rng)

        def batch_of(mixed: bool) -> list[str]:
            if not mixed:
                return hot_passes.take(batch)
            return hot_passes.take(batch - cold_n) + pool_passes.take(cold_n)

        x = np.ones((batch, 1), np.float32)
        rates: dict[str, list[float]] = {"all_hot": [], "with_cold": []}
        hits = ticks = 0
        for _ in range(3):
            for name, engine, mixed in (("all_hot", plain, False), ("with_cold", tiered, True)):
                before = tiered.stats.cold.hits if tiered.stats.cold else 0
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds / 3:
                    engine.step(batch_of(mixed), x)
                    done += batch
                rates[name].append(done / (time.perf_counter() - start))
                if mixed:
                    hits += (tiered.stats.cold.hits if tiered.stats.cold else 0) - before
                    ticks += done
        on_disk = tiered.stats.cold.streams if tiered.stats.cold else 0
        tiered.close()  # flushes: the bytes below are all on disk
        return {
            "hot": hot,
            "room": room,
            "pool": pool,
            "cold_share": cold_share,
            "all_hot_ticks_per_s": max(rates["all_hot"]),
            "with_cold_ticks_per_s": max(rates["with_cold"]),
            "ticks_read_from_disk": hits / max(ticks, 1),
            "disk_bytes": float(disk_bytes(root)),
            "streams_on_disk": float(on_disk),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
