"""``streamlstm train | evaluate | import``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from streamlstm import Bundle
from streamlstm.errors import ConfigError

__all__ = ["main"]


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="CSV or Parquet file")
    parser.add_argument("--features", help="comma-separated input columns")
    parser.add_argument("--target", help="column to forecast (default: the first feature)")
    parser.add_argument("--time-column")
    parser.add_argument("--stream-column")


def _print_metrics(metrics: dict[str, object]) -> None:
    print(f"{'metric':<24} value")
    for key, value in metrics.items():
        print(f"{key:<24} {value:.6g}" if isinstance(value, float) else f"{key:<24} {value}")


def main(argv: Sequence[str]) -> int:
    command, rest = argv[0], list(argv[1:])
    if command == "train":
        return _train(rest)
    if command == "evaluate":
        return _evaluate(rest)
    raise ConfigError(
        "import: not available in this version; train with `streamlstm train` "
        "(see the issue tracker for the torch and Keras importers)"
    )


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamlstm train")
    _data_arguments(parser)
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--mode", choices=("stateful", "window"), default="stateful")
    for name, kind, default in (
        ("seq-len", int, 60),
        ("hidden-size", int, 128),
        ("num-layers", int, 2),
        ("dropout", float, 0.2),
        ("lr", float, 1e-3),
        ("batch-size", int, 32),
        ("epochs", int, 50),
        ("clip-norm", float, 1.0),
        ("patience", int, 10),
        ("horizon", int, 1),
        ("seed", int, 0),
    ):
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"(default {default})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--predictions-out", help="CSV of test-period predictions")
    args = parser.parse_args(argv)
    if not args.features:
        parser.error("--features is required")
    from training.data import read_table
    from training.train import TrainOptions, evaluate, prepare, train

    frame = read_table(args.data)
    opts = TrainOptions(
        features=tuple(args.features.split(",")),
        target=args.target,
        time_column=args.time_column,
        stream_column=args.stream_column,
        mode=args.mode,
        seq_len=args.seq_len,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        dropout=args.dropout,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        clip_norm=args.clip_norm,
        patience=args.patience,
        horizon=args.horizon,
        seed=args.seed,
        device=args.device,
    )
    bundle = train(frame, opts)
    bundle.name = args.out.rstrip("/").split("/")[-1]
    bundle.save(args.out)
    _print_metrics(bundle.metrics)
    if args.predictions_out:
        evaluate(bundle, prepare(frame, opts))[1].to_csv(args.predictions_out, index=False)
    print(f"saved {args.out}", file=sys.stderr)
    return 0


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamlstm evaluate")
    parser.add_argument("--model", required=True)
    _data_arguments(parser)
    parser.add_argument("--predictions-out")
    args = parser.parse_args(argv)
    from training.data import read_table
    from training.train import TrainOptions, evaluate, prepare

    bundle = Bundle.load(args.model)
    features = args.features.split(",") if args.features else list(bundle.feature_names)
    train_meta = bundle.training
    opts = TrainOptions(
        features=tuple(features),
        target=args.target or bundle.target_names[0],
        time_column=args.time_column,
        stream_column=args.stream_column,
        seq_len=int(train_meta.get("seq_len", 60)),
        horizon=int(train_meta.get("horizon", 1)),
    )
    metrics, frame = evaluate(bundle, prepare(read_table(args.data), opts))
    _print_metrics(metrics)
    if args.predictions_out:
        frame.to_csv(args.predictions_out, index=False)
    return 0
