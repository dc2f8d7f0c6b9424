"""Expert-specialisation analysis: routing recorder, statistics, figures, report and ``vidmoe inspect``.

The whole analysis is ``vidmoe.inspect(model_dir, ...)`` (defined in :mod:`vidmoe.analysis.inspect`);
the pieces below are for custom studies, e.g. recording routing during your own forward passes.
"""

from .recorder import LayerRecord, RoutingRecorder, grid_from_config

__all__ = ["LayerRecord", "RoutingRecorder", "grid_from_config"]
