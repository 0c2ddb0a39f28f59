"""Reading the tensors and plain values out of a ``torch.save`` file without running it.

A checkpoint (Lightning's ``.ckpt``, say) is a zip holding a pickle and the
tensors' bytes. Its pickle names classes and functions (the optimiser, the loss
module, a trainer's hyper-parameter dict); unpickling would import and call
them, which can run any code. ``torch.load(weights_only=True)`` refuses such a
file outright. This reader walks the same pickle but imports and calls nothing:
a tensor is rebuilt from its bytes with NumPy, a dict, list or tuple is itself,
and every other object the pickle names becomes an inert ``Opaque`` that only
records the name it was given and the values it was built from.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamlstm.errors import BundleError

__all__ = ["Opaque", "read_checkpoint"]

#: Legacy typed storages (how ``torch.save`` names a tensor's element type).
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,  # read as bits, widened below
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class Opaque(dict[Any, Any]):
    """An object the pickle names, never built: its ``name`` (``module.Class``), the
    ``args`` it would be called with, its ``state``, and the items and entries a
    dict or list subclass would hold (as a dict itself, and in ``items_added``)."""

    name = "?"
    args: tuple[Any, ...]
    state: Any
    items_added: list[Any]

    def __new__(cls, *args: Any, **_kwargs: Any) -> Opaque:
        # Pickle's NEWOBJ calls __new__ alone, REDUCE calls the class: both land here.
        self = super().__new__(cls)
        self.args, self.state, self.items_added = args, None, []
        return self

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        # A reduce may call what another returned (getattr(cls, "method")(...)): nothing runs.
        return Opaque(*args, **kwargs)

    def append(self, item: Any) -> None:
        self.items_added.append(item)

    def extend(self, items: Any) -> None:
        self.items_added.extend(items)

    def __reduce__(self) -> Any:  # never pickled back
        raise TypeError("an Opaque stands for an object that was not built")


def _rebuild_tensor(
    storage: np.ndarray, offset: int, size: Any, stride: Any, *_rest: Any
) -> torch.Tensor:
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    _check_view(storage, int(offset), size, stride)
    if not size:
        array = np.array(storage[offset])
    else:
        view = np.lib.stride_tricks.as_strided(
            storage[offset:], size, tuple(s * storage.itemsize for s in stride)
        )
        array = np.array(view)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if getattr(storage, "bf16", False) else tensor


def _check_view(
    storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    """A tensor's view must lie inside its storage and hold no more elements than it:
    ``as_strided`` checks nothing, so a hostile file could otherwise read memory beyond
    the storage or make a view (then a copy) far larger than the file."""
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size + stride):
        raise pickle.UnpicklingError(
            f"tensor view: bad size {size}, stride {stride}, offset {offset}"
        )
    count = int(np.prod(size, dtype=np.int64)) if size else 1
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if count else offset
    if count and (last >= storage.size or count > storage.size):
        raise pickle.UnpicklingError(
            f"tensor view: size {size}, stride {stride}, offset {offset} outside a storage of "
            f"{storage.size} elements"
        )


class _Storage(np.ndarray):
    bf16 = False


class _OrderedDict(dict[Any, Any]):
    """An ``OrderedDict`` (a state dict's; its ``_metadata`` attribute is dropped)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _rebuild_parameter(data: torch.Tensor, *_rest: Any) -> torch.Tensor:
    return data


class _Unpickler(pickle.Unpickler):
    """Builds tensors and the plain containers; names everything else ``Opaque``."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        known = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("collections", "OrderedDict"): _OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("torch", "Size"): tuple,
        }
        if (module, name) in known:
            return known[module, name]
        if module == "torch" and name in _STORAGES:
            return name  # a storage type, read by persistent_load
        return type(name, (Opaque,), {"name": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 3):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        kind, key = pid[1], str(pid[2])
        if kind not in _STORAGES:
            raise pickle.UnpicklingError(f"tensor storage {kind!r} is not read")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        storage = np.frombuffer(raw, dtype=_STORAGES[kind]).view(_Storage)
        storage.bf16 = kind == "BFloat16Storage"
        return storage


def read_checkpoint(path: str | Path) -> Any:
    """The object a ``torch.save`` zip file holds, tensors rebuilt and every other
    named object an ``Opaque``. Raises ``BundleError`` for a file that is not one."""
    file = Path(path)
    try:
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise BundleError(f"{file.name}: not a torch.save file (no single data.pkl)")
            prefix = pickles[0].removesuffix("/data.pkl")
            if archive.namelist().count(f"{prefix}/byteorder") and (
                archive.read(f"{prefix}/byteorder").strip() != b"little"
            ):
                raise BundleError(f"{file.name}: a big-endian checkpoint is not read")
            return _Unpickler(archive.read(pickles[0]), archive, prefix).load()
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        KeyError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        raise BundleError(f"{file.name}: not a readable torch checkpoint ({exc})") from exc
