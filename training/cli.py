"""``streamlstm train | evaluate | import``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from streamlstm import Bundle
from streamlstm.errors import ConfigError

if TYPE_CHECKING:
    from streamlstm.training.importers import ScalerSource

__all__ = ["main"]


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="CSV or Parquet file")
    parser.add_argument("--features", help="comma-separated input columns")
    parser.add_argument("--target", help="column to forecast (default: the first feature)")
    parser.add_argument("--time-column", help="sort by this column; gaps and duplicates are errors")
    parser.add_argument("--stream-column", help="one series per value of this column")
    parser.add_argument(
        "--label-column",
        help="classify: the class of each tick; forecast: 0/1 anomaly labels for the score's "
        "ROC AUC",
    )
    parser.add_argument("--season", type=int, help="also compare with seasonal persistence")
    parser.add_argument(
        "--max-gap-factor",
        type=float,
        default=5.0,
        help="a time step longer than this many median steps is an error (5)",
    )
    parser.add_argument("--allow-gaps", action="store_true", help="do not check for time gaps")
    parser.add_argument(
        "--missing",
        choices=("error", "interpolate", "ffill", "drop"),
        default="error",
        help="what to do with empty cells (error)",
    )
    parser.add_argument("--predictions-out", help="CSV of test-period predictions")
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=0.8,
        help="leading fraction of each stream to train on; the rest is the test period (0.8)",
    )


def _print_metrics(metrics: Mapping[str, object], prefix: str = "") -> None:
    """One line per figure; a horizon's figures (``horizons``) as ``h6_mae`` and so on,
    after the model's own horizon's (printed once, at the top level)."""
    if not prefix:
        print(f"{'metric':<28} value")
    for key, value in metrics.items():
        if key == "horizons" and isinstance(value, Mapping):
            for h, figures in list(value.items())[1:]:
                _print_metrics(figures, f"h{h}_")
            continue
        key = prefix + key
        print(f"{key:<28} {value:.6g}" if isinstance(value, float) else f"{key:<28} {value}")


def main(argv: Sequence[str]) -> int:
    command, rest = argv[0], list(argv[1:])
    if command == "train":
        return _train(rest)
    if command == "evaluate":
        return _evaluate(rest)
    return _import(rest)


def _floats(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from exc


#: ``import``'s frameworks that read one file, and what each takes.
_FILE_IMPORTS = (
    ("keras", "a Keras 3 .keras file of LSTM, GRU or SimpleRNN layers then Dense layers"),
    ("onnx", "an ONNX file of LSTM, GRU or RNN nodes then a linear head (torch.onnx.export)"),
    ("darts", "a darts RNNModel's Lightning checkpoint (model.pt.ckpt; never the pickled .pt)"),
)


def _import(argv: list[str]) -> int:
    args = _import_parser().parse_args(argv)
    from streamlstm.training.importers import ScalerSource

    scaler = ScalerSource(
        features=tuple(args.features.split(",")) if args.features else (),
        target=args.target,
        data=args.scaler_data,
        fit_fraction=args.scaler_fit_fraction,
        feature_min=_floats(args.feature_min),
        feature_max=_floats(args.feature_max),
        target_min=args.target_min,
        target_max=args.target_max,
    )
    bundle = _imported(args, scaler)
    bundle.save(args.out)
    config = bundle.config
    print(
        f"imported {args.framework} model: input {config.input_size}, {config.cell.upper()} "
        f"{list(config.hidden_sizes)}, head {list(config.head_sizes)} -> {config.output_size} "
        f"({bundle.outputs.activation}); scaling: "
        f"{'affine' if bundle.input_scaler else 'none'}; saved {args.out}"
    )
    return 0


def _imported(args: argparse.Namespace, scaler: ScalerSource) -> Bundle:
    """The bundle ``args`` names, read by its framework's importer."""
    if args.framework == "torch":
        from streamlstm.training.importers import import_torch

        return import_torch(
            args.state_dict,
            scaler=scaler,
            rnn_prefix=args.rnn_prefix,
            head_prefix=args.head_prefix,
            head_activation=args.head_activation,
            name=args.name,
            cell=args.cell,
        )
    if args.framework == "keras":
        from streamlstm.training.keras_import import import_keras

        return import_keras(args.file, scaler=scaler, name=args.name)
    if args.framework == "onnx":
        from streamlstm.training.onnx_import import import_onnx

        return import_onnx(args.file, scaler=scaler, name=args.name)
    from streamlstm.training.darts_import import import_darts

    return import_darts(args.file, scaler=scaler, name=args.name)


def _import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamlstm import",
        description="Turn a model trained with PyTorch, Keras, darts (or exported to ONNX) "
        "into a bundle the engine serves.",
    )
    sub = parser.add_subparsers(dest="framework", required=True)
    parsers = [_torch_import_arguments(sub)]
    for framework, what in _FILE_IMPORTS:
        parsers.append(sub.add_parser(framework, help=what))
        parsers[-1].add_argument("file", help=what.split(" of ")[0].split(" (")[0])
    for p in parsers:
        p.add_argument("--out", required=True, help="bundle directory to write")
        p.add_argument("--name", help="model name (default: the file name)")
        group = p.add_argument_group(
            "scaling",
            "MinMax scaling the model was trained with (default: none); darts: the target(s) "
            "then the covariates",
        )
        group.add_argument("--features", help="comma-separated input column names")
        group.add_argument("--target", help="target column (default: the first feature)")
        group.add_argument("--scaler-data", help="CSV/Parquet to fit the scaler on")
        group.add_argument(
            "--scaler-fit-fraction",
            type=float,
            default=1.0,
            help="fit on this leading fraction of --scaler-data's rows (1.0)",
        )
        group.add_argument("--feature-min", help="comma-separated minimum per feature")
        group.add_argument("--feature-max", help="comma-separated maximum per feature")
        group.add_argument("--target-min", type=float)
        group.add_argument("--target-max", type=float)
    return parser


def _torch_import_arguments(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """``import torch``'s own options."""
    torch_p: argparse.ArgumentParser = sub.add_parser(
        "torch", help="a state_dict of an nn.LSTM (nn.GRU, nn.RNN) `lstm` + Linear head `fc`"
    )
    torch_p.add_argument("--state-dict", required=True, help=".pth file (read weights_only)")
    torch_p.add_argument(
        "--rnn-prefix",
        "--lstm-prefix",  # its older name
        dest="rnn_prefix",
        help="name of the nn.LSTM, nn.GRU or nn.RNN (default: the first of lstm, gru, rnn)",
    )
    torch_p.add_argument(
        "--cell",
        default="auto",
        choices=("auto", "lstm", "gru", "rnn"),
        help="the recurrent cell (auto: read from the weights' shapes; an nn.RNN must be tanh)",
    )
    torch_p.add_argument("--head-prefix", default="fc", help="name of the head (fc)")
    torch_p.add_argument(
        "--head-activation",
        default="relu",
        choices=("relu", "tanh", "sigmoid", "linear"),
        help="activation between the head's Linear layers (relu)",
    )
    return torch_p


def _score_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("anomaly score")
    group.add_argument(
        "--score",
        choices=("auto", "residual", "horizons"),
        default="auto",
        help="horizons: forecast the next --score-horizons values and judge each tick by all "
        "forecasts made for it; residual: the one-step residual's EW z-score; auto (default): "
        "horizons with --label-column, else residual",
    )
    group.add_argument(
        "--score-horizons", type=int, default=32, help="forecasts judging each tick (32)"
    )
    group.add_argument(
        "--score-span",
        type=int,
        help="ticks the score is smoothed over (default: horizons: 1.5 x the series' "
        "dominant period, measured on the training part; residual: 100)",
    )
    group.add_argument(
        "--score-stages",
        type=int,
        default=2,
        help="horizons: EW means in a row that smooth the raw score, each of span "
        "--score-span / stages (2)",
    )
    group.add_argument(
        "--score-baseline-span",
        type=int,
        help="horizons: divide the smoothed score by the stream's own slow mean of it over "
        "this many ticks (default: 10 x --score-span; 0: no baseline)",
    )
    group.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.01,
        help="the flag's threshold: exceeded by this fraction of the training part's normal "
        "ticks (0.01)",
    )
    group.add_argument(
        "--threshold-step",
        type=float,
        default=0.005,
        help="how fast each stream's threshold follows its own scores toward that rate, "
        "never below the fitted one: log units a tick (0.005; 0: fixed)",
    )


#: ``train``'s numeric options: flag, type, default.
_TRAIN_NUMBERS: tuple[tuple[str, type[int] | type[float], float], ...] = (
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
    ("threads", int, 1),
)


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamlstm train")
    _data_arguments(parser)
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--mode", choices=("stateful", "window"), default="stateful")
    parser.add_argument("--task", choices=("forecast", "classify"), default="forecast")
    parser.add_argument(
        "--target-transform",
        choices=("auto", "level", "diff"),
        default="auto",
        help="diff: learn the change (for series that trend past their training range); "
        "auto (default): diff when the target is a feature and trends in the training part",
    )
    parser.add_argument(
        "--cell",
        choices=("lstm", "gru", "rnn"),
        default="lstm",
        help="every layer's recurrent cell: nn.LSTM, nn.GRU or nn.RNN (tanh); a GRU's or "
        "RNN's streams keep h alone, half an LSTM's state (default lstm)",
    )
    for name, kind, default in _TRAIN_NUMBERS:
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"(default {default})")
    _score_arguments(parser)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not args.features:
        parser.error("--features is required")
    from streamlstm.training.data import read_table
    from streamlstm.training.plots import write_plots
    from streamlstm.training.train import TrainOptions, fit

    frame = read_table(args.data)
    opts = TrainOptions(
        features=tuple(args.features.split(",")),
        target=args.target,
        time_column=args.time_column,
        stream_column=args.stream_column,
        mode=args.mode,
        seq_len=args.seq_len,
        cell=args.cell,
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
        threads=args.threads,
        device=args.device,
        task=args.task,
        label_column=args.label_column,
        target_transform=args.target_transform,
        season=args.season,
        score_span=args.score_span,
        score=args.score,
        score_horizons=args.score_horizons,
        score_stages=args.score_stages,
        score_baseline_span=args.score_baseline_span,
        false_alarm_rate=args.false_alarm_rate,
        threshold_step=args.threshold_step,
        train_fraction=args.train_fraction,
        max_gap_factor=None if args.allow_gaps else args.max_gap_factor,
        missing=args.missing,
    )
    bundle, predictions = fit(frame, opts)
    bundle.name = args.out.rstrip("/").split("/")[-1]
    bundle.save(args.out)
    _print_metrics(bundle.metrics)
    plots = write_plots(
        Path(args.out) / "plots",
        bundle.training["history"],
        predictions,
        bundle.outputs.threshold,
    )
    if args.predictions_out:
        predictions.to_csv(args.predictions_out, index=False)
    print(f"saved {args.out} (plots: {', '.join(p.name for p in plots)})", file=sys.stderr)
    return 0


def _bundle_target(bundle: Bundle) -> str | None:
    """The column a bundle forecasts (a multi-horizon scoring model names its outputs
    ``target+1 ..``; its target is the input column ``target_feature``)."""
    spec = bundle.outputs
    if spec.is_classifier:
        return None
    if spec.score_scale and spec.target_feature is not None:
        return bundle.feature_names[spec.target_feature]
    return bundle.target_names[0]


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamlstm evaluate")
    parser.add_argument("--model", required=True)
    _data_arguments(parser)
    args = parser.parse_args(argv)
    from streamlstm.training.data import read_table
    from streamlstm.training.train import TrainOptions, evaluate, prepare

    bundle = Bundle.load(args.model)
    features = args.features.split(",") if args.features else list(bundle.feature_names)
    meta = bundle.training
    spec = bundle.outputs
    opts = TrainOptions(
        features=tuple(features),
        target=args.target or _bundle_target(bundle),
        time_column=args.time_column,
        stream_column=args.stream_column,
        seq_len=int(meta.get("seq_len", 60)),
        horizon=spec.horizon,
        task="classify" if spec.is_classifier else "forecast",
        label_column=args.label_column,
        # The bundle's own score: its outputs fix how far ahead the targets lie.
        score="horizons" if spec.score_scale else "residual",
        score_horizons=len(spec.score_scale) or 32,
        score_span=spec.score_span,
        train_fraction=args.train_fraction,
        target_transform=spec.transform,
        season=args.season if args.season is not None else meta.get("season"),
        max_gap_factor=None if args.allow_gaps else args.max_gap_factor,
        missing=args.missing,
    )
    series = prepare(read_table(args.data), opts, spec.classes or None)
    metrics, frame = evaluate(bundle, series, season=opts.season)
    _print_metrics(metrics)
    if args.predictions_out:
        frame.to_csv(args.predictions_out, index=False)
    return 0
