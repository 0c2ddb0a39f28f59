"""``streamlstm produce`` and ``tail`` against the test broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

from tests.consumers.conftest import read_all


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamlstm.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_produce_replays_a_file_in_time_order_keyed_as_kafka_keys(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    (topic,) = make_topics("ticks", partitions=4)
    rows = [  # out of time order on purpose; ISO dates become epoch ms
        ("2024-01-03", "pump-a", 3.0, 30),
        ("2024-01-01", "pump-a", 1.0, 10),
        ("2024-01-02", "pump-b", 2.5, 25),
        ("2024-01-01", "pump-b", 1.5, 15),
        ("2024-01-02", "pump-a", 2.0, 20),
    ]
    data = tmp_path / "ticks.csv"
    data.write_text("day,pump,load,temp\n" + "".join(f"{d},{p},{x},{t}\n" for d, p, x, t in rows))
    done = _cli(
        "produce",
        "--data",
        str(data),
        "--topic",
        topic,
        "--bootstrap-servers",
        bootstrap,
        "--stream-column",
        "pump",
        "--time-column",
        "day",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"produced 5 ticks to {topic}" in done.stderr

    messages = asyncio.run(read_all(bootstrap, topic, 5, timeout_s=30))
    assert len(messages) == 5
    kafka_default = DefaultPartitioner()
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for msg in sorted(messages, key=lambda m: (m.partition, m.offset)):
        body = json.loads(msg.value)
        assert msg.key.decode() == body["stream"]
        assert msg.partition == kafka_default(msg.key, [0, 1, 2, 3], [0, 1, 2, 3])
        by_stream.setdefault(body["stream"], []).append(body)
    day_ms = 86_400_000
    jan1 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    assert by_stream["pump-a"] == [
        {"stream": "pump-a", "ts": jan1 + k * day_ms, "values": [float(k + 1), 10.0 * (k + 1)]}
        for k in range(3)
    ]
    assert [b["ts"] for b in by_stream["pump-b"]] == [jan1, jan1 + day_ms]
    assert [b["values"] for b in by_stream["pump-b"]] == [[1.5, 15.0], [2.5, 25.0]]

    shown = _cli(
        "tail",
        "--topic",
        topic,
        "--bootstrap-servers",
        bootstrap,
        "--from-beginning",
        "--max-messages",
        "5",
        "--timeout-s",
        "20",
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    assert len(lines) == 5
    assert sorted(line.split("\t")[0] for line in lines) == ["pump-a"] * 3 + ["pump-b"] * 2
