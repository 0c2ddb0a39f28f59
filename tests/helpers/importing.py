"""Checking an imported bundle against its source library's own predictions, tick by tick."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from streamlstm import Bundle, Engine

#: Ticks an imported model is compared over: long enough for a wrong gate or bias
#: to drift far, and for state carried across calls to matter.
LONG = 1000


def assert_serves_like(
    bundle: Bundle,
    x: npt.NDArray[np.float32],
    expected: npt.NDArray[np.float32],
    *,
    atol: float = 1e-5,
) -> None:
    """``bundle`` answers ``expected [S, T, O]`` for ``x [S, T, F]`` (S streams of T
    ticks from zero state): through ``predict_sequence`` per stream, and served by
    the engine (C and NumPy steps) one tick of every stream per ``step``, the
    state carried between calls."""
    assert x.ndim == 3 and expected.shape[:2] == x.shape[:2], (x.shape, expected.shape)
    for stream, want in zip(x, expected, strict=True):
        np.testing.assert_allclose(bundle.predict_sequence(stream), want, atol=atol, rtol=0)
    ids = [f"s{i}" for i in range(len(x))]
    for native in (True, False):
        engine = Engine(bundle, native=native)
        got = np.stack([engine.step(ids, x[:, t]).predictions for t in range(x.shape[1])], 1)
        np.testing.assert_allclose(got, expected, atol=atol, rtol=0, err_msg=f"native={native}")
