"""The realized errors' update in C (``_quality.c``: ``streamlstm._quality``).

``RealizedErrors.update`` in NumPy is some forty array operations a round of
ticks, about 0.26 ms of a 2.3 ms step of 1024 ticks at 10k streams (caches
cold, as the step's products leave them); the C update is one pass over the
rows, about 60 µs, with the same figures bit for bit (see
``_quality.c``). Where it is not built, or ``STREAMLSTM_NATIVE=0``, the NumPy
path runs. ``make test-sanitize`` builds it again with AddressSanitizer and
UBSan and points ``STREAMLSTM_QUALITY_PATH`` at that build.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError
from streamlstm.kernels import DISABLE_ENV

__all__ = ["QUALITY_PATH_ENV", "NativeUpdate", "TrackedArrays", "loaded_path", "quality_lib"]

logger = logging.getLogger(__name__)

#: The path of a build of ``_quality`` to load instead of the installed one.
QUALITY_PATH_ENV = "STREAMLSTM_QUALITY_PATH"
_NAME = "streamlstm._quality"

#: As ``_quality.c``'s ``SLQ_MAX_TRACKED`` and ``SLQ_MAX_ROWS``.
MAX_TRACKED = 2
MAX_ROWS = 3

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_P = ctypes.c_void_p
_N = ctypes.c_int64

_lib: ctypes.CDLL | None = None
_path: str | None = None
_tried = False


def _module_file() -> str | None:
    path = os.environ.get(QUALITY_PATH_ENV)
    if path:
        # Asked for one build: failing to load it is an error, never a silent
        # fallback to the in-place build or to NumPy (the tests would pass on those).
        spec = importlib.util.spec_from_file_location(_NAME, path)
        if spec is None or spec.loader is None or not os.path.isfile(path):
            raise ConfigError(f"{QUALITY_PATH_ENV}: no extension module at {path!r}")
        return path
    try:
        module = importlib.import_module(_NAME)
    except ImportError as exc:
        logger.info("C quality update not available (%s); it runs in NumPy", exc)
        return None
    return str(module.__file__)


def _load() -> ctypes.CDLL | None:
    global _lib, _path, _tried
    if not _tried:
        _tried = True
        path = _module_file()
        if path is not None:
            lib = ctypes.CDLL(path)
            lib.slq_update.argtypes = [_P, _P, _N, _N, _P, _P, _P, _P, _N, _N]
            lib.slq_update.restype = _N
            _lib, _path = lib, path
    return _lib


def loaded_path() -> str | None:
    """The file the C update was loaded from (None: not loaded)."""
    return _path if _lib is not None else None


def quality_lib() -> ctypes.CDLL | None:
    """The C update, or None where it is not built or ``STREAMLSTM_NATIVE=0``."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    return _load()


class _Horizon(ctypes.Structure):
    """``slq_horizon`` of ``_quality.c``."""

    _fields_ = [
        ("output", _N),
        ("horizon", _N),
        ("ring", _N),
        ("lags", _N),
        ("lag", _N * (MAX_ROWS - 1)),
        ("buckets", _N),
        ("bounds", _P),
        ("counts", _P),
        ("sums", _P),
    ]


class _Spec(ctypes.Structure):
    """``slq_spec`` of ``_quality.c``."""

    _fields_ = [
        ("base", _N),
        ("levels", _N),
        ("recent", _N),
        ("tracked", _N),
        ("alpha", ctypes.c_double),
        ("horizon", _Horizon * MAX_TRACKED),
    ]


TrackedArrays = tuple[int, int, int, Sequence[int], F64, npt.NDArray[np.int64], F64]
"""A tracked horizon as the C update takes it: output, horizon, ring column (relative
to the base), baseline lags, bucket bounds ``[B]``, per-bucket counts ``[1 + lags, B]``
and sums ``[1 + lags, 2]`` (C-contiguous; the update adds to the last two in place)."""


def _data(*arrays: npt.NDArray[Any]) -> tuple[int, ...]:
    return tuple(a.ctypes.data for a in arrays)


class NativeUpdate:
    """``RealizedErrors.update`` through ``slq_update`` for one layout of columns."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        *,
        base: int,
        width: int,
        levels: int,
        recent: int,
        alpha: float,
        tracked: Sequence[TrackedArrays],
    ) -> None:
        if not 1 <= len(tracked) <= MAX_TRACKED:
            raise ValueError(f"{len(tracked)} tracked horizons: the C update takes 1 or 2")
        self._fn = lib.slq_update
        self._end = base + width
        self._keep: list[Any] = []  # what the struct points at lives as long as it
        horizons = []
        for output, horizon, ring, lags, bounds, counts, sums in tracked:
            if not 1 <= len(lags) <= MAX_ROWS - 1:
                raise ValueError(f"{len(lags)} baselines: the C update takes 1 or 2")
            for array in (bounds, counts, sums):
                assert array.flags.c_contiguous and array.flags.writeable
            assert counts.shape == (1 + len(lags), bounds.size) and sums.shape == (1 + len(lags), 2)
            self._keep += [bounds, counts, sums]
            lag = (_N * (MAX_ROWS - 1))(*lags)
            horizons.append(
                _Horizon(
                    output, horizon, ring, len(lags), lag, bounds.size, *_data(bounds, counts, sums)
                )
            )
        self._spec = _Spec(base, levels, recent, len(tracked), alpha, (*horizons,))
        self._spec_ref = ctypes.byref(self._spec)

    def __call__(self, extra: F64, slots: I64, steps: I64, values: F32, forecasts: F32) -> bool:
        """The update, where the arrays are as the C update takes them (C-contiguous
        ``extra``, float32 values and forecasts); False: nothing done, use NumPy."""
        if not (
            extra.dtype == np.float64
            and extra.flags.c_contiguous
            and extra.flags.writeable
            and extra.shape[1] >= self._end
            and values.dtype == np.float32
            and forecasts.dtype == np.float32
            and forecasts.ndim == 2
        ):
            return False
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        steps = np.ascontiguousarray(steps, dtype=np.int64)
        values = np.ascontiguousarray(values)
        forecasts = np.ascontiguousarray(forecasts)
        n = slots.size
        if steps.size != n or values.size != n or forecasts.shape[0] != n:
            raise ValueError("slots, steps, values and forecasts: one row per stream")
        rc = self._fn(
            self._spec_ref, extra.ctypes.data, extra.shape[0], extra.shape[1],
            slots.ctypes.data, steps.ctypes.data, values.ctypes.data,
            forecasts.ctypes.data, forecasts.shape[1], n,
        )  # fmt: skip
        if rc != 0:
            raise IndexError("slots: a slot outside the store")
        return True
