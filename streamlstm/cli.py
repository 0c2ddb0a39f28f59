"""The ``streamlstm`` command: dispatches each subcommand to the package that owns it.

The daemon (``streamlstm.consumers``) and the training pipeline
(``streamlstm.training``) are imported only when their subcommand runs, so the
core never imports Kafka or asyncio code, and a base install (no training
extras) serves; a training command without its extra names the extra.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from streamlstm.errors import StreamLSTMError

__all__ = ["main"]

_TRAINING = "streamlstm.training.cli"
_DAEMON = "streamlstm.consumers.cli"
_DEVTOOLS = "streamlstm.consumers.devtools"

#: subcommand -> (module, one-line help); each module has ``main(argv) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (_TRAINING, "train a model on a CSV/Parquet file into a bundle directory"),
    "evaluate": (_TRAINING, "evaluate a bundle on a data file through the serving engine"),
    "import": (_TRAINING, "import a PyTorch state dict or a Keras 3 .keras model"),
    "serve": (_DAEMON, "run the Kafka inference daemon"),
    "streams": (
        f"{_DEVTOOLS}.streams",
        "look at, list, reset or delete streams (admin API, or a control record)",
    ),
    "produce": (f"{_DEVTOOLS}.replay", "replay a data file as ticks onto a topic"),
    "tail": (f"{_DEVTOOLS}.replay", "print messages from a topic as they arrive"),
    "broker": (f"{_DEVTOOLS}.brokers", "a local broker (Apache Kafka or Tansu) until Ctrl-C"),
    "demo": (f"{_DEVTOOLS}.demo", "broker, training, serving and replay, locally, in one command"),
    "bench": ("streamlstm.cli", "benchmarks: engine | kafka | cold"),
}


#: Packages that only an extra installs (a base install serves; it does not train).
EXTRAS = {
    "pandas": "train",
    "sklearn": "train",
    "matplotlib": "train",
    "tqdm": "train",
    "pyarrow": "train",
    "h5py": "keras",
}


def _usage() -> str:
    lines = ["usage: streamlstm COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "streamlstm COMMAND --help shows a command's options."]
    return "\n".join(lines)


def bench_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamlstm bench")
    sub = parser.add_subparsers(dest="target", required=True)
    engine = sub.add_parser(
        "engine", help="engine ticks/s against a plain nn.LSTM (GRU, RNN) and recompute"
    )
    engine.add_argument("--streams", default="1000,10000,100000", help="comma-separated counts")
    engine.add_argument("--batch", type=int, default=1024)
    engine.add_argument("--seconds", type=float, default=1.0, help="per timed block")
    engine.add_argument("--repeats", type=int, default=3, help="alternating blocks per count")
    engine.add_argument("--rss-streams", type=int, default=1_000_000, help="0 skips the RSS run")
    engine.add_argument("--json", action="store_true", help="print one JSON object")
    engine.add_argument("--model", help="bundle directory to bench (default: random weights)")
    engine.add_argument(
        "--cell",
        choices=("lstm", "gru", "rnn"),
        help="the random model's cell, its ceiling nn.LSTM, nn.GRU or nn.RNN (default lstm)",
    )
    engine.add_argument(
        "--rewarm-ticks",
        type=int,
        default=0,
        help="also time a model swap that re-warms every stream over its last K ticks",
    )
    sub.add_parser("kafka", help="end-to-end through a broker (see streamlstm bench kafka -h)")
    sub.add_parser(
        "restart",
        help="a restart's restore: local checkpoint against changelog (streamlstm bench "
        "restart -h)",
    )
    _cold_parser(sub)
    if argv and argv[0] == "kafka":
        return _run_module("streamlstm.consumers.devtools.bench", list(argv[1:]))
    if argv and argv[0] == "restart":
        return _run_module("streamlstm.consumers.devtools.bench_restart", list(argv[1:]))
    args = parser.parse_args(argv)
    if args.target == "cold":
        return _bench_cold(args)
    from streamlstm.bench import format_engine_bench, run_engine_bench

    counts = tuple(int(s) for s in args.streams.split(",") if s.strip())
    result = run_engine_bench(
        stream_counts=counts,
        batch=args.batch,
        seconds=args.seconds,
        repeats=args.repeats,
        rss_streams=args.rss_streams,
        model=args.model,
        cell=args.cell,
        rewarm_ticks=args.rewarm_ticks,
    )
    print(json.dumps(result) if args.json else format_engine_bench(result))
    return 0


def _cold_parser(sub: Any) -> None:
    cold = sub.add_parser("cold", help="the cold tier's store: rocksdict against lmdb")
    cold.add_argument("--keys", type=int, default=1_000_000, help="states written")
    cold.add_argument("--write-batch", type=int, default=5000, help="states per write batch")
    cold.add_argument("--read-batch", type=int, default=1000, help="keys per multi-get")
    cold.add_argument("--polls", type=int, default=200, help="multi-gets (and cycles) timed")
    cold.add_argument("--repeats", type=int, default=2, help="alternate runs of each backend")
    cold.add_argument("--dir", help="where the stores go (default: the temporary directory)")
    cold.add_argument("--json", action="store_true", help="print one JSON object")
    cold.add_argument(
        "--engine",
        action="store_true",
        help="instead: the engine with 10%% of its ticks from streams on disk, against all hot",
    )
    cold.add_argument("--hot", type=int, default=50_000, help="--engine: streams memory holds")
    cold.add_argument("--pool", type=int, default=200_000, help="--engine: streams beyond it")
    cold.add_argument(
        "--streams", type=int, help="--engine: streams in all (the pool: all but the hot set)"
    )
    cold.add_argument(
        "--max-streams", type=int, help="--engine: memory's room (the hot set: what it holds)"
    )
    cold.add_argument(
        "--sample", type=int, default=20, help="--engine: streams checked against the oracle"
    )
    cold.add_argument("--hidden", type=int, default=128, help="--engine: the LSTM's width")
    cold.add_argument("--layers", type=int, default=2, help="--engine: the LSTM's layers")
    cold.add_argument("--seconds", type=float, default=3.0, help="--engine: timed, per engine")


def _bench_cold(args: argparse.Namespace) -> int:
    from streamlstm.cold_bench import (
        format_cold_bench,
        format_engine_cold,
        run_cold_bench,
        run_engine_cold,
    )

    if args.engine:
        figures = run_engine_cold(
            hot=args.hot,
            pool=args.pool,
            directory=args.dir,
            streams=args.streams,
            max_streams=args.max_streams,
            sample=args.sample,
            hidden=args.hidden,
            layers=args.layers,
            seconds=args.seconds,
        )
        print(json.dumps(figures) if args.json else format_engine_cold(figures))
        return 0
    result = run_cold_bench(
        keys=args.keys,
        write_batch=args.write_batch,
        read_batch=args.read_batch,
        polls=args.polls,
        directory=args.dir,
        repeats=args.repeats,
    )
    print(json.dumps(result) if args.json else format_cold_bench(result))
    return 0


def _run_module(module_name: str, argv: list[str], command: str | None = None) -> int:
    module = importlib.import_module(module_name)
    entry: Callable[..., int] = module.main
    return entry(argv) if command is None else entry([command, *argv])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"streamlstm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        if command == "bench":
            return bench_main(rest)
        return _run_module(COMMANDS[command][0], rest, command)
    except StreamLSTMError as exc:
        print(f"streamlstm {command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"streamlstm {command}: error: {exc.name} is not installed; this command needs "
            f"the {extra} extra: pip install 'streamlstm[{extra}]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
