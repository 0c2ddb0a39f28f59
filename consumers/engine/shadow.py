"""The shadow model's key space in the changelog, beside the served model's.

With ``--shadow-model`` the engine child runs a second ``Engine`` on the same
ticks (``EngineHost``). Its states are checkpointed to the same changelog
partition as the served model's, under their own keys: ``SHADOW_PREFIX`` and
the stream id. No stream id from the wire holds a control character (``wire``
refuses them), so no stream's key can be taken for a shadow's. A restore splits
each partition's records by key (``split_shadow``): the plain keys restore the
served model, the prefixed ones the shadow. A prefixed record made by the
served model is a promotion that was not checkpointed before a crash
(``EngineHost`` promotes a shadow by serving its engine, then writes its states
under the plain keys at the next checkpoint): it is the served model's state.
"""

from __future__ import annotations

import numpy as np

from streamlstm.stream_state import StateBlobs

__all__ = ["SHADOW_PREFIX", "shadow_key", "split_shadow", "take_blobs"]

#: What a shadow state's changelog key starts with: unit separator, "shadow", unit separator.
SHADOW_PREFIX = "\x1fshadow\x1f"


def shadow_key(stream: str) -> str:
    """The changelog key of ``stream``'s shadow state."""
    return SHADOW_PREFIX + stream


def take_blobs(blobs: StateBlobs, rows: list[int], ids: list[str] | None = None) -> StateBlobs:
    """These rows of ``blobs`` (views of the same buffer), renamed to ``ids`` if given."""
    index = np.asarray(rows, dtype=np.int64)
    names = [blobs.ids[i] for i in rows] if ids is None else ids
    return StateBlobs(names, blobs.data, blobs.starts[index], blobs.ends[index])


def split_shadow(blobs: StateBlobs) -> tuple[StateBlobs, StateBlobs]:
    """The served model's records and the shadow's, the latter by stream id (prefix off)."""
    plain: list[int] = []
    shadowed: list[int] = []
    for i, key in enumerate(blobs.ids):
        (shadowed if key.startswith(SHADOW_PREFIX) else plain).append(i)
    if not shadowed:
        return blobs, take_blobs(blobs, [])
    cut = len(SHADOW_PREFIX)
    streams = [blobs.ids[i][cut:] for i in shadowed]
    return take_blobs(blobs, plain), take_blobs(blobs, shadowed, streams)
