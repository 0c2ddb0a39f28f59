"""A step's answered ticks to output records: in C where built (``_codec.c``), each
record that C leaves (or all, without C) through ``wire.encode_prediction``."""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
import orjson

from streamlstm import StepResult
from streamlstm.consumers.codec.native import codec_module
from streamlstm.consumers.codec.poll import Batch, DeadLetter
from streamlstm.consumers.codec.wire import encode_prediction

__all__ = ["predictions"]

logger = logging.getLogger(__name__)

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def predictions(
    batch: Batch, result: StepResult, model_id: str, has_score: bool, dead: list[DeadLetter]
) -> tuple[list[bytes | None], list[bytes | None], list[int | None], I64]:
    """Keys, values and timestamps of the answered ticks' outputs, and the ticks' rows;
    a tick the engine refused or whose output cannot be written joins ``dead``."""
    n = len(batch.ids)
    answer = np.ones(n, dtype=bool)
    if result.skipped.size:
        answer &= ~result.skipped  # its state already reflected it: answered before a restart
    for r in sorted(result.rejections, key=lambda r: r.index):
        if answer[r.index]:
            answer[r.index] = False
            dead.append(DeadLetter(batch.record(r.index), r.field, r.reason))
    rows = np.flatnonzero(answer)
    # A model with an anomaly score puts "score" (null while warming up) in every output.
    scores = np.ascontiguousarray(result.scores, dtype=np.float64) if has_score else None
    native = codec_module()
    count = rows.size
    keys: list[bytes | None] = [None] * count
    values: list[bytes | None] = [None] * count
    stamps: list[int | None] = [None] * count
    if native is not None and result.predictions.ndim == 2 and result.ready.dtype == np.bool_:
        try:
            model_json = orjson.dumps(model_id)
        except orjson.JSONEncodeError:
            model_json = None
        if model_json is not None:
            # orjson writes the floats (in bulk, exactly as it writes each in encode_prediction);
            # C splices them into the records.
            flat = result.predictions.astype(np.float64).ravel()
            keys, values, stamps = native.encode_predictions(
                batch.ids,
                rows,
                np.ascontiguousarray(batch.ts, dtype=np.float64),
                orjson.dumps(flat, option=_NUMPY),
                result.predictions.shape[1],
                np.ascontiguousarray(result.steps, dtype=np.int64),
                np.ascontiguousarray(result.ready),
                batch.partitions,
                batch.offsets,
                None if scores is None else orjson.dumps(scores, option=_NUMPY),
                _anomaly_codes(result),
                model_json,
            )
    failed: list[int] = []
    for j, value in enumerate(values) if None in values else ():
        if value is None:  # what C left to Python, or no C: as encode_prediction writes it
            i = int(rows[j])
            encoded = _encode_one(batch, result, i, model_id, scores)
            if isinstance(encoded, DeadLetter):
                dead.append(encoded)
                failed.append(j)
            else:
                keys[j], values[j], stamps[j] = encoded
    if failed:
        keep = sorted(set(range(len(values))) - set(failed))
        keys, values, stamps = (
            [keys[j] for j in keep],
            [values[j] for j in keep],
            [stamps[j] for j in keep],
        )
        rows = rows[keep]
    return keys, values, stamps, rows


def _anomaly_codes(result: StepResult) -> npt.NDArray[np.int8] | None:
    """``result.anomaly(i)`` of every row for C: 0 false, 1 true, 2 undefined (null); None
    when the model has no threshold (no "anomaly" field)."""
    if result.threshold is None:
        return None
    codes = np.full(len(result.predictions), -1, dtype=np.int8)  # past the scores: absent
    flags = result.anomalies()[: codes.size]
    codes[: flags.size] = np.where(np.isnan(flags), 2, flags)
    return codes


def _encode_one(
    batch: Batch, result: StepResult, i: int, model_id: str, scores: F64 | None
) -> tuple[bytes, bytes, int | None] | DeadLetter:
    stream, msg, ts = batch.ids[i], batch.record(i), float(batch.ts[i])
    try:
        value = encode_prediction(
            stream=stream,
            ts=None if ts != ts else ts,
            prediction=result.predictions[i].tolist(),
            partition=int(batch.partitions[i]),
            offset=int(batch.offsets[i]),
            step=int(result.steps[i]),
            ready=bool(result.ready[i]),
            model=model_id,
            score=None if scores is None else float(scores[i]),
            anomaly=result.anomaly(i),
        )
        key: bytes = msg.key or stream.encode()
    except Exception as exc:  # never let one tick stop the poll
        logger.warning("cannot encode the prediction of %s", msg, exc_info=True)
        return DeadLetter(msg, "prediction", f"cannot be encoded: {exc}")
    return key, value, None if ts != ts else int(ts)
