"""``CheckpointStore``: a local checkpoint's records and header in a real RocksDB."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamlstm.checkpoint_store import CheckpointStore, Header
from streamlstm.errors import StateError

HEADER = Header("g-in-changelog", "model-a", 42)


def _filled(directory: Path, count: int = 200) -> dict[str, bytes]:
    """``count`` states of 2,117 random bytes (several table blocks), closed (flushed)."""
    records = {f"stream-{i}": os.urandom(2117) for i in range(count)}
    store = CheckpointStore.open(directory, 0)
    store.write(records.items(), HEADER)
    store.close()
    return records


def test_records_and_header_round_trip_and_a_write_without_a_header_keeps_it(
    tmp_path: Path,
) -> None:
    records = _filled(tmp_path)
    store = CheckpointStore.open(tmp_path, 0)
    assert store.header() == HEADER
    assert store.records() == records
    store.write([("stream-0", None), ("stream-x\udcff", b"new")], None)  # a chunk: no header
    assert store.header() == HEADER
    got = store.records()
    assert "stream-0" not in got and got["stream-x\udcff"] == b"new"  # changelog keys' decoding
    store.invalidate()
    assert store.header() is None
    store.close()


@pytest.mark.parametrize("where", [0.5, 0.95])
def test_a_block_that_fails_its_checksum_fails_the_read(tmp_path: Path, where: float) -> None:
    """RocksDB's bulk scan ends quietly at a corrupt block; the store notices that it did
    not reach its last key (mid-file) or that the last key's block does not read (its
    end), and raises: a restore must not take a part of the states for all of them."""
    _filled(tmp_path)
    (table,) = (tmp_path / "checkpoint-0").glob("*.sst")
    data = bytearray(table.read_bytes())
    at = int(len(data) * where)
    data[at : at + 4000] = b"\xa5" * 4000
    table.write_bytes(bytes(data))
    store = CheckpointStore.open(tmp_path, 0)
    try:
        with pytest.raises(StateError, match="cannot read"):
            store.records()
    finally:
        store.close()


def test_a_header_that_does_not_decode_is_refused() -> None:
    for raw in (b"{", b'{"format": 9, "topic": "t", "model": "m", "offset": 1}', b"[]"):
        with pytest.raises(StateError, match="header"):
            Header.from_bytes(raw)
    with pytest.raises(StateError, match="negative"):
        Header.from_bytes(b'{"format": 1, "topic": "t", "model": "m", "offset": -1}')


def test_a_rebuild_writes_its_header_last(tmp_path: Path) -> None:
    store = CheckpointStore.open(tmp_path, 3)
    records = {f"s{i}": bytes([i % 256]) * 10 for i in range(45_000)}  # three batches
    assert store.rebuild(records.items(), HEADER) == len(records)
    assert store.header() == HEADER and store.records() == records
    store.close()
    CheckpointStore.discard(tmp_path, 3)
    assert not (tmp_path / "checkpoint-3").exists()
