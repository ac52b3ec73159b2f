"""Loss terms, one function per term, registered by the name used in ``loss_params``.

Each term scores one part (``chunk``) of an optimizer batch and returns that part's share of the
batch's loss: the shares of the parts add up to the loss of the whole batch, value and gradient,
so a batch split into micro-batches (after an out-of-memory error) takes exactly the step the
whole batch takes. Everything that depends on the whole batch (its measured mean, its size, the
batch-averaged prediction) comes in ``BatchStats``. Data terms are normalized by the measured
intensity, so their size does not depend on the dose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import forward as fw

# Under sqrt and log the prediction gets a floor of this fraction of the batch's mean measured
# intensity per pixel: the gradient stays finite where the model predicts (almost) nothing and a
# count was measured, and, being relative, the floor means the same at any dose (an absolute one
# made float32 runs at 1x and 100x the counts drift apart by 10 % of the phase in 4 iterations).
_EPS = 1e-4


@dataclass
class BatchStats:
    """The whole optimizer batch, as every part of it sees it.

    size: the batch's number of patterns; meas_mean: their mean intensity per pixel (), which
    every data term divides by; meas_pattern: their mean pattern (ky, kx), for the pacbed term;
    pred_sum: the sum of the batch's predicted patterns (ky, kx), detached, when the pacbed term
    needs it and the batch is split (None otherwise: the part is the whole batch). A batch split
    across micro-batches or processes (collective.py) gives every part the same stats."""

    size: int
    meas_mean: torch.Tensor
    meas_pattern: Optional[torch.Tensor]  # None when no term needs it (a batch split across processes)
    pred_sum: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, meas: torch.Tensor, pred_sum: Optional[torch.Tensor] = None) -> "BatchStats":
        """The stats of ``meas`` (B, ky, kx), the whole batch."""
        return cls(size=meas.shape[0], meas_mean=meas.mean(), meas_pattern=meas.mean(dim=0), pred_sum=pred_sum)


# the terms that compare predicted with measured patterns one by one (a validation score uses these)
DATA_TERMS = ("amplitude", "poisson")

LossTerm = Callable[[torch.Tensor, torch.Tensor, BatchStats, object, torch.Tensor], torch.Tensor]
LOSS_TERMS: dict[str, LossTerm] = {}


def register_loss(name: str):
    def decorate(fn):
        LOSS_TERMS[name] = fn
        return fn
    return decorate


def _share(chunk: torch.Tensor, batch: BatchStats) -> torch.Tensor:
    """Sum over the chunk's patterns and pixels divided by the batch's element count: the chunk's
    part of the batch mean."""
    return chunk.sum() / (batch.size * chunk[0].numel())


@register_loss("amplitude")
def amplitude_loss(pred, meas, batch: BatchStats, model=None, indices=None) -> torch.Tensor:
    """Gaussian noise model on amplitudes: mean (sqrt(I_pred) - sqrt(I_meas))^2 / mean(I_meas)."""
    diff = torch.sqrt(pred + _EPS * batch.meas_mean) - torch.sqrt(meas)
    return _share(diff.square(), batch) / batch.meas_mean


@register_loss("poisson")
def poisson_loss(pred, meas, batch: BatchStats, model=None, indices=None) -> torch.Tensor:
    """Poisson negative log-likelihood mean(I_pred - I_meas log I_pred) / mean(I_meas), shifted so a
    perfect prediction scores 0."""
    eps = _EPS * batch.meas_mean
    nll = pred - meas * torch.log(pred + eps)
    floor = meas - meas * torch.log(meas + eps)
    return _share(nll - floor, batch) / batch.meas_mean


@register_loss("pacbed")
def pacbed_loss(pred, meas, batch: BatchStats, model=None, indices=None) -> torch.Tensor:
    """Amplitude misfit of the batch-averaged patterns (position-averaged CBED): insensitive to
    positions, sensitive to the probe and thickness.

    The average is over the whole batch: a part adds its own predictions to the detached sum of
    the others, so its gradient is the whole batch's; its value counts once in the sum of parts."""
    own_sum = pred.sum(dim=0)
    if batch.pred_sum is None or pred.shape[0] == batch.size:
        mean_pred = own_sum / batch.size
        share = 1.0
    else:
        mean_pred = (batch.pred_sum - own_sum.detach() + own_sum) / batch.size
        share = pred.shape[0] / batch.size
    diff = torch.sqrt(mean_pred + _EPS * batch.meas_mean) - torch.sqrt(batch.meas_pattern)
    value = diff.square().mean() / batch.meas_mean
    # full gradient for this part, value counted in proportion to its size
    return value - (1.0 - share) * value.detach()


@register_loss("phase_sparsity")
def phase_sparsity_loss(pred, meas, batch: BatchStats, model=None, indices=None) -> torch.Tensor:
    """Mean absolute object phase (rad) under the batch's probe windows, all modes and slices.

    Like the data terms it covers the batch's own patterns: a pixel is pulled towards zero as often
    as the data see it, and nowhere the data never reach, whatever the number of batches."""
    flat_idx = fw.patch_indices(model.crop_pos[indices], model.window, tuple(model.objp.shape))
    patches = fw.crop_patches(model.objp, flat_idx)  # (b, O, Z, ny, nx)
    return _share(patches.abs(), batch)


def total_loss(pred: torch.Tensor, meas: torch.Tensor, weights: dict[str, float], model=None,
               indices: Optional[torch.Tensor] = None, batch: Optional[BatchStats] = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the active terms for this part of the batch (the whole batch when ``batch``
    is None) and each term's unweighted share, for the history."""
    batch = batch if batch is not None else BatchStats.of(meas)
    total = pred.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        if weight:
            value = LOSS_TERMS[name](pred, meas, batch, model, indices)
            parts[name] = value.detach()
            total = total + weight * value
    return total, parts
