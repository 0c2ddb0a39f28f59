"""An independent model of the engine's semantics, built on ``predict_sequence``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from streamlstm import Bundle


def expected_outputs(
    bundle: Bundle,
    ids: Sequence[str],
    x: npt.NDArray[np.float32],
    resets: Sequence[bool] | None = None,
    ends: Sequence[bool] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Per tick: the oracle's prediction on the stream's segment since its last reset/end."""
    n = len(ids)
    resets = resets if resets is not None else [False] * n
    ends = ends if ends is not None else [False] * n
    segments: list[list[int]] = []
    current: dict[str, list[int]] = {}
    for i, stream in enumerate(ids):
        if resets[i] or stream not in current:
            current[stream] = []
            segments.append(current[stream])
        current[stream].append(i)
        if ends[i]:
            del current[stream]
    out = np.full((n, bundle.config.output_size), np.nan, dtype=np.float32)
    steps = np.zeros(n, dtype=np.int64)
    for seg in segments:
        out[seg] = bundle.predict_sequence(x[seg])
        steps[seg] = np.arange(1, len(seg) + 1)
    return out, steps


def threshold_levels(
    scores: Sequence[float], threshold: float, rate: float, step: float
) -> list[float]:
    """One stream's adaptive flag threshold before each tick, from its definition in
    plain floats: a flagged tick (score above it) raises it by ``exp(step (1 - rate))``,
    another lowers it by ``exp(-step rate)``, never below ``threshold``; a NaN score
    leaves it. The tick is flagged where its score exceeds the level."""
    level, out = threshold, []
    for score in scores:
        out.append(level)
        if not math.isnan(score):
            factor = step * (1 - rate) if score > level else -step * rate
            level = max(threshold, level * math.exp(factor))
    return out


def expected_state(
    bundle: Bundle, x: npt.NDArray[np.float32]
) -> tuple[list[npt.NDArray[np.float32]], list[npt.NDArray[np.float32]]]:
    """One stream's ``h`` and ``c`` per layer after its ticks ``x [T, F]`` from zero
    state, stepped through torch's own cell module (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``:
    ``StreamLSTM.recurrent_step``)."""
    import torch

    scaled = torch.from_numpy(bundle.scale_inputs(np.asarray(x, dtype=np.float32)))
    with torch.inference_mode():
        hs, cs = bundle.model.zero_group_state(1)
        for t in range(scaled.shape[0]):
            _, hs, cs = bundle.model.recurrent_step(scaled[t : t + 1], hs, cs)
    # Per group [count, 1, H]: its layers in order.
    return (
        [layer.numpy().copy() for group in hs for layer in group[:, 0]],
        [layer.numpy().copy() for group in cs for layer in group[:, 0]],
    )


def carried_outputs(
    old: Bundle,
    new: Bundle,
    before: npt.NDArray[np.float32],
    after: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """One stream's answers under ``new`` to ``after [T, F]``, continuing from the state
    ``old`` reached over ``before`` (a model swap that carries the state), through
    torch's own modules: ``old``'s to reach the state, ``new``'s from it."""
    import torch

    x = np.asarray(after, dtype=np.float32)
    scaled_before = torch.from_numpy(old.scale_inputs(np.asarray(before, dtype=np.float32)))
    scaled = torch.from_numpy(new.scale_inputs(x))
    with torch.inference_mode():
        hs, cs = old.model.zero_group_state(1)
        for t in range(scaled_before.shape[0]):
            _, hs, cs = old.model.recurrent_step(scaled_before[t : t + 1], hs, cs)
        tops = []
        for t in range(scaled.shape[0]):
            top, hs, cs = new.model.recurrent_step(scaled[t : t + 1], hs, cs)
            tops.append(top)
        y = new.model.head(torch.cat(tops)).numpy()
    return new.finish(y, x)
