"""Loading the daemon's C codec (``_codec.c`` here: ``streamlstm.consumers.codec._codec``).

The codec parses untrusted Kafka bytes, so it is an extension of its own,
built without the kernels' ``-ffast-math``; ``make test-sanitize`` builds it
again with AddressSanitizer and UBSan and points ``STREAMLSTM_CODEC_PATH`` at
that build. Where it is not built, or ``STREAMLSTM_NATIVE=0``, the codec
goes through ``wire.py`` record by record, with the same verdicts and bytes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from types import ModuleType

from streamlstm.errors import ConfigError
from streamlstm.kernels import DISABLE_ENV

__all__ = ["CODEC_PATH_ENV", "codec_module"]

logger = logging.getLogger(__name__)

#: The path of a build of the codec to load instead of the installed one.
CODEC_PATH_ENV = "STREAMLSTM_CODEC_PATH"
_NAME = "streamlstm.consumers.codec._codec"

_codec: ModuleType | None = None
_codec_tried = False


def _load_codec() -> ModuleType | None:
    global _codec, _codec_tried
    if _codec_tried:
        return _codec
    _codec_tried = True
    path = os.environ.get(CODEC_PATH_ENV)
    if path:
        # Asked for one build: any failure to load it is an error, never a silent
        # fallback to the in-place build or to wire.py (the tests would pass on those).
        spec = importlib.util.spec_from_file_location(_NAME, path)
        if spec is None or spec.loader is None or not os.path.isfile(path):
            raise ConfigError(f"{CODEC_PATH_ENV}: no extension module at {path!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _codec = module
        return _codec
    try:
        _codec = importlib.import_module(_NAME)
    except ImportError as exc:
        logger.info("C codec not available (%s); records go through wire.py", exc)
    return _codec


def codec_module() -> ModuleType | None:
    """The C codec (``decode_ticks``, ``encode_predictions`` of ``_codec.c``), or None
    where the extension is not built or ``STREAMLSTM_NATIVE=0`` turns it off."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    return _load_codec()
