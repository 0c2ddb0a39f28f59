"""``streamlstm streams get|list|reset|delete``: look at one stream, or act on it.

Through a daemon's admin API (``--admin URL --token-file F``; see
docs/admin-api.md): ``get STREAM [--state]``, ``list [--prefix P] [--limit N]
[--cursor C] [--all]``, ``reset STREAM``, ``delete STREAM``. Or, for reset
and delete, straight to Kafka (``--input-topic T`` and the connection
flags): the control (``wire.CONTROL_HEADER``) goes onto the input topic keyed
by the stream, acknowledged by every in-sync replica and sent idempotently;
the partition's owner applies it in offset order with the stream's ticks and
answers on the output topic. With ``--output-topic`` the command waits (up to
``--wait-s``) for that acknowledgement.

Exit status: 0 done; 3 the control was sent but not acknowledged in time (it
stays in the topic and will still be applied); 1 the admin API refused the
request (its answer is printed on stderr). Anyone who may produce to the input
topic may send controls, as they may send ticks: Kafka's ACLs govern both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from streamlstm.consumers.admin.ack_reader import AckReader
from streamlstm.consumers.codec.wire import CONTROL_HEADER, stream_key
from streamlstm.consumers.devtools.connection import add_connection_arguments, connection_options
from streamlstm.errors import InputError

__all__ = ["main"]

#: Exit status when the acknowledgement did not come within the wait.
NOT_YET = 3
#: Exit status when the admin API refused the request.
REFUSED = 1


def main(argv: Sequence[str]) -> int:
    """``argv``: ``["streams", OP, ...]``, as ``streamlstm`` passes it."""
    parser = _parser()
    args = parser.parse_args(list(argv)[1:])  # argv[0]: the command's name, "streams"
    if args.op != "list":
        if not args.stream:
            parser.error(f"{args.op}: the stream id is required")
        try:
            stream_key("stream", args.stream)
        except InputError as exc:
            parser.error(str(exc))
    if not args.wait_s > 0:
        parser.error("--wait-s: must be positive")
    if args.admin:
        if not args.token_file:
            parser.error("--admin needs --token-file")
        return _over_http(args)
    if args.op in ("get", "list"):
        parser.error(f"{args.op}: needs --admin URL (the daemon's admin API)")
    if not args.input_topic:
        parser.error(f"{args.op}: needs --admin URL, or --input-topic to send it to Kafka")
    return asyncio.run(_to_kafka(args, args.stream.encode()))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamlstm streams",
        description="Look at one stream's state through a daemon's admin API, list the "
        "streams it holds, or reset or delete one (a control record on the input topic, "
        "applied in order with its ticks).",
    )
    parser.add_argument("op", choices=["get", "list", "reset", "delete"])
    parser.add_argument("stream", nargs="?", help="the stream id (the ticks' message key)")
    parser.add_argument("--admin", help="the admin API's base URL, e.g. http://host:9465")
    parser.add_argument("--token-file", help="a file holding the admin API's bearer token")
    parser.add_argument("--state", action="store_true", help="get: include the state itself")
    parser.add_argument("--prefix", default="", help="list: ids starting with this")
    parser.add_argument("--limit", type=int, default=100, help="list: per page (default 100)")
    parser.add_argument("--cursor", default=None, help="list: from this page on")
    parser.add_argument("--all", action="store_true", help="list: every page")
    parser.add_argument("--input-topic", help="reset/delete straight to Kafka: the input topic")
    parser.add_argument("--output-topic", help="straight to Kafka: wait for the acknowledgement")
    parser.add_argument("--wait-s", type=float, default=30.0, help="(default 30)")
    add_connection_arguments(parser)
    return parser


# -- through the admin API ------------------------------------------------------


def _over_http(args: argparse.Namespace) -> int:
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        print(f"--token-file: cannot read {args.token_file}: {exc.strerror}", file=sys.stderr)
        return 2
    base = args.admin.rstrip("/") + "/v1"
    if args.op == "list":
        return _list(base, token, args)
    path = f"{base}/streams/{urllib.parse.quote(args.stream, safe='')}"
    if args.op == "get":
        status, body = _call("GET", path + ("?include=state" if args.state else ""), token)
    elif args.op == "reset":
        status, body = _call("POST", path + "/reset", token, args.wait_s)
    else:
        status, body = _call("DELETE", path, token, args.wait_s)
    if status == 504:
        print(json.dumps(body), flush=True)
        print(f"{args.op} sent, not yet applied (it will still be)", file=sys.stderr)
        return NOT_YET
    if status >= 400:
        print(f"admin API answered {status}: {json.dumps(body)}", file=sys.stderr)
        return REFUSED
    print(json.dumps(body))
    return 0


def _list(base: str, token: str, args: argparse.Namespace) -> int:
    cursor = args.cursor
    while True:
        query = {"prefix": args.prefix, "limit": str(args.limit)}
        if cursor is not None:
            query["cursor"] = cursor
        status, body = _call("GET", f"{base}/streams?{urllib.parse.urlencode(query)}", token)
        if status >= 400:
            print(f"admin API answered {status}: {json.dumps(body)}", file=sys.stderr)
            return REFUSED
        for stream in body["streams"]:
            print(stream)
        cursor = body["next_cursor"]
        if cursor is None or not args.all:
            if cursor is not None:
                print(f"next page: --cursor {cursor}", file=sys.stderr)
            return 0


def _call(method: str, url: str, token: str, wait_s: float = 0.0) -> tuple[int, Any]:
    """The status and JSON body of one request (an error status is an answer too)."""
    request = urllib.request.Request(
        url, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30 + wait_s) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": exc.reason}


# -- straight to Kafka -------------------------------------------------------------


async def _to_kafka(args: argparse.Namespace, key: bytes) -> int:
    options = connection_options(args, "streamlstm-streams")
    producer = AIOKafkaProducer(**options, acks="all", enable_idempotence=True)
    await producer.start()
    reader = None
    try:
        if args.output_topic:
            reader = await AckReader.start(options, args.output_topic, producer, key)
        meta = await producer.send_and_wait(
            args.input_topic, b"", key=key, headers=[(CONTROL_HEADER, args.op.encode())]
        )
        sent = {"sent": args.op, "stream": args.stream, "partition": meta.partition}
        print(json.dumps({**sent, "offset": meta.offset}), flush=True)
        if reader is None:
            return 0
        ack = await reader.wait(meta.partition, meta.offset, args.wait_s)
    finally:
        await producer.stop()
        if reader is not None:
            await reader.stop()
    if ack is None:
        print(
            f"not acknowledged within {args.wait_s:g} s (it will still be applied)",
            file=sys.stderr,
        )
        return NOT_YET
    print(json.dumps(ack))
    return 0
