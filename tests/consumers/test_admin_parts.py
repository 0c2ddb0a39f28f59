"""The admin API's parts without a broker: reads through the engine child, waiting for
a control, the token file, the settings."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamlstm import Bundle, ConfigError, Engine, ModelConfig
from streamlstm.consumers.admin.acks import ControlAcks
from streamlstm.consumers.admin.token import read_token
from streamlstm.consumers.engine.child import EngineHost
from streamlstm.consumers.engine.process import ProcessClient, StepRequest
from streamlstm.consumers.engine.protocol import (
    CountsReply,
    CountStreams,
    InspectStream,
    ListStreams,
    PageReply,
    StreamReply,
)
from streamlstm.consumers.settings import ServeConfig
from streamlstm.control import Control


def _request(
    ids: list[str], offsets: list[int], part: int, positions: dict[int, int]
) -> StepRequest:
    n = len(ids)
    return StepRequest(
        stream_ids=ids,
        features=np.ones((n, 2)),
        resets=[False] * n,
        ends=[False] * n,
        timestamps=np.full(n, np.nan),
        offsets=offsets,
        partitions=[part] * n,
        positions=positions,
    )


def _bundle() -> Bundle:
    return Bundle.random(ModelConfig(input_size=2, hidden_sizes=(8,)), seed=4)


def test_reads_say_which_input_positions_they_reflect() -> None:
    host = EngineHost(Engine(_bundle()))
    host.step(_request(["a", "b"], [5, 6], 1, {1: 7}))
    host.step(_request(["c"], [3], 0, {0: 4, 1: 9}))  # 7, 8 of partition 1 were refused
    reply = host.read(InspectStream("b"))
    assert isinstance(reply, StreamReply) and reply.view is not None
    assert reply.as_of == {0: 4, 1: 9} and reply.view.offset == 6
    host.drop({1})
    after = host.read(CountStreams())
    assert isinstance(after, CountsReply)
    assert after.as_of == {0: 4} and after.streams == {0: 1}


def test_reads_cross_the_process_boundary_in_their_turn_among_the_steps() -> None:
    async def main() -> None:
        proc = ProcessClient(_bundle(), max_streams=64, idle_ttl_s=None)
        await proc.start()
        try:
            # Not awaited in between: the read still reflects the step sent before it.
            step = asyncio.ensure_future(proc.step(_request(["x", "y"], [0, 1], 3, {3: 2})))
            await asyncio.sleep(0)
            read = await proc.read(InspectStream("y", include_state=True))
            await step
            assert isinstance(read, StreamReply) and read.view is not None
            assert read.view.steps == 1 and read.as_of == {3: 2}
            assert read.view.state is not None and read.view.state.h[0].shape == (8,)
            page = await proc.read(ListStreams("", 10, 0))
            assert isinstance(page, PageReply) and sorted(page.streams) == ["x", "y"]
            assert page.cursor == -1 or page.cursor > 0
        finally:
            await proc.close()

    asyncio.run(main())


def test_a_control_wait_ends_when_it_is_applied_before_or_after_the_wait_began() -> None:
    async def main() -> None:
        acks = ControlAcks(remembered=2)
        acks.applied([Control("s", "reset", 0, 5, 0)])
        assert await acks.wait(0, 5, 0.01)  # already applied
        waiting = asyncio.ensure_future(acks.wait(1, 7, 5.0))
        await asyncio.sleep(0.01)
        acks.applied([Control("t", "delete", 1, 7, 0)])
        assert await waiting
        assert not await acks.wait(2, 1, 0.05)  # never applied: the wait runs out
        acks.applied([Control("u", "reset", 3, i, 0) for i in range(3)])
        assert not await acks.wait(0, 5, 0.01)  # forgotten past ``remembered``

    asyncio.run(main())


def test_the_token_file_is_checked_without_showing_its_content(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text("  0123456789abcdef0123  \n")
    assert read_token(str(good)) == b"0123456789abcdef0123"
    short = tmp_path / "short"
    short.write_text("hunter2")
    with pytest.raises(ConfigError, match="at least 16") as info:
        read_token(str(short))
    assert "hunter2" not in str(info.value)
    spaced = tmp_path / "spaced"
    spaced.write_text("secret with spaces inside it")
    with pytest.raises(ConfigError, match="printable ASCII") as info:
        read_token(str(spaced))
    assert "secret" not in str(info.value).replace(str(spaced), "")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(str(tmp_path / "missing"))


def test_the_admin_api_is_off_unless_a_port_and_a_token_file_are_given() -> None:
    base: dict[str, Any] = {
        "model": "m", "bootstrap_servers": "b", "input_topic": "i", "output_topic": "o"
    }  # fmt: skip
    assert ServeConfig(**base).admin_port is None
    with pytest.raises(ConfigError, match="admin_token_file: required"):
        ServeConfig(**base, admin_port=9465)
    with pytest.raises(ConfigError, match="admin_port: must differ"):
        ServeConfig(**base, admin_port=9464, admin_token_file="t")
    with pytest.raises(ConfigError, match=r"admin_port: must be 0\.\.65535"):
        ServeConfig(**base, admin_port=70000, admin_token_file="t")
