"""Live model quality: realized forecast errors, naive baselines, input drift, anomaly
rates, measured by the engine at O(1) per tick (``Engine.quality``)."""

from streamlstm.quality.report import ErrorTotals, HorizonQuality, QualityReport, StreamError
from streamlstm.quality.tracker import Quality, QualityConfig

__all__ = [
    "ErrorTotals",
    "HorizonQuality",
    "Quality",
    "QualityConfig",
    "QualityReport",
    "StreamError",
]
