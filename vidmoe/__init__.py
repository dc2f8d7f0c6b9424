"""vidmoe: spatiotemporal Mixture-of-Experts diffusion transformers for video.

    cfg = vidmoe.load_config("configs/bouncing_small.yaml", ["model.moe.num_experts=16"])
    model = vidmoe.build_model(cfg.model)
    run_dir = vidmoe.train(cfg)
    videos = vidmoe.generate(run_dir / "model", prompt="a red circle bouncing", num_videos=4)
    vidmoe.inspect(run_dir / "model", data="synthetic:bouncing_shapes", out="report/")
"""

import importlib
import sys
import types

from .config import Config, ConfigError, load_config, save_config
from .errors import UsageError

__version__ = "0.1.0"

# Entry points load torch, diffusers and accelerate, so they are imported on first use:
# `import vidmoe` and `vidmoe --help` stay instant.
_ENTRY_POINTS = {
    "build_model": "vidmoe.model",
    "train": "vidmoe.train",
    "generate": "vidmoe.generate",
    "inspect": "vidmoe.analysis.inspect",
    "evaluate": "vidmoe.evaluate",
}


def __getattr__(name):
    if name in _ENTRY_POINTS:
        function = getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
        globals()[name] = function
        return function
    raise AttributeError(f"module 'vidmoe' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps `vidmoe.train` the function when the submodule `vidmoe.train` is imported.

    Importing a submodule sets it as an attribute of its package; for the entry points that
    share a name with their module, the function is what users call.
    """

    def __setattr__(self, name, value):
        if name in _ENTRY_POINTS and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)  # fall back to __getattr__, which returns the function
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["Config", "ConfigError", "UsageError", "load_config", "save_config", *_ENTRY_POINTS]
