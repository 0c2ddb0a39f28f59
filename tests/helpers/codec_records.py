"""Stand-ins for what aiokafka hands the codec, and a sink that keeps what the codec sends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rec:
    """A consumed record as aiokafka gives it (the fields the codec reads)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 1_700_000_000_000
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Read:
    """A record as aiokafka's record batch reads it (``kafka.internals.lean_records``):
    no topic, no partition; those are the poll's key."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int = 1_700_000_000_000
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class Sink:
    records: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]], int | None]] = (
        field(default_factory=list)
    )
    sources: list[int] = field(default_factory=list)  # the input partition of each record

    def __call__(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        timestamp_ms: int | None,
        *,
        source: int,
    ) -> None:
        self.records.append((topic, key, value, list(headers), timestamp_ms))
        self.sources.append(source)

    def on(self, topic: str) -> list[Any]:
        return [r for r in self.records if r[0] == topic]
