"""Running iterations: optimizer construction, deterministic batches, the optimization loop.

An iteration is one pass over all positions in batches; each batch is one optimizer step. The
batch order of iteration i depends only on (seed, i), so a run stopped anywhere and resumed from
its checkpoint repeats exactly what an uninterrupted run does.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .config import ConfigError
from .constraints import DataContext, apply_constraints, place_held_out
from .distributed import Collective
from .losses import DATA_TERMS, BatchStats, total_loss
from .measurements import MeasurementFeed
from .model import PtychoAD


class NumericalError(RuntimeError):
    """The loss or a tensor became NaN/Inf."""


def forward_loss(model: PtychoAD, indices: torch.Tensor, meas: torch.Tensor, weights: dict[str, float],
                 batch: Optional[BatchStats] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Predict the patterns of ``indices`` (in FFT order, like ``meas``) and score them as a part
    of the optimizer batch ``batch`` (None: they are the whole batch)."""
    return total_loss(model(indices, centered=False), meas, weights, model, indices, batch)


def compiled_forward_loss() -> Callable:
    """forward_loss under torch.compile (recon_params.compile). Compiling happens at the first call;
    a failure there (no C++ compiler, an unsupported torch) is a ConfigError, not a crash."""
    compiled = torch.compile(forward_loss)
    first_call = True

    def call(*args):
        nonlocal first_call
        if not first_call:
            return compiled(*args)
        try:
            result = compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the compiler stack raises
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"recon_params.compile: torch.compile failed ({reason}); set it to false") from None
        first_call = False
        return result

    return call


# --------------------------------------------------------------------------- optimizer
def build_optimizer(model: PtychoAD, name: str, configs: dict, lr_units: Optional[dict[str, float]] = None
                    ) -> torch.optim.Optimizer:
    """torch.optim.<name> over the tensors that are ever optimized, one param group each.

    Each group carries its tensor's name and lr (model_params.update_params) times the tensor's
    unit from ``lr_units`` (default 1): an adaptive optimizer's step is about lr in the tensor's
    own units, so a tensor whose size depends on the data (the probe carries sqrt(counts)) needs a
    unit for its lr to mean the same on every dataset. LBFGS accepts one group only: all
    optimized tensors share it and its lr is ``configs['lr']`` (torch's default 1 if absent);
    update_params lr then only decides which tensors take part (lr > 0).
    """
    lr_units = lr_units or {}
    names = model.optimized_names()
    if not names:
        raise ConfigError(
            "model_params.update_params: no tensor is optimized (every start_iter is null or lr is 0)"
        )
    cls = getattr(torch.optim, name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    for key in configs:
        if key not in accepted:
            raise ConfigError(
                f"model_params.optimizer_params.configs.{key}: not an argument of torch.optim.{name} "
                f"(accepted: {', '.join(accepted)})"
            )
    if name == "LBFGS":
        groups = [{"params": [getattr(model, n) for n in names], "names": list(names)}]
    else:
        groups = [
            {"params": [getattr(model, n)], "lr": model.update_rules[n].lr * lr_units.get(n, 1.0), "names": [n]}
            for n in names
        ]
    try:
        optimizer = cls(groups, **configs)
        for group in optimizer.param_groups:
            unit = lr_units.get(group["names"][0], 1.0) if len(group["names"]) == 1 else 1.0
            if unit != 1.0 and isinstance(group.get("eps"), float):
                # Adam-like steps are lr * m / (sqrt(v) + eps): eps is in gradient units, which scale
                # as 1/unit, so it scales with them (the step is then exactly that of the tensor
                # divided by its unit)
                group["eps"] = group["eps"] / unit
            group["base_lr"] = group["lr"]  # what Problem.lr_factor scales
        return optimizer
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model_params.optimizer_params.configs: torch.optim.{name} refused them: {exc}") from None


# --------------------------------------------------------------------------- batches
def _generator(seed: int, iteration: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, iteration]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def compact_groups(positions: np.ndarray, group_size: int) -> list[np.ndarray]:
    """Split positions (N, 2) into spatially compact groups of at most group_size by recursive
    bisection along the longer extent; deterministic, sizes as equal as possible."""
    result, pending = [], [np.arange(len(positions))]
    while pending:
        group = pending.pop()
        if len(group) <= group_size:
            result.append(group)
            continue
        pts = positions[group]
        axis = int(np.argmax(np.ptp(pts, axis=0)))
        ordered = group[np.lexsort((pts[:, 1 - axis], pts[:, axis]))]
        n_parts = math.ceil(len(group) / group_size)
        cut = round(len(group) * (n_parts // 2) / n_parts)
        pending += [ordered[cut:], ordered[:cut]]
    return sorted(result, key=lambda g: int(g.min()))


def batch_order(seed: int, iteration: int, n_positions: int, batch_size: int, mode: str = "random",
                positions: Optional[np.ndarray] = None) -> list[torch.Tensor]:
    """Position indices of each batch of ``iteration``, drawn from (seed, iteration) alone.

    random: a permutation split into ceil(N / batch_size) batches of near-equal size.
    compact: spatially compact groups of batch_size neighbours, in random order.
    sparse: batch_size spatial clusters; each batch takes the member of one rank from every
    cluster, so each batch is spread evenly over the whole field.
    """
    generator = _generator(seed, iteration)
    if mode == "random" or positions is None:
        perm = torch.randperm(n_positions, generator=generator)
        n_batches = max(1, math.ceil(n_positions / batch_size))
        return list(torch.tensor_split(perm, n_batches))
    if mode == "compact":
        groups = compact_groups(positions, batch_size)
        order = torch.randperm(len(groups), generator=generator).tolist()
        return [torch.from_numpy(groups[k]) for k in order]
    if mode == "sparse":
        clusters = compact_groups(positions, math.ceil(n_positions / batch_size))
        # members in raster order inside each cluster; batch j takes the member of the same rank in
        # every cluster, so its members sit about one cluster width apart (ranks shuffled per iteration)
        ranked = [c[np.lexsort((positions[c][:, 1], positions[c][:, 0]))] for c in clusters]
        n_batches = max(len(c) for c in ranked)
        ranks = torch.randperm(n_batches, generator=generator).tolist()
        return [torch.from_numpy(np.array([c[r] for c in ranked if r < len(c)])) for r in ranks]
    raise ValueError(f"recon_params.batching: unknown mode '{mode}'")


def held_out_indices(positions_px: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The validation patterns (recon_params.validation_fraction): sorted indices of about
    ``fraction`` of the positions (N, 2), one drawn from each of as many spatially compact
    clusters, so they spread evenly over the field and no region loses all of its data. Depends
    only on (positions, fraction, seed): every resume holds out the same patterns."""
    n = len(positions_px)
    count = min(int(round(fraction * n)), n - 1)
    if count < 1:
        return np.zeros(0, dtype=np.int64)
    clusters = compact_groups(np.asarray(positions_px, dtype=np.float64), math.ceil(n / count))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11D]))  # not the batch order's stream
    return np.sort(np.array([c[rng.integers(len(c))] for c in clusters], dtype=np.int64))


# --------------------------------------------------------------------------- the loop
@dataclass
class EngineState:
    """Where a reconstruction stands: ``iteration`` complete iterations, plus ``batch_cursor``
    batches of the next one (non-zero only after a preemption mid-iteration)."""

    iteration: int = 0
    batch_cursor: int = 0
    partial_loss: dict[str, float] = field(default_factory=dict)  # sums over the cursor's batches
    history: dict[str, list[float]] = field(default_factory=dict)  # per completed iteration

    def record(self, row: dict[str, float]) -> None:
        for key, value in row.items():
            self.history.setdefault(key, []).append(float(value))


@dataclass
class Problem:
    """What the loop needs besides the model: the data and the settings that shape the steps."""

    measurements: MeasurementFeed  # batches (B, ky, kx) in FFT order (DC at [0, 0]) on the model's device
    loss_weights: dict[str, float]
    constraint_params: object
    batch_size: int
    seed: int
    context: DataContext  # what the constraints know of the data
    batching: str = "random"
    positions_px: Optional[np.ndarray] = None  # (N, 2), for compact/sparse batches
    micro_batches: int = 1  # grows when a batch does not fit in (GPU) memory
    forward_loss: Callable = forward_loss  # or compiled_forward_loss() (recon_params.compile)
    lr_factor: Callable[[int], float] = lambda iteration: 1.0  # model_params.lr_schedule
    collective: Optional[Collective] = None  # several processes share each batch (recon_params.devices)
    # recon_params.validation_fraction: patterns that never enter a batch, scored after every iteration
    validation_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    validation_mean_intensity: Optional[torch.Tensor] = None  # their mean intensity per pixel, read at the first score

    def training_indices(self, n_positions: int) -> Optional[np.ndarray]:
        """The patterns the optimizer sees, (N - held out,); None: all of them."""
        if not len(self.validation_indices):
            return None
        keep = np.ones(n_positions, dtype=bool)
        keep[self.validation_indices] = False
        return np.flatnonzero(keep)


def batch_step_closure(model: PtychoAD, optimizer: torch.optim.Optimizer, problem: Problem, indices: torch.Tensor,
                       meas: torch.Tensor, parts_out: dict, batch: Optional[torch.Tensor] = None
                       ) -> Callable[[], torch.Tensor]:
    """The gradient of one optimizer batch: forward, loss, backward, in ``problem.micro_batches``
    parts when the whole batch does not fit in memory. Every part is scored against the whole
    batch (losses.BatchStats), so the parts' gradients add up to exactly the whole batch's and the
    step is the same. With several processes (``problem.collective``) ``indices``/``meas`` are this
    process's share of the optimizer batch ``batch`` (its pattern indices), and the shares'
    gradients are summed across the processes. Fills ``parts_out`` with the loss terms and the total."""
    collective = problem.collective

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        chunks = [c for c in torch.arange(len(indices), device=indices.device).tensor_split(problem.micro_batches)
                  if len(c)]
        pred_sum = None
        if (len(chunks) > 1 or collective is not None) and problem.loss_weights.get("pacbed"):
            # the batch-averaged pattern needs every part's prediction before any part's gradient
            with torch.no_grad():
                pred_sum = sum((model(indices[c], centered=False).sum(dim=0) for c in chunks),
                               torch.zeros(meas.shape[1:], dtype=meas.dtype, device=meas.device))
                if collective is not None:
                    pred_sum = collective.sum(pred_sum)
        if collective is not None:
            stats = collective.batch_stats(meas, batch, bool(problem.loss_weights.get("pacbed")))
            stats.pred_sum = pred_sum
        else:
            stats = BatchStats.of(meas, pred_sum)
        totals: dict[str, torch.Tensor] = {}
        loss_sum = None
        for chunk in chunks:
            loss, parts = problem.forward_loss(model, indices[chunk], meas[chunk], problem.loss_weights, stats)
            loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for key, value in parts.items():
                totals[key] = totals[key] + value if key in totals else value
        if collective is not None:
            if loss_sum is not None:
                totals["total"] = loss_sum
            totals = collective.reduce_step(model, totals, [k for k, w in problem.loss_weights.items() if w])
            loss_sum = totals.pop("total")
        parts_out.clear()
        parts_out.update(totals, total=loss_sum)
        return loss_sum

    return closure


def _to_device_at_once(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The batches' index tensors on the device in one copy: copying from pageable host memory
    waits for the GPU's queue to drain, which once per batch would stop the host from queueing
    the next batch's kernels while the GPU runs this one."""
    if not parts or torch.device(device).type == "cpu":
        return parts
    return list(torch.cat(parts).to(device).split([len(p) for p in parts]))


def _check_finite(model: PtychoAD, loss: torch.Tensor, iteration: int) -> None:
    if torch.isfinite(loss):
        return
    bad = [n for n, t in model.tensors().items() if not torch.isfinite(t).all()]
    where = f"; non-finite values in {', '.join(bad)}" if bad else ""
    raise NumericalError(
        f"loss became {loss.item()} at iteration {iteration}{where}: lower the learning rates "
        "(model_params.update_params.<tensor>.lr)"
    )


def _optimizer_step(model: PtychoAD, optimizer: torch.optim.Optimizer, problem: Problem, indices: torch.Tensor,
                    meas: torch.Tensor, iteration: int, warn: Callable[[str], None],
                    batch: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch. A batch whose gradient does not fit in (GPU) memory is split
    into more micro-batches (problem.micro_batches, kept for the rest of the run) and the step is
    retried: nothing but gradients had changed. Running out of memory after that, inside the
    optimizer's update or in a later evaluation of LBFGS's, which follow a change of the tensors,
    ends the run: a retry would apply part of the step twice. Returns the loss terms."""
    parts: dict[str, torch.Tensor] = {}
    closure = batch_step_closure(model, optimizer, problem, indices, meas, parts, batch)
    updating = False

    def gradient_then_update() -> torch.Tensor:
        nonlocal updating
        loss = closure()
        updating = True  # from here on the optimizer changes the tensors and its state
        return loss

    while True:
        updating = False
        try:
            if isinstance(optimizer, torch.optim.LBFGS):
                optimizer.step(gradient_then_update)
            else:
                gradient_then_update()
                optimizer.step()
            return parts
        except torch.cuda.OutOfMemoryError as exc:
            if updating:
                raise torch.cuda.OutOfMemoryError(
                    f"out of memory in the optimizer's update at iteration {iteration}, after the batch's gradient "
                    f"was computed: the update was partly applied, so it is not retried with smaller batches; "
                    f"nothing of it is saved (a rerun continues from the newest checkpoint). The optimizer's "
                    f"state needs memory the patterns leave free: lower recon_params.memory_budget_gb (the "
                    f"patterns then stay in host memory or on disk) or, for LBFGS, configs.history_size") from exc
            # with several processes a retry would repeat collectives the others have passed
            if problem.micro_batches >= len(indices) or problem.collective is not None:
                raise
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            problem.micro_batches *= 2
            warn(f"out of memory at iteration {iteration}: splitting each batch into "
                 f"{problem.micro_batches} parts (same steps, gradients summed)")


def validation_loss(model: PtychoAD, problem: Problem) -> float:
    """The weighted data terms (amplitude, poisson) of the held-out patterns, scored as one batch:
    how well the model predicts patterns it was never fitted to, at the positions their trained
    neighbours' corrections give them (constraints.place_held_out). Regularizers and the
    batch-level pacbed term are left out: they do not measure a prediction. Every process of a
    distributed run scores its share and the shares are summed."""
    weights = {k: w for k, w in problem.loss_weights.items() if k in DATA_TERMS and w}
    held = torch.from_numpy(problem.validation_indices)
    chunks = list(held.tensor_split(max(1, math.ceil(len(held) / problem.batch_size))))
    collective = problem.collective
    if collective is not None:
        chunks = [collective.own(c) for c in chunks]
    chunks = [c for c in chunks if len(c)]
    device = problem.measurements.device
    with torch.no_grad():
        if problem.validation_mean_intensity is None:
            total = torch.zeros((), dtype=torch.float64, device=device)
            with problem.measurements.prefetch(chunks) as fed:
                for meas in fed:
                    total = total + meas.sum(dtype=torch.float64)
            if collective is not None:
                total = collective.sum(total)
            pixels = len(held) * math.prod(model.window)
            problem.validation_mean_intensity = (total / pixels).to(model.probe.dtype)
        stats = BatchStats(size=len(held), meas_mean=problem.validation_mean_intensity, meas_pattern=None)
        score = torch.zeros((), dtype=torch.float64, device=device)
        with problem.measurements.prefetch(chunks) as fed:
            for chunk, meas in zip(chunks, fed):
                loss, _ = total_loss(model(chunk.to(device), centered=False), meas, weights, model, chunk, stats)
                score = score + loss.to(torch.float64)
        if collective is not None:
            score = collective.sum(score)
    return float(score)


def run_iterations(
    model: PtychoAD,
    optimizer: torch.optim.Optimizer,
    problem: Problem,
    state: EngineState,
    last_iteration: int,
    stop_requested: Callable[[], bool] = lambda: False,
    on_iteration: Optional[Callable[[EngineState, dict], None]] = None,
    warn: Callable[[str], None] = logging.getLogger("ptyflow").warning,
) -> bool:
    """Run until ``state.iteration == last_iteration`` or until ``stop_requested()`` is true after a
    batch. Updates ``state`` in place; returns True when it stopped early."""
    context = problem.context
    n = model.n_positions
    collective = problem.collective
    trained = problem.training_indices(n)
    n_trained = n if trained is None else len(trained)
    positions = problem.positions_px if trained is None or problem.positions_px is None else problem.positions_px[trained]

    def stopping() -> bool:
        return collective.stop if collective is not None else stop_requested()

    if collective is not None:
        collective.start(problem.measurements, n)

    while state.iteration < last_iteration:
        iteration = state.iteration + 1
        model.set_iteration(iteration)
        factor = problem.lr_factor(iteration)
        for group in optimizer.param_groups:
            group["lr"] = group.get("base_lr", group["lr"]) * factor
        batches = batch_order(problem.seed, iteration, n_trained, problem.batch_size, problem.batching, positions)
        if trained is not None:  # batches were drawn over the trained patterns: back to pattern indices
            batches = [torch.from_numpy(trained[b.numpy()]) for b in batches]
        started = time.perf_counter()
        # loss sums stay on the device until the iteration ends (or stops): no host sync per batch.
        # float64, continuing from the floats a mid-iteration checkpoint holds, so a resumed
        # iteration adds up exactly as an uninterrupted one.
        sums = {k: torch.tensor(v, dtype=torch.float64, device=problem.measurements.device)
                for k, v in state.partial_loss.items()}
        # with several processes each computes its share of every batch; they stop together, at
        # the batch after which any of them asked to (rank 0 is the one signals reach)
        shares = batches if collective is None else [collective.own(b) for b in batches]
        on_device = _to_device_at_once(shares, problem.measurements.device)
        with problem.measurements.prefetch(shares[state.batch_cursor:]) as fed:
            for b, meas in zip(range(state.batch_cursor, len(batches)), fed):
                indices = on_device[b]
                if collective is not None:
                    collective.vote = stop_requested()
                parts = _optimizer_step(model, optimizer, problem, indices, meas, iteration, warn, batches[b])
                weight = len(batches[b]) / n_trained
                for key, value in parts.items():
                    weighted = value.detach().to(torch.float64) * weight
                    sums[key] = sums[key] + weighted if key in sums else weighted
                state.batch_cursor = b + 1
                if stopping() and state.batch_cursor < len(batches):
                    # a non-finite state must not reach the checkpoint the caller writes next
                    _check_finite(model, sums["total"], iteration)
                    state.partial_loss = {k: float(v) for k, v in sums.items()}
                    return True
        # checked once per iteration: a NaN in one batch spreads to the next, so nothing is missed
        _check_finite(model, sums["total"], iteration)
        totals = {k: float(v) for k, v in sums.items()}
        apply_constraints(model, problem.constraint_params, iteration, context, optimizer)
        # held-out patterns are scored where the refined positions around them say their probes
        # are. Stored in the model rather than computed for the score alone: the checkpoint, the
        # exported positions and a later run that starts from this model then hold the positions
        # that were scored, and a resume continues from exactly them
        place_held_out(model, context)
        # a position correction past half a pixel moves its probe window by whole pixels, so the
        # Fourier shift inside the window stays sub-pixel and never wraps the probe's tail around
        model.recentre_windows()
        if collective is not None:
            collective.share_model(model)
        row = {"iteration": iteration, "loss": totals.pop("total")}
        row.update({f"loss_{k}": v for k, v in totals.items()})
        if len(problem.validation_indices):
            row["validation_loss"] = validation_loss(model, problem)
        row["seconds"] = time.perf_counter() - started
        state.iteration, state.batch_cursor, state.partial_loss = iteration, 0, {}
        state.record(row)
        if on_iteration is not None:
            on_iteration(state, row)
        if stopping() and state.iteration < last_iteration:
            return True
    return False
