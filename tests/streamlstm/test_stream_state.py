"""``decode_many``/``encode_many``: many states' bytes at once, bitwise equal to one by one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from streamlstm import StateError, StateStore, StreamState
from streamlstm.stream_state import StateArrays, StateBlobs, decode_many, encode_many


def _state(
    rng: np.random.Generator, i: int, *, model: str = "m-é1", partition: int = 2
) -> StreamState:
    return StreamState(
        h=(rng.standard_normal(5).astype(np.float32), rng.standard_normal(3).astype(np.float32)),
        c=(rng.standard_normal(5).astype(np.float32), rng.standard_normal(3).astype(np.float32)),
        step=10 + i,
        offset=1000 + i,
        last_seen=1.7e9 + i / 7,
        extra=(i / 3, -float(i)),
        partition=partition,
        model=model,
    )


def _assert_rows_equal(arrays: StateArrays, states: dict[str, StreamState]) -> None:
    assert arrays.ids == list(states)
    for row, state in enumerate(states.values()):
        for layer in range(len(state.h)):
            # Bitwise: the bytes of each float, not a tolerance.
            assert arrays.h[layer][row].tobytes() == state.h[layer].tobytes()
        for layer in range(len(state.c)):
            assert arrays.c[layer][row].tobytes() == state.c[layer].tobytes()
        assert int(arrays.step[row]) == state.step
        assert int(arrays.offset[row]) == state.offset
        assert float(arrays.last_seen[row]) == state.last_seen
        assert tuple(arrays.extra[row].tolist()) == state.extra
        assert arrays.models[row] == state.model


def test_one_layout_is_read_as_a_table_of_views_bitwise() -> None:
    rng = np.random.default_rng(0)
    states = {f"s{i}": _state(rng, i) for i in range(50)}
    blobs = StateBlobs.from_dict({s: st.to_bytes() for s, st in states.items()})
    arrays = decode_many(blobs)
    _assert_rows_equal(arrays, states)
    # No copy: the columns are views of the buffer (rows of an odd length: unaligned).
    assert len(blobs.blob(0)) % 4 != 0
    assert all(np.shares_memory(h, blobs.data) for h in arrays.h + arrays.c)
    # The store takes them bitwise.
    store = StateStore((5, 3), max_streams=64, extra_width=2)
    store.restore_arrays(arrays)
    for stream, state in states.items():
        slot = store.slot_of(stream)
        assert slot is not None
        assert store.h[0][slot].tobytes() == state.h[0].tobytes()
        assert store.c[1][slot].tobytes() == state.c[1].tobytes()
        assert (store.steps[slot], store.offsets[slot]) == (state.step, state.offset)


@pytest.mark.parametrize("odd", ["length", "version", "model", "partition", "gap"])
def test_anything_else_is_decoded_one_by_one_and_still_exact(odd: str) -> None:
    rng = np.random.default_rng(1)
    states = {f"s{i}": _state(rng, i) for i in range(6)}
    if odd == "model":
        states["s3"] = _state(rng, 3, model="m-é2")
    elif odd == "partition":
        states["s3"] = _state(rng, 3, partition=7)
    elif odd == "length":
        states["s3"] = _state(rng, 3, model="longer-model")
    blobs = {s: st.to_bytes() for s, st in states.items()}
    if odd == "version":  # the first is version 2 (no cell, no partition, no model)
        tail = 6 + len(b"m-\xc3\xa91") + 4  # partition, model, an empty history
        blobs["s0"] = blobs["s0"][:4] + bytes([2]) + blobs["s0"][5:30] + blobs["s0"][31:-tail]
        states["s0"] = StreamState.from_bytes(blobs["s0"])
    joined = StateBlobs.from_dict(blobs)
    if odd == "gap":  # laid out with a byte between records: not one table
        values = list(blobs.values())
        data = np.frombuffer(b"".join(v + b"\0" for v in values), np.uint8)
        starts = np.cumsum([0] + [len(v) + 1 for v in values[:-1]])
        ends = starts + np.array([len(v) for v in values])
        joined = StateBlobs(list(blobs), data, starts.astype(np.int64), ends.astype(np.int64))
    arrays = decode_many(joined)
    _assert_rows_equal(arrays, states)
    assert not np.shares_memory(arrays.h[0], joined.data)  # decoded or gathered: a copy


def test_a_corrupt_state_names_its_stream() -> None:
    rng = np.random.default_rng(2)
    blobs = {f"s{i}": _state(rng, i).to_bytes() for i in range(4)}
    blobs["s2"] = blobs["s2"][:-3]
    with pytest.raises(StateError, match="'s2'"):
        decode_many(blobs)
    with pytest.raises(StateError, match="'first'"):  # the one that sets the layout
        decode_many({"first": b"SLST\x03 not a state", **blobs})


def test_reserve_grows_the_store_ahead_up_to_max_streams_and_no_further() -> None:
    store = StateStore((4,), max_streams=100, initial_capacity=4)
    store.reserve(3)
    assert store.capacity == 4  # room already
    store.reserve(20)
    assert store.capacity == 32  # doubled, as a growing restore would
    store.reserve(1000)
    assert store.capacity == 100
    slots, _ = store.acquire([f"s{i}" for i in range(100)], np.zeros(100))
    assert store.capacity == 100 and len(set(slots.tolist())) == 100
    assert not store.h[0][slots].any()  # new streams start from zero


@pytest.mark.parametrize("model", ["m-é1", ""])
@pytest.mark.parametrize("extra", [2, 0])
def test_many_states_encode_to_the_bytes_of_each_one(model: str, extra: int) -> None:
    rng = np.random.default_rng(11)
    states = [_state(rng, i, model=model, partition=i % 3 - 1) for i in range(6)]
    states = [
        StreamState(
            h=s.h,
            c=s.c,
            step=s.step,
            offset=s.offset,
            last_seen=float("nan") if i == 0 else s.last_seen,
            extra=s.extra[:extra],
            partition=s.partition,
            model=s.model,
        )
        for i, s in enumerate(states)
    ]
    got = encode_many(
        h=[np.stack([s.h[layer] for s in states]) for layer in range(2)],
        c=[np.stack([s.c[layer] for s in states]) for layer in range(2)],
        step=np.array([s.step for s in states]),
        offset=np.array([s.offset for s in states]),
        last_seen=np.array([s.last_seen for s in states]),
        extra=np.array([s.extra for s in states], dtype=np.float64).reshape(6, extra),
        partition=np.array([s.partition for s in states]),
        model=model,
    )
    assert got == [s.to_bytes() for s in states]


def test_the_store_encodes_what_a_snapshot_holds() -> None:
    store = StateStore((4, 3), max_streams=8, initial_capacity=4, extra_width=2)
    ids = ["a", "b", "c"]
    slots, _ = store.acquire(ids, np.zeros(3))
    rng = np.random.default_rng(3)
    for t in (*store.h, *store.c):
        t[:] = rng.standard_normal(t.shape).astype(np.float32)
    store.steps[slots] = [4, 5, 6]
    store.extra[slots] = rng.standard_normal((3, 2))
    want = [
        replace(state, partition=p, model="mdl").to_bytes()
        for state, p in zip(store.snapshot(["c", "a"]).values(), [7, 1], strict=True)
    ]
    assert store.encode(["c", "a"], [7, 1], "mdl") == want


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_a_gru_or_rnn_state_is_h_alone_and_round_trips(cell: str) -> None:
    rng = np.random.default_rng(5)
    lstm = _state(rng, 1)
    state = replace(lstm, c=(), cell=cell)
    data = state.to_bytes()
    assert len(data) == len(lstm.to_bytes()) - 4 * (5 + 3)  # no c: 8 floats fewer
    assert data[30] == (1 if cell == "gru" else 2)
    back = StreamState.from_bytes(data)
    assert back.cell == cell and back.c == ()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(back.h, state.h, strict=True))
    assert (back.step, back.extra, back.model) == (state.step, state.extra, state.model)
    # Many at once: the same bytes, and read back as a table of views.
    states = {f"s{i}": replace(_state(rng, i), c=(), cell=cell) for i in range(20)}
    encoded = encode_many(
        h=[np.stack([s.h[k] for s in states.values()]) for k in range(2)],
        c=[],
        step=np.array([s.step for s in states.values()]),
        offset=np.array([s.offset for s in states.values()]),
        last_seen=np.array([s.last_seen for s in states.values()]),
        extra=np.array([s.extra for s in states.values()]),
        partition=np.full(20, 2),
        model="m-é1",
        cell=cell,
    )
    assert encoded == [s.to_bytes() for s in states.values()]
    blobs = StateBlobs.from_dict(dict(zip(states, encoded, strict=True)))
    arrays = decode_many(blobs)
    assert arrays.cell == cell and arrays.c == []
    assert all(np.shares_memory(h, blobs.data) for h in arrays.h)
    _assert_rows_equal(arrays, states)
    store = StateStore((5, 3), cell=cell, max_streams=64, extra_width=2)
    assert store.c == [] and store.raw_bytes_per_stream() == 4 * 8
    store.restore_arrays(arrays)
    assert store.snapshot(["s4"])["s4"].h[1].tobytes() == states["s4"].h[1].tobytes()
    assert store.encode(["s4"], [2], "m-é1") == [states["s4"].to_bytes()]


def test_a_state_of_one_cell_is_refused_by_a_store_of_another() -> None:
    rng = np.random.default_rng(6)
    lstm = _state(rng, 0)
    gru = replace(lstm, c=(), cell="gru")
    rnn = replace(lstm, c=(), cell="rnn")
    for state, store_cell in ((lstm, "gru"), (gru, "lstm"), (gru, "rnn"), (rnn, "gru")):
        store = StateStore((5, 3), cell=store_cell, max_streams=8, extra_width=2)
        with pytest.raises(StateError, match=f"{state.cell.upper()} model.*{store_cell.upper()}"):
            store.restore({"a": StreamState.from_bytes(state.to_bytes())})
        with pytest.raises(StateError, match="cell"):
            store.restore_arrays(decode_many({"a": state.to_bytes()}))
        assert len(store) == 0
    with pytest.raises(StateError, match="more than one cell"):
        decode_many({"a": lstm.to_bytes(), "b": gru.to_bytes()})
    wider = replace(
        lstm, h=(np.zeros(4, np.float32), lstm.h[1]), c=(np.zeros(4, np.float32), lstm.c[1])
    )
    with pytest.raises(StateError, match="more than one layout"):  # a rewarm swap's two models
        decode_many({"a": lstm.to_bytes(), "b": wider.to_bytes()})
    with pytest.raises(StateError, match="2 h and 2 c layers for a GRU"):
        replace(lstm, cell="gru")
    with pytest.raises(StateError, match="cell must be one of"):
        replace(gru, cell="lstmish")
    with pytest.raises(StateError, match="unknown cell 7"):
        StreamState.from_bytes(lstm.to_bytes()[:30] + bytes([7]) + lstm.to_bytes()[31:])


def test_version_3_states_are_an_lstms_and_still_read_as_a_table() -> None:
    rng = np.random.default_rng(7)
    states = {f"s{i}": _state(rng, i) for i in range(10)}
    # Version 3, as a daemon before cells wrote it: no cell byte after the header, and
    # no history (version 5's empty one is 4 bytes at the end).
    blobs = {
        s: (b := st.to_bytes())[:4] + bytes([3]) + b[5:30] + b[31:-4] for s, st in states.items()
    }
    joined = StateBlobs.from_dict(blobs)
    arrays = decode_many(joined)
    assert arrays.cell == "lstm" and np.shares_memory(arrays.h[0], joined.data)
    _assert_rows_equal(arrays, states)


def test_a_tick_history_goes_through_the_bytes_one_by_one_and_as_a_table() -> None:
    """Version 5's ring of raw ticks: round trip, encode_many byte for byte, the table read
    (a view), and the held ticks in order; a version 4 state reads with none."""
    rng = np.random.default_rng(8)
    ring = rng.normal(size=(10, 4, 3)).astype(np.float32)
    states = {f"s{i}": replace(_state(rng, i), history=ring[i], step=i + 2) for i in range(10)}
    blobs = {s: st.to_bytes() for s, st in states.items()}
    for stream, state in states.items():
        back = StreamState.from_bytes(blobs[stream])
        np.testing.assert_array_equal(back.history, state.history)
    arrays = decode_many(StateBlobs.from_dict(blobs))
    assert arrays.history is not None and arrays.history.shape == (10, 4, 3)
    np.testing.assert_array_equal(arrays.history, ring)
    again = encode_many(
        h=arrays.h, c=arrays.c, step=arrays.step, offset=arrays.offset,
        last_seen=arrays.last_seen, extra=arrays.extra, partition=arrays.partition,
        model=arrays.models[0], history=arrays.history,
    )  # fmt: skip
    assert again == list(blobs.values())
    # Step 2 holds rows 0 and 1; step 6 of a 4-tick ring holds ticks 3..6: rows 2, 3, 0, 1.
    np.testing.assert_array_equal(states["s0"].recent_ticks(), ring[0][[0, 1]])
    np.testing.assert_array_equal(states["s4"].recent_ticks(), ring[4][[2, 3, 0, 1]])
    old = blobs["s0"][:4] + bytes([4]) + blobs["s0"][5 : -(4 + ring[0].nbytes)]
    assert StreamState.from_bytes(old).history.shape == (0, 0)
