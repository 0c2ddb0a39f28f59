"""The engine child process: same answers as an in-process Engine, errors that cross back."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamlstm import Bundle, Engine, InputError, ModelConfig, StepResult, StreamLSTMError
from streamlstm.consumers.engine import spool
from streamlstm.consumers.engine.child import EngineHost
from streamlstm.consumers.engine.isolation import step_isolated
from streamlstm.consumers.engine.process import ProcessClient, StepRequest
from tests.conftest import BundleFactory
from tests.consumers.conftest import FragileEngine


def _bundle() -> Bundle:
    return Bundle.random(ModelConfig(input_size=2, hidden_sizes=(16, 8)), seed=3)


def run(factory: Callable[[ProcessClient], Coroutine[Any, Any, None]]) -> None:
    """Start a child for ``_bundle()``, run ``factory(proc)``, always close it."""

    async def main() -> None:
        proc = ProcessClient(_bundle(), max_streams=64, idle_ttl_s=None)
        await proc.start()
        try:
            await factory(proc)
        finally:
            await proc.close()
            await proc.close()  # safe twice

    asyncio.run(main())


def _batch(rng: np.random.Generator, n: int, start: int = 0) -> dict[str, Any]:
    ids = [f"s{i}" for i in rng.integers(0, 20, n).tolist()]
    return {
        "stream_ids": ids,
        "features": rng.standard_normal((n, 2)),
        "resets": rng.random(n) < 0.1,
        "ends": rng.random(n) < 0.05,
        "timestamps": np.arange(n, dtype=np.float64) * 1000.0,
        "offsets": list(range(start, start + n)),  # one partition's offsets only grow
    }


def test_overlapping_steps_match_an_in_process_engine() -> None:
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 60, 12).tolist()
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    batches = [_batch(rng, n, start) for n, start in zip(sizes, starts, strict=True)]
    local = Engine(_bundle(), max_streams=64)
    expected = [local.step(**b) for b in batches]

    async def check(proc: ProcessClient) -> None:
        # All requests in flight at once: replies must come back in order.
        replies = await asyncio.gather(
            *(proc.step(StepRequest(**b, partitions=[0] * len(b["stream_ids"]))) for b in batches)
        )
        for reply, want in zip(replies, expected, strict=True):
            np.testing.assert_array_equal(reply.result.predictions, want.predictions)
            np.testing.assert_array_equal(reply.result.steps, want.steps)
            assert reply.seconds > 0
        assert proc.stats is not None
        assert proc.stats.active_streams == local.stats.active_streams
        assert proc.stats.ticks == sum(len(b["stream_ids"]) for b in batches)

    run(check)


def test_drop_partitions_forgets_only_their_streams() -> None:
    async def check(proc: ProcessClient) -> None:
        features = np.zeros((4, 2))
        flags = [False] * 4
        ts = np.zeros(4)
        ids = ["a", "b", "c", "d"]
        await proc.step(StepRequest(ids, features, flags, flags, ts, [0, 1, 2, 3], [0, 1, 1, 2]))
        assert await proc.drop_partitions([1]) == 2
        assert proc.stats is not None and proc.stats.active_streams == 2
        reply = await proc.step(
            StepRequest(["b", "a"], features[:2], flags[:2], flags[:2], ts[:2], [4, 5], [1, 0])
        )
        assert reply.result.steps.tolist() == [1, 2]  # b starts again; a goes on

    run(check)


def test_rejected_ticks_leave_no_partition_behind() -> None:
    async def check(proc: ProcessClient) -> None:
        features = np.array([[0.0, 0.0], [np.nan, 0.0], [0.0, 0.0]])
        flags = [False] * 3
        reply = await proc.step(
            StepRequest(
                ["a", "bad", "c"], features, flags, flags, np.zeros(3), [0, 1, 2], [0, 1, 1]
            )
        )
        assert reply.result.accepted.tolist() == [True, False, True]
        # Only "c" holds state on partition 1; the rejected "bad" never did.
        assert await proc.drop_partitions([1]) == 1
        assert proc.stats is not None and proc.stats.active_streams == 1

    run(check)


def test_an_engine_error_crosses_back_with_its_type_and_the_child_goes_on() -> None:
    async def check(proc: ProcessClient) -> None:
        with pytest.raises(InputError) as info:
            await proc.step(
                StepRequest(
                    ["a"],
                    np.zeros((1, 2)),
                    resets=[False, True],  # two flags for one tick
                    ends=[False],
                    timestamps=np.zeros(1),
                    offsets=[0],
                    partitions=[0],
                )
            )
        assert info.value.field == "resets"
        reply = await proc.step(
            StepRequest(["a"], np.zeros((1, 2)), [False], [False], np.zeros(1), [0], [0])
        )
        assert reply.result.accepted.tolist() == [True]

    run(check)


def test_the_child_outlives_sigint_and_sigterm() -> None:
    # Ctrl-C and some supervisors signal the whole process group; the parent decides.
    async def check(proc: ProcessClient) -> None:
        assert proc._proc is not None
        proc._proc.send_signal(signal.SIGINT)
        proc._proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert await proc.drop_partitions([0]) == 0
        assert proc._proc.poll() is None

    run(check)


def test_a_dead_child_fails_waiting_and_later_calls() -> None:
    async def check(proc: ProcessClient) -> None:
        assert proc._proc is not None and proc.alive
        proc._proc.send_signal(signal.SIGKILL)
        proc._proc.wait()
        assert not proc.alive  # /healthz says so before any request fails
        for _ in range(2):
            with pytest.raises(StreamLSTMError, match="exited unexpectedly"):
                await proc.drop_partitions([0])

    run(check)


def test_a_bad_engine_setting_fails_start_with_the_engines_error() -> None:
    async def main() -> None:
        proc = ProcessClient(_bundle(), max_streams=0, idle_ttl_s=None)
        with pytest.raises(StreamLSTMError, match="max_streams"):
            await proc.start()
        await proc.close()

    asyncio.run(main())


def test_the_child_takes_a_failed_step_again_tick_by_tick_in_order(
    make_bundle: BundleFactory,
) -> None:
    bundle = make_bundle(input_size=2, output_size=1)
    ids = ["a", "b", "boom", "a", "b", "a"]
    x = np.arange(12, dtype=np.float64).reshape(6, 2) / 10
    request = StepRequest(
        stream_ids=ids,
        features=x,
        resets=[False] * 6,
        ends=[False] * 6,
        timestamps=np.full(6, 1.7e12),
        offsets=list(range(6)),
        partitions=[0] * 6,
    )
    child = EngineHost(FragileEngine(bundle))
    reply = child.step(request)
    result = reply.result
    assert result.accepted.tolist() == [True, True, False, True, True, True]
    (rejection,) = result.rejections
    assert (rejection.index, rejection.field) == (2, "engine")
    assert "kaboom" in rejection.reason
    assert result.steps.tolist() == [1, 1, 0, 2, 2, 3]
    # The others are what one batch without the failing tick gives.
    keep = [0, 1, 3, 4, 5]
    alone = Engine(bundle).step([ids[i] for i in keep], x[keep])
    np.testing.assert_allclose(result.predictions[keep], alone.predictions, atol=1e-6)
    assert "boom" not in child.partition_of and child.partition_of["a"] == 0


def test_ticks_taken_one_by_one_keep_their_skips_and_the_flag_threshold() -> None:
    # A tick its stream's state already reflects stays unanswered, and a scoring
    # model's ticks keep their "anomaly" flag, on the one-by-one path too.
    def step(request: StepRequest) -> StepResult:
        if len(request.stream_ids) > 1:
            raise ValueError("only one at a time")
        one = np.ones(1, dtype=bool)
        return StepResult(
            np.zeros((1, 1), np.float32),
            np.ones(1, np.int64),
            one,
            one,
            scores=np.full(1, 3.0),
            skipped=np.array([int(request.offsets[0]) == 1]),
            threshold=2.0,
            # A stream whose own threshold has risen: its score of 3 is not flagged.
            flags=np.array([float(request.stream_ids[0] != "c")]),
        )

    request = StepRequest(
        stream_ids=["a", "b", "c"],
        features=np.zeros((3, 1)),
        resets=[False] * 3,
        ends=[False] * 3,
        timestamps=np.full(3, np.nan),
        offsets=[0, 1, 2],
        partitions=[0] * 3,
    )
    result = step_isolated(step, request, outputs=1)
    assert result.skipped.tolist() == [False, True, False]
    assert result.threshold == 2.0 and result.anomaly(0) is True
    assert result.anomaly(2) is False and result.anomalies().tolist() == [1.0, 1.0, 0.0]


def test_a_restore_crosses_through_a_file_and_loads_bitwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The states travel through a file the child maps; here in tmp_path, to see it go.
    monkeypatch.setattr(spool, "_directory", lambda size: str(tmp_path))
    rng = np.random.default_rng(5)
    ids = [f"s{i}" for i in range(40)]
    no = [False] * 40

    def request(start: int) -> StepRequest:
        x = rng.standard_normal((40, 2))
        return StepRequest(ids, x, no, no, np.zeros(40), list(range(start, start + 40)), [3] * 40)

    writer = EngineHost(Engine(_bundle()))
    writer.step(request(0))
    blobs = {s: v for s, _, v in writer.checkpoint() if v is not None}
    mixed = {"broken": b"SLST\x03 not a state", "s0": blobs["s0"]}
    then = request(40)
    local = EngineHost(Engine(_bundle(), max_streams=64))
    want = local.restore(3, blobs, "reset"), local.restore(4, mixed, "reset")
    expected = local.step(then).result.predictions

    async def check(proc: ProcessClient) -> None:
        got = await proc.restore(3, blobs, "reset"), await proc.restore(4, mixed, "reset")
        assert got == want
        assert (got[0].loaded, got[1].loaded, got[1].corrupt) == (40, 1, 1)
        assert proc.stats is not None and proc.stats.active_streams == 40
        # Bitwise the same state as an engine restored in process: the same predictions.
        assert (await proc.step(then)).result.predictions.tobytes() == expected.tobytes()
        assert list(tmp_path.iterdir()) == []

    run(check)


def test_the_child_loads_the_bundle_from_its_own_directory(tmp_path: Path) -> None:
    saved = Bundle.load(_bundle().save(tmp_path / "m"))
    assert saved.source == (tmp_path / "m").resolve()

    async def main() -> None:
        proc = ProcessClient(saved, max_streams=8, idle_ttl_s=None)
        await proc.start()
        try:
            children = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert str(tmp_path / "m").encode() in b" ".join(children)  # no temporary copy
        finally:
            await proc.close()

    asyncio.run(main())


def test_a_bundle_changed_on_disk_after_it_was_read_is_refused(tmp_path: Path) -> None:
    read = Bundle.load(_bundle().save(tmp_path / "m"))
    other = Bundle.random(ModelConfig(input_size=2, hidden_sizes=(16, 8)), seed=4)
    other.save(tmp_path / "m")  # a deploy writes the directory while the daemon starts

    async def main() -> None:
        proc = ProcessClient(read, max_streams=8, idle_ttl_s=None)
        try:
            with pytest.raises(StreamLSTMError, match="changed after the daemon read it"):
                await proc.start()
        finally:
            await proc.close()

    asyncio.run(main())
