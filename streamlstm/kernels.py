"""The engine's recurrent step through the optional C kernels (``_kernels.c``).

Stepping through ``nn.LSTM`` costs, besides the matrix products, a gather of
every stream's ``h`` and ``c`` rows into a batch and a scatter of the new rows
back: four passes over state that, at 10k streams, no longer sits in cache.
Here only ``h`` is gathered, straight into the input of the layer's one
matrix product (``[x, h] @ [W_ih, W_hh]^T``, torch/MKL); the C cell then reads
``c`` and writes ``c`` and ``h`` in place at the streams' slots, and the new
``h`` into the next layer's input. Where torch links MKL, the whole step and
the head are one C call (``sl_step``) that runs every layer and the head
chunk by chunk of rows, calling MKL's ``sgemm_`` itself. Results agree with
``nn.LSTM`` to float32 rounding (the parity tests check the engine on every
path against the ``nn.LSTM`` oracle).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
import torch

from streamlstm.errors import ConfigError
from streamlstm.model import HeadRunner, StreamLSTM

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

#: Set to 0 to step layer by layer over the whole batch (torch.mm between
#: the C gather and cell) even where torch's MKL allows the chunked step.
CHUNKED_ENV = "STREAMLSTM_CHUNKED"

#: Rows per chunk of the chunked step (``sl_step``): a chunk's [x, h] and
#: gates (0.9 MB for the default model) stay in a core's L2 from product to
#: cell; 128 and 512 rows measured no better at 10k streams.
CHUNK_ROWS = 256

_P = ctypes.c_void_p
_N = ctypes.c_int64
#: The path of a build of the codec (``streamlstm._codec``) to load instead of the
#: installed one: ``make test-sanitize`` points it at its ASan/UBSan build.
CODEC_PATH_ENV = "STREAMLSTM_CODEC_PATH"

_lib: ctypes.CDLL | None = None
_module: ModuleType | None = None
_tried = False
_codec: ModuleType | None = None
_codec_tried = False


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
    lib.sl_step.argtypes = [_P, _P, _P, _P, _N, _P, _P, _P, _P, _N, _N]
    lib.sl_step.restype = None
    _lib, _module = lib, module
    return lib


def native_available() -> bool:
    """Whether the C kernels were built and ``STREAMLSTM_NATIVE`` does not turn them off."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and _load() is not None


def _load_codec() -> ModuleType | None:
    global _codec, _codec_tried
    if _codec_tried:
        return _codec
    _codec_tried = True
    path = os.environ.get(CODEC_PATH_ENV)
    if path:
        # Asked for one build: any failure to load it is an error, never a silent
        # fallback to the in-place build or to wire.py (the tests would pass on those).
        spec = importlib.util.spec_from_file_location("streamlstm._codec", path)
        if spec is None or spec.loader is None or not Path(path).is_file():
            raise ConfigError(f"{CODEC_PATH_ENV}: no extension module at {path!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _codec = module
        return _codec
    try:
        _codec = importlib.import_module("streamlstm._codec")
    except ImportError as exc:
        logger.info("C codec not available (%s); records go through wire.py", exc)
    return _codec


def codec_module() -> ModuleType | None:
    """The daemon's C codec (``decode_ticks``, ``encode_predictions`` of ``_codec.c``), or
    None where the extension is not built or ``STREAMLSTM_NATIVE=0`` turns it off."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    return _load_codec()


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


def _blas_sgemm() -> int | None:
    """The address of the ``sgemm_`` of the MKL that torch links, or None.

    ``sl_step`` calls it from its own threads, one chunk each; torch offers
    no way to run a product on one thread from C. Only MKL is taken: it is
    thread-safe, runs single-threaded inside another parallel region, and
    computes a row the same way whatever the number of rows from 12 up.
    """
    if os.environ.get(CHUNKED_ENV, "1") == "0":
        return None
    if not torch.backends.mkl.is_available():  # type: ignore[no-untyped-call]
        return None
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        try:
            lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name))
            address: int | None = ctypes.cast(lib.sgemm_, _P).value
        except (OSError, AttributeError):
            continue
        return address
    return None


class _Model(ctypes.Structure):
    """``sl_model`` of ``_kernels.c``: what ``sl_step`` needs of the model."""

    _fields_ = [
        ("sgemm", _P),
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
    ]


#: The head's activations as ``sl_step`` names them (``SL_ACT_*``).
_ACTIVATIONS = {"": 0, "relu": 1, "tanh": 2, "sigmoid": 3}


def _int64s(values: Sequence[int]) -> ctypes.Array[ctypes.c_int64]:
    return (ctypes.c_int64 * len(values))(*values)


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (_P * len(tensors))(*(t.data_ptr() for t in tensors))


class NativeStep:
    """One recurrent step of ``model`` for distinct slots, state updated in place.

    Holds per layer the fused weights ``[F + H, 4H]`` and bias ``[4H]``. Where
    torch's MKL is at hand, the whole step, and the head when ``head`` gives
    it, is one C call over chunks of rows (``sl_step``, see there why);
    otherwise each layer is a gather (C), one ``torch.mm`` and the cell (C)
    over the whole batch, and the caller runs the head.
    """

    def __init__(
        self, model: StreamLSTM, head: HeadRunner | None = None, *, chunk: int | None = None
    ) -> None:
        lib = _load()
        if lib is None:
            raise ConfigError("native: the C kernels are not built")
        self._lib = lib
        with torch.no_grad():
            params = model.lstm_weights()
            self._weights = [
                torch.cat([w_ih, w_hh], 1).t().contiguous() for w_ih, w_hh, _, _ in params
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
        self._y = torch.zeros(0)
        self._work = torch.zeros(0)
        self._head: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._chunk = CHUNK_ROWS if chunk is None else chunk  # 0: the whole batch as one chunk
        self._keep: list[ctypes.Array[Any]] = []
        sgemm = _blas_sgemm()
        self._model = None if sgemm is None else self._describe(sgemm, head)
        self._outputs = int(self._head[-1][0].shape[1]) if self.runs_head else self._hidden[-1]

    def _describe(self, sgemm: int, head: HeadRunner | None) -> _Model:
        linears = [] if head is None else head.linears
        if any(len(acts) > 1 or (acts and acts[0] not in _ACTIVATIONS) for *_, acts in linears):
            linears = []  # a head sl_step cannot run: the caller runs it
        self._head = [(w, b) for w, b, _ in linears]
        widths = [int(w.shape[1]) for w, _ in self._head]
        acts = [_ACTIVATIONS[a[0] if a else ""] for *_, a in linears]
        # The arrays must live as long as the struct that points at them.
        self._keep = [
            _int64s(self._hidden),
            _int64s(self._widths),
            _pointers(self._weights),
            _pointers(self._bias),
            _int64s(widths or [0]),
            _pointers([w for w, _ in self._head]),
            _pointers([b for _, b in self._head]),
            _int64s(acts or [0]),
        ]
        k = [ctypes.cast(a, _P) for a in self._keep]
        # Scratch per row: [x, h] of every layer, then the gates or two head activations.
        per_row = sum(self._widths) + max([4 * max(self._hidden)] + [2 * w for w in widths])
        return _Model(
            sgemm, len(self._hidden), k[0], k[1], k[2], k[3],
            len(self._head), k[4], k[5], k[6], k[7], per_row,
        )  # fmt: skip

    @property
    def chunked(self) -> bool:
        """Whether steps run as one C call over chunks of rows (``sl_step``)."""
        return self._model is not None

    @property
    def runs_head(self) -> bool:
        """Whether a step returns the head's outputs ``[n, O]`` (else the top ``h``)."""
        return self._model is not None and self._model.head_layers > 0

    def _grow(self, rows: int) -> None:
        self._rows = rows
        self._top = torch.zeros(rows, self._hidden[-1])
        if self._model is not None:
            self._y = torch.zeros(rows, self._outputs)
        else:
            self._xh = [torch.zeros(rows, w) for w in self._widths]
            self._gates = torch.zeros(rows * 4 * max(self._hidden))

    def __call__(
        self, h: Sequence[torch.Tensor], c: Sequence[torch.Tensor], slots: I64, x: torch.Tensor
    ) -> torch.Tensor:
        """Step ``x [n, F]`` (scaled) for distinct ``slots [n]`` of the stores ``h``, ``c``.

        ``h[l]``, ``c[l]`` are the store's contiguous float32 ``[capacity, H_l]``
        tensors, updated at ``slots``. Returns the head's outputs ``[n, O]``
        where ``runs_head``, else the top layer's new ``h [n, H]`` (either a
        view of a buffer the next call overwrites).
        """
        n = int(slots.size)
        rows = max(n, MIN_ROWS)
        if rows > self._rows:
            self._grow(max(rows, 2 * self._rows))
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        x = x.float().contiguous()
        if self._model is None:
            self._by_layer(h, c, slots, x)
            return self._top[:n]
        # As sl_step takes them: a chunk of at least 2 * MIN_ROWS rows, a lone one on one thread.
        chunk = max(self._chunk or rows, 2 * MIN_ROWS)
        threads = torch.get_num_threads() if self._chunk else 1
        need = threads * chunk * self._model.per_row
        if self._work.numel() < need:
            self._work = torch.zeros(max(need, 2 * self._work.numel()))
        self._lib.sl_step(
            ctypes.byref(self._model),
            _pointers(h),
            _pointers(c),
            slots.ctypes.data,
            n,
            x.data_ptr(),
            self._top.data_ptr(),
            self._y.data_ptr(),
            self._work.data_ptr(),
            threads,
            chunk,
        )
        return self._y[:n] if self.runs_head else self._top[:n]

    def _by_layer(
        self, h: Sequence[torch.Tensor], c: Sequence[torch.Tensor], slots: I64, x: torch.Tensor
    ) -> None:
        n = int(slots.size)
        rows = max(n, MIN_ROWS)
        ptr = slots.ctypes.data
        lib = self._lib
        layers = len(self._hidden)
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
