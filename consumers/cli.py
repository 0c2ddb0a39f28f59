"""``streamlstm serve``: the daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from streamlstm.consumers.settings import parse_serve_args

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
        loop.add_signal_handler(sig, server.request_stop)
    async with server:
        await server.wait()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
