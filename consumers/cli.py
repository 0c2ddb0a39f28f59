"""``streamlstm serve``: the daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from streamlstm.consumers.settings import parse_serve_args

if TYPE_CHECKING:
    from streamlstm.consumers.server import Server

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(argv: Sequence[str]) -> int:
    command, rest = argv[0], list(argv[1:])
    if command == "serve":
        return asyncio.run(_serve(rest))
    raise SystemExit(f"unknown command {command}")


async def _serve(argv: list[str]) -> int:
    from streamlstm.consumers.server import Server

    config = parse_serve_args(argv)
    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, server, sig)
    # SIGHUP: reload --model at the next checkpoint boundary (docs/serving.md).
    loop.add_signal_handler(signal.SIGHUP, _on_hangup, server)
    async with server:
        await server.wait()
    return 0


_signals = 0


def _on_hangup(server: Server) -> None:
    logger.info("SIGHUP: reloading the model at the next checkpoint")
    server.request_reload()


def _on_signal(server: Server, sig: signal.Signals) -> None:
    """The first signal drains and commits; a second one exits at once.

    At once means ``os._exit``: nothing more is committed, so whatever was
    not acknowledged is read again by the next owner of its partition.
    """
    global _signals
    _signals += 1
    if _signals == 1:
        logger.info("%s: finishing in-flight work (send it again to exit at once)", sig.name)
        server.request_stop()
        return
    logger.warning("%s again: exiting at once, without committing", sig.name)
    server.kill_engine()
    logging.shutdown()
    os._exit(128 + sig.value)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
