"""Small helpers shared by the tests (no physics here)."""

import yaml

from ptycho_core.config import config_from_dict, resolve_paths


def config_with(config_path, **dotted):
    """Load a config.yaml and override dotted keys, e.g. {"recon_params.iterations": 3}."""
    from pathlib import Path

    raw = yaml.safe_load(Path(config_path).read_text())
    for key, value in dotted.items():
        node = raw
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return resolve_paths(config_from_dict(raw), Path(config_path).parent)
