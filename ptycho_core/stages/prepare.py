"""Stage 1 of a run directory: config.yaml and preprocessed.h5, written or confirmed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..checkpoint import atomic_write, leftover_temporaries, require_current_format
from ..config import PtyflowConfig, check_files
from ..io.preprocess import check_inputs, preprocess, read_preprocessed
from ..io.readers import DataError
from ..rundir import RunDirError, RunPaths, newest_checkpoint, read_run_config, require_same_config

log = logging.getLogger("ptyflow")


@dataclass
class PrepareOutcome:
    skipped: bool
    n_patterns: int
    window: tuple[int, int]
    dx_ang: float
    dk_mrad: float
    input_hash: str
    notes: dict = field(default_factory=dict)
    input_check: str = ""  # how the inputs were checked against the record (for the log)


def prepare(config: PtyflowConfig, run_dir: str | Path, warn: Callable[[str], None] = log.warning
            ) -> PrepareOutcome:
    """Write config.yaml and preprocessed.h5, or confirm that the existing ones match.

    A run directory that holds a different input or a different configuration is refused
    (naming what differs) so that two reconstructions never mix in one place; so is one whose
    checkpoints an older ptyflow wrote (checkpoint.require_current_format says what to do).
    """
    check_files(config)  # a missing starting model is named as such, not as "a different configuration"
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    newest = newest_checkpoint(run_dir, warn=lambda message: None)  # the segment warns about damaged files
    if newest is not None:  # a directory an older ptyflow wrote: that is what to say, not what differs
        require_current_format(newest)
    if paths.config.is_file():
        require_same_config(read_run_config(run_dir).resume_dict(), config, f"{paths.root} holds a reconstruction")
    existing = read_preprocessed(paths.preprocessed)
    if existing is not None and existing.acquisition == "acquiring":
        raise RunDirError(f"{paths.preprocessed}: a live run whose scan was still being acquired; rerun it with "
                          "--follow (ptyflow run CONFIG --run-dir D --follow)")
    if existing is not None:
        try:
            input_check = check_inputs(config, existing)
        except DataError as exc:
            raise RunDirError(f"{paths.preprocessed} does not match this run's input ({exc}): different input "
                              "data; use a new run directory") from None
        prep, skipped = existing, True
    else:
        # a process killed while preprocessing leaves its partial file (as large as the data): the
        # caller holds the run directory, so no living process is writing these
        for leftover in leftover_temporaries(paths.preprocessed):
            leftover.unlink()
            warn(f"removed {leftover.name}, left by a preprocessing that did not finish")
        prep, skipped = preprocess(config, paths.preprocessed), False
        input_check = "input hashed while it was preprocessed"
    # config.yaml is (re)written so iterations and other free settings reflect the latest run
    _write_text_atomic(paths.config, config.to_yaml())
    return PrepareOutcome(skipped, prep.n_patterns, prep.window, prep.dx_ang, prep.dk_mrad,
                          prep.input_hash, prep.notes, input_check)


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
