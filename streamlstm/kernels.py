"""The engine's recurrent step through the optional C kernels (``_kernels.c``).

Stepping through ``nn.LSTM`` costs, besides the matrix products, a gather of
every stream's ``h`` and ``c`` rows into a batch and a scatter of the new rows
back: four passes over state that, at 10k streams, no longer sits in cache.
Here the whole step and the head are one C call (``sl_step``) that runs every
layer and the head chunk by chunk of rows: only ``h`` is gathered, straight
into the input of the layer's matrix product (``[x, h] @ W``, W from
``LayerWeights.fused``: ``[W_ih, W_hh]^T`` for an LSTM or RNN; a GRU's
``r, z`` and perhaps ``n_h`` blocks, its ``n_x`` and perhaps ``n_h`` blocks from
products of their own, ``LayerWeights.gru_apart``; OpenBLAS's ``cblas_sgemm`` from the
``scipy-openblas32`` wheel, linked through its public C API); the C cell
(LSTM, GRU or RNN) then reads an LSTM's ``c`` and writes ``c`` and ``h`` in
place at the streams' slots (a GRU's or RNN's state is ``h`` alone), and the
new ``h`` into the next layer's input. Results agree with torch's
``nn.LSTM``/``nn.GRU``/``nn.RNN`` to float32 rounding (the parity tests check
the engine on every path against the torch oracle).

No training framework is imported here: weights are NumPy arrays
(``weights.ModelWeights``).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from itertools import repeat
from types import ModuleType
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from streamlstm.errors import ConfigError
from streamlstm.weights import ModelWeights

__all__ = [
    "DictSlotMap",
    "NativeStep",
    "SlotMapping",
    "native_available",
    "slot_map",
    "step_name",
]

logger = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]

#: Matrix products run over whole blocks of this many rows (``sl_step``). A
#: BLAS's sgemm takes a product's rows in groups, and may sum the terms of the
#: rows of a last, partial group in another order: OpenBLAS's Haswell kernel
#: (AVX2 machines, Zen included) groups them by 12, and there a stream's
#: results differed in the last bit with the number of streams in its batch.
#: In whole blocks of 24 (a multiple of 12 and of 8; the AVX-512 kernel gave the
#: same bits for any number of rows) they do not, which keeps a
#: snapshot-restored stream bit-identical to one never interrupted
#: (tests/streamlstm/test_chunked_step.py, 1 to 1600 rows).
ROW_BLOCK = 24


def _whole_blocks(rows: int) -> int:
    """``rows`` rounded up to whole blocks of ``ROW_BLOCK`` (at least one)."""
    return -(-max(rows, 1) // ROW_BLOCK) * ROW_BLOCK


#: Set to 0 to use no C code even where it is built: the engine steps
#: through NumPy and the store maps ids to slots with a dict.
DISABLE_ENV = "STREAMLSTM_NATIVE"

#: The C step's threads (default: the CPUs this process may run on).
THREADS_ENV = "STREAMLSTM_THREADS"

#: Rows per chunk of the chunked step (``sl_step``): a chunk's [x, h] and
#: gates (0.9 MB for the default model) stay in a core's L2 from product to
#: cell; 128 and 512 rows measured no better at 10k streams.
CHUNK_ROWS = 256

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
        # Loads OpenBLAS into the process (RTLD_GLOBAL) before the extension that
        # links it: the wheel's documented way for a module built against it.
        importlib.import_module("scipy_openblas32")
        module = importlib.import_module("streamlstm._kernels")
        lib = ctypes.CDLL(str(module.__file__))
    except (ImportError, OSError) as exc:
        logger.info("C kernels not available (%s); the engine steps through NumPy", exc)
        return None
    lib.sl_step.argtypes = [_P, _P, _P, _P, _N, _P, _P, _P, _P, _N, _N]
    lib.sl_step.restype = None
    _lib, _module = lib, module
    return lib


_threads: int | None = None


def set_num_threads(threads: int) -> None:
    """How many threads the C step runs on (each takes chunks of rows in turn)."""
    global _threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads: must be a positive integer, got {threads!r}")
    _threads = threads


def get_num_threads() -> int:
    """The C step's threads: ``set_num_threads``'s, else ``STREAMLSTM_THREADS``, else the
    CPUs this process may run on."""
    if _threads is not None:
        return _threads
    env = os.environ.get(THREADS_ENV, "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def native_available() -> bool:
    """Whether the C kernels were built and ``STREAMLSTM_NATIVE`` does not turn them off."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and _load() is not None


def step_name(native: bool) -> str:
    """How reports name the recurrent step: ``"C kernels"`` or ``"NumPy"``."""
    return "C kernels" if native else "NumPy"


class SlotMapping(Protocol):
    """The store's stream id -> slot map (``str`` keys, slots ``>= 0``)."""

    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __getitem__(self, key: str, /) -> int: ...
    def __setitem__(self, key: str, slot: int, /) -> None: ...
    def __delitem__(self, key: str, /) -> None: ...
    def get(self, key: str, default: None = None, /) -> int | None: ...

    def lookup(self, ids: Sequence[object], out: I64, /) -> bool:
        """``out[i]`` = the slot of ``ids[i]``, or -1 for anything not held; returns
        whether there are ids, every one held and none twice."""


class DictSlotMap(dict[str, int]):
    """The slot map in pure Python: a dict with the batched lookup."""

    def lookup(self, ids: Sequence[object], out: I64, /) -> bool:
        get: Callable[[object, int], int] = self.get  # type: ignore[assignment]
        try:
            out[:] = np.fromiter(map(get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
        except TypeError:  # an unhashable id is not held; the caller rejects it
            out[:] = [_held_slot(get, s) for s in ids]
        return distinct_held(out)


def distinct_held(held: I64) -> bool:
    """Whether every slot is a held one (not -1) and none repeats."""
    if not held.size or held.min() < 0:
        return False
    ordered = np.sort(held)
    return bool((ordered[1:] != ordered[:-1]).all())


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


class _Model(ctypes.Structure):
    """``sl_model`` of ``_kernels.c``: what ``sl_step`` needs of the model."""

    _fields_ = [
        ("layers", _N),
        ("hidden", _P),
        ("widths", _P),
        ("weights", _P),
        ("bias", _P),
        ("head_layers", _N),
        ("head_widths", _P),
        ("head_weights", _P),
        ("head_bias", _P),
        ("head_act", _P),
        ("per_row", _N),
        ("cell", _N),
        ("n_h_weights", _P),
        ("n_x_weights", _P),
    ]


#: The head's activations as ``sl_step`` names them (``SL_ACT_*``).
_ACTIVATIONS = {"": 0, "relu": 1, "tanh": 2, "sigmoid": 3}

#: The cells as ``sl_step`` names them (``SL_CELL_*``).
_CELLS = {"lstm": 0, "gru": 1, "rnn": 2}

F32 = npt.NDArray[np.float32]


def _int64s(values: Sequence[int]) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * len(values))(*values)


def _pointers(arrays: Sequence[F32 | None]) -> ctypes.Array[ctypes.c_void_p]:
    return (_P * len(arrays))(*(None if a is None else a.ctypes.data for a in arrays))


class NativeStep:
    """One recurrent step and the head of a model for distinct slots, state updated
    in place: one C call over chunks of rows (``sl_step``, see there why).

    Holds per layer the fused weights ``[F + H, K]`` and bias (``LayerWeights.fused``:
    ``K`` is ``4H`` for an LSTM, ``H`` for an RNN, ``3H`` or ``2H`` for a GRU, whose
    ``LayerWeights.gru_apart`` weights it holds too),
    and each head linear's weight ``[in, out]`` (contiguous copies made once).
    ``chunk``: rows per chunk (0: the whole batch as one chunk, on one thread).
    """

    runs_head = True

    def __init__(self, weights: ModelWeights, *, chunk: int | None = None) -> None:
        lib = _load()
        if lib is None:
            raise ConfigError("native: the C kernels are not built")
        self._lib = lib
        self._cell = weights.config.cell
        fused = [layer.fused() for layer in weights.layers]
        gate_widths = [layer.fused_width for layer in weights.layers]
        self._weights = [w for w, _ in fused]
        self._bias = [b for _, b in fused]
        apart = [layer.gru_apart() for layer in weights.layers if layer.cell == "gru"]
        self._hidden = [layer.hidden_size for layer in weights.layers]
        widths = [weights.config.input_size, *self._hidden[:-1]]
        self._widths = [w + h for w, h in zip(widths, self._hidden, strict=True)]
        self._head_w = [np.ascontiguousarray(linear.weight.T) for linear in weights.head]
        self._head_b = [np.ascontiguousarray(linear.bias) for linear in weights.head]
        self._outputs = int(self._head_w[-1].shape[1])
        self._rows = 0
        self._top = np.zeros((0, self._hidden[-1]), dtype=np.float32)
        self._y = np.zeros((0, self._outputs), dtype=np.float32)
        self._work = np.zeros(0, dtype=np.float32)
        self._chunk = CHUNK_ROWS if chunk is None else chunk
        acts = [_ACTIVATIONS[linear.activation] for linear in weights.head]
        head_widths = [int(w.shape[1]) for w in self._head_w]
        # The arrays must live as long as the struct that points at them.
        self._keep: list[ctypes.Array[Any]] = [
            _int64s(self._hidden),
            _int64s(self._widths),
            _pointers(self._weights),
            _pointers(self._bias),
            _int64s(head_widths),
            _pointers(self._head_w),
            _pointers(self._head_b),
            _int64s(acts),
            _pointers([n_h for n_h, _ in apart]),
            _pointers([n_x for _, n_x in apart]),
        ]
        self._apart = apart
        k = [ctypes.cast(a, _P) for a in self._keep]
        # Scratch per row: [x, h] of every layer, then the gates or two head activations.
        per_row = sum(self._widths) + max([max(gate_widths)] + [2 * w for w in head_widths])
        self._model = _Model(
            len(self._hidden), k[0], k[1], k[2], k[3],
            len(self._head_w), k[4], k[5], k[6], k[7], per_row, _CELLS[self._cell],
            k[8] if apart else None, k[9] if apart else None,
        )  # fmt: skip

    def _grow(self, rows: int) -> None:
        self._rows = rows
        self._top = np.zeros((rows, self._hidden[-1]), dtype=np.float32)
        self._y = np.zeros((rows, self._outputs), dtype=np.float32)

    def __call__(self, h: Sequence[F32], c: Sequence[F32], slots: I64, x: F32) -> F32:
        """Step ``x [n, F]`` (scaled) for distinct ``slots [n]`` of the stores ``h``, ``c``.

        ``h[l]``, ``c[l]`` are the store's C-contiguous float32 ``[capacity, H_l]``
        arrays, updated at ``slots`` (``c`` empty for a GRU or RNN, whose state is
        ``h`` alone). Returns the head's outputs ``[n, O]``, a view of a buffer the
        next call overwrites.
        """
        n = int(slots.size)
        rows = _whole_blocks(n)  # the last chunk is padded to whole blocks, here
        if rows > self._rows:
            self._grow(max(rows, 2 * self._rows))
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        x = np.ascontiguousarray(x, dtype=np.float32)
        # As sl_step takes them: chunks of whole blocks, a lone one on one thread.
        chunk = _whole_blocks(self._chunk or rows)
        threads = get_num_threads() if self._chunk else 1
        need = threads * chunk * self._model.per_row
        if self._work.size < need:
            self._work = np.zeros(max(need, 2 * self._work.size), dtype=np.float32)
        if len(h) != len(self._hidden) or len(c) != (len(h) if self._cell == "lstm" else 0):
            raise ConfigError(
                f"state: {len(h)} h and {len(c)} c arrays for {len(self._hidden)} "
                f"{self._cell.upper()} layers"
            )
        for layer in (*h, *c):
            if not (layer.dtype == np.float32 and layer.flags.c_contiguous):
                raise ConfigError("state: h and c must be C-contiguous float32 arrays")
        self._lib.sl_step(
            ctypes.byref(self._model),
            _pointers(h),
            _pointers(c),
            slots.ctypes.data,
            n,
            x.ctypes.data,
            self._top.ctypes.data,
            self._y.ctypes.data,
            self._work.ctypes.data,
            threads,
            chunk,
        )
        return self._y[:n]
