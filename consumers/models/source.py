"""Where ``--model`` points: one bundle, or a directory of versioned bundles.

``--model DIR`` names a bundle when ``DIR/bundle.json`` exists. Otherwise each
subdirectory of DIR holding a ``bundle.json`` is a version, named by its
directory (``1``, ``2``, ``2026-12-01``, ``v10``): the newest version is the
greatest name, digits compared as numbers (``v10`` after ``v9``), and the
newest *valid* one serves: a version whose ``bundle.json`` does not load is
skipped with a warning, so a half-copied upload never stops a reload. Only
``bundle.json`` is read here (the daemon never loads weights); the engine
process loads the weights and refuses a bundle whose weights are broken.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from streamlstm import Bundle
from streamlstm.errors import ConfigError, StreamLSTMError

__all__ = ["ModelSource", "Resolved", "check_shadow"]

logger = logging.getLogger(__name__)

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True, eq=False)
class Resolved:
    """The bundle ``--model`` names now: its ``bundle.json`` (weights not read), and its
    version (the subdirectory's name; "" for a single bundle)."""

    bundle: Bundle
    version: str


def _version_key(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((1, int(part)) if part.isdigit() else (0, part) for part in _DIGITS.split(name))


class ModelSource:
    """``resolve()``: the bundle to serve now (raises ``ConfigError`` where there is none)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def versioned(self) -> bool:
        """A directory without a bundle.json of its own (anything else is read as a bundle,
        whose load says what is wrong with it: missing, not a directory, ...)."""
        return self.path.is_dir() and not (self.path / "bundle.json").exists()

    def resolve(self) -> Resolved:
        if not self.versioned:
            return Resolved(Bundle.load(self.path, lazy_weights=True), "")
        try:
            versions = [p for p in self.path.iterdir() if (p / "bundle.json").is_file()]
        except OSError as exc:
            raise ConfigError(f"model: cannot read {self.path}: {exc}") from exc
        for version in sorted(versions, key=lambda p: _version_key(p.name), reverse=True):
            try:
                return Resolved(Bundle.load(version, lazy_weights=True), version.name)
            except StreamLSTMError as exc:
                logger.warning("model version %s skipped: %s", version, exc)
        raise ConfigError(
            f"model: {self.path} holds no bundle (no bundle.json in it or in a subdirectory "
            "that loads)"
        )


def check_shadow(serving: Bundle, shadow: Bundle) -> None:
    """``ConfigError`` unless ``shadow`` can run on the served model's ticks: the same
    number of inputs, and the same feature names where both name them."""
    if shadow.config.input_size != serving.config.input_size:
        raise ConfigError(
            f"shadow_model: takes {shadow.config.input_size} inputs, the served model "
            f"{serving.config.input_size}; a shadow runs on the same ticks"
        )
    ours, theirs = _named(serving), _named(shadow)
    if ours and theirs and ours != theirs:
        raise ConfigError(f"shadow_model: features {theirs} are not the served model's {ours}")


def _named(bundle: Bundle) -> list[str]:
    """The bundle's feature names; none where they are the defaults (x0, x1, ...)."""
    names = list(bundle.feature_names)
    return [] if names == [f"x{i}" for i in range(len(names))] else names
