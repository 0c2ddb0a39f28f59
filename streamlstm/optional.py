"""Optional dependencies: a clear error where a feature needs what a serving install lacks."""

from __future__ import annotations

import importlib
from types import ModuleType

from streamlstm.errors import DependencyError

__all__ = ["require_cold", "require_torch"]

TRAIN_EXTRA = "pip install 'streamlstm[train]'"
COLD_EXTRA = "pip install 'streamlstm[cold]'"


def require_torch(what: str) -> ModuleType:
    """torch, or ``DependencyError`` saying that ``what`` needs it and how to install it.

    Serving (``Engine``, ``Bundle.load``, ``streamlstm serve``) never needs torch;
    training, the importers and the offline oracle do.
    """
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise DependencyError(
            f"{what} needs PyTorch, which a serving install leaves out: {TRAIN_EXTRA}"
        ) from exc


def require_cold(what: str) -> ModuleType:
    """rocksdict (RocksDB), or ``DependencyError`` saying that ``what`` needs it and how
    to install it: the cold tier's store (``cold_store``) is an extra."""
    try:
        return importlib.import_module("rocksdict")
    except ImportError as exc:
        raise DependencyError(
            f"{what} needs rocksdict (RocksDB), which a base install leaves out: {COLD_EXTRA}"
        ) from exc
