"""The stream admin API's routes: look at one stream, list them, reset or delete one.

Every request needs ``Authorization: Bearer <token>``, compared in constant
time (``hmac.compare_digest``); a missing or wrong one gets 401 and nothing
else, and no header is ever logged. The routes (docs/admin-api.md):

- ``GET /v1/streams/{id}[?include=state]``: what this instance holds of the
  stream; where it holds none, the partition its key goes to and the group
  member that holds that partition, if the group's coordinator says;
- ``GET /v1/streams?prefix=&limit=&cursor=``: the streams held here, a page
  at a time (``next_cursor`` until there is none);
- ``POST /v1/streams/{id}/reset``, ``DELETE /v1/streams/{id}``: a control
  record, then 202 once it was applied, 504 where it was not within the
  wait (it stays in the topic and will be);
- ``GET /v1/partitions``: the input partitions held here;
- ``GET /v1/model``: the model served (and the shadow's id: ``shadow``, null
  for none); ``POST /v1/model/reload``: resolve
  ``--model`` again and swap to the bundle it names at the next checkpoint
  boundary (``models/reload.py``): 200 once swapped (or unchanged), 409 where
  it was refused (the old model serves on), 504 where it was not done within
  the wait (it still will be).

Reads go to the engine as requests in their turn among the steps, so each
answer reflects every step before it and says which: ``as_of`` maps each
input partition to the offset after the last record of it the engine took.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from streamlstm.consumers.admin.controls import ControlSender
from streamlstm.consumers.codec.wire import MAX_STREAM_ID_BYTES, stream_key
from streamlstm.consumers.engine.process import EngineClient
from streamlstm.consumers.engine.protocol import (
    CountsReply,
    CountStreams,
    InspectStream,
    ListStreams,
    PageReply,
    Read,
    ReadReply,
    StreamReply,
)
from streamlstm.consumers.models.reload import Reloader, ReloadOutcome
from streamlstm.errors import InputError, StreamLSTMError

__all__ = ["MAX_PAGE", "AdminApi"]

logger = logging.getLogger(__name__)

#: The most streams one listing page returns.
MAX_PAGE = 1000
_DEFAULT_PAGE = 100

_R = TypeVar("_R", bound=ReadReply)

_STREAM = "/v1/streams/{stream:.+}"  # an id may hold "/" (sent as %2F)


class AdminApi:
    """The routes over the daemon's parts, each passed in.

    ``controls`` sends reset and delete; ``locate(stream, key)`` says where a
    stream not held here lives; ``partitions()`` describes the partitions held
    here.
    """

    def __init__(
        self,
        *,
        token: bytes,
        engine: EngineClient,
        controls: ControlSender,
        locate: Callable[[str, bytes], Awaitable[dict[str, Any]]],
        partitions: Callable[[], list[dict[str, Any]]],
        wait_s: float,
        reloader: Reloader | None = None,
    ) -> None:
        if not token:
            raise StreamLSTMError("admin token: empty")
        self._token = token
        self._engine = engine
        self._controls = controls
        self._locate = locate
        self._partitions = partitions
        self._wait_s = wait_s
        self._reloader = reloader

    def app(self) -> web.Application:
        """The routes (``HttpService`` adds the limits)."""
        app = web.Application(middlewares=[self._authenticate, _translate_errors])
        app.router.add_get("/v1/streams", self.list_streams)
        app.router.add_get("/v1/partitions", self.partitions)
        app.router.add_post(_STREAM + "/reset", self.reset)
        app.router.add_get(_STREAM, self.get_stream)
        app.router.add_delete(_STREAM, self.delete)
        if self._reloader is not None:
            app.router.add_get("/v1/model", self.model)
            app.router.add_post("/v1/model/reload", self.reload)
        return app

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Constant time in the token's content, whatever was sent.
        if not (
            scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token)
        ):
            return web.json_response(
                {"error": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="streamlstm-admin"'},
            )
        return await handler(request)

    async def get_stream(self, request: web.Request) -> web.Response:
        stream, key = _stream(request)
        include = request.query.get("include", "")
        if include not in ("", "state"):
            raise InputError("include", f"must be state, got {include[:40]!r}")
        query = InspectStream(stream, include_state=include == "state")
        reply = await _read(self._engine, query, StreamReply)
        as_of = _as_of(reply.as_of)
        if reply.view is not None:
            return web.json_response({"held": True, **reply.view.to_json(), "as_of": as_of})
        where = await self._locate(stream, key)
        return web.json_response({"held": False, "stream": stream, **where, "as_of": as_of})

    async def list_streams(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        if len(prefix.encode("utf-8", "replace")) > MAX_STREAM_ID_BYTES:
            raise InputError("prefix", f"over the {MAX_STREAM_ID_BYTES}-byte stream id limit")
        limit = _int_arg(request, "limit", _DEFAULT_PAGE, 1, MAX_PAGE)
        cursor = _int_arg(request, "cursor", 0, 0, 2**62)
        reply = await _read(self._engine, ListStreams(prefix, limit, cursor), PageReply)
        return web.json_response(
            {
                "streams": reply.streams,
                "next_cursor": None if reply.cursor < 0 else str(reply.cursor),
                "as_of": _as_of(reply.as_of),
            }
        )

    async def partitions(self, request: web.Request) -> web.Response:
        counts = await _read(self._engine, CountStreams(), CountsReply)
        held = self._partitions()
        for item in held:
            item["streams"] = counts.streams.get(item["partition"], 0)
        return web.json_response({"partitions": held, "as_of": _as_of(counts.as_of)})

    async def model(self, request: web.Request) -> web.Response:
        assert self._reloader is not None
        serving = self._reloader.serving
        stats = self._engine.stats
        shadow = stats.shadow_model if stats is not None and stats.shadow_model else None
        return web.json_response(
            {"model": serving.bundle.model_id, "version": serving.version, "shadow": shadow}
        )

    async def reload(self, request: web.Request) -> web.Response:
        assert self._reloader is not None
        future = self._reloader.request()
        logger.info("admin: model reload asked for")
        try:
            outcome: ReloadOutcome = await asyncio.wait_for(asyncio.shield(future), self._wait_s)
        except TimeoutError:
            return web.json_response(
                {"error": f"not done within {self._wait_s:g} s; it goes on (GET /v1/model)"},
                status=504,
            )
        return web.json_response(
            outcome.to_json(), status=409 if outcome.outcome == "refused" else 200
        )

    async def reset(self, request: web.Request) -> web.Response:
        return await self._control(request, "reset")

    async def delete(self, request: web.Request) -> web.Response:
        return await self._control(request, "delete")

    async def _control(self, request: web.Request, op: str) -> web.Response:
        stream, key = _stream(request)
        outcome = await self._controls.send(stream, key, op, self._wait_s)
        logger.info(
            "admin %s of stream %r: partition %d offset %d (%s)",
            op,
            stream,
            outcome.partition,
            outcome.offset,
            "applied" if outcome.acknowledged else "not yet applied",
        )
        return web.json_response(outcome.to_json(), status=202 if outcome.acknowledged else 504)


@web.middleware
async def _translate_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Bad input: 400 naming the field; the engine or Kafka unavailable: 503; anything
    else: 500 with no detail (logged here, with its traceback)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise  # aiohttp's own answers (404, 405)
    except InputError as exc:
        return web.json_response({"error": {"field": exc.field, "reason": exc.reason}}, status=400)
    except StreamLSTMError as exc:
        logger.warning("admin request %s %s failed: %s", request.method, request.path, exc)
        return web.json_response({"error": str(exc)}, status=503)
    except Exception:
        logger.exception("admin request %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)


async def _read(engine: EngineClient, query: Read, kind: type[_R]) -> _R:
    """The engine's answer to ``query``, which must be a ``kind``."""
    reply = await engine.read(query)
    if not isinstance(reply, kind):
        raise StreamLSTMError(f"engine process: {type(reply).__name__} to {query!r}")
    return reply


def _stream(request: web.Request) -> tuple[str, bytes]:
    stream = request.match_info["stream"]
    return stream, stream_key("stream", stream)


def _int_arg(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(name, f"not an integer: {raw[:40]!r}") from None
    if not low <= value <= high:
        raise InputError(name, f"must be {low}..{high}, got {value}")
    return value


def _as_of(positions: dict[int, int]) -> dict[str, int]:
    """Partition -> offset, with the partitions as JSON keys."""
    return {str(p): o for p, o in sorted(positions.items())}
