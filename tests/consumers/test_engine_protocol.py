"""The engine process's messages: typed both ways, evicted states only when asked."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest

from streamlstm import Bundle, Engine, ModelConfig, StreamLSTMError
from streamlstm.consumers.engine.child import EngineHost, answer
from streamlstm.consumers.engine.process import ProcessClient
from streamlstm.consumers.engine.protocol import (
    ChangesReply,
    Drop,
    DropReply,
    Reserve,
    ReserveReply,
    StartReply,
    Step,
    StepReply,
    StepRequest,
    TakeChanges,
    frame,
)


def _bundle() -> Bundle:
    return Bundle.random(ModelConfig(input_size=1, hidden_sizes=(8,)), seed=1)


def _request(ids: list[str], offset: int = 0) -> StepRequest:
    n = len(ids)
    return StepRequest(
        stream_ids=ids,
        features=np.ones((n, 1)),
        resets=np.zeros(n, dtype=bool),
        ends=np.zeros(n, dtype=bool),
        timestamps=np.full(n, 1.7e12),
        offsets=np.arange(offset, offset + n),
        partitions=np.zeros(n, dtype=np.int64),
    )


def test_each_request_has_its_own_reply_type() -> None:
    child = EngineHost(Engine(_bundle(), max_streams=8))
    assert isinstance(answer(child, Step.of(_request(["a", "b"]))), StepReply)
    changes = answer(child, TakeChanges())
    assert isinstance(changes, ChangesReply)
    assert sorted(c.stream for c in changes.changes) == ["a", "b"]
    assert all(c.partition == 0 and c.state for c in changes.changes)
    reserved = answer(child, Reserve(4))
    assert isinstance(reserved, ReserveReply)
    dropped = answer(child, Drop((0,)))
    assert isinstance(dropped, DropReply) and dropped.count == 2
    with pytest.raises(StreamLSTMError, match="StartReply is not a request"):
        answer(child, StartReply(child.engine.stats))


def test_evicted_states_cross_back_only_when_asked() -> None:
    child = EngineHost(Engine(_bundle(), max_streams=2))
    answer(child, Step.of(_request(["a", "b"])))
    quiet = answer(child, Step.of(_request(["c"], 2)))  # evicts a
    assert isinstance(quiet, StepReply) and quiet.result.evictions == []
    asked = answer(child, Step.of(_request(["d"], 3), with_evictions=True))  # evicts b
    assert isinstance(asked, StepReply)
    assert [e.stream_id for e in asked.result.evictions] == ["b"]
    assert child.engine.stats.evictions  # counted either way


def test_a_step_reply_over_the_socket_holds_no_evicted_state() -> None:
    async def main() -> tuple[int, int]:
        engine = ProcessClient(_bundle(), max_streams=64, idle_ttl_s=None)
        await engine.start()
        try:
            await engine.step(_request([f"s{i}" for i in range(64)]))
            reply = await engine.step(_request([f"t{i}" for i in range(64)], 64))
            return len(reply.result.evictions), sum(reply.stats.evictions.values())
        finally:
            await engine.close()

    carried, evicted = asyncio.run(main())
    assert (carried, evicted) == (0, 64)


def test_frames_hold_one_message() -> None:
    message = Step.of(_request(["x"]))
    body = frame(message)[8:]
    back = pickle.loads(body)
    assert isinstance(back, Step) and back.request().stream_ids == ["x"]
