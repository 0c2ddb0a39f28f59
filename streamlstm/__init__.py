"""streamlstm: streaming, stateful LSTM inference for real-time series.

The core package is pure and synchronous: it imports no Kafka client and no
asyncio. The daemon lives in ``consumers``, the training pipeline in
``training``.
"""

from streamlstm.bundle import Bundle
from streamlstm.config import ModelConfig
from streamlstm.engine import Engine, EngineStats, Rejection, StepResult
from streamlstm.errors import (
    BrokerError,
    BundleError,
    ConfigError,
    InputError,
    StateError,
    StreamLSTMError,
)
from streamlstm.model import StreamLSTM
from streamlstm.outputs import OutputSpec
from streamlstm.scaling import Affine
from streamlstm.state import Eviction, StateStore, StreamState

__version__ = "0.1.0"

__all__ = [
    "Affine",
    "BrokerError",
    "Bundle",
    "BundleError",
    "ConfigError",
    "Engine",
    "EngineStats",
    "Eviction",
    "InputError",
    "ModelConfig",
    "OutputSpec",
    "Rejection",
    "StateError",
    "StateStore",
    "StepResult",
    "StreamLSTM",
    "StreamLSTMError",
    "StreamState",
    "__version__",
]
