"""The exception hierarchy: one root, a few specific subclasses.

Every error the library raises on purpose is a ``StreamLSTMError``; callers that
want to tell bad configuration from a bad model file or bad input catch the
subclass. Library errors from safetensors, torch or Kafka are translated at the
boundary where they happen (``raise BundleError(...) from exc``).
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BundleError",
    "ConfigError",
    "DependencyError",
    "InputError",
    "StateError",
    "StreamLSTMError",
]


class StreamLSTMError(Exception):
    """Root of every error streamlstm raises on purpose."""


class ConfigError(StreamLSTMError, ValueError):
    """A configuration value is invalid; the message names the field."""


class DependencyError(StreamLSTMError, ImportError):
    """A feature needs an optional package that is not installed; the message says which
    and how to install it (``pip install 'streamlstm[train]'`` for torch)."""


class BundleError(StreamLSTMError):
    """A saved model (bundle directory) is missing, corrupt or inconsistent."""


class InputError(StreamLSTMError, ValueError):
    """Input data is malformed; the message names the field and the reason."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str]]:
        # Pickles (the daemon's engine process sends errors back) rebuild from both fields.
        return (type(self), (self.field, self.reason))


class StateError(StreamLSTMError):
    """Recurrent state cannot be stored or restored (wrong shape, corrupt bytes)."""


class BrokerError(StreamLSTMError):
    """The Kafka broker is unreachable or refused an operation."""
