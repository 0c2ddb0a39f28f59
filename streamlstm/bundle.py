"""The saved model: a directory with ``model.safetensors`` and ``bundle.json``.

Weights are stored with safetensors and read back without unpickling, into
NumPy (serving needs no training framework); every other fact needed to
serve the model (config, feature and target names, scalers, warm-up) is
plain JSON beside them. The torch module (``Bundle.model``) is built on
demand, for training and the offline oracle, where torch is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from streamlstm.config import ModelConfig
from streamlstm.errors import BundleError, ConfigError, InputError
from streamlstm.optional import require_torch
from streamlstm.outputs import OutputSpec
from streamlstm.scaling import Affine
from streamlstm.weights import ModelWeights

if TYPE_CHECKING:
    from streamlstm.model import StreamLSTM

__all__ = ["SCHEMA_VERSION", "Bundle"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"


class Bundle:
    """A trained model plus everything needed to serve it.

    ``input_scaler`` maps raw feature columns to model units and
    ``target_scaler`` maps model outputs back (``None``: no scaling).
    ``warmup_steps`` is how many ticks a stream needs before its predictions
    are marked ready. ``outputs`` says what the outputs mean (activation,
    diff transform, classes, anomaly score); the default is plain levels.

    The weights come as ``weights`` (NumPy) or as a torch ``model`` (copied
    into ``weights`` at construction: later changes to the module are not
    seen by engines built from this bundle), or are read from
    ``weights_file`` on first use (``load(..., lazy_weights=True)``).
    """

    def __init__(
        self,
        *,
        config: ModelConfig,
        weights: ModelWeights | None = None,
        model: StreamLSTM | None = None,
        feature_names: Sequence[str] | None = None,
        target_names: Sequence[str] | None = None,
        input_scaler: Affine | None = None,
        target_scaler: Affine | None = None,
        warmup_steps: int = 0,
        name: str = "model",
        training: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        outputs: OutputSpec | None = None,
        weights_file: Path | None = None,
    ) -> None:
        self.config = config
        given = (weights is not None) + (model is not None) + (weights_file is not None)
        if given != 1 and not (given == 2 and weights is not None and weights_file is not None):
            raise ConfigError("weights: give either weights or a model, not both or neither")
        if model is not None:
            weights = model.weights()
        if weights is not None and weights.config != config:
            raise ConfigError("weights: made for another model config")
        self._weights: ModelWeights | None = weights
        #: The file the weights are read from on first use, where none were given.
        self._weights_file = weights_file
        #: The ``model_id`` bundle.json states (None: computed from the weights).
        self._stated_id: str | None = None
        self._model = model.eval() if model is not None else None
        self.feature_names = tuple(feature_names or [f"x{i}" for i in range(config.input_size)])
        self.target_names = tuple(target_names or [f"y{i}" for i in range(config.output_size)])
        if len(self.feature_names) != config.input_size:
            raise ConfigError(
                f"feature_names: {len(self.feature_names)} names for input_size {config.input_size}"
            )
        if len(self.target_names) != config.output_size:
            raise ConfigError(
                f"target_names: {len(self.target_names)} names for output_size {config.output_size}"
            )
        if input_scaler is not None and input_scaler.width != config.input_size:
            raise ConfigError(
                f"input_scaler: {input_scaler.width} columns for input_size {config.input_size}"
            )
        if target_scaler is not None and target_scaler.width != config.output_size:
            raise ConfigError(
                f"target_scaler: {target_scaler.width} columns for output_size {config.output_size}"
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be a non-negative integer, got {warmup_steps!r}")
        self.outputs = outputs or OutputSpec()
        self.outputs.check(config.input_size, config.output_size)
        self.input_scaler = input_scaler
        self.target_scaler = target_scaler
        self.warmup_steps = warmup_steps
        self.name = name
        self.training: dict[str, Any] = dict(training or {})
        self.metrics: dict[str, Any] = dict(metrics or {})
        #: The directory ``load`` read this bundle from (None: made in memory).
        self.source: Path | None = None

    # -- construction -------------------------------------------------------

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, **kwargs: Any) -> Bundle:
        """A bundle with freshly initialised weights (NumPy's generator), for tests and
        benchmarks."""
        kwargs.setdefault("name", f"random-{seed}")
        return cls(config=config, weights=ModelWeights.random(config, seed), **kwargs)

    @property
    def model(self) -> StreamLSTM:
        """The torch module of these weights, in eval mode (built on first use; needs
        torch, which the ``train`` extra installs)."""
        if self._model is None:
            require_torch("Bundle.model")
            from streamlstm.model import StreamLSTM

            self._model = StreamLSTM.from_weights(self.weights)
        return self._model

    @property
    def weights(self) -> ModelWeights:
        """The model's weights (NumPy); read from the bundle's file on first use where
        ``load`` was told to leave them (``lazy_weights``)."""
        if self._weights is None:
            assert self._weights_file is not None
            self._weights = _read_weights(self._weights_file, self.config)
            self._check_stated_id()
        return self._weights

    @property
    def weights_loaded(self) -> bool:
        """Whether the weights are in memory (False until first use where ``load`` left
        them, ``lazy_weights``)."""
        return self._weights is not None

    @property
    def model_id(self) -> str:
        """``name@<weights digest>``: tells two versions of one model apart in output.

        A bundle saved by this version states it in bundle.json, so a process that
        never steps (the daemon's parent) knows it without reading the weights; a
        process that reads them checks the statement (``load``)."""
        if self._weights is None and self._stated_id is not None:
            return self._stated_id
        return self._digest()

    def _digest(self) -> str:
        digest = hashlib.sha256()
        for key, array in sorted(self.weights.tensors.items()):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return f"{self.name}@{digest.hexdigest()[:12]}"

    def _check_stated_id(self) -> None:
        if self._stated_id is not None and self._stated_id != self._digest():
            raise BundleError(
                f"{self._weights_file}: the weights are not those bundle.json names "
                f"({self._stated_id}; they are {self._digest()}): the bundle was changed "
                "in part, or by hand"
            )

    # -- persistence --------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "model": self.config.to_dict(),
            "features": list(self.feature_names),
            "targets": list(self.target_names),
            "scaler": {
                "input": self.input_scaler.to_dict() if self.input_scaler else None,
                "target": self.target_scaler.to_dict() if self.target_scaler else None,
            },
            "warmup_steps": self.warmup_steps,
            "outputs": self.outputs.to_dict(),
            "training": self.training,
            "metrics": self.metrics,
            "model_id": self.model_id,
        }

    def save(self, path: str | Path) -> Path:
        """Write the bundle directory (created if needed); returns its path."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v) for k, v in self.weights.tensors.items()}
        save_file(tensors, str(out / WEIGHTS_FILE))
        # Write-then-rename so a crash never leaves a half-written bundle.json.
        tmp = out / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        tmp.replace(out / META_FILE)
        return out

    @classmethod
    def load(cls, path: str | Path, *, lazy_weights: bool = False) -> Bundle:
        """Load a bundle directory; never unpickles.

        Raises ``BundleError`` naming the problem for a missing directory or
        file, unreadable JSON, an unknown schema version, a corrupt weights
        file, tensors that do not match the config, or weights that are not
        the ones bundle.json names (``model_id``). ``lazy_weights`` reads only
        bundle.json now and the weights on first use (``weights``), where the
        same checks apply: for a process that describes a model and never
        steps it (the daemon's parent).
        """
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"model directory {str(root)!r} does not exist")
        meta_path = root / META_FILE
        weights_path = root / WEIGHTS_FILE
        for required in (meta_path, weights_path):
            if not required.is_file():
                raise BundleError(
                    f"{str(root)!r} is not a model bundle: {required.name} is missing"
                )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{meta_path}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise BundleError(f"{meta_path}: expected a JSON object")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{meta_path}: unknown schema_version {version!r}; this streamlstm "
                f"reads version {SCHEMA_VERSION}"
            )
        try:
            config = ModelConfig.from_dict(meta["model"])
            scaler = meta.get("scaler") or {}
            input_scaler = Affine.from_dict(scaler["input"]) if scaler.get("input") else None
            target_scaler = Affine.from_dict(scaler["target"]) if scaler.get("target") else None
            outputs = OutputSpec.from_dict(meta.get("outputs"))
        except KeyError as exc:
            raise BundleError(f"{meta_path}: missing field {exc}") from exc
        except ConfigError as exc:
            raise BundleError(f"{meta_path}: {exc}") from exc
        stated = meta.get("model_id")
        if stated is not None and not isinstance(stated, str):
            raise BundleError(f"{meta_path}: model_id must be a string")
        weights = None if lazy_weights else _read_weights(weights_path, config)
        try:
            bundle = cls(
                config=config,
                weights=weights,
                weights_file=weights_path,
                feature_names=meta.get("features"),
                target_names=meta.get("targets"),
                input_scaler=input_scaler,
                target_scaler=target_scaler,
                warmup_steps=meta.get("warmup_steps", 0),
                name=meta.get("name") or root.name,
                training=meta.get("training"),
                metrics=meta.get("metrics"),
                outputs=outputs,
            )
        except ConfigError as exc:
            raise BundleError(f"{meta_path}: {exc}") from exc
        bundle.source = root.resolve()
        bundle._stated_id = stated
        if not lazy_weights:
            bundle._check_stated_id()
        return bundle

    # -- the offline oracle -------------------------------------------------

    def scale_inputs(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if self.input_scaler is None:
            return np.asarray(x, dtype=np.float32)
        return self.input_scaler.apply(x)

    def unscale_outputs(self, y: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if self.target_scaler is None:
            return np.asarray(y, dtype=np.float32)
        return self.target_scaler.invert(y)

    def finish(self, y: npt.NDArray[Any], x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Head outputs ``y [N, O]`` for raw inputs ``x [N, F]`` -> predictions in target units."""
        return self.outputs.finish(y, x, self.unscale_outputs)

    def predict_sequence(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """One stream from zero state: ``x [T, F]`` original units -> ``[T, outputs]``.

        Steps one tick at a time through torch's own cell module (``nn.LSTM``,
        ``nn.GRU`` or ``nn.RNN``) and head (``Bundle.model``), never through the
        engine's code, so it is the reference the engine is tested against. Needs
        torch (the ``train`` extra).
        """
        torch = require_torch("predict_sequence (the offline oracle)")
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.config.input_size:
            raise InputError(
                "x", f"expected shape [T, {self.config.input_size}], got {list(arr.shape)}"
            )
        if not np.isfinite(arr).all():
            raise InputError("x", "contains NaN or infinity")
        scaled = torch.from_numpy(self.scale_inputs(arr))
        with torch.inference_mode():
            hs, cs = self.model.zero_group_state(1)
            tops = []
            for t in range(scaled.shape[0]):
                top, hs, cs = self.model.recurrent_step(scaled[t : t + 1], hs, cs)
                tops.append(top)
            if not tops:
                return np.zeros((0, self.config.output_size), dtype=np.float32)
            y = self.model.head(torch.cat(tops)).numpy()
        return self.finish(y, arr)


def _read_weights(path: Path, config: ModelConfig) -> ModelWeights:
    """A bundle's weights file, read without unpickling and checked against its config."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable safetensors file ({exc})") from exc
    try:
        return ModelWeights(config, tensors)
    except ConfigError as exc:
        raise BundleError(f"{path}: {exc}") from exc
