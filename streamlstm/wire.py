"""The wire format: JSON ticks in, JSON predictions out (one message per tick).

Pure functions over bytes, so they are tested without a broker. Every
rejection raises ``InputError`` naming the field and the reason; the daemon
sends the original bytes to the dead-letter topic with that reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

from streamlstm.errors import InputError

__all__ = ["Tick", "decode_tick", "encode_prediction"]

DEFAULT_MAX_VALUE_BYTES = 64 * 1024


class Tick(NamedTuple):
    """One decoded input message. ``ts`` is event time in epoch ms, or None.

    A named tuple, not a frozen dataclass: it is built once per message, and
    builds in two thirds of the time (0.57 against 0.85 us).
    """

    stream: str
    values: tuple[float, ...]
    ts: float | None = None
    reset: bool = False
    end: bool = False


def decode_tick(
    key: bytes | None,
    value: bytes | None,
    *,
    input_size: int,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> Tick:
    """Decode and validate one input message against a model of ``input_size`` features."""
    if value is None:
        raise InputError("value", "empty message (no value)")
    if len(value) > max_value_bytes:
        raise InputError("value", f"{len(value)} bytes is over the {max_value_bytes}-byte limit")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        # orjson is strict where json is lenient (NaN literals, integers past
        # 64 bits, lone surrogates): json decides, so such input gets the same
        # verdict and reason as before, and only bad messages pay for it.
        try:
            obj = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError("value", f"not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise InputError("value", f"expected a JSON object, got {type(obj).__name__}")
    try:
        key_id = key.decode("utf-8") if key else None
    except UnicodeDecodeError as exc:
        raise InputError("key", "not valid UTF-8") from exc
    stream = obj.get("stream")
    if stream is not None and (not isinstance(stream, str) or not stream):
        raise InputError("stream", "must be a non-empty string")
    if key_id and stream and key_id != stream:
        raise InputError("stream", f"{stream!r} disagrees with the message key {key_id!r}")
    stream_id = stream or key_id
    if not stream_id:
        raise InputError("stream", "missing: set the message key or the 'stream' field")
    return Tick(
        stream=stream_id,
        values=_values(obj, input_size),
        ts=_timestamp(obj.get("ts")),
        reset=_flag(obj, "reset"),
        end=_flag(obj, "end"),
    )


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(field, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(field, "NaN or infinity is not a value")
    return number


def _values(obj: dict[str, object], input_size: int) -> tuple[float, ...]:
    if "values" in obj:
        raw = obj["values"]
        if not isinstance(raw, list):
            raise InputError("values", f"expected a list of numbers, got {type(raw).__name__}")
        if len(raw) != input_size:
            raise InputError("values", f"expected {input_size} values, got {len(raw)}")
        return tuple(_number("values", v) for v in raw)
    if "value" in obj:
        if input_size != 1:
            raise InputError(
                "value", f"a single 'value' needs a one-feature model; send {input_size} 'values'"
            )
        return (_number("value", obj["value"]),)
    raise InputError("values", "missing")


def _timestamp(raw: object) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InputError(
                "ts", f"not epoch milliseconds or an ISO-8601 time: {raw!r:.40}"
            ) from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp() * 1000.0
    return _number("ts", raw)


def _flag(obj: dict[str, object], name: str) -> bool:
    raw = obj.get(name, False)
    if raw is None:
        return False
    if not isinstance(raw, bool):
        raise InputError(name, f"expected true or false, got {type(raw).__name__}")
    return raw


def encode_prediction(
    *,
    stream: str,
    ts: float | None,
    prediction: Sequence[float],
    partition: int,
    offset: int,
    step: int,
    ready: bool,
    model: str,
    score: float | None = None,
) -> bytes:
    """One output message (UTF-8 JSON)."""
    out: dict[str, object] = {
        "stream": stream,
        "ts": None if ts is None else (int(ts) if float(ts).is_integer() else ts),
        "prediction": [float(v) for v in prediction],
        "partition": partition,
        "offset": offset,
        "step": step,
        "ready": ready,
        "model": model,
    }
    if score is not None:
        out["score"] = None if not math.isfinite(score) else float(score)
    # orjson writes non-finite floats as null, where json would write invalid JSON.
    return orjson.dumps(out)
