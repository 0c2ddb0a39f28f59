"""A call's ticks checked one by one: bad rows are refused alone, with the field and reason."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.errors import InputError
from streamlstm.results import F32, I64, Bools, Rejection

__all__ = ["bool_column", "column", "validate_ticks"]


def validate_ticks(
    stream_ids: Sequence[str],
    features: npt.ArrayLike | Sequence[Sequence[Any]],
    ts: npt.NDArray[np.float64] | None,
    held: I64,
    width: int,
) -> tuple[F32, Bools, list[Rejection]]:
    n = len(stream_ids)
    rejections: list[Rejection] = []
    accepted = np.ones(n, dtype=bool)
    x = np.zeros((n, width), dtype=np.float32)
    arr: npt.NDArray[Any] | None = None
    if isinstance(features, np.ndarray) and features.dtype.kind in "fiu":
        arr = features
    if arr is not None and arr.ndim == 2 and arr.shape[0] == n:
        if arr.shape[1] == width:
            if arr.dtype == np.float32:
                x[:] = arr
            else:
                with np.errstate(over="ignore"):  # too large for float32: inf, rejected below
                    x[:] = arr
        else:
            for i in range(n):
                accepted[i] = False
                rejections.append(
                    Rejection(i, "values", f"expected {width} values, got {arr.shape[1]}")
                )
    else:
        rows = list(features)  # type: ignore[arg-type]
        if len(rows) != n:
            raise InputError("features", f"{len(rows)} rows for {n} stream ids")
        for i, row in enumerate(rows):
            reason = _row_problem(row, width)
            if reason is None:
                with np.errstate(over="ignore"):  # too large for float32: inf, rejected below
                    x[i] = np.asarray(row, dtype=np.float64)
            else:
                accepted[i] = False
                rejections.append(Rejection(i, "values", reason))
    if not np.isfinite(x).all():
        bad = ~np.isfinite(x).all(axis=1) & accepted
        for i in np.flatnonzero(bad).tolist():
            accepted[i] = False
            rejections.append(
                Rejection(i, "values", "NaN, infinity or out of float32 range is not a value")
            )
    # A held id passed this check when its stream was created.
    for i in np.flatnonzero(held < 0).tolist():
        stream_id = stream_ids[i]
        if (not isinstance(stream_id, str) or not stream_id) and accepted[i]:
            accepted[i] = False
            rejections.append(Rejection(i, "stream", "must be a non-empty string"))
    if ts is not None:  # NaN: no event time; infinity: rejected
        for i in np.flatnonzero(np.isinf(ts) & accepted).tolist():
            accepted[i] = False
            rejections.append(Rejection(i, "ts", "must be a finite number"))
    rejections.sort(key=lambda r: r.index)
    return x, accepted, rejections


def _row_problem(row: object, width: int) -> str | None:
    if isinstance(row, str | bytes) or not hasattr(row, "__len__"):
        return f"expected a list of {width} numbers, got {type(row).__name__}"
    values = list(row)  # type: ignore[call-overload]
    if len(values) != width:
        return f"expected {width} values, got {len(values)}"
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            return f"expected numbers, got {type(value).__name__} {value!r:.40}"
    return None


def bool_column(name: str, values: Any, n: int) -> Bools:
    if values is None:
        return np.zeros(n, dtype=bool)
    arr = np.asarray(values, dtype=bool)
    if arr.shape != (n,):
        raise InputError(name, f"expected {n} flags, got shape {list(arr.shape)}")
    return arr


def column(name: str, values: Any, n: int, dtype: type[np.generic]) -> Any:
    if values is None:
        return None
    try:
        arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(name, f"must be numbers ({exc})") from exc
    if arr.shape != (n,):
        raise InputError(name, f"expected {n} values, got shape {list(arr.shape)}")
    return arr
