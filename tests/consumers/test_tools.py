"""``streamlstm produce`` and ``tail`` against the test broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka.partitioner import DefaultPartitioner

from streamlstm.consumers.devtools.replay import _PACE_S, replay
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


def test_paced_replay_keeps_the_rate_and_sends_at_most_every_pace_interval(
    bootstrap: str, make_topics: Any
) -> None:
    (topic,) = make_topics("paced", partitions=4)
    count, rate = 1000, 2000.0
    streams = [f"s{i % 7}" for i in range(count)]
    values = np.arange(count, dtype=np.float64).reshape(count, 1)
    start = time.monotonic()
    sent = asyncio.run(replay(bootstrap, topic, streams, values, None, rate=rate))
    elapsed = time.monotonic() - start
    assert sent == count
    assert elapsed >= (count - 1) / rate  # never ahead of the rate

    bodies = [json.loads(m.value) for m in asyncio.run(read_all(bootstrap, topic, count))]
    assert sorted(b["values"][0] for b in bodies) == list(range(count))
    # Ticks without a time column carry their send time; one send stamps all
    # it carries alike. At 2000 ticks/s a tick is due every 0.5 ms, so sends
    # as soon as anything is due would stamp several hundred distinct times.
    sends = len({b["ts"] for b in bodies})
    span_s = (max(b["ts"] for b in bodies) - min(b["ts"] for b in bodies)) / 1000.0
    assert sends <= span_s / _PACE_S + 2


def test_produce_with_a_model_sends_exactly_its_features(
    bootstrap: str, make_topics: Any, tmp_path: Path
) -> None:
    from streamlstm import Bundle, ModelConfig

    (topic,) = make_topics("ticks", partitions=1)
    config = ModelConfig(input_size=2, hidden_sizes=(4,), head_sizes=(2,), output_size=1)
    model = Bundle.random(config, seed=0, feature_names=("temp", "load")).save(tmp_path / "m")
    data = tmp_path / "ticks.csv"
    data.write_text("load,noise,temp\n1.0,9.0,20.0\n2.0,9.5,21.0\n")
    done = _cli(
        "produce",
        "--data",
        str(data),
        "--topic",
        topic,
        "--bootstrap-servers",
        bootstrap,
        "--model",
        str(model),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    messages = asyncio.run(read_all(bootstrap, topic, 2, timeout_s=30))
    # The model's features, in the model's order; the other numeric column is left out.
    assert [json.loads(m.value)["values"] for m in messages] == [[20.0, 1.0], [21.0, 2.0]]
    nameless = Bundle.random(config, seed=0).save(tmp_path / "nameless")
    refused = _cli(
        "produce",
        "--data",
        str(data),
        "--topic",
        topic,
        "--bootstrap-servers",
        bootstrap,
        "--model",
        str(nameless),
    )
    # A bundle without named features is x0, x1, ...: the file lacks them, and says so.
    assert refused.returncode == 1 and "x0, x1 not in the file" in refused.stderr
