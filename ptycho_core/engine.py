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
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .config import ConfigError
from .constraints import DataContext, apply_constraints, place_held_out
from .arrivals import ACQUIRING, Arrivals
from .collective import Collective
from .losses import DATA_TERMS, BatchStats, total_loss
from .measurements import MeasurementFeed
from .model import PtychoAD
from .scan_calibration import ScanCalibration, measure_scan_affine
from .scan_fit import ScanFit, ScanFitState, scan_fit_step


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
    batches of the next one (non-zero only after a preemption mid-iteration). The loop's one
    mutable record: run_iterations updates it in place."""

    iteration: int = 0
    batch_cursor: int = 0
    partial_loss: dict[str, float] = field(default_factory=dict)  # sums over the cursor's batches
    history: dict[str, list[float]] = field(default_factory=dict)  # per completed iteration
    # parts each batch's gradient is computed in: doubles when a batch does not fit in (GPU)
    # memory, and stays so for the rest of the process's run (not saved: a resume finds it again)
    micro_batches: int = 1
    scan_fit: Optional[ScanFitState] = None  # model_params.scan_fit: where the fit stands
    # live mode: the (acquired, acquiring) the iteration in progress draws with (arrivals.Arrivals)
    arrivals_in: Optional[tuple[int, bool]] = None

    def record(self, row: dict[str, float]) -> None:
        for key, value in row.items():
            self.history.setdefault(key, []).append(float(value))


@dataclass(frozen=True)
class Problem:
    """What the loop needs besides the model: the data and the settings that shape the steps.
    Fixed for the run (what changes as it goes is in EngineState)."""

    measurements: MeasurementFeed  # batches (B, ky, kx) in FFT order (DC at [0, 0]) on the model's device
    loss_weights: dict[str, float]
    constraint_params: object
    batch_size: int
    seed: int
    context: DataContext  # what the constraints know of the data
    batching: str = "random"
    positions_px: Optional[np.ndarray] = None  # (N, 2), for compact/sparse batches
    forward_loss: Callable = forward_loss  # or compiled_forward_loss() (recon_params.compile)
    # model_params.lr_schedule: (iteration, the training loss of each earlier iteration that counts) -> factor
    lr_factor: Callable[[int, Sequence[float]], float] = lambda iteration, losses: 1.0
    collective: Collective = field(default_factory=Collective)  # this process, or one rank of several
    # recon_params.validation_fraction: patterns that never enter a batch, scored after every iteration
    validation_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scan_fit: Optional[ScanFit] = None  # model_params.scan_fit (None: off)
    # live mode: the patterns acquired so far, which the batches are drawn from; None: all of them
    arrivals: Optional[Arrivals] = None

    def training_indices(self, n_positions: int) -> Optional[np.ndarray]:
        """The patterns the optimizer sees, (N - held out,); None: all of them."""
        if not len(self.validation_indices):
            return None
        keep = np.ones(n_positions, dtype=bool)
        keep[self.validation_indices] = False
        return np.flatnonzero(keep)


def batch_step_closure(model: PtychoAD, optimizer: torch.optim.Optimizer, problem: Problem, micro_batches: int,
                       indices: torch.Tensor, meas: torch.Tensor, parts_out: dict, batch: torch.Tensor
                       ) -> Callable[[], torch.Tensor]:
    """The gradient of one optimizer batch ``batch`` (its pattern indices): forward, loss,
    backward, in ``micro_batches`` parts when the whole batch does not fit in memory. ``indices``
    and ``meas`` are this process's share of it (problem.collective; all of it with one process).
    Every part is scored against the whole batch (losses.BatchStats), so the parts' gradients add
    up to exactly the whole batch's and the step is the same; the processes' shares are summed.
    Fills ``parts_out`` with the loss terms and the total."""
    collective = problem.collective
    pacbed = bool(problem.loss_weights.get("pacbed"))

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        chunks = [c for c in torch.arange(len(indices), device=indices.device).tensor_split(micro_batches) if len(c)]
        pred_sum = None
        if pacbed and (len(chunks) > 1 or collective.world > 1):
            # the batch-averaged pattern needs every part's prediction before any part's gradient
            with torch.no_grad():
                pred_sum = collective.sum(sum((model(indices[c], centered=False).sum(dim=0) for c in chunks),
                                              torch.zeros(meas.shape[1:], dtype=meas.dtype, device=meas.device)))
        stats = collective.batch_stats(meas, batch, pred_sum, pacbed)
        totals: dict[str, torch.Tensor] = {}
        loss_sum = None
        for chunk in chunks:
            loss, parts = problem.forward_loss(model, indices[chunk], meas[chunk], problem.loss_weights, stats)
            loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for key, value in parts.items():
                totals[key] = totals[key] + value if key in totals else value
        if loss_sum is not None:
            totals["total"] = loss_sum
        totals = collective.reduce_step(model, totals, [k for k, w in problem.loss_weights.items() if w])
        parts_out.clear()
        parts_out.update(totals)
        return totals["total"]

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


def _optimizer_step(model: PtychoAD, optimizer: torch.optim.Optimizer, problem: Problem, state: EngineState,
                    indices: torch.Tensor, meas: torch.Tensor, iteration: int, warn: Callable[[str], None],
                    batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch. A batch whose gradient does not fit in (GPU) memory is split
    into more micro-batches (state.micro_batches) and the step is retried: nothing but gradients
    had changed. Running out of memory after that, inside the optimizer's update or in a later
    evaluation of LBFGS's, which follow a change of the tensors, ends the run: a retry would apply
    part of the step twice. Returns the loss terms."""
    updating = False

    def gradient_then_update(closure) -> Callable[[], torch.Tensor]:
        def evaluate() -> torch.Tensor:
            nonlocal updating
            loss = closure()
            updating = True  # from here on the optimizer changes the tensors and its state
            return loss
        return evaluate

    while True:
        updating = False
        parts: dict[str, torch.Tensor] = {}
        evaluate = gradient_then_update(
            batch_step_closure(model, optimizer, problem, state.micro_batches, indices, meas, parts, batch))
        try:
            if isinstance(optimizer, torch.optim.LBFGS):
                optimizer.step(evaluate)
            else:
                evaluate()
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
            if state.micro_batches >= len(indices) or problem.collective.world > 1:
                raise
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            state.micro_batches *= 2
            warn(f"out of memory at iteration {iteration}: splitting each batch into "
                 f"{state.micro_batches} parts (same steps, gradients summed)")


def _held_out_chunks(problem: Problem) -> list[torch.Tensor]:
    """This process's share of the held-out patterns, in batch-sized chunks."""
    held = torch.from_numpy(problem.validation_indices)
    chunks = held.tensor_split(max(1, math.ceil(len(held) / problem.batch_size)))
    return [c for c in (problem.collective.own(c) for c in chunks) if len(c)]


def held_out_mean_intensity(model: PtychoAD, problem: Problem) -> torch.Tensor:
    """The held-out patterns' mean intensity per pixel (), which their score divides by, as a
    batch's does: read once per run (data only), summed over the processes."""
    device = problem.measurements.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad(), problem.measurements.prefetch(_held_out_chunks(problem)) as fed:
        for meas in fed:
            total = total + meas.sum(dtype=torch.float64)
    pixels = len(problem.validation_indices) * math.prod(model.window)
    return (problem.collective.sum(total) / pixels).to(model.probe.dtype)


def validation_loss(model: PtychoAD, problem: Problem, mean_intensity: torch.Tensor) -> float:
    """The weighted data terms (amplitude, poisson) of the held-out patterns, scored as one batch
    whose mean intensity is ``mean_intensity`` (held_out_mean_intensity): how well the model
    predicts patterns it was never fitted to, at the positions their trained neighbours'
    corrections give them (constraints.place_held_out). Regularizers and the batch-level pacbed
    term are left out: they do not measure a prediction. Every process of a distributed run
    scores its share and the shares are summed."""
    weights = {k: w for k, w in problem.loss_weights.items() if k in DATA_TERMS and w}
    chunks = _held_out_chunks(problem)
    device = problem.measurements.device
    stats = BatchStats(size=len(problem.validation_indices), meas_mean=mean_intensity, meas_pattern=None)
    score = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad(), problem.measurements.prefetch(chunks) as fed:
        for chunk, meas in zip(chunks, fed):
            loss, _ = total_loss(model(chunk.to(device), centered=False), meas, weights, model, chunk, stats)
            score = score + loss.to(torch.float64)
    return float(problem.collective.sum(score))


def _begin_iteration(model: PtychoAD, optimizer: torch.optim.Optimizer, problem: Problem, iteration: int,
                     history: dict[str, list[float]]) -> None:
    """Gradients on for the tensors whose start_iter is reached; the lr schedule's factor, from the
    iteration and the losses of the earlier ones (``history``: EngineState.history)."""
    model.set_iteration(iteration)
    factor = problem.lr_factor(iteration, settled_losses(history))
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", group["lr"]) * factor


def settled_losses(history: dict[str, list[float]]) -> list[float]:
    """The training loss of each completed iteration, less those of a live run while its scan was
    still acquired: each of those had more patterns than the one before, so their losses do not
    compare (a plateau schedule would read the growing scan as a loss that stopped falling)."""
    losses = history.get("loss", [])
    acquiring = history.get(ACQUIRING, [])
    return [loss for n, loss in enumerate(losses) if not (n < len(acquiring) and acquiring[n])]


def iteration_batches(problem: Problem, iteration: int, trained: Optional[np.ndarray], n_positions: int
                      ) -> list[torch.Tensor]:
    """The pattern indices of each batch of ``iteration``: drawn over the trained patterns (all
    of them, ``trained`` None) from (seed, iteration) alone."""
    n_trained = n_positions if trained is None else len(trained)
    positions = problem.positions_px
    if trained is not None and positions is not None:
        positions = positions[trained]
    batches = batch_order(problem.seed, iteration, n_trained, problem.batch_size, problem.batching, positions)
    if trained is not None:  # drawn over the trained patterns: back to pattern indices
        batches = [torch.from_numpy(trained[b.numpy()]) for b in batches]
    return batches


def _run_batches(model: PtychoAD, optimizer: torch.optim.Optimizer, problem: Problem, state: EngineState,
                 batches: list[torch.Tensor], iteration: int, n_trained: int, stop_requested: Callable[[], bool],
                 warn: Callable[[str], None]) -> Optional[dict[str, torch.Tensor]]:
    """The optimizer steps of one iteration, from state.batch_cursor on; returns the loss terms
    summed over the iteration (weighted by batch size), or None when the processes stopped
    after a batch, the sums so far then kept in state.partial_loss."""
    collective = problem.collective
    device = problem.measurements.device
    # loss sums stay on the device until the iteration ends (or stops): no host sync per batch.
    # float64, continuing from the floats a mid-iteration checkpoint holds, so a resumed
    # iteration adds up exactly as an uninterrupted one.
    sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state.partial_loss.items()}
    shares = [collective.own(b) for b in batches]
    on_device = _to_device_at_once(shares, device)
    with problem.measurements.prefetch(shares[state.batch_cursor:]) as fed:
        for b, meas in zip(range(state.batch_cursor, len(batches)), fed):
            collective.vote(stop_requested)
            parts = _optimizer_step(model, optimizer, problem, state, on_device[b], meas, iteration, warn, batches[b])
            weight = len(batches[b]) / n_trained
            for key, value in parts.items():
                weighted = value.detach().to(torch.float64) * weight
                sums[key] = sums[key] + weighted if key in sums else weighted
            state.batch_cursor = b + 1
            if collective.agreed_stop(stop_requested) and state.batch_cursor < len(batches):
                # a non-finite state must not reach the checkpoint the caller writes next
                _check_finite(model, sums["total"], iteration)
                state.partial_loss = {k: float(v) for k, v in sums.items()}
                return None
    return sums


def _fit_scan(model: PtychoAD, problem: Problem, state: EngineState, iteration: int) -> None:
    """A step of the scan's smooth error (scan_fit.py), after the iteration's optimizer steps and
    before the constraints: positions and object move together, every process alike (each sums
    the same gradients)."""
    fit = problem.scan_fit
    if fit is None:
        return
    # not in a run that followed an acquisition (live mode). Fitted on the rows in so far, 2 of 3
    # live runs ended 0.03 and 0.08 below offline; fitted from the completion on, when the object
    # has formed over the whole scan, it found a 2 % scan error in ideal abTEM data (0.80 against
    # 0.96 without it)
    if (state.arrivals_in is not None and state.arrivals_in[1]) or any(state.history.get(ACQUIRING, [])):
        return
    if not fit.active(iteration):
        return
    weights = {k: w for k, w in problem.loss_weights.items() if k in DATA_TERMS and w}
    # in the parts a batch's gradient is computed in, which fit in memory (state.micro_batches)
    chunk = max(1, math.ceil(problem.batch_size / state.micro_batches))
    state.scan_fit = scan_fit_step(model, fit, state.scan_fit or fit.initial_state(), problem.measurements,
                                   weights, problem.collective, chunk)


def measure_scan_map(model: PtychoAD, problem: Problem) -> ScanCalibration:
    """The scan's affine map measured from this problem's trained patterns at the model's probe
    centres (scan_calibration.py); nothing is moved. Needs problem.scan_fit."""
    fit = problem.scan_fit
    return measure_scan_affine(problem.measurements, fit.subset, model.centres_px(), fit.spread_px,
                               problem.collective, model.probe_complex, model.detector_blur_std)


def _measure_scan(model: PtychoAD, problem: Problem) -> Optional[ScanFitState]:
    """Before the first iteration: the scan's affine map measured from the data
    (scan_calibration.py) and the probes moved by it, while no object has formed that would have to
    follow them. Returns the fit's starting state (None: no fit, or not measured here)."""
    fit = problem.scan_fit
    if fit is None or not fit.measure:
        return None
    if problem.arrivals is not None and problem.arrivals.acquiring:
        return None  # live mode: a part of the scan is in (see _fit_scan)
    log = logging.getLogger("ptyflow")
    calibration = measure_scan_map(model, problem)
    if not calibration.applied:
        log.info("scan: affine map left nominal (%s)", calibration.reason)
        return fit.initial_state()
    state = fit.initial_state(calibration.matrix)
    model.move_probes(torch.from_numpy(fit.moves_px(state.params)).to(model.probe_pos_shifts.device))
    model.recentre_windows()
    log.info("scan: affine map measured from %d frequencies (%.3f px misfit): %s", calibration.frequencies,
             calibration.residual_px, np.round(calibration.matrix, 4).tolist())
    return state


def _end_iteration(model: PtychoAD, optimizer: torch.optim.Optimizer, problem: Problem, iteration: int) -> None:
    """What follows an iteration's steps: the constraints, the held-out patterns' positions, the
    probe windows, and the processes' tensors made equal."""
    apply_constraints(model, problem.constraint_params, iteration, problem.context, optimizer)
    # held-out patterns are scored where the refined positions around them say their probes
    # are. Stored in the model rather than computed for the score alone: the checkpoint, the
    # exported positions and a later run that starts from this model then hold the positions
    # that were scored, and a resume continues from exactly them
    place_held_out(model, problem.context)
    # a position correction past half a pixel moves its probe window by whole pixels, so the
    # Fourier shift inside the window stays sub-pixel and never wraps the probe's tail around
    model.recentre_windows()
    problem.collective.share_model(model)


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
    batch (with several processes: any of them). Updates ``state`` in place; returns True when it
    stopped early."""
    n = model.n_positions
    trained = problem.training_indices(n)
    n_trained = n if trained is None else len(trained)
    problem.collective.start(problem.measurements, n)
    held_out_mean = held_out_mean_intensity(model, problem) if len(problem.validation_indices) else None
    if state.iteration == 0 and state.batch_cursor == 0 and state.scan_fit is None:
        state.scan_fit = _measure_scan(model, problem)
    while state.iteration < last_iteration:
        iteration = state.iteration + 1
        _begin_iteration(model, optimizer, problem, iteration, state.history)
        started = time.perf_counter()
        drawn, arrival_fields = trained, {}
        if problem.arrivals is not None:  # live mode: from the acquired patterns, the ones behind first
            drawn, arrival_fields = problem.arrivals.draw(
                state.history, trained if trained is not None else np.arange(n), n,
                state.arrivals_in if state.batch_cursor else None)
            state.arrivals_in = (int(arrival_fields["patterns_in"]), bool(arrival_fields["acquiring"]))
        batches = iteration_batches(problem, iteration, drawn, n)
        n_drawn = n_trained if drawn is None else len(drawn)
        sums = _run_batches(model, optimizer, problem, state, batches, iteration, n_drawn, stop_requested, warn)
        if sums is None:
            return True
        # checked once per iteration: a NaN in one batch spreads to the next, so nothing is missed
        _check_finite(model, sums["total"], iteration)
        totals = {k: float(v) for k, v in sums.items()}
        _fit_scan(model, problem, state, iteration)
        _end_iteration(model, optimizer, problem, iteration)
        row = {"iteration": iteration, "loss": totals.pop("total")}
        row.update({f"loss_{k}": v for k, v in totals.items()})
        row.update(arrival_fields)
        if held_out_mean is not None:
            row["validation_loss"] = validation_loss(model, problem, held_out_mean)
        row["seconds"] = time.perf_counter() - started
        state.iteration, state.batch_cursor, state.partial_loss = iteration, 0, {}
        state.record(row)
        if on_iteration is not None:
            on_iteration(state, row)
        if problem.collective.agreed_stop(stop_requested) and state.iteration < last_iteration:
            return True
    return False
