"""ptycho_core: automatic-differentiation electron ptychography in pure PyTorch (no Prefect)."""

from .config import ConfigError, PtyflowConfig, load_config
from .model import TENSOR_NAMES, PtychoAD

__all__ = ["ConfigError", "PtyflowConfig", "PtychoAD", "TENSOR_NAMES", "load_config"]
