"""The serving image, built and run: `streamlstm serve` in a container on Apache Kafka.

No registry is needed. The base image is Debian bookworm made by debootstrap
(deploy/container/base-image.sh, cached as ``streamlstm-base:bookworm``); the
serving image is deploy/Dockerfile built on it (``--build-arg PYTHON_IMAGE``),
with the classic builder and the host's network. Then:

- the image is under MAX_IMAGE_BYTES (its size is printed), holds no torch, no
  ``nvidia-*`` package and no C compiler, and runs as uid 10001;
- `streamlstm serve` runs in it as uid 10001 with a read-only root file system
  (a tmpfs on /tmp), on the host's network, against the suite's Apache Kafka (on
  loopback), with a model bundle mounted read-only at /models/model and the
  Kafka settings from STREAMLSTM_* variables: /healthz and /readyz answer 200,
  every tick gets one prediction, equal per stream to ``Bundle.predict_sequence``
  (1e-5);
- ``docker stop`` ends it with exit status 0 within the grace period, and the
  group's committed offsets are then the input topic's end offsets.

The Docker engine: deploy/container/dockerd.sh starts one where none answers
(`make test-container` also stops it). Where it cannot start, the test fails
(never skips). Containers are labelled ``org.streamlstm.test`` (dockerd.sh stop
removes any left over).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamlstm import Affine, Bundle, ModelConfig
from tests.deploy.conftest import DEPLOY, ROOT

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(1800)]

CONTAINER = DEPLOY / "container"
BASE_IMAGE = "streamlstm-base:bookworm"
IMAGE = "streamlstm:container-test"
LABEL = "org.streamlstm.test"
#: Debian minbase with python3 (~160 MB), libgomp1 and tini, and the venv (numpy is
#: most of it): some 260 MB. torch alone would be several times that.
MAX_IMAGE_BYTES = 400 * 1024 * 1024
#: docker stop's grace period; the daemon's shutdown timeout (20 s by default) is within it.
GRACE_S = 30
PARTITIONS = 2
STREAMS = 6
TICKS = 240
TOLERANCE = 1e-5


def _run(command: list[str], what: str, timeout: float, **env: str) -> str:
    """Runs ``command``; fails with its output's end when it fails."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **env},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        pytest.fail(f"{what}: did not finish within {timeout:.0f} s\n{partial[-3000:]}")
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-6000:]
        pytest.fail(
            f"{what} failed (exit {done.returncode}) after "
            f"{time.monotonic() - started:.0f} s:\n{output}"
        )
    return done.stdout


def _docker(*args: str, what: str = "", timeout: float = 120) -> str:
    return _run(["docker", *args], what or f"docker {args[0]}", timeout)


@dataclass(frozen=True)
class Image:
    tag: str
    size: int
    timings: dict[str, float]


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine that answers: deploy/container/dockerd.sh starts one if need be."""
    _run(["bash", str(CONTAINER / "dockerd.sh"), "start"], "starting Docker (dockerd.sh)", 600)


@pytest.fixture(scope="session")
def image(docker_engine: None) -> Image:
    """The base image (cached) and the serving image built on it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base_deps = pyproject["project"]["dependencies"]
    torch_deps = [d for d in base_deps if d.replace(" ", "").lower().startswith("torch")]
    assert not torch_deps, (
        f"pyproject.toml's base dependencies name {torch_deps}: the serving image must hold "
        "no torch (it belongs in the [train] extra); not built"
    )
    timings: dict[str, float] = {}
    started = time.monotonic()
    _run(["bash", str(CONTAINER / "base-image.sh"), BASE_IMAGE], "base-image.sh", 900)
    timings["base image"] = time.monotonic() - started
    started = time.monotonic()
    build = [
        "docker", "build", "--network", "host",
        "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
        "-f", str(DEPLOY / "Dockerfile"), "-t", IMAGE, str(ROOT),
    ]  # fmt: skip
    # The classic builder: BuildKit would fetch the `# syntax=` frontend from a
    # registry, and the Docker CLI may come without buildx.
    _run(build, f"docker build (on {BASE_IMAGE})", 900, DOCKER_BUILDKIT="0")
    timings["image build"] = time.monotonic() - started
    size = int(_docker("image", "inspect", "--format", "{{.Size}}", IMAGE).strip())
    return Image(IMAGE, size, timings)


def test_the_image_is_small_torch_free_compiler_free_and_not_root(image: Image) -> None:
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in image.timings.items())
    print(
        f"\n{image.tag}: {image.size / 1e6:.0f} MB (bound {MAX_IMAGE_BYTES / 1e6:.0f} MB); "
        f"{timings}"
    )
    assert image.size < MAX_IMAGE_BYTES, (
        f"{image.tag} is {image.size / 1e6:.0f} MB, over {MAX_IMAGE_BYTES / 1e6:.0f} MB"
    )
    probe = (
        "import glob, importlib.metadata as m, json, os, shutil; print(json.dumps({"
        "'uid': os.getuid(), 'gid': os.getgid(),"
        "'dists': sorted(d.name.lower() for d in m.distributions()),"
        "'compilers': sorted({p for c in ('gcc', 'cc', 'c++', 'g++', 'cpp', 'clang', 'tcc')"
        " if (p := shutil.which(c, path='/usr/local/bin:/usr/bin:/bin:/opt/streamlstm/bin'))}"
        " | set(glob.glob('/usr/bin/*-gcc*')) | set(glob.glob('/usr/lib/gcc/*/*/cc1'))),"
        "}))"
    )
    found = json.loads(
        _docker(
            "run",
            "--rm",
            "--network",
            "host",
            "--label",
            LABEL,
            "--read-only",
            "--entrypoint",
            "python",
            image.tag,
            "-c",
            probe,
        )
    )
    assert (found["uid"], found["gid"]) == (10001, 10001)
    heavy = [d for d in found["dists"] if d == "torch" or d.startswith("nvidia")]
    assert not heavy, f"the serving image holds {heavy}"
    assert "streamlstm" in found["dists"] and "numpy" in found["dists"], found["dists"]
    assert not found["compilers"], f"the serving image holds a compiler: {found['compilers']}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _ticks(seed: int) -> list[tuple[str, list[float]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(TICKS):
        stream = f"machine-{i % STREAMS}" if i % 7 else f"machine-{int(rng.integers(STREAMS))}"
        out.append((stream, [float(rng.normal() * 5), float(rng.uniform(0, 100))]))
    return out


async def _produce(bootstrap: str, topic: str, ticks: list[tuple[str, list[float]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        for i, (stream, values) in enumerate(ticks):
            body = {"stream": stream, "ts": now_ms + i, "values": values}
            await producer.send(topic, key=stream.encode(), value=json.dumps(body).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, count: int, timeout_s: float) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


async def _offsets(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """The group's committed offsets and the topic's end offsets, by partition."""
    # OffsetFetch through a consumer that never joins the group.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        committed = {}
        for tp in tps:
            offset = await consumer.committed(tp)
            if offset is not None:
                committed[tp.partition] = offset
        ends = await consumer.end_offsets(tps)
        return committed, {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


@dataclass
class Container:
    name: str

    def inspect(self, template: str) -> str:
        return _docker("inspect", "--format", template, self.name).strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        done = subprocess.run(
            ["docker", "logs", "--tail", "60", self.name], capture_output=True, text=True
        )
        return (done.stdout + done.stderr)[-6000:]


@pytest.fixture
def serve_container(image: Image) -> Iterator[Callable[[list[str]], Container]]:
    """``start(docker_run_args)``: a container of the image, removed afterwards; its log
    is printed when the test fails."""
    started: list[Container] = []

    def start(args: list[str]) -> Container:
        name = f"streamlstm-test-{uuid.uuid4().hex[:8]}"
        _docker("run", "--detach", "--name", name, "--label", LABEL, *args, image.tag)
        started.append(Container(name))
        return started[-1]

    failed = True
    try:
        yield start
        failed = False
    finally:
        for container in started:
            if failed:
                print(f"--- docker logs {container.name} (last lines)\n{container.logs()}")
            subprocess.run(["docker", "rm", "--force", container.name], capture_output=True)


def _wait(what: str, check: Callable[[], bool], timeout: float, container: Container) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not container.running():
            status = container.inspect("{{.State.ExitCode}}")
            pytest.fail(f"waiting for {what}: the container exited ({status}):\n{container.logs()}")
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def test_serve_in_the_container_on_apache_kafka(
    serve_container: Callable[[list[str]], Container],
    kafka_bootstrap: str,
    make_kafka_topics: Callable[..., list[str]],
    tmp_path: Path,
) -> None:
    config = ModelConfig(input_size=2, hidden_sizes=(16, 8), head_sizes=(8,), output_size=1)
    bundle = Bundle.random(
        config,
        seed=7,
        input_scaler=Affine.from_min_max([-10.0, 0.0], [10.0, 100.0]),
        target_scaler=Affine.from_min_max([0.0], [5.0]),
    )
    model = bundle.save(tmp_path / "model")
    for path in [model, *model.rglob("*")]:  # readable by uid 10001 (root wrote them)
        path.chmod(0o755 if path.is_dir() else 0o644)
    ticks_topic, predictions_topic = make_kafka_topics(
        "ticks", "predictions", partitions=PARTITIONS
    )
    group = f"container-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {
        "STREAMLSTM_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAMLSTM_INPUT_TOPIC": ticks_topic,
        "STREAMLSTM_OUTPUT_TOPIC": predictions_topic,
        "STREAMLSTM_GROUP_ID": group,
        "STREAMLSTM_CREATE_TOPICS": "true",
        "STREAMLSTM_METRICS_HOST": "127.0.0.1",
        "STREAMLSTM_METRICS_PORT": str(port),
        "STREAMLSTM_COMMIT_INTERVAL_MS": "500",
    }
    container = serve_container(
        [
            "--network", "host",
            "--user", "10001:10001",
            "--read-only",
            "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m",
            "--volume", f"{model}:/models/model:ro",
            "--stop-timeout", str(GRACE_S),
            *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")),
        ]
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    _wait("/readyz to answer 200", lambda: _status(f"{base}/readyz") == 200, 120, container)
    assert _status(f"{base}/healthz") == 200
    assert container.inspect("{{.Config.User}}") == "10001:10001"
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"

    ticks = _ticks(seed=3)
    asyncio.run(_produce(kafka_bootstrap, ticks_topic, ticks))
    outputs = asyncio.run(_read(kafka_bootstrap, predictions_topic, len(ticks), 90))
    assert len(outputs) == len(ticks), f"{len(outputs)} predictions for {len(ticks)} ticks"

    got: dict[str, list[tuple[int, list[float]]]] = defaultdict(list)
    for message in outputs:
        body = json.loads(message.value)
        got[body["stream"]].append((body["offset"], body["prediction"]))
    sent: dict[str, list[list[float]]] = defaultdict(list)
    for stream, values in ticks:
        sent[stream].append(values)
    assert set(got) == set(sent)
    worst = 0.0
    for stream, inputs in sent.items():
        # A stream's ticks share a partition (keyed), so offsets order them.
        predictions = np.array([p for _, p in sorted(got[stream])], np.float32)
        want = bundle.predict_sequence(np.array(inputs, np.float32))
        assert predictions.shape == want.shape, (stream, predictions.shape, want.shape)
        worst = max(worst, float(np.abs(predictions - want).max()))
    assert worst <= TOLERANCE, f"worst difference from predict_sequence: {worst:.3g}"
    assert _status(f"{base}/healthz") == 200 and _status(f"{base}/readyz") == 200

    started = time.monotonic()
    _docker("stop", "--time", str(GRACE_S), container.name, timeout=GRACE_S + 30)
    stopped_in = time.monotonic() - started
    exit_code = container.inspect("{{.State.ExitCode}}")
    assert exit_code == "0", f"exit status {exit_code} after docker stop:\n{container.logs()}"
    assert stopped_in < GRACE_S, f"docker stop took {stopped_in:.1f} s (grace period {GRACE_S} s)"
    print(
        f"\nserved {len(ticks)} ticks in the container; worst difference {worst:.2g}; "
        f"stopped in {stopped_in:.1f} s"
    )

    committed, ends = asyncio.run(_offsets(kafka_bootstrap, group, ticks_topic))
    assert sum(ends.values()) == len(ticks)
    assert committed == ends, f"committed {committed}, end offsets {ends}"
