"""``streamlstm bench engine``: the engine beside baselines measured in the same run.

Figures are ratios against baselines timed alternately with the engine in
one process, because the machines are shared and absolute numbers drift:

* ceiling: a plain ``nn.LSTM`` (``nn.GRU``, ``nn.RNN``: the model's cell) + head
  on a ready batch, no state bookkeeping;
* tutorial: re-running the model over each stream's last 60 ticks, batch 1,
  for every tick (what most hand-written serving code does);
* roofline: the machine's sgemm peak (a 1024x1024 float32 product through
  NumPy's BLAS on all its threads, timed alternately too) divided by the
  model's FLOPs per tick (each layer's gate products, as many gates as its
  cell has, and the head's linears; the gates' elementwise work is not
  counted): the rate no implementation could pass.

The ceiling and the tutorial need torch (the ``train`` extra); without it
they are left out (``None``) and the engine is still timed against the roofline.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from streamlstm.bundle import Bundle
from streamlstm.config import ModelConfig, gate_count
from streamlstm.engine import Engine
from streamlstm.errors import ConfigError, DependencyError
from streamlstm.kernels import get_num_threads, native_available, step_name
from streamlstm.optional import require_torch
from streamlstm.outputs import OutputSpec
from streamlstm.quality import QualityConfig
from streamlstm.store import MAX_PAGE_SCAN
from streamlstm.weights import ModelWeights

__all__ = ["flops_per_tick", "raw_state_bytes", "run_engine_bench"]

TUTORIAL_WINDOW = 60


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _rate(fn: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * items / elapsed


def _ceiling(config: ModelConfig, batch: int) -> Callable[[], object] | None:
    """``nn.LSTM`` (``nn.GRU``, ``nn.RNN``: the config's cell) and the head on a ready
    batch (None without torch)."""
    try:
        torch = require_torch("the bench's torch ceiling")
    except DependencyError:
        return None
    nn = torch.nn
    module = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[config.cell]
    lstm = module(config.input_size, config.hidden_sizes[0], config.num_layers, batch_first=True)
    head = nn.Sequential(
        nn.Dropout(config.dropout),
        nn.Linear(config.hidden_sizes[0], config.head_sizes[0]),
        nn.ReLU(),
        nn.Linear(config.head_sizes[0], config.output_size),
    ).eval()
    lstm.eval()
    x = torch.randn(batch, 1, config.input_size)
    h = torch.randn(config.num_layers, batch, config.hidden_sizes[0]) * 0.1
    c = torch.randn(config.num_layers, batch, config.hidden_sizes[0]) * 0.1
    state = (h, c) if config.keeps_c else h

    def run() -> object:
        with torch.inference_mode():
            out, _ = lstm(x, state)
            return head(out)

    return run


def flops_per_tick(config: ModelConfig) -> int:
    """Multiply-add FLOPs (2 per MAC) of one tick: every layer's ``[GH, I + H]`` gate
    product (``G`` gates: 4 for an LSTM, 3 for a GRU, 1 for an RNN; a GRU's products
    may also multiply a few zero rows, not counted), then the head's linears."""
    flops, width = 0, config.input_size
    gates = gate_count(config.cell)
    for hidden in config.hidden_sizes:
        flops += 2 * gates * hidden * (width + hidden)
        width = hidden
    for size in (*config.head_sizes, config.output_size):
        flops += 2 * width * size
        width = size
    return flops


_GEMM = 1024


def _sgemm() -> Callable[[], object]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((_GEMM, _GEMM), dtype=np.float32)
    b = rng.standard_normal((_GEMM, _GEMM), dtype=np.float32)
    out = np.empty((_GEMM, _GEMM), dtype=np.float32)

    def run() -> object:
        return np.matmul(a, b, out=out)

    return run


def _tutorial_rate(bundle: Bundle, seconds: float) -> float | None:
    """Ticks/s of the recompute-the-window way, batch 1 (None without torch)."""
    try:
        torch = require_torch("the bench's tutorial baseline")
    except DependencyError:
        return None
    window = torch.randn(1, TUTORIAL_WINDOW, bundle.config.input_size)

    def one_tick() -> object:
        with torch.inference_mode():
            y, _ = bundle.model(window)
            return y[:, -1]

    return _rate(one_tick, 1, seconds)


def _median(values: Sequence[float], digits: int) -> float | None:
    """The median rounded to ``digits`` (an int for 0), None for no values (no torch)."""
    if not values:
        return None
    median = statistics.median(values)
    return round(median) if digits == 0 else round(median, digits)


def _tick_order(streams: int, count: int, order: str, rng: np.random.Generator) -> list[int]:
    """Stream indices of ``count`` ticks.

    ``shuffled``: every stream ticks once per pass, each pass in a fresh
    random order (streams of one rate, randomly interleaved); ``iid``: each
    tick's stream drawn independently (bursty: a stream often ticks twice in
    one batch, which costs the engine an extra recurrent round).
    """
    if order == "iid":
        return list(rng.integers(0, streams, count).tolist())
    out: list[int] = []
    while len(out) < count:
        out.extend(rng.permutation(streams).tolist())
    return out[:count]


def bench_bundle(seed: int = 0, cell: str = "lstm") -> Bundle:
    """The benches' model: the default shape of ``cell``, random weights, forecasting its
    one input (so the live quality figures are measured, as for a served forecaster:
    realized errors, persistence, input drift against the training statistics it carries)."""
    return Bundle.random(
        ModelConfig(input_size=1, cell=cell),
        seed=seed,
        outputs=OutputSpec(target_feature=0),
        training={"inputs": {"mean": [0.0], "std": [1.0]}},
    )


def _engine_run(
    bundle: Bundle,
    streams: int,
    batch: int,
    order: str,
    rng: np.random.Generator,
    quality: QualityConfig | None = None,
) -> tuple[Engine, Callable[[], object]]:
    engine = Engine(bundle, max_streams=streams, quality=quality)
    ids = [f"stream-{i}" for i in range(streams)]
    width = bundle.config.input_size
    for start in range(0, streams, batch):  # every stream active before timing
        chunk = ids[start : start + batch]
        engine.step(chunk, rng.standard_normal((len(chunk), width), dtype=np.float32))
    planned = 64
    ticks = _tick_order(streams, planned * batch, order, rng)
    batches = [
        (
            [ids[i] for i in ticks[b * batch : (b + 1) * batch]],
            rng.standard_normal((batch, width), dtype=np.float32),
        )
        for b in range(planned)
    ]
    position = [0]

    def one_batch() -> object:
        chosen, x = batches[position[0] % planned]
        position[0] += 1
        return engine.step(chosen, x)

    return engine, one_batch


def _alternately(
    blocks: dict[str, tuple[Callable[[], object], int] | None], repeats: int, seconds: float
) -> dict[str, list[float]]:
    """Each block's rate (items/s, a block being a call and the items it does), timed
    in turns ``repeats`` times; None leaves a block out."""
    rates: dict[str, list[float]] = {name: [] for name, b in blocks.items() if b is not None}
    for _ in range(repeats):
        for name, block in blocks.items():
            if block is not None:
                rates[name].append(_rate(block[0], block[1], seconds))
    return rates


def _streams_row(
    bundle: Bundle,
    streams: int,
    *,
    batch: int,
    repeats: int,
    seconds: float,
    rng: np.random.Generator,
    ceiling: Callable[[], object] | None,
    sgemm: Callable[[], object],
    tutorial: float | None,
) -> dict[str, Any]:
    """One row of ``run_engine_bench``: the engine at ``streams`` streams beside its
    baselines, timed in turns."""
    raw = raw_state_bytes(bundle.config)
    flops = flops_per_tick(bundle.config)
    _progress(f"{streams} streams: filling state, then timing engine and ceiling alternately")
    engine, one_batch = _engine_run(bundle, streams, batch, "shuffled", rng)
    _, bursty_batch = _engine_run(bundle, streams, batch, "iid", rng)
    _, plain_batch = _engine_run(
        bundle, streams, batch, "shuffled", rng, QualityConfig(enabled=False)
    )
    timed = _alternately(
        {
            "plain": (plain_batch, batch),
            # FLOP/s of the product: products/s x 2 N^3.
            "peak": (sgemm, 2 * _GEMM**3),
            "ceiling": None if ceiling is None else (ceiling, batch),
            "engine": (one_batch, batch),
            "iid": (bursty_batch, batch),
        },
        repeats,
        seconds,
    )
    engine_rates, bursty_rates, plain_rates = timed["engine"], timed["iid"], timed["plain"]
    ceiling_rates, peaks = timed.get("ceiling", []), timed["peak"]
    ratios = [e / c for e, c in zip(engine_rates, ceiling_rates, strict=False)]
    bursty_ratios = [e / c for e, c in zip(bursty_rates, ceiling_rates, strict=False)]
    per_stream = engine.store.memory_bytes() / max(1, len(engine.store))
    roofline = statistics.median(peaks) / flops
    reads = _read_costs(engine, seconds)
    step_ms = 1000.0 * batch / statistics.median(engine_rates)
    return {
        "streams": streams,
        "engine_ticks_per_s": round(statistics.median(engine_rates)),
        "ceiling_ticks_per_s": _median(ceiling_rates, 0),
        "engine_over_ceiling": _median(ratios, 3),
        "engine_over_tutorial": (
            None if tutorial is None else round(statistics.median(engine_rates) / tutorial, 1)
        ),
        "no_quality_ticks_per_s": round(statistics.median(plain_rates)),
        "engine_over_no_quality": _median(
            [e / p for e, p in zip(engine_rates, plain_rates, strict=True)], 3
        ),
        "iid_engine_ticks_per_s": round(statistics.median(bursty_rates)),
        "iid_engine_over_ceiling": _median(bursty_ratios, 3),
        "state_bytes_per_stream": round(per_stream),
        "state_over_raw": round(per_stream / raw, 3),
        "sgemm_gflops": round(statistics.median(peaks) / 1e9, 1),
        "roofline_ticks_per_s": round(roofline),
        "engine_over_roofline": round(statistics.median(engine_rates) / roofline, 3),
        "step_ms": round(step_ms, 3),
        "reads_ms": reads,
    }


def _read_costs(engine: Engine, seconds: float) -> dict[str, float]:
    """Milliseconds per admin read at this engine's size: the daemon's engine answers a
    read between two steps, so each delays the next step by that much."""
    store = engine.store
    some = store.stream_ids()[len(store) // 2]
    calls: dict[str, Callable[[], object]] = {
        "inspect": lambda: engine.inspect(some, include_state=True),
        "page": lambda: store.page(prefix="", limit=1000, cursor=0, max_scan=MAX_PAGE_SCAN),
        # No id matches: the page looks at every slot it may.
        "rare_page": lambda: store.page(
            prefix="\x7f", limit=1000, cursor=0, max_scan=MAX_PAGE_SCAN
        ),
        "counts": store.partition_counts,
    }
    return {name: round(1000.0 / _rate(fn, 1, seconds / 4), 3) for name, fn in calls.items()}


def run_engine_bench(
    *,
    stream_counts: Sequence[int] = (1_000, 10_000, 100_000),
    batch: int = 1024,
    seconds: float = 1.0,
    repeats: int = 3,
    rss_streams: int = 1_000_000,
    seed: int = 0,
    model: str | None = None,
    cell: str | None = None,
    rewarm_ticks: int = 0,
) -> dict[str, Any]:
    """Engine ticks/s of the default model's shape (random weights) of ``cell`` (LSTM
    where None), or of the bundle at ``model`` (its score and flag computed on every
    tick, as served; ``cell``, where given, must be the bundle's)."""
    bundle = Bundle.load(model) if model else bench_bundle(seed, cell or "lstm")
    config = bundle.config
    if cell is not None and cell != config.cell:
        raise ConfigError(f"cell: the bundle at {model} is a {config.cell.upper()}, not {cell}")
    rng = np.random.default_rng(seed)
    raw = raw_state_bytes(config)
    ceiling = _ceiling(config, batch)
    sgemm = _sgemm()
    flops = flops_per_tick(config)
    _progress("timing the tutorial-style recompute (60-tick window, batch 1)")
    tutorial = _tutorial_rate(bundle, seconds)
    rows = [
        _streams_row(
            bundle,
            streams,
            batch=batch,
            repeats=repeats,
            seconds=seconds,
            rng=rng,
            ceiling=ceiling,
            sgemm=sgemm,
            tutorial=tutorial,
        )
        for streams in stream_counts
    ]
    spec = bundle.outputs
    result: dict[str, Any] = {
        "model": config.to_dict(),
        "cell": config.cell,
        "bundle": model,
        "score": (
            None
            if spec.score_span is None
            else f"{len(spec.score_scale)} horizons"
            if spec.score_scale
            else "residual"
        ),
        "batch": batch,
        "threads": get_num_threads(),
        "recurrent_step": step_name(native_available()),
        "tutorial_ticks_per_s": None if tutorial is None else round(tutorial, 1),
        "raw_state_bytes_per_stream": raw,
        "flops_per_tick": flops,
        "results": rows,
    }
    if rewarm_ticks:
        result["rewarm"] = [_rewarm_row(bundle, n, rewarm_ticks, rng) for n in stream_counts]
    if rss_streams:
        _progress(f"peak RSS with {rss_streams} streams (separate process)")
        result["rss"] = _measure_rss(rss_streams, batch, config.cell)
    return result


def _rewarm_row(
    bundle: Bundle, streams: int, ticks: int, rng: np.random.Generator
) -> dict[str, Any]:
    """A swap to another model (random weights of the same shape) that re-warms every one
    of ``streams`` streams over its last ``ticks`` ticks: seconds, and the history's bytes."""
    _progress(f"re-warm of {streams:,} streams over {ticks} ticks")
    engine = Engine(bundle, max_streams=max(streams, 1), history_ticks=ticks)
    ids = [f"s{i}" for i in range(streams)]
    width = bundle.config.input_size
    for _ in range(ticks):  # every stream's ring full
        for start in range(0, streams, 65536):
            chunk = ids[start : start + 65536]
            engine.step(chunk, rng.normal(size=(len(chunk), width)).astype(np.float32))
    other = Bundle(config=bundle.config, weights=ModelWeights.random(bundle.config, 99))
    started = time.perf_counter()
    engine.swap_model(other, mode="rewarm")
    seconds = time.perf_counter() - started
    return {
        "streams": streams,
        "ticks": ticks,
        "seconds": round(seconds, 3),
        "ticks_per_s": round(streams * ticks / seconds),
        "history_bytes_per_stream": ticks * width * 4,
    }


def raw_state_bytes(config: ModelConfig) -> int:
    """Bytes of one stream's recurrent state, float32: ``h`` and ``c`` per LSTM layer,
    ``h`` alone per GRU or RNN layer."""
    return (2 if config.keeps_c else 1) * 4 * sum(config.hidden_sizes)


def _measure_rss(streams: int, batch: int, cell: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "streamlstm.bench", "rss", str(streams), str(batch), cell],
        check=True,
        capture_output=True,
        text=True,
    )
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


def _rss_child(streams: int, batch: int, cell: str) -> None:
    """Fill ``streams`` streams of the default model of ``cell``; print peak RSS as JSON."""
    config = ModelConfig(input_size=1, cell=cell)
    bundle = Bundle.random(config, seed=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine = Engine(bundle, max_streams=streams)
    rng = np.random.default_rng(0)
    for start in range(0, streams, batch):
        count = min(batch, streams - start)
        engine.step(
            [f"stream-{i}" for i in range(start, start + count)],
            rng.standard_normal((count, 1), dtype=np.float32),
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "streams": len(engine.store),
                "peak_rss_gib": round(peak / 2**30, 3),
                "rss_before_engine_gib": round(before / 2**30, 3),
                "state_bytes_per_stream": round(engine.store.memory_bytes() / len(engine.store)),
            }
        )
    )


def _fmt(value: float | None, spec: str, width: int = 0) -> str:
    """``value`` formatted by ``spec``, right-aligned in ``width``; "n/a" for None (no torch)."""
    text = "n/a" if value is None else format(value, spec)
    return text.rjust(width)


def format_engine_bench(result: dict[str, Any]) -> str:
    lines = [
        f"model: {result.get('cell', 'lstm').upper()}, input {result['model']['input_size']}, "
        f"hidden {result['model']['hidden_sizes']}, "
        f"head {result['model']['head_sizes']}; batch {result['batch']}; "
        f"threads {result['threads']}; recurrent step: {result['recurrent_step']}",
        f"bundle: {result.get('bundle') or 'random weights'}; anomaly score: "
        f"{result.get('score') or 'none'}",
        "tutorial recompute (60-tick window, batch 1): "
        f"{_fmt(result['tutorial_ticks_per_s'], ',.0f')} ticks/s",
        f"raw state bytes per stream ({'h+c' if result.get('cell', 'lstm') == 'lstm' else 'h'}): "
        f"{result['raw_state_bytes_per_stream']}; "
        f"{result['flops_per_tick']:,} FLOPs per tick (roofline: sgemm peak / that)",
        "ticks in shuffled passes over all streams; 'iid x ceil': each tick's stream drawn "
        "independently (bursty); 'x no-qual': over the engine without live quality figures",
        "",
        f"{'streams':>9} {'engine t/s':>12} {'ceiling t/s':>12} {'x ceiling':>10} "
        f"{'x tutorial':>11} {'iid x ceil':>11} {'B/stream':>9} {'x raw':>6} "
        f"{'GFLOP/s':>8} {'roofline':>10} {'x roof':>7} {'x no-qual':>10}",
    ]
    for row in result["results"]:
        lines.append(
            f"{row['streams']:>9,} {row['engine_ticks_per_s']:>12,} "
            f"{_fmt(row['ceiling_ticks_per_s'], ',', 12)} "
            f"{_fmt(row['engine_over_ceiling'], '.3f', 10)} "
            f"{_fmt(row['engine_over_tutorial'], '.1f', 11)} "
            f"{_fmt(row['iid_engine_over_ceiling'], '.3f', 11)} "
            f"{row['state_bytes_per_stream']:>9,} "
            f"{row['state_over_raw']:>6.3f} {row['sgemm_gflops']:>8.1f} "
            f"{row['roofline_ticks_per_s']:>10,} {row['engine_over_roofline']:>7.3f} "
            f"{_fmt(row.get('engine_over_no_quality'), '.3f', 10)}"
        )
    lines += ["", "admin reads, ms each (a read waits for a step and delays the next):"]
    for row in result["results"]:
        reads = row.get("reads_ms")
        if reads:
            lines.append(
                f"{row['streams']:>9,} streams: step of {result['batch']} ticks "
                f"{row['step_ms']:.2f}; inspect with state {reads['inspect']:.3f}, page of "
                f"1000 {reads['page']:.2f}, page no id matches {reads['rare_page']:.2f}, "
                f"partition counts {reads['counts']:.2f}"
            )
    for row in result.get("rewarm", []):
        lines.append(
            f"re-warm swap, {row['streams']:,} streams over their last {row['ticks']} ticks: "
            f"{row['seconds']:.2f} s ({row['ticks_per_s']:,} ticks/s); tick history "
            f"{row['history_bytes_per_stream']} bytes per stream"
        )
    if "rss" in result:
        rss = result["rss"]
        lines += [
            "",
            f"{rss['streams']:,} streams: peak RSS {rss['peak_rss_gib']:.2f} GiB "
            f"(process before engine {rss['rss_before_engine_gib']:.2f} GiB), "
            f"{rss['state_bytes_per_stream']} state bytes per stream",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "rss":
        _rss_child(
            int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else "lstm"
        )
    else:
        sys.exit("usage: python -m streamlstm.bench rss STREAMS BATCH [CELL]")
