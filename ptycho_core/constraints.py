"""Constraints: projections applied under no_grad to the model tensors after an iteration.

One function per constraint, registered by its name in ``constraint_params``. They change
parameter values in place and leave the optimizer state alone.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .model import PtychoAD

CONSTRAINTS: dict[str, Callable[[PtychoAD, Any, dict], None]] = {}


def register_constraint(name: str):
    def decorate(fn):
        CONSTRAINTS[name] = fn
        return fn
    return decorate


@register_constraint("probe_ortho")
def orthogonalize_probe_modes(model: PtychoAD, params, context: dict) -> None:
    """Replace the probe modes by the orthogonal modes of the same mixed state, by power."""
    if model.probe.shape[0] < 2:
        return
    probe = model.probe_complex
    flat = probe.reshape(probe.shape[0], -1)
    # eigen-decomposition of the small (P, P) Gram matrix gives the orthogonal modes of rho
    gram = flat.conj() @ flat.T
    eigval, eigvec = torch.linalg.eigh(gram)
    order = torch.argsort(eigval, descending=True)
    modes = eigvec[:, order].T @ flat
    model.probe.copy_(torch.view_as_real(modes.reshape(probe.shape)))


@register_constraint("fix_probe_intensity")
def fix_probe_intensity(model: PtychoAD, params, context: dict) -> None:
    """Scale the probe so its total intensity equals the mean measured counts per pattern."""
    power = model.probe.square().sum()
    model.probe.mul_(torch.sqrt(context["mean_pattern_sum"] / power))


@register_constraint("obja_thresh")
def threshold_amplitude(model: PtychoAD, params, context: dict) -> None:
    """Clip the object amplitude into [min, max]."""
    model.obja.clamp_(min=params.min, max=params.max)


def apply_constraints(model: PtychoAD, constraint_params, iteration: int, context: dict) -> list[str]:
    """Apply every constraint scheduled for this iteration; returns the names applied."""
    applied = []
    with torch.no_grad():
        for name in type(constraint_params).model_fields:
            params = getattr(constraint_params, name)
            if params.active(iteration):
                CONSTRAINTS[name](model, params, context)
                applied.append(name)
    model._propagator_cache = None
    return applied
