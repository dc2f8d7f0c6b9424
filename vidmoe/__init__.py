"""vidmoe: spatiotemporal Mixture-of-Experts diffusion transformers for video."""

from .config import Config, ConfigError, load_config, save_config
from .errors import UsageError

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "UsageError", "load_config", "save_config"]
