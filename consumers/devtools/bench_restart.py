"""``streamlstm bench restart``: what a restarted instance waits before it serves again.

A changelog partition filled with ``streams`` states of the bench's model
(``bench_state``), restored into a real engine child process as the daemon
restores an assigned partition: from the changelog alone, against from the
partition's local checkpoint (a state dir) and only the changelog records
after it, alternated in one run (docs/cold-tier.md, "Local checkpoints").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamlstm import Bundle, ModelConfig
from streamlstm.cold_store import disk_bytes
from streamlstm.consumers.devtools.bench_state import fill_changelog, restore_once
from streamlstm.consumers.devtools.brokers import local_broker
from streamlstm.consumers.durability.changelog import ensure_changelog
from streamlstm.consumers.kafka.clients import client_options

__all__ = ["main", "run_restart_bench"]


def run_restart_bench(
    bootstrap: str, bundle: Bundle, streams: int, *, tail: int, repeat: int, state_dir: Path
) -> dict[str, Any]:
    """An instance of ``streams`` streams restarted: its restore from the changelog alone
    against one from its local checkpoint and the changelog's last ``tail`` records,
    alternated ``repeat`` times (a fresh engine child each; the best of each counts).
    First, the start that builds the local checkpoint (the whole changelog read, and
    written to disk); before each local restore, ``tail`` new records (written after
    the local checkpoint, as a kill -9 leaves the checkpoints it did not flush)."""
    topic = f"bench-changelog-{uuid.uuid4().hex[:6]}"
    asyncio.run(
        ensure_changelog(client_options(bootstrap), topic, partitions=1, replication_factor=1)
    )
    _progress(f"filling {topic} with {streams} states")
    size = asyncio.run(fill_changelog(bootstrap, topic, bundle, streams))
    local = str(state_dir / topic)
    _progress("first start with a state dir: the whole changelog, and the local checkpoint built")
    first = asyncio.run(restore_once(bootstrap, topic, bundle, streams, local))
    runs: dict[str, list[dict[str, Any]]] = {"changelog": [], "local": []}
    for turn in range(repeat):
        for kind, directory in (("changelog", None), ("local", local)):
            if kind == "local" and tail:  # new records since the local checkpoint, each turn
                asyncio.run(fill_changelog(bootstrap, topic, bundle, tail, seed=turn + 1))
            _progress(f"turn {turn + 1} of {repeat}: restore from {kind}")
            runs[kind].append(
                asyncio.run(restore_once(bootstrap, topic, bundle, streams, directory))
            )
    best = {kind: min(r["restore_seconds"] for r in done) for kind, done in runs.items()}
    return {
        "streams": streams,
        "tail_records": tail,
        "changelog_bytes": size,
        "first_start_seconds": first["restore_seconds"],
        "changelog_restore_seconds": [r["restore_seconds"] for r in runs["changelog"]],
        "local_restore_seconds": [r["restore_seconds"] for r in runs["local"]],
        "restored_streams": [r["restored_streams"] for r in runs["local"]],
        "local_over_changelog": round(best["local"] / max(best["changelog"], 1e-9), 3),
        "local_disk_bytes": disk_bytes(Path(local)),
    }


def _progress(text: str) -> None:
    print(f"[bench restart] {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> int:
    """``streamlstm bench restart``: a restart's restore, local checkpoint against changelog."""
    parser = argparse.ArgumentParser(prog="streamlstm bench restart")
    parser.add_argument(
        "--bootstrap-servers", help="an existing broker (default: start a local Apache Kafka)"
    )
    parser.add_argument("--streams", type=int, default=1_000_000)
    parser.add_argument(
        "--tail", type=int, default=10_000, help="changelog records after the local checkpoint"
    )
    parser.add_argument("--repeat", type=int, default=2, help="alternated restores of each kind")
    parser.add_argument("--state-dir", help="where the local checkpoints go (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(list(argv))
    bundle = Bundle.random(ModelConfig(input_size=1), seed=0)
    broker = None if args.bootstrap_servers else local_broker("kafka").start()
    try:
        bootstrap = args.bootstrap_servers or broker.bootstrap  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(dir=args.state_dir) as directory:
            result = run_restart_bench(
                bootstrap,
                bundle,
                args.streams,
                tail=args.tail,
                repeat=args.repeat,
                state_dir=Path(directory),
            )
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps(result) if args.json else _restart_report(result))
    return 0


def _restart_report(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"restart of {result['streams']:,} streams ({result['changelog_bytes'] / 1e9:.2f} GB "
            f"of changelog), {result['tail_records']:,} records after the local checkpoint",
            f"first start (changelog, local checkpoint built): {result['first_start_seconds']} s",
            f"changelog alone:          {result['changelog_restore_seconds']} s",
            f"local checkpoint + tail:  {result['local_restore_seconds']} s "
            f"({result['local_over_changelog']}x the changelog's best)",
            f"local checkpoint on disk: {result['local_disk_bytes'] / 1e9:.2f} GB",
        ]
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
