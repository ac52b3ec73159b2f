"""Loss terms, one function per term, registered by the name used in ``loss_params``.

Each term takes the predicted and measured intensities (B, ky, kx) and the model, and returns a
scalar; data terms are normalized by the measured intensity, so their size does not depend on
the dose.
"""

from __future__ import annotations

from typing import Callable

import torch

LOSS_TERMS: dict[str, Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]] = {}

# keeps sqrt and log differentiable where the prediction is exactly zero
_EPS = 1e-10


def register_loss(name: str):
    def decorate(fn):
        LOSS_TERMS[name] = fn
        return fn
    return decorate


@register_loss("amplitude")
def amplitude_loss(pred: torch.Tensor, meas: torch.Tensor, model=None) -> torch.Tensor:
    """Gaussian noise model on amplitudes: mean (sqrt(I_pred) - sqrt(I_meas))^2 / mean(I_meas)."""
    diff = torch.sqrt(pred + _EPS) - torch.sqrt(meas)
    return diff.square().mean() / meas.mean()


@register_loss("poisson")
def poisson_loss(pred: torch.Tensor, meas: torch.Tensor, model=None) -> torch.Tensor:
    """Poisson negative log-likelihood mean(I_pred - I_meas log I_pred) / mean(I_meas), shifted so a
    perfect prediction scores 0."""
    nll = pred - meas * torch.log(pred + _EPS)
    floor = meas - meas * torch.log(meas + _EPS)
    return (nll - floor).mean() / meas.mean()


@register_loss("pacbed")
def pacbed_loss(pred: torch.Tensor, meas: torch.Tensor, model=None) -> torch.Tensor:
    """Amplitude misfit of the batch-averaged patterns: insensitive to positions, sensitive to the
    probe and thickness (position-averaged CBED)."""
    return amplitude_loss(pred.mean(dim=0, keepdim=True), meas.mean(dim=0, keepdim=True))


@register_loss("phase_sparsity")
def phase_sparsity_loss(pred: torch.Tensor, meas: torch.Tensor, model=None) -> torch.Tensor:
    """Mean absolute object phase (rad)."""
    return model.objp.abs().mean()


def total_loss(pred: torch.Tensor, meas: torch.Tensor, weights: dict[str, float], model=None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the active terms and each term's (unweighted) value for the history."""
    total = pred.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        if weight:
            value = LOSS_TERMS[name](pred, meas, model)
            parts[name] = value.detach()
            total = total + weight * value
    return total, parts
