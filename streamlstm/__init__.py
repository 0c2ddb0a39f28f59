"""streamlstm: streaming, stateful LSTM inference for real-time series.

The core package is pure and synchronous: it imports no Kafka client and no
asyncio, and serving imports no torch (``StreamLSTM``, the torch module that
training and the offline oracle use, is loaded on first access, and needs the
``train`` extra). The daemon lives in ``consumers``, the training pipeline in
``training``.
"""

import typing as _typing

from streamlstm.bundle import Bundle
from streamlstm.config import ModelConfig
from streamlstm.engine import Engine, EngineStats, Rejection, StepResult
from streamlstm.errors import (
    BrokerError,
    BundleError,
    ConfigError,
    DependencyError,
    InputError,
    StateError,
    StreamLSTMError,
)
from streamlstm.outputs import OutputSpec
from streamlstm.scaling import Affine
from streamlstm.store import Eviction, StateStore, StreamState
from streamlstm.stream_view import StreamView
from streamlstm.weights import ModelWeights

if _typing.TYPE_CHECKING:
    from streamlstm.model import StreamLSTM

__version__ = "0.1.0"

__all__ = [
    "Affine",
    "BrokerError",
    "Bundle",
    "BundleError",
    "ConfigError",
    "DependencyError",
    "Engine",
    "EngineStats",
    "Eviction",
    "InputError",
    "ModelConfig",
    "ModelWeights",
    "OutputSpec",
    "Rejection",
    "StateError",
    "StateStore",
    "StepResult",
    "StreamLSTM",
    "StreamLSTMError",
    "StreamState",
    "StreamView",
    "__version__",
]


def __getattr__(name: str) -> _typing.Any:
    # StreamLSTM is a torch module: imported on first use, so that serving never loads torch.
    if name == "StreamLSTM":
        from streamlstm.optional import require_torch

        require_torch("streamlstm.StreamLSTM")
        from streamlstm.model import StreamLSTM

        return StreamLSTM
    raise AttributeError(f"module 'streamlstm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "StreamLSTM"})
