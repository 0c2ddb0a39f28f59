"""The HTTP servers and their limits, over real sockets: what a hostile or clumsy client
gets (oversized heads and bodies, slowloris, too many connections, a request that never
ends) and that honest clients are served all the while."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from streamlstm.consumers.observability.http import (
    HttpEndpoints,
    HttpLimits,
    HttpService,
    metrics_app,
)
from streamlstm.errors import ConfigError
from tests.helpers.polling import await_for
from tests.helpers.serving import http_get

#: Set when ``GET /sleep`` was cut off (its handler cancelled).
CANCELLED = web.AppKey("cancelled", asyncio.Event)
#: Long enough not to end a test by itself: each test shortens the limit it is about.
PATIENT: dict[str, Any] = {"header_timeout_s": 30.0, "request_timeout_s": 60.0}


def _app() -> web.Application:
    """The metrics app (empty registry, ready and healthy) plus ``POST /echo`` (the length
    of the body it read), ``GET /sleep`` (10 s; sets ``CANCELLED`` if cut off) and ``GET /nap``
    (0.8 s)."""
    app = metrics_app(CollectorRegistry(), ready=lambda: True, healthy=lambda: True)
    app[CANCELLED] = asyncio.Event()

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    async def sleep(request: web.Request) -> web.Response:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            request.app[CANCELLED].set()
            raise
        return web.Response(text="slept\n")

    async def nap(request: web.Request) -> web.Response:
        await asyncio.sleep(0.8)
        return web.Response(text="napped\n")

    app.router.add_post("/echo", echo)
    app.router.add_get("/nap", nap)
    app.router.add_get("/sleep", sleep)
    return app


@asynccontextmanager
async def serving(app: web.Application, **limits: Any) -> AsyncIterator[HttpService]:
    service = HttpService(app, host="127.0.0.1", port=0, limits=HttpLimits(**limits))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def exchange(port: int, data: bytes, timeout_s: float = 5.0) -> bytes:
    """Sends ``data``, reads until the server closes: what came back (b"" on a reset)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def get(path: str, *headers: str) -> bytes:
    """An HTTP/1.1 GET of ``path`` (keep-alive, as HTTP/1.1 is by default)."""
    lines = [f"GET {path} HTTP/1.1", "Host: test", *headers, "", ""]
    return "\r\n".join(lines).encode()


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response else 0


async def cut_off_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes = b""
) -> float:
    """Sends ``prefix``, then trickles a header, one byte each 0.2 s: the seconds until the
    server cut it off (an EOF or a reset), or inf if it did not within 5 s."""
    start = time.monotonic()
    writer.write(prefix + b"GET /metrics HTTP/1.1\r\nX-Slow: ")
    while time.monotonic() - start < 5:
        try:
            writer.write(b"a")
            if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - start
    return float("inf")


def test_metrics_health_and_readiness_in_both_states_and_404_elsewhere() -> None:
    registry = CollectorRegistry()
    Counter("streamlstm_probe", "A counter of this test.", registry=registry).inc(3)
    state = {"ready": False, "healthy": False}

    async def scenario() -> None:
        endpoints = HttpEndpoints(
            registry,
            ready=lambda: state["ready"],
            healthy=lambda: state["healthy"],
            host="127.0.0.1",
            port=0,
        )
        await endpoints.start()
        try:
            port = endpoints.port
            assert port != 0
            code, body = await http_get(port, "/metrics")
            assert code == 200 and "streamlstm_probe_total 3.0" in body
            assert await http_get(port, "/healthz") == (503, "unhealthy\n")
            assert await http_get(port, "/readyz") == (503, "not ready\n")
            state.update(ready=True, healthy=True)
            assert await http_get(port, "/healthz") == (200, "ok\n")
            assert await http_get(port, "/readyz") == (200, "ready\n")
            assert await http_get(port, "/nothing/here") == (404, "not found\n")
            response = await exchange(port, get("/metrics"))
            assert b"content-type: text/plain; version=" in response.lower()
        finally:
            await endpoints.stop()
            await endpoints.stop()  # safe twice

    asyncio.run(scenario())


def test_a_head_over_its_limits_is_a_400_and_its_bytes_stay_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Bearer " + "s3cr3t" * 60

    async def scenario() -> list[int]:
        async with serving(_app(), max_header_bytes=256, max_headers=8, **PATIENT) as http:
            p = http.port
            return [
                status(await exchange(p, get("/metrics", "X-Fits: " + "a" * 200))),
                status(await exchange(p, get("/metrics" + "?q=" + "a" * 300))),
                status(await exchange(p, get("/metrics", "X-Long: " + "a" * 300))),
                status(await exchange(p, get("/metrics", f"Authorization: {secret}"))),
                status(await exchange(p, get("/metrics", *(f"X-{i}: y" for i in range(6))))),
                status(await exchange(p, get("/metrics", *(f"X-{i}: y" for i in range(20))))),
            ]

    # Within the limits it is served; past either the line, a field or the count, 400.
    assert asyncio.run(scenario()) == [200, 400, 400, 400, 200, 400]
    # aiohttp's error quotes the start of the offending line: it must not be logged.
    assert "s3cr3t" not in caplog.text
    assert "LineTooLong" in caplog.text  # the refusal itself is (at DEBUG)


def test_a_body_over_max_body_bytes_is_a_413_declared_or_chunked() -> None:
    def post(body: bytes, chunked: bool = False) -> bytes:
        head = "POST /echo HTTP/1.1\r\nHost: test\r\n"
        if chunked:
            chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
            return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunk
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def scenario() -> list[bytes]:
        # The app keeps aiohttp's default client_max_size (1 MiB): the service's limit holds.
        async with serving(_app(), max_body_bytes=1000, **PATIENT) as http:
            return [
                await exchange(http.port, post(b"x" * 1000)),
                await exchange(http.port, post(b"x" * 1001)),
                await exchange(http.port, post(b"x" * 900, chunked=True)),
                await exchange(http.port, post(b"x" * 5000, chunked=True)),
            ]

    fits, declared, chunked_fits, chunked = asyncio.run(scenario())
    assert status(fits) == 200 and fits.endswith(b"\r\n\r\n1000")
    assert status(declared) == 413
    assert status(chunked_fits) == 200 and chunked_fits.endswith(b"\r\n\r\n900")
    assert status(chunked) == 413


def test_slowloris_clients_are_cut_off_and_honest_ones_are_served_meanwhile() -> None:
    header_timeout_s = 1.0

    async def scenario() -> tuple[list[float], list[float]]:
        async with serving(_app(), header_timeout_s=header_timeout_s) as http:
            conns = [await asyncio.open_connection("127.0.0.1", http.port) for _ in range(5)]
            # Empty lines before the request line are no end of a head (one client).
            prefixes = [b"\r\n\r\n", b"", b"", b"", b""]
            slow = [
                asyncio.create_task(cut_off_after(r, w, prefix))
                for (r, w), prefix in zip(conns, prefixes, strict=True)
            ]
            honest = []
            while not all(task.done() for task in slow):
                start = time.monotonic()
                code, _ = await asyncio.wait_for(http_get(http.port, "/metrics"), 1.0)
                assert code == 200
                honest.append(time.monotonic() - start)
                await asyncio.sleep(0.1)
            for _, writer in conns:
                writer.close()
            return [task.result() for task in slow], honest

    cut_offs, honest = asyncio.run(scenario())
    # The head timer, not something else, ends them: not before it, not long after.
    assert all(header_timeout_s - 0.05 <= t <= header_timeout_s + 1 for t in cut_offs), cut_offs
    assert len(honest) >= 5 and max(honest) < 1.0, honest


def test_a_head_whose_blank_line_comes_in_pieces_is_served_past_header_timeout_s() -> None:
    head = get("/nap")
    # The blank line split every way across two reads, and one byte a read.
    pieces = [
        [head[:-1], head[-1:]],
        [head[:-2], head[-2:]],
        [head[:-3], head[-3:]],
        [head[:-4], head[-4:]],
        [head[:-4], b"\r", b"\n", b"\r", b"\n"],
    ]

    async def send(port: int, parts: list[bytes]) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.03)  # one segment, one read each
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    async def scenario() -> list[bytes]:
        # The answer takes 0.8 s, past the head's 0.3 s: only a head seen whole survives.
        async with serving(_app(), header_timeout_s=0.3, request_timeout_s=5.0) as http:
            return await asyncio.gather(*(send(http.port, parts) for parts in pieces))

    for response in asyncio.run(scenario()):
        assert status(response) == 200 and response.endswith(b"napped\n"), response


def test_a_connection_past_max_connections_is_closed_at_once_until_one_closes() -> None:
    async def scenario() -> None:
        async with serving(_app(), max_connections=3, **PATIENT) as http:
            idle = [await asyncio.open_connection("127.0.0.1", http.port) for _ in range(3)]
            await await_for(_true_when(lambda: http.open_connections == 3), 5, "3 accepted")
            start = time.monotonic()
            assert await exchange(http.port, get("/metrics"), timeout_s=1) == b""
            assert time.monotonic() - start < 1
            assert http.open_connections == 3  # the refused one never counted
            # The three are served (they were accepted, not the fourth).
            reader, writer = idle[0]
            writer.write(get("/healthz"))
            assert status(await asyncio.wait_for(reader.read(), 5)) == 200
            writer.close()
            await await_for(_true_when(lambda: http.open_connections == 2), 5, "one closed")
            assert status(await exchange(http.port, get("/metrics"))) == 200
            for _, writer in idle[1:]:
                writer.close()

    asyncio.run(scenario())


def test_one_client_cannot_take_every_connection() -> None:
    """Past max_connections_per_client from one address, that address is refused while
    another (a probe, a scrape) is still served."""

    async def scenario() -> None:
        async with serving(_app(), max_connections_per_client=2, **PATIENT) as http:
            idle = [await asyncio.open_connection("127.0.0.1", http.port) for _ in range(2)]
            await await_for(_true_when(lambda: http.open_connections == 2), 5, "2 accepted")
            assert await exchange(http.port, get("/metrics"), timeout_s=1) == b""
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", http.port, local_addr=("127.0.0.2", 0)
            )
            writer.write(get("/metrics"))
            assert status(await asyncio.wait_for(reader.read(), 5)) == 200
            writer.close()
            for _, idle_writer in idle:
                idle_writer.close()
            await await_for(_true_when(lambda: http.open_connections == 0), 5, "all closed")
            assert status(await exchange(http.port, get("/metrics"))) == 200

    asyncio.run(scenario())


def _true_when(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``predicate`` as ``await_for`` takes it."""

    async def check() -> bool:
        return bool(predicate())

    return check


def test_a_request_past_request_timeout_s_is_cut_off_and_its_handler_cancelled() -> None:
    async def scenario() -> tuple[bytes, float, bool]:
        app = _app()
        async with serving(app, header_timeout_s=0.5, request_timeout_s=1.0) as http:
            start = time.monotonic()
            response = await exchange(http.port, get("/sleep"), timeout_s=5)
            took = time.monotonic() - start
            await await_for(_true_when(app[CANCELLED].is_set), 5, "the handler cancelled")
            return response, took, http.open_connections == 0

    response, took, none_open = asyncio.run(scenario())
    assert response == b"" and 0.95 <= took <= 1.5, (response, took)
    assert none_open


def test_every_response_says_connection_close_and_closes() -> None:
    async def scenario() -> list[bytes]:
        async with serving(_app(), max_body_bytes=10, **PATIENT) as http:
            p = http.port
            too_big = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n" + b"x" * 11
            return [
                # Two pipelined requests: the connection closes after the first answer.
                await exchange(p, get("/metrics") + get("/healthz")),
                await exchange(p, get("/nowhere", "Connection: keep-alive")),
                await exchange(p, too_big),
                await exchange(p, b"GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            ]

    for response in asyncio.run(scenario()):
        head = response.partition(b"\r\n\r\n")[0].lower()
        assert b"\r\nconnection: close" in head, response
        assert response.count(b"HTTP/1.") == 1, response


def test_stop_closes_idle_connections_and_a_second_stop_is_harmless() -> None:
    async def scenario() -> bytes:
        service = HttpService(_app(), host="127.0.0.1", port=0, limits=HttpLimits(**PATIENT))
        await service.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        await await_for(_true_when(lambda: service.open_connections == 1), 5, "accepted")
        await asyncio.wait_for(service.stop(), 5)
        await service.stop()
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    assert asyncio.run(scenario()) == b""


def test_stop_drops_a_client_that_does_not_read_its_answer() -> None:
    size = 32 * 1024 * 1024  # far more than the sockets' buffers hold

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * size)

    async def scenario() -> tuple[int, float]:
        app = web.Application()
        app.router.add_get("/big", big)
        service = HttpService(app, host="127.0.0.1", port=0, limits=HttpLimits(**PATIENT))
        await service.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(get("/big"))
        await await_for(_true_when(lambda: service.open_connections == 1), 5, "accepted")
        await asyncio.sleep(0.2)  # the answer fills the buffers (nothing to poll for)
        start = time.monotonic()
        await asyncio.wait_for(service.stop(), 10)
        took = time.monotonic() - start
        received = 0
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                received += len(chunk)
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        return received, took

    received, took = asyncio.run(scenario())
    # Dropped with its answer unsent (aiohttp alone would wait to flush it for ever).
    assert received < size and took < 4, (received, took)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_header_bytes", 0),
        ("max_headers", -1),
        ("max_body_bytes", 1.5),
        ("header_timeout_s", float("nan")),
        ("request_timeout_s", float("inf")),
        ("max_connections", True),
        ("max_connections_per_client", 0),
        ("header_timeout_s", 61.0),  # past request_timeout_s
    ],
)
def test_limits_refuse_a_bad_value_naming_its_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        HttpLimits(**{field: value})
