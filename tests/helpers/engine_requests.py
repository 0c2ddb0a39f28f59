"""Step requests for the engine child's host, in process."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamlstm.consumers.engine.protocol import StepRequest
from streamlstm.control import Control


def step_request(
    ids: list[str],
    x: np.ndarray,
    offsets: Sequence[int],
    part: int,
    *,
    controls: Sequence[Control] = (),
    **flags: list[bool],
) -> StepRequest:
    """One poll's ticks of one input partition (``flags``: ``resets``, ``ends``)."""
    n = len(ids)
    return StepRequest(
        stream_ids=ids,
        features=x,
        resets=flags.get("resets", [False] * n),
        ends=flags.get("ends", [False] * n),
        timestamps=np.full(n, np.nan),
        offsets=list(offsets),
        partitions=[part] * n,
        controls=controls,
    )
