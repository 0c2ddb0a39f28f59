"""The wire format: JSON ticks in, JSON predictions out (one message per tick).

Pure functions over bytes, so they are tested without a broker. Every
rejection raises ``InputError`` naming the field and the reason; the daemon
sends the original bytes to the dead-letter topic with that reason.

``decode_tick`` accepts only what the engine can step and ``encode_prediction``
can write back: a tick it returns has a stream id that is UTF-8 text (no lone
surrogates), non-empty, at most ``MAX_STREAM_ID_BYTES`` bytes, free of control
characters; finite values inside float32 range; booleans for flags; and an
event time that is plausibly epoch milliseconds. Whatever else the bytes
hold, the answer is that tick or an ``InputError``, never another exception.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

from streamlstm.errors import InputError
from streamlstm.results import UNDEFINED, Undefined

__all__ = [
    "DEFAULT_MAX_FUTURE_MS",
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_STREAM_ID_BYTES",
    "MIN_TS_MS",
    "UNDEFINED",
    "Tick",
    "Undefined",
    "decode_tick",
    "encode_prediction",
    "stream_key",
]

DEFAULT_MAX_VALUE_BYTES = 64 * 1024
#: Longest stream id (key or ``stream`` field), in UTF-8 bytes.
MAX_STREAM_ID_BYTES = 256
#: Earliest plausible event time, epoch ms (1973-03-03): below it, a time in
#: seconds (today about 1.8e9) cannot pass for milliseconds.
MIN_TS_MS = 1e11
#: How far past ``now_ms`` an event time may lie (producers' clocks drift; a
#: day also lets time-zone mistakes through, but not micro- or nanoseconds).
DEFAULT_MAX_FUTURE_MS = 86_400_000.0

# The smallest magnitude that float32 rounds to infinity (FLT_MAX plus half an
# ulp rounds up, to even): the engine steps float32, so such values are refused.
_F32_OVERFLOW = 2.0**128 - 2.0**103
# C0 and C1 control characters and DEL. An id is a name: these only ever
# arrive by mistake or malice, and they forge or break log lines (newline,
# carriage return), drive terminals that print the id (ESC, CSI), and cut
# strings short in C code and other consumers (NUL).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_JSON_TYPE = {
    "NoneType": "null",
    "bool": "boolean",
    "str": "string",
    "list": "array",
    "dict": "object",
    "int": "int",
    "float": "float",
}


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
    max_stream_id_bytes: int = MAX_STREAM_ID_BYTES,
    now_ms: float | None = None,
    max_future_ms: float = DEFAULT_MAX_FUTURE_MS,
    min_ts_ms: float = MIN_TS_MS,
) -> Tick:
    """Decode and validate one input message against a model of ``input_size`` features.

    ``ts`` must lie in ``[min_ts_ms, now_ms + max_future_ms]``; ``now_ms`` is
    the caller's wall clock in epoch ms (read once per poll, say), and the
    wall clock here when None. An empty key counts as no key.
    """
    if value is None:
        raise InputError("value", "empty message (no value)")
    if len(value) > max_value_bytes:
        raise InputError("value", f"{len(value)} bytes is over the {max_value_bytes}-byte limit")
    obj = _parse(value)
    if not isinstance(obj, dict):
        raise InputError("value", f"expected a JSON object, got {_json_type(obj)}")
    key_id = _key_id(key, max_stream_id_bytes) if key else None
    stream = obj.get("stream")
    if stream is not None:
        if not isinstance(stream, str) or not stream:
            raise InputError("stream", "must be a non-empty string")
        if stream != key_id:
            _check_id("stream", stream, _utf8("stream", stream), max_stream_id_bytes)
    if key_id and stream and key_id != stream:
        raise InputError("stream", f"{stream!r} disagrees with the message key {key_id!r}")
    stream_id = stream or key_id
    if not stream_id:
        raise InputError("stream", "missing: set the message key or the 'stream' field")
    return Tick(
        stream=stream_id,
        values=_values(obj, input_size),
        ts=_timestamp(obj.get("ts"), now_ms, max_future_ms, min_ts_ms),
        reset=_flag(obj, "reset"),
        end=_flag(obj, "end"),
    )


def _parse(value: bytes) -> object:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    # orjson is strict where json is lenient (NaN literals, integers past 64
    # bits): json decides, so such input gets the same verdict and reason as
    # before, and only bad messages pay for it. The bytes must be UTF-8 (json
    # would guess UTF-16 or UTF-32 from bytes, and take encoded surrogates);
    # integers past Python's digit limit raise a plain ValueError, and deep
    # nesting a RecursionError: each is a bad message, not a crash.
    try:
        return json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError("value", f"not valid JSON (not UTF-8: {exc.reason})") from exc
    except ValueError as exc:  # JSONDecodeError is one
        raise InputError("value", f"not valid JSON ({_short(exc)})") from exc
    except RecursionError as exc:
        raise InputError("value", "not valid JSON (nested too deeply)") from exc


#: The header that makes an input record a control of its stream's state (``control``).
CONTROL_HEADER = "streamlstm-control"


def control_of(key: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    """The control an input record carries (``reset`` or ``delete``), or None for a
    tick. A control names its stream by its key alone (its value is ignored); raises
    ``InputError`` for a control header with another value, or a key that is no
    stream id."""
    values = [v for k, v in headers or () if k == CONTROL_HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise InputError("headers", f"{CONTROL_HEADER} given {len(values)} times")
    op = values[0]
    if op not in (b"reset", b"delete"):
        shown = op[:40] if isinstance(op, bytes) else type(op).__name__
        raise InputError("headers", f"{CONTROL_HEADER} must be reset or delete, got {shown!r}")
    if not key:
        raise InputError("key", "a control names its stream by the message key: missing")
    _key_id(key, MAX_STREAM_ID_BYTES)
    return op.decode()


def stream_key(field: str, text: str) -> bytes:
    """A stream id given as text (an admin request's) as its message key; raises
    ``InputError`` naming ``field`` where it is no stream id (the rules of a tick's key)."""
    if not text:
        raise InputError(field, "a stream id must not be empty")
    encoded = _utf8(field, text)
    _check_id(field, text, encoded, MAX_STREAM_ID_BYTES)
    return encoded


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _json_type(value: object) -> str:
    name = type(value).__name__
    return _JSON_TYPE.get(name, name)


def _key_id(key: bytes, limit: int) -> str:
    if len(key) > limit:
        raise InputError("key", f"{len(key)} bytes is over the {limit}-byte stream id limit")
    try:
        key_id = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("key", "not valid UTF-8") from exc
    # isprintable() is the quick pass for ordinary ids; it also fails on some harmless
    # characters (no-break space), so the pattern decides.
    if not key_id.isprintable() and _CONTROL.search(key_id):
        raise InputError("key", "a stream id must not hold control characters")
    return key_id


def _utf8(field: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            field, f"not valid UTF-8 text (a lone surrogate at character {exc.start})"
        ) from exc


def _check_id(field: str, text: str, encoded: bytes, limit: int) -> None:
    if len(encoded) > limit:
        raise InputError(field, f"{len(encoded)} bytes is over the {limit}-byte stream id limit")
    if not text.isprintable() and _CONTROL.search(text):
        raise InputError(field, "a stream id must not hold control characters")


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(field, f"expected a number, got {_json_type(value)}")
    if isinstance(value, int):
        if abs(value) >= _F32_OVERFLOW:  # exact for any int; float() could overflow
            raise InputError(field, "out of float32 range")
        return float(value)
    if not math.isfinite(value):
        raise InputError(field, "NaN or infinity is not a value")
    if abs(value) >= _F32_OVERFLOW:
        raise InputError(field, "out of float32 range")
    return value


def _values(obj: dict[str, object], input_size: int) -> tuple[float, ...]:
    if "values" in obj:
        raw = obj["values"]
        if not isinstance(raw, list):
            raise InputError("values", f"expected a list of numbers, got {_json_type(raw)}")
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


def _timestamp(
    raw: object, now_ms: float | None, max_future_ms: float, min_ts_ms: float
) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            ts = parsed.timestamp() * 1000.0
        except (ValueError, OverflowError) as exc:
            raise InputError(
                "ts", f"not epoch milliseconds or an ISO-8601 time: {raw!r:.40}"
            ) from exc
    elif isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InputError("ts", f"expected a number, got {_json_type(raw)}")
    else:
        try:
            ts = float(raw)
        except OverflowError:  # an integer past float64: far future or far past
            ts = math.inf if raw > 0 else -math.inf
        if math.isnan(ts):
            raise InputError("ts", "NaN is not a time")
    latest = (time.time() * 1000.0 if now_ms is None else now_ms) + max_future_ms
    numeric = not isinstance(raw, str)  # a unit mistake is only a number's
    if ts < min_ts_ms:
        if numeric and min_ts_ms <= ts * 1000.0 <= latest:
            raise InputError("ts", f"{ts:.0f} looks like epoch seconds; ts is epoch milliseconds")
        raise InputError(
            "ts", f"{ts:.6g} is before {_iso(min_ts_ms)}: not plausible epoch milliseconds"
        )
    if ts > latest:
        for unit, scale in (("microseconds", 1e3), ("nanoseconds", 1e6)):
            if numeric and min_ts_ms <= ts / scale <= latest:
                raise InputError(
                    "ts", f"{ts:.0f} looks like epoch {unit}; ts is epoch milliseconds"
                )
        raise InputError(
            "ts",
            f"{ts:.6g} is more than {max_future_ms:.0f} ms in the future (after {_iso(latest)})",
        )
    return ts


def _iso(ms: float) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000.0, UTC).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"{ms:.6g} ms"


def _flag(obj: dict[str, object], name: str) -> bool:
    raw = obj.get(name, False)
    if raw is None:
        return False
    if not isinstance(raw, bool):
        raise InputError(name, f"expected true or false, got {type(raw).__name__}")
    return raw


def encode_control_ack(*, stream: str, op: str, partition: int, offset: int) -> bytes:
    """The output record that says a control was applied (keyed by its stream):
    ``{"stream", "control", "partition", "offset"}``, the control's input position."""
    return orjson.dumps({"stream": stream, "control": op, "partition": partition, "offset": offset})


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
    anomaly: bool | Undefined | None = None,
) -> bytes:
    """One output message (UTF-8 JSON).

    ``anomaly`` (a model with a flag threshold) is written right after
    ``score``: true or false, or null for ``UNDEFINED`` (the score is not yet
    defined); absent for None (a model without a threshold).

    Never fails for a tick ``decode_tick`` accepted. Non-finite numbers are
    written as null; ``ts`` as an integer where it is one (and fits JSON's
    exact integers). A stream or model name that is not UTF-8 text (a lone
    surrogate) raises ``InputError``, never a TypeError.
    """
    out: dict[str, object] = {
        "stream": stream,
        "ts": _json_ts(ts),
        "prediction": [float(v) for v in prediction],
        "partition": partition,
        "offset": offset,
        "step": step,
        "ready": ready,
        "model": model,
    }
    if score is not None:
        out["score"] = None if not math.isfinite(score) else float(score)
    if anomaly is not None:
        out["anomaly"] = None if isinstance(anomaly, Undefined) else anomaly
    # orjson writes non-finite floats as null, where json would write invalid JSON.
    try:
        return orjson.dumps(out)
    except orjson.JSONEncodeError as exc:
        field = "stream" if _not_text(stream) else "model" if _not_text(model) else "prediction"
        raise InputError(field, f"cannot be written as JSON ({exc})") from exc


def _json_ts(ts: float | None) -> float | int | None:
    if ts is None:
        return None
    value = float(ts)
    if value.is_integer() and abs(value) <= 2.0**53:
        return int(value)
    return value  # orjson writes a non-finite one as null


def _not_text(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
