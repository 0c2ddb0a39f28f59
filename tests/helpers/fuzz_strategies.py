"""Hypothesis strategies for hostile Kafka records: random bytes, mutated ticks, valid JSON
with hostile values, random keys. The fuzz test and the C codec's property tests share them."""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import strategies as st

NOW_MS = 1_764_000_000_000.0
#: Examples per property; a campaign: ``STREAMLSTM_FUZZ_EXAMPLES=200000``.
EXAMPLES = int(os.environ.get("STREAMLSTM_FUZZ_EXAMPLES", "250"))

TRICKY_TEXT = [
    "",
    "\ud800",
    "a\udfffb",
    "\ud83d\ude00",
    "\x00",
    "a\nb",
    "\x1b[31m",
    "\x85",
    "\u2028",
    "\ufeff",
    "\uffff",
    "x" * 300,
    "é" * 129,
    "AAPL",
    "s1",
]

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e40, max_value=1e40),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([3.4028235e38, 3.4028236e38, 2.0**128 - 2.0**103, 1e-45, -0.0, 2**63, 2**64]),
)
ts_values = st.one_of(
    st.none(),
    numbers,
    st.sampled_from(
        [NOW_MS, NOW_MS / 1000, NOW_MS * 1000, NOW_MS * 1e6, 1e11, NOW_MS + 86_400_000]
    ),
    st.floats(min_value=1e11, max_value=NOW_MS + 86_400_000),
    st.sampled_from(["2025-11-24T00:00:00Z", "1970-01-01", "9999-12-31T23:59:59+14:00", "soon"]),
    st.text(max_size=30),
)
leaves = st.one_of(
    st.none(), st.booleans(), numbers, st.text(max_size=10), st.sampled_from(TRICKY_TEXT)
)
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
stream_ids = st.one_of(st.sampled_from(TRICKY_TEXT), st.text(max_size=12))


@st.composite
def tick_objects(draw: st.DrawFn) -> Any:
    """Valid JSON objects shaped like ticks, each field valid or hostile."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["stream"] = draw(st.one_of(stream_ids, json_values))
    choice = draw(st.integers(0, 4))
    if choice == 0:
        obj["values"] = [draw(st.floats(-1e6, 1e6)) for _ in range(2)]
    elif choice == 1:
        obj["values"] = draw(st.one_of(st.lists(numbers, max_size=3), json_values))
    elif choice == 2:
        obj["value"] = draw(json_values)
    elif choice == 3:
        obj["values"] = [draw(numbers), draw(json_values)]
    if draw(st.booleans()):
        obj["ts"] = draw(ts_values)
    for flag in ("reset", "end"):
        if draw(st.integers(0, 3)) == 0:
            obj[flag] = draw(st.one_of(st.booleans(), json_values))
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)  # not an object at all, sometimes
    return obj


def _dumps(obj: Any, ascii_only: bool) -> bytes:
    # json writes lone surrogates as \\ud800 escapes with ensure_ascii, NaN as NaN.
    text = json.dumps(obj, ensure_ascii=ascii_only)
    return text.encode("utf-8", errors="surrogatepass")


INSERTS = [
    b"\\ud800",
    b"NaN",
    b"-Infinity",
    b"1e39",
    b"1e400",
    b"true",
    b"null",
    b"[[",
    b"}",
    b'"ts":1764000000000000000,',
    b'"stream":"\\udc00",',
    b"9" * 30,
    b"\xff",
    b"\xed\xa0\x80",
    b"\x00",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A tick's JSON bytes after a few byte-level mutations."""
    base = bytearray(_dumps(draw(tick_objects()), draw(st.booleans())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(base)))
        if op == 0 and base:
            base[min(pos, len(base) - 1)] = draw(st.integers(0, 255))
        elif op == 1:
            base[pos:pos] = draw(st.sampled_from(INSERTS))
        elif op == 2:
            del base[pos : pos + draw(st.integers(1, 8))]
        elif op == 3:
            base[pos:pos] = draw(st.binary(max_size=6))
        else:
            end = draw(st.integers(pos, len(base)))
            base[pos:pos] = base[pos:end]
    return bytes(base)


values_bytes = st.one_of(
    st.none(),
    st.binary(max_size=64),
    mutated(),
    st.builds(_dumps, tick_objects(), st.booleans()),
)
keys = st.one_of(
    st.none(),
    st.just(b""),
    st.binary(max_size=12),
    st.builds(lambda s: s.encode("utf-8", errors="surrogatepass"), stream_ids),
)
messages = st.lists(st.tuples(keys, values_bytes), min_size=1, max_size=8)
