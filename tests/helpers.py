"""Small helpers shared by the tests (no physics here)."""

import yaml

from ptycho_core.config import config_from_dict, resolve_paths, set_dotted


def config_with(config_path, **dotted):
    """Load a config.yaml and override dotted keys, e.g. {"recon_params.iterations": 3}."""
    from pathlib import Path

    raw = yaml.safe_load(Path(config_path).read_text())
    for key, value in dotted.items():
        set_dotted(raw, key, value)
    return resolve_paths(config_from_dict(raw), Path(config_path).parent)
