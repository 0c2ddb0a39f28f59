"""HTTP servers on aiohttp, with limits: ``/metrics``, ``/healthz``, ``/readyz`` (and, on
another port, any other ``web.Application``, such as the admin API).

aiohttp parses and answers; :class:`HttpService` puts a small guard protocol in front of
each of its connections and bounds what one client can hold. Each limit of
:class:`HttpLimits` is there for one attack or accident:

- ``max_header_bytes`` / ``max_headers``: a request head is read into memory before anything
  looks at it; without a bound, one client sends an endless header line (or endless headers)
  and the daemon buffers it all (memory). aiohttp answers 400 past either bound.
- ``max_body_bytes``: the same for a body read with ``request.read()`` / ``json()`` /
  ``post()`` (413). A body declared longer by its ``Content-Length`` is refused before a
  byte of it is read.
- ``header_timeout_s`` (slowloris): a client that sends its head one byte at a time, just
  before each read would give up, holds its connection (a file descriptor and a slot of
  ``max_connections``) for as long as it likes; a handful of such clients starve every
  honest one. The head must be complete (up to its blank line) this soon after connecting.
- ``request_timeout_s``: a hard end to each connection, whatever it does: a slow body, a
  slow reader of the response, a handler that never ends (it is cancelled). Every response
  carries ``Connection: close`` (one request per connection), so this is a per-request
  deadline.
- ``max_connections``: each connection is a file descriptor and some memory; past this many
  at once a new one is closed as soon as it is accepted (fd exhaustion would stop the Kafka
  clients too, not just HTTP).

Nothing here logs a request's headers or body: an ``Authorization`` header passes through
this module (the admin API). aiohttp's access log is off, and its server log gets a
malformed request's error as its type alone (the message quotes the offending bytes).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from streamlstm.errors import ConfigError

__all__ = ["HttpEndpoints", "HttpLimits", "HttpService", "metrics_app"]

logger = logging.getLogger(__name__)

#: The blank line that ends a request head (aiohttp's parser refuses bare LFs: 400).
_HEAD_END = b"\r\n\r\n"
#: The bytes of one read kept to find a head end split across two reads.
_TAIL = len(_HEAD_END) - 1
#: How long stop() lets a request in progress finish before it is cancelled (aiohttp waits
#: up to twice this: for the handler, then for its task once the request is cancelled).
_SHUTDOWN_S = 1.0


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """Limits of one HTTP server (see the module's docstring for why each exists)."""

    #: The longest request line, and the longest header field (aiohttp's ``max_line_size``
    #: and ``max_field_size``); past it aiohttp answers 400.
    max_header_bytes: int = 8190
    #: The most header fields in one request; past it aiohttp answers 400.
    max_headers: int = 64
    #: The largest body a handler may read (``request.read()`` and the like): 413 past it.
    max_body_bytes: int = 64 * 1024
    #: A connection that has not sent its whole request head (up to the blank line) this
    #: long after it opened is closed.
    header_timeout_s: float = 5.0
    #: A connection is closed this long after it opened, whatever it is doing.
    request_timeout_s: float = 60.0
    #: Connections open at once; one more is closed as soon as it is accepted.
    max_connections: int = 64
    #: Connections open at once from one client address: one client cannot take every
    #: slot (a kubelet probe or a scrape from elsewhere still gets in).
    max_connections_per_client: int = 8

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{field.name}: must be a number, not {value!r}")
            if field.type == "int" and not isinstance(value, int):
                raise ConfigError(f"{field.name}: must be a whole number, not {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{field.name}: must be positive and finite, not {value!r}")
        if self.header_timeout_s > self.request_timeout_s:
            raise ConfigError("header_timeout_s: must not exceed request_timeout_s")


class _Connections:
    """The open connections of one server, which its guards share."""

    def __init__(self, name: str, limits: HttpLimits, handler: Callable[[], asyncio.Protocol]):
        self.name = name
        self.limits = limits
        #: Makes aiohttp's protocol for an accepted connection.
        self.handler = handler
        self.open: set[_Guard] = set()
        #: Open connections per client address.
        self.per_client: collections.Counter[str] = collections.Counter()
        #: Whether a refusal was logged since the count was last under the limit.
        self.refusing = False

    def admit(self, guard: _Guard, peer: object) -> bool:
        """Whether ``guard``'s connection may be served: counts it in if so."""
        client = _address(peer)
        if self.per_client[client] >= self.limits.max_connections_per_client:
            return self._refuse(peer, "max_connections_per_client")
        if len(self.open) >= self.limits.max_connections:
            return self._refuse(peer, "max_connections")
        self.open.add(guard)
        self.per_client[client] += 1
        guard.client = client
        return True

    def _refuse(self, peer: object, limit: str) -> bool:
        if not self.refusing:  # once per episode: a flood must not flood the log too
            logger.warning(
                "%s: %d connections open, closing new ones past %s (%s first)",
                self.name,
                len(self.open),
                limit,
                peer,
            )
        self.refusing = True
        return False

    def release(self, guard: _Guard) -> None:
        if guard in self.open:
            self.open.discard(guard)
            self.per_client[guard.client] -= 1
            if self.per_client[guard.client] <= 0:
                del self.per_client[guard.client]
        if len(self.open) < self.limits.max_connections:
            self.refusing = False


def _address(peer: object) -> str:
    """A connection's client address (host, not port), from its ``peername``."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


class _Guard(asyncio.Protocol):
    """One connection: counted, given deadlines, then handed to aiohttp's protocol.

    aiohttp reads a request head for as long as its client keeps sending, and has no
    deadline for a whole request; the guard closes the transport when either runs out.
    """

    def __init__(self, connections: _Connections) -> None:
        self._connections = connections
        self._inner: asyncio.Protocol | None = None  # None: refused (or not yet made)
        self._transport: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""
        self._started = False  # any byte of the request line seen (leading CRLFs are not)
        #: The client's address, once admitted.
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if not self._connections.admit(self, transport.get_extra_info("peername")):
            transport.close()  # never reaches aiohttp: no parser, no task
            return
        limits = self._connections.limits
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(limits.header_timeout_s, self._expire, "head")
        self._deadline = loop.call_later(limits.request_timeout_s, self._expire, "request")
        self._inner = self._connections.handler()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._head_timer is not None:
            self._watch_head(data)
        self._inner.data_received(data)

    def _watch_head(self, data: bytes) -> None:
        """Cancels the head timer once the head's blank line has come (keeps no more than
        a few bytes: the head itself is aiohttp's to buffer, within its limits)."""
        if not self._started:
            # Empty lines before a request line are allowed (RFC 9112, 2.2): they are not
            # the end of a head, and must not pass for one.
            data = data.lstrip(b"\r\n")
            if not data:
                return
            self._started = True
        if _HEAD_END in data or _HEAD_END in self._tail + data[:_TAIL]:
            assert self._head_timer is not None
            self._head_timer.cancel()
            self._head_timer = None
        else:
            self._tail = (self._tail + data[-_TAIL:])[-_TAIL:]

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._deadline):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._deadline = None
        self._transport = None
        if self._inner is not None:
            self._connections.release(self)
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def _expire(self, what: str) -> None:
        if self._transport is None:
            return
        limits = self._connections.limits
        timeout = limits.header_timeout_s if what == "head" else limits.request_timeout_s
        logger.debug(
            "%s: closing the connection from %s: %s not done within %.1f s",
            self._connections.name,
            self._transport.get_extra_info("peername"),
            what,
            timeout,
        )
        self.abort()

    def abort(self) -> None:
        """Closes the connection now, whatever is left to write (a client that does not
        read its answer must not hold it open)."""
        if self._transport is not None:
            self._transport.abort()


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log, less what a client can write into it.

    A malformed request's exception (an over-long header line, say) quotes up to 100 of its
    bytes, such as the start of an ``Authorization`` header, and aiohttp logs it with its
    traceback at ERROR: anyone who can connect could fill the log, and secrets would land
    in it. Such errors are logged at DEBUG as their type and status alone; everything else
    (a handler's exception above all) goes through as it was.
    """

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(f"{__name__}.aiohttp"))
        self.server_name = name

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            del kwargs["exc_info"]
            level, msg = logging.DEBUG, "%s: a malformed request refused: %d %s"
            args = (self.server_name, exc.code, type(exc).__name__)
        super().log(level, msg, *args, **kwargs)


class HttpService:
    """One aiohttp Application served on ``host:port`` with :class:`HttpLimits`.

    It adds to ``app`` (before aiohttp freezes it at :meth:`start`): a middleware that holds
    every request's body to ``limits.max_body_bytes``, whatever ``client_max_size`` the app
    was made with (413; a handler that reads ``request.content`` itself reads past it, so
    handlers read bodies with ``read()``, ``text()``, ``json()`` or ``post()``), and a
    response hook that closes each connection after its response. Its
    ``handler_args`` (``web.Application(handler_args=...)``) would override the header limits:
    an app served here sets none.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        limits: HttpLimits = HttpLimits(),
        name: str = "http",
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._limits = limits
        self._name = name
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._connections: _Connections | None = None
        # Outermost, so that the app's own middlewares (an auth check) see bounded bodies.
        app.middlewares.insert(0, _body_limit(limits.max_body_bytes))
        app.on_response_prepare.append(_close_after)

    @property
    def port(self) -> int:
        """The bound port once started (``port=0`` picks a free one), else the one asked for."""
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        """Connections served now (the refused ones never count)."""
        return len(self._connections.open) if self._connections is not None else 0

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError(f"{self._name}: already started")
        limits = self._limits
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_S,
            # RequestHandler's arguments (through web.Server):
            access_log=None,  # it would log requests; headers must never be logged
            logger=_ServerLog(self._name),
            handler_cancellation=True,  # a closed connection cancels its handler
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            # aiohttp closes a connection without a whole request after this too; the
            # guard's deadlines are shorter, this is only a backstop.
            keepalive_timeout=limits.request_timeout_s,
        )
        await runner.setup()
        handler = runner.server
        if handler is None:  # set by setup(), always
            raise RuntimeError(f"{self._name}: aiohttp made no server")
        connections = _Connections(self._name, limits, handler)
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _Guard(connections), self._host, self._port
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._connections = runner, connections
        logger.debug("%s: serving on %s:%d with %s", self._name, self._host, self.port, limits)

    async def stop(self) -> None:
        """Stops listening, lets requests in progress end (briefly), closes the rest."""
        server, runner, connections = self._server, self._runner, self._connections
        self._server = self._runner = self._connections = None
        if server is not None:
            server.close()
        if runner is not None:
            await runner.cleanup()
        for guard in list(connections.open if connections is not None else ()):
            guard.abort()  # what aiohttp's shutdown left: a client that does not read
        if server is not None:
            await server.wait_closed()


def _body_limit(max_bytes: int) -> Middleware:
    @web.middleware
    async def body_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > max_bytes:
            # Refused before any of it is read: no handler needs to see it.
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=declared)
        if request.client_max_size == 0 or request.client_max_size > max_bytes:
            # A chunked body has no length up front: read() counts it as it comes.
            request = request.clone(client_max_size=max_bytes)
        return await handler(request)

    return body_limit


async def _close_after(request: web.Request, response: web.StreamResponse) -> None:
    """One request per connection: its deadlines (HttpLimits) are then the request's.

    A response hook rather than a middleware: it runs for streamed responses too and for
    the ones aiohttp makes from an HTTPException, just before the head is written.
    """
    response.force_close()
    response.headers["Connection"] = "close"  # aiohttp leaves it out for HTTP/1.0


def metrics_app(
    registry: CollectorRegistry,
    *,
    ready: Callable[[], bool],
    healthy: Callable[[], bool],
) -> web.Application:
    """``GET /metrics`` (Prometheus text), ``/healthz`` and ``/readyz``; 404 elsewhere."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(request: web.Request) -> web.Response:
        return _plain(200, "ok\n") if healthy() else _plain(503, "unhealthy\n")

    async def readyz(request: web.Request) -> web.Response:
        return _plain(200, "ready\n") if ready() else _plain(503, "not ready\n")

    app = web.Application(middlewares=[_plain_not_found])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


@web.middleware
async def _plain_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The 404 of the old server ("not found\\n") rather than aiohttp's HTML-ish one."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _plain(404, "not found\n")


class HttpEndpoints:
    """``/metrics``, ``/healthz`` and ``/readyz`` (:func:`metrics_app`) on ``host:port``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        ready: Callable[[], bool],
        healthy: Callable[[], bool],
        host: str,
        port: int,
        limits: HttpLimits = HttpLimits(),
    ) -> None:
        self._host = host
        self._service = HttpService(
            metrics_app(registry, ready=ready, healthy=healthy),
            host=host,
            port=port,
            limits=limits,
            name="metrics",
        )

    @property
    def port(self) -> int:
        return self._service.port

    async def start(self) -> None:
        await self._service.start()
        logger.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def stop(self) -> None:
        await self._service.stop()
