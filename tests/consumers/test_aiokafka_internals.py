"""The fenced aiokafka internals (``consumers/kafka/internals.py``): each fast path is
engaged on the pinned aiokafka, gives what the public API gives, and falls back to it when
turned off or when aiokafka's objects are not laid out as checked."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from streamlstm.consumers.kafka import internals
from streamlstm.consumers.kafka import outbox as outbox_module
from streamlstm.consumers.kafka.outbox import Outbox


@pytest.fixture(autouse=True)
def _probed_afresh() -> Any:
    # Verdicts are per process: each test starts unprobed and leaves nothing behind.
    internals._forget()
    yield
    internals._forget()


def test_both_fast_paths_are_engaged_on_the_pinned_aiokafka(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # constraints.txt pins the aiokafka these internals were checked on: a path that is
    # not engaged there is a regression (slower), not a fallback to accept silently.
    caplog.set_level(logging.INFO, logger=internals.__name__)
    assert internals.fast_paths() == {internals.LEAN_RECORDS: False, internals.RAW_APPEND: False}
    assert asyncio.run(internals.probe()) == {
        internals.LEAN_RECORDS: True,
        internals.RAW_APPEND: True,
    }
    engaged = [r.getMessage() for r in caplog.records if "engaged" in r.getMessage()]
    assert len(engaged) == 2, engaged


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("none", set()),
        ("raw_append", {internals.RAW_APPEND}),
        (" lean_records , raw_append ", {internals.LEAN_RECORDS, internals.RAW_APPEND}),
        ("all", {internals.LEAN_RECORDS, internals.RAW_APPEND}),
    ],
)
def test_the_environment_names_the_paths_that_may_be_engaged(
    monkeypatch: pytest.MonkeyPatch, setting: str, expected: set[str]
) -> None:
    monkeypatch.setenv(internals.ENV, setting)
    verdicts = asyncio.run(internals.probe())
    assert {name for name, on in verdicts.items() if on} == expected


def test_an_unknown_path_in_the_environment_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(internals.ENV, "raw_apend")
    assert asyncio.run(internals.probe()) == dict.fromkeys(internals.FAST_PATHS, False)
    assert any("raw_apend" in r.getMessage() for r in caplog.records)


class _Relaid:
    """A producer whose batches are laid out otherwise: the builder's inner record batch
    is gone, as a future aiokafka might rename it."""

    def __init__(self) -> None:
        self._real = AIOKafkaProducer(bootstrap_servers="localhost:1")

    def create_batch(self) -> Any:
        builder = self._real.create_batch()
        builder._builder = None
        return builder

    async def stop(self) -> None:
        await self._real.stop()


def test_internals_laid_out_otherwise_leave_the_public_api(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def probed() -> tuple[dict[str, bool], Any]:
        relaid = _Relaid()  # aiokafka's clients are made inside a running loop
        try:
            verdicts = await internals.probe(relaid)
            # Not engaged: every builder goes through the public append.
            return verdicts, internals.raw_append(relaid._real.create_batch(), 0)
        finally:
            await relaid.stop()

    verdicts, raw = asyncio.run(probed())
    assert verdicts[internals.RAW_APPEND] is False
    assert raw is None
    assert any(
        "raw_append not engaged" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
    )


def _outbox_batches(bulk: bool) -> list[tuple[Any, ...]]:
    async def built() -> list[tuple[Any, ...]]:
        producer = AIOKafkaProducer(bootstrap_servers="localhost:1")  # never started
        outbox = Outbox(producer, {"out": [0, 1, 2]})
        keys = [f"s{i % 50}".encode() for i in range(400)]
        values = [b"v" * (i % 300) for i in range(400)]  # enough to fill batches
        stamps = [1_700_000_000_000 + i for i in range(400)]  # fixed: None stamps "now"
        for lo, hi in ((0, 200), (200, 400)):
            if bulk:
                outbox.add_many("out", keys[lo:hi], values[lo:hi], stamps[lo:hi], [0] * (hi - lo))
            else:
                for k, v, t in zip(keys[lo:hi], values[lo:hi], stamps[lo:hi], strict=True):
                    outbox.add("out", k, v, (), t)
            outbox.add("out", b"between", b"adds", (), 5)
        batches = outbox._ready + [(t, p, b, r) for (t, p), (b, r) in outbox._open.items()]
        await producer.stop()
        return [(t, p, b.record_count(), internals.batch_bytes(b), r) for t, p, b, r in batches]

    return asyncio.run(built())


@pytest.mark.parametrize("fast", [True, False], ids=["raw_append", "public append"])
def test_add_many_builds_the_bytes_single_adds_build(
    monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    taken: list[bool] = []
    real = internals.raw_append

    def counted(builder: Any, appended: int) -> Any:
        raw = real(builder, appended)
        taken.append(raw is not None)
        return raw

    monkeypatch.setattr(outbox_module, "raw_append", counted)
    with internals.only([internals.RAW_APPEND] if fast else []):
        assert asyncio.run(internals.probe())[internals.RAW_APPEND] is fast
        bulk = _outbox_batches(True)
    # The path under test was the one taken: a fast run that fell back would prove nothing.
    assert taken and all(taken) is fast and any(taken) is fast
    assert bulk == _outbox_batches(False)
    assert len(bulk) > 3  # several partitions, and full batches started anew
