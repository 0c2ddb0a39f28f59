"""Reading tabular time series (CSV or Parquet) with clear errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from streamlstm.errors import InputError

__all__ = ["numeric_columns", "read_table", "require_columns", "time_values"]


def read_table(path: str | Path) -> pd.DataFrame:
    file = Path(path)
    if not file.is_file():
        raise InputError("data", f"{str(file)!r} does not exist")
    try:
        if file.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(file)
        if file.suffix.lower() in (".csv", ".txt", ".gz"):
            return pd.read_csv(file)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise InputError("data", f"cannot read {file.name}: {exc}") from exc
    raise InputError("data", f"{file.name}: expected a .csv or .parquet file")


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(
            what,
            f"column(s) {', '.join(missing)} not in the file "
            f"(it has {', '.join(map(str, frame.columns))})",
        )


def time_values(raw: pd.Series, what: str = "time_column", where: str = "") -> pd.Series:
    """A time column as numbers: numbers as they are, dates as epoch milliseconds (UTC).

    A cell that is neither is an error naming it (``where`` says whose it is).
    """
    times = pd.to_numeric(raw, errors="coerce")
    if times.isna().any():
        dates = pd.to_datetime(raw, errors="coerce", utc=True)
        if dates.isna().any():
            row = raw[dates.isna()].iloc[0]
            raise InputError(what, f"{where}{row!r} is neither a number nor a date")
        times = (dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(1, "ms")
    return times


def numeric_columns(
    frame: pd.DataFrame, columns: Sequence[str], what: str, *, allow_missing: bool = False
) -> pd.DataFrame:
    """The columns as float64; a non-numeric cell is an error naming column and row.

    An empty cell is an error too unless ``allow_missing`` (it is then NaN).
    """
    require_columns(frame, columns, what)
    out = {}
    for col in columns:
        converted = pd.to_numeric(frame[col], errors="coerce")
        bad = converted.isna() & frame[col].notna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise InputError(
                what,
                f"column {col!r} has a non-numeric value {frame[col].iloc[row]!r} at row {row + 2}",
            )
        if converted.isna().any() and not allow_missing:
            row = int(converted.isna().to_numpy().nonzero()[0][0])
            raise InputError(
                what,
                f"column {col!r} is empty at row {row + 2}; pass --missing "
                "interpolate|ffill|drop to fill or drop empty cells",
            )
        out[col] = converted.astype("float64")
    return pd.DataFrame(out, index=frame.index)
