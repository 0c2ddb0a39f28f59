"""The engine's recurrent step through the optional C kernels (``_kernels.c``).

Stepping through ``nn.LSTM`` costs, besides the matrix products, a gather of
every stream's ``h`` and ``c`` rows into a batch and a scatter of the new rows
back: four passes over state that, at 10k streams, no longer sits in cache.
Here only ``h`` is gathered, straight into the input of the layer's one
matrix product (``[x, h] @ [W_ih, W_hh]^T``, torch/MKL); the C cell then reads
``c`` and writes ``c`` and ``h`` in place at the streams' slots, and the new
``h`` into the next layer's input. Results agree with ``nn.LSTM`` to float32
rounding (the parity tests check the engine on both paths against the
``nn.LSTM`` oracle).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from itertools import repeat
from types import ModuleType
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt
import torch

from streamlstm.errors import ConfigError
from streamlstm.model import StreamLSTM

__all__ = [
    "DictSlotMap",
    "NativeStep",
    "SlotMapping",
    "codec_module",
    "native_available",
    "slot_map",
    "step_name",
]

logger = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]

#: Matrix products run over at least this many rows. MKL computes a row the
#: same way whatever the batch size from 12 rows up, but not below (checked
#: for 1..1600 rows); with the padding a stream's results do not depend on
#: how many other streams share its batch, which keeps a snapshot-restored
#: stream bit-identical to one never interrupted.
MIN_ROWS = 16

#: Set to 0 to use no C code even where it is built: the engine steps
#: through torch and the store maps ids to slots with a dict.
DISABLE_ENV = "STREAMLSTM_NATIVE"

_P = ctypes.c_void_p
_N = ctypes.c_int64
_lib: ctypes.CDLL | None = None
_module: ModuleType | None = None
_tried = False


def _load() -> ctypes.CDLL | None:
    global _lib, _module, _tried
    if _tried:
        return _lib
    _tried = True
    try:
        module = importlib.import_module("streamlstm._kernels")
        lib = ctypes.CDLL(str(module.__file__))
    except (ImportError, OSError) as exc:
        logger.info("C kernels not available (%s); the engine steps through torch", exc)
        return None
    lib.sl_gather.argtypes = [_P, _P, _N, _N, _P, _N, _N, _P, _N]
    lib.sl_gather.restype = None
    lib.sl_lstm_cell.argtypes = [_P, _P, _P, _N, _N, _P, _P, _P, _N]
    lib.sl_lstm_cell.restype = None
    _lib, _module = lib, module
    return lib


def native_available() -> bool:
    """Whether the C kernels were built and ``STREAMLSTM_NATIVE`` does not turn them off."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and _load() is not None


def codec_module() -> ModuleType | None:
    """The daemon's C codec (``decode_ticks``, ``encode_predictions`` of ``_codec.c``), or
    None where the extension is not built or ``STREAMLSTM_NATIVE=0`` turns it off."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or _load() is None:
        return None
    return _module


def step_name(native: bool) -> str:
    """How reports name the recurrent step: ``"C kernels"`` or ``"nn.LSTM"``."""
    return "C kernels" if native else "nn.LSTM"


class SlotMapping(Protocol):
    """The store's stream id -> slot map (``str`` keys, slots ``>= 0``)."""

    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __getitem__(self, key: str, /) -> int: ...
    def __setitem__(self, key: str, slot: int, /) -> None: ...
    def __delitem__(self, key: str, /) -> None: ...
    def get(self, key: str, default: None = None, /) -> int | None: ...

    def lookup(self, ids: Sequence[object], out: I64, /) -> None:
        """``out[i]`` = the slot of ``ids[i]``, or -1 for anything not held."""


class DictSlotMap(dict[str, int]):
    """The slot map in pure Python: a dict with the batched lookup."""

    def lookup(self, ids: Sequence[object], out: I64, /) -> None:
        get: Callable[[object, int], int] = self.get  # type: ignore[assignment]
        try:
            out[:] = np.fromiter(map(get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
        except TypeError:  # an unhashable id is not held; the caller rejects it
            out[:] = [_held_slot(get, s) for s in ids]


def _held_slot(get: Callable[[object, int], int], stream_id: object) -> int:
    try:
        return get(stream_id, -1)
    except TypeError:
        return -1


def slot_map(native: bool) -> SlotMapping:
    """A new, empty slot map: the C one (``_kernels.SlotMap``) or ``DictSlotMap``.

    The C map looks a batch of ids up in stages with prefetching, so that the
    cache misses of many ids overlap (a dict takes them one after another).
    """
    if native:
        if _load() is None or _module is None:
            raise ConfigError("native: the C kernels are not built")
        return cast(SlotMapping, _module.SlotMap())
    return DictSlotMap()


class NativeStep:
    """One recurrent step of ``model`` for distinct slots, state updated in place.

    Holds per layer the fused weights ``[4H, F + H]`` and bias ``[4H]``, and
    its own input and gate buffers, grown to the largest batch seen.
    """

    def __init__(self, model: StreamLSTM) -> None:
        lib = _load()
        if lib is None:
            raise ConfigError("native: the C kernels are not built")
        self._lib = lib
        with torch.no_grad():
            params = model.lstm_weights()
            # [F + H, 4H], the transpose of a row-major [4H, F + H] as nn.Linear keeps it.
            self._weights = [
                torch.cat([w_ih, w_hh], 1).contiguous().t() for w_ih, w_hh, _, _ in params
            ]
            self._bias = [(b_ih + b_hh).contiguous() for _, _, b_ih, b_hh in params]
        self._hidden = list(model.config.hidden_sizes)
        widths = [model.config.input_size, *self._hidden[:-1]]
        self._widths = [w + h for w, h in zip(widths, self._hidden, strict=True)]
        self._inputs = widths[0]
        self._rows = 0
        self._xh: list[torch.Tensor] = []
        self._gates = torch.zeros(0)  # flat: each layer views it [n, 4H] contiguous
        self._top = torch.zeros(0)

    def _grow(self, rows: int) -> None:
        self._rows = rows
        self._xh = [torch.zeros(rows, w) for w in self._widths]
        self._gates = torch.zeros(rows * 4 * max(self._hidden))
        self._top = torch.zeros(rows, self._hidden[-1])

    def __call__(
        self, h: Sequence[torch.Tensor], c: Sequence[torch.Tensor], slots: I64, x: torch.Tensor
    ) -> torch.Tensor:
        """Step ``x [n, F]`` (scaled) for distinct ``slots [n]`` of the stores ``h``, ``c``.

        ``h[l]``, ``c[l]`` are the store's contiguous float32 ``[capacity, H_l]``
        tensors, updated at ``slots``. Returns the top layer's new ``h [n, H]``
        (a view of a buffer the next call overwrites).
        """
        n = int(slots.size)
        rows = max(n, MIN_ROWS)
        if rows > self._rows:
            self._grow(max(rows, 2 * self._rows))
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        ptr = slots.ctypes.data
        lib = self._lib
        layers = len(self._hidden)
        x = x.float().contiguous()
        for layer in range(layers):
            hidden = self._hidden[layer]
            xh = self._xh[layer]
            width = self._widths[layer]
            # The first layer's input comes from x; a deeper one's, the cell below wrote.
            inputs = (x.data_ptr(), self._inputs) if layer == 0 else (None, 0)
            lib.sl_gather(
                h[layer].data_ptr(), ptr, n, hidden, xh.data_ptr(), width, width - hidden, *inputs
            )
            gates = self._gates[: rows * 4 * hidden].view(rows, 4 * hidden)
            torch.mm(xh[:rows], self._weights[layer], out=gates)
            if layer + 1 < layers:
                out, ld = self._xh[layer + 1], self._widths[layer + 1]
            else:
                out, ld = self._top, hidden
            lib.sl_lstm_cell(
                gates.data_ptr(),
                self._bias[layer].data_ptr(),
                ptr,
                n,
                hidden,
                h[layer].data_ptr(),
                c[layer].data_ptr(),
                out.data_ptr(),
                ld,
            )
        return self._top[:n]
