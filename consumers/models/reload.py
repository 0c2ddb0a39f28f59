"""Model reloads without a restart: asked for by SIGHUP, ``POST /v1/model/reload`` or
``--model-watch-s``; done by the poll loop at a checkpoint boundary.

The order (``PollLoop``): every batch stepped so far is sent, the open
checkpoint is closed and everything up to it acknowledged and committed
(``drain``); then ``Reloader.perform`` resolves ``--model`` again
(``source.py``), decides per ``--swap-state`` whether the states carry
(``streamlstm.swap_policy``, the rule a restore follows too) and has the
engine load and swap to the new bundle (``SwapModel``); the next poll's ticks
are the new model's. So per partition every tick before the swap was answered
by the old model and every tick after it by the new one; nothing is read again
or skipped. A bundle that does not load (its ``bundle.json`` here, its weights
in the engine) is refused with a log line and ``streamlstm_model_reloads_total
{outcome="refused"}``, and the old model goes on serving. A reload to the
shadow model's bundle (``--shadow-model``) promotes it: every stream it holds
goes on from the shadow's own state, warmed on the same ticks (``SwapReply
.from_shadow``); only streams the shadow never saw follow ``--swap-state``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from streamlstm.consumers.engine.process import EngineClient
from streamlstm.consumers.engine.protocol import SwapModel
from streamlstm.consumers.models.source import ModelSource, Resolved
from streamlstm.consumers.observability.metrics import ServeMetrics
from streamlstm.errors import StreamLSTMError
from streamlstm.swap_policy import same_state_layout, swap_mode

__all__ = ["ReloadOutcome", "Reloader"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``swapped``, ``unchanged`` (the newest bundle is the one
    served) or ``refused`` (``error`` says why; the model served so far goes on)."""

    outcome: str
    model: str  # the model serving after it
    previous: str
    version: str = ""
    mode: str | None = None  # swapped: carry, rewarm or reset (swap_policy.SWAP_MODES)
    streams: int = 0  # swapped: the streams held, now under the new model
    seconds: float = 0.0  # swapped: the engine's time to load and swap
    from_shadow: int = 0  # swapped to the shadow's model: the streams that kept its state
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Reloader:
    """``request()`` a reload (any number of times: one reload answers all waiting);
    the poll loop sees ``wanted`` and calls ``perform`` at a checkpoint boundary."""

    def __init__(
        self,
        source: ModelSource,
        serving: Resolved,
        *,
        policy: str,
        metrics: ServeMetrics,
        on_swapped: Callable[[Resolved], None] = lambda resolved: None,
    ) -> None:
        self.source = source
        #: The bundle served now (its bundle.json; the engine holds its weights).
        self.serving = serving
        self._policy = policy
        self._metrics = metrics
        self._on_swapped = on_swapped
        self._waiting: list[asyncio.Future[ReloadOutcome]] = []
        #: Model ids the engine refused: the watch does not ask for them again.
        self._refused: set[str] = set()

    @property
    def wanted(self) -> bool:
        return bool(self._waiting)

    def request(self) -> asyncio.Future[ReloadOutcome]:
        """Ask for a reload; the future has its outcome once the loop has done it."""
        future: asyncio.Future[ReloadOutcome] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return future

    async def perform(self, engine: EngineClient) -> ReloadOutcome:
        """Resolve ``--model`` again and swap the engine to it (the loop's part)."""
        waiting, self._waiting = self._waiting, []
        outcome = await self._swap(engine)
        self._metrics.model_reloads.labels(outcome.outcome).inc()
        if outcome.outcome == "refused":
            logger.error("model reload refused, %s serves on: %s", outcome.model, outcome.error)
        elif outcome.outcome == "swapped":
            self._metrics.model_swap_seconds.set(outcome.seconds)
            logger.info(
                "model swapped: %s -> %s (version %s), %d streams' states %s in %.3f s",
                outcome.previous,
                outcome.model,
                outcome.version or "-",
                outcome.streams,
                {"carry": "carried", "rewarm": "re-warmed", "reset": "reset"}[outcome.mode or ""],
                outcome.seconds,
            )
            if outcome.from_shadow:
                logger.info(
                    "shadow model promoted: %d streams go on from its own states",
                    outcome.from_shadow,
                )
        for future in waiting:
            if not future.done():
                future.set_result(outcome)
        return outcome

    async def watch(self, every_s: float) -> None:
        """Until cancelled: ask for a reload whenever ``--model`` resolves to a bundle
        other than the one served (and not one the engine refused before)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                found = self.source.resolve().bundle.model_id
            except StreamLSTMError as exc:
                logger.debug("model watch: %s", exc)
                continue
            if found != self.serving.bundle.model_id and found not in self._refused:
                logger.info("model watch: %s found, reloading", found)
                await self.request()

    async def _swap(self, engine: EngineClient) -> ReloadOutcome:
        old = self.serving.bundle
        try:
            found = self.source.resolve()
        except StreamLSTMError as exc:
            return ReloadOutcome("refused", old.model_id, old.model_id, error=str(exc))
        new = found.bundle
        if new.model_id == old.model_id:
            return ReloadOutcome("unchanged", old.model_id, old.model_id, self.serving.version)
        mode = swap_mode(
            self._policy,
            made_by=old.model_id,
            model_id=new.model_id,
            compatible=same_state_layout(old.config, new.config),
        )
        try:
            reply = await engine.swap_model(SwapModel(str(new.source), new.model_id, mode))
        except StreamLSTMError as exc:
            self._refused.add(new.model_id)
            error = str(exc)
            return ReloadOutcome("refused", old.model_id, old.model_id, found.version, error=error)
        self.serving = found
        self._on_swapped(found)
        return ReloadOutcome(
            "swapped",
            new.model_id,
            old.model_id,
            found.version,
            mode=mode,
            streams=reply.streams,
            seconds=reply.seconds,
            from_shadow=reply.from_shadow,
        )
