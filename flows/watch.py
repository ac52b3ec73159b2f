"""The watch flow: reconstruct each complete dataset of an inbox exactly once.

Deployed on a schedule, every run polls the inbox. A complete dataset (marker file, or a size
that held still) is reconstructed into ``<outbox>/<dataset name>/``: as a child run of
``deployment`` (the `reconstruct` deployment unless told otherwise; a server without it is an
error), or in this process when ``deployment`` is None. A dataset whose reconstruction fails is
retried up to ``max_attempts`` times in later polls, then reported as failed. A poll that cannot
have the state's lock in time ends at once, Completed, saying so (flows.bookkeeping.inbox.StateBusy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.states import Completed

from flows import send_core_logs_to_prefect
from flows.bookkeeping.inbox import StateBusy, claim_due_datasets, hand_back, peek, record, record_failure, report
from flows.reconstruct import named_after, reconstruct, submit_reconstruct
from flows.sweep import RECONSTRUCT_DEPLOYMENT, checked_deployment
from ptycho_core.config import ConfigError, PtyflowConfig, read_config_file
from ptycho_core.io.calibration import config_for_run
from ptycho_core.rundir import Preempted
from tasks import stopping


def _settle_submitted(outbox: str, max_attempts: int) -> None:
    """Turn finished child runs into done / retry / failed."""
    pending = [e for e in report(outbox) if e.get("status") == "submitted"]
    if not pending:
        return
    with get_client(sync_client=True) as client:
        for entry in pending:
            run = client.read_flow_run(entry["flow_run_id"])
            if not (run.state and run.state.is_final()):
                continue
            if run.state.is_completed():
                record(outbox, entry["dataset"], status="done")
            else:
                record_failure(outbox, entry["dataset"], entry.get("attempts", 0), max_attempts,
                               f"flow run {run.name}: {run.state.name}")


@flow(name="watch", flow_run_name=named_after("watch", "inbox"))
def watch(inbox: str, outbox: str, config: Union[dict, str], stable_seconds: float = 30.0,
          marker_suffix: str = ".done", max_attempts: int = 2,
          deployment: Optional[str] = RECONSTRUCT_DEPLOYMENT, live: bool = False) -> list[dict]:
    """One poll of ``inbox``; ``config`` is the template whose data.path each dataset replaces
    (a config file, or a dict whose relative paths are taken from the working directory); what
    a dataset's file states fills what the template leaves out. ``live``: a dataset is taken as
    soon as it appears and reconstructed while it is written (live mode, the reconstruct flow's
    ``follow``). Returns the state's rows, one per dataset."""
    send_core_logs_to_prefect()
    with stopping.owned("the watch"):
        logger = get_run_logger()
        template = Template.of(config)
        template.config_for(None, logger.warning)  # a bad template fails here, before any dataset is claimed
        deployment = checked_deployment(deployment)
        try:
            rows = _poll(inbox, outbox, template, stable_seconds, marker_suffix, max_attempts, deployment, logger,
                         live)
        except StateBusy as exc:
            # another watcher stuck holding the state: this poll ends, the next one tries again
            logger.warning("poll of %s skipped: %s", inbox, exc)
            rows = peek(outbox)
            _table(rows, f"inbox {inbox} (poll skipped: {exc})")
            return Completed(message=f"poll skipped: {exc}", data=rows)
        _table(rows, f"inbox {inbox}")
    return rows


@dataclass(frozen=True)
class Template:
    """The watch's config template as YAML reads it, and the folder its relative paths are taken from."""

    raw: dict
    base: Path
    source: str

    @classmethod
    def of(cls, config: Union[dict, str]) -> "Template":
        if isinstance(config, (str, Path)):
            return cls(read_config_file(config), Path(config).parent, str(config))
        return cls(config, Path.cwd(), "watch config")

    def config_for(self, data_path: Optional[str], warn) -> PtyflowConfig:
        """The run config of the dataset at ``data_path`` (None: the template's own data.path),
        completed by what that file states."""
        raw = copy.deepcopy(self.raw)
        if data_path is not None and isinstance(raw, dict) and isinstance(raw.get("data"), dict):
            raw["data"]["path"] = data_path
        return config_for_run(raw, self.base, source=self.source if data_path is None else
                              f"{self.source} for {Path(data_path).name}", warn=warn)


def _poll(inbox, outbox, template, stable_seconds, marker_suffix, max_attempts, deployment, logger,
          live: bool = False) -> list[dict]:
    if deployment:
        _settle_submitted(outbox, max_attempts)
    due = claim_due_datasets(inbox, outbox, stable_seconds, marker_suffix, max_attempts, live=live)
    for index, entry in enumerate(due):
        run_dir = str(Path(outbox).resolve() / entry["name"])
        try:
            cfg = template.config_for(entry["path"], logger.warning)
        except ConfigError as exc:  # the template and what this dataset states do not make a config
            attempts = record_failure(outbox, entry["name"], entry["attempts"], max_attempts, str(exc)[:500])
            logger.warning("dataset %s (attempt %d of %d): %s", entry["name"], attempts, max_attempts, exc)
            continue
        try:
            if deployment:
                _submit(deployment, cfg, run_dir, outbox, entry, logger, live)
            else:
                _reconstruct_here(cfg, run_dir, outbox, entry, max_attempts, logger, live)
        except (Preempted, stopping.Stopped):
            # this process is being stopped: no failed attempt; the next poll takes these datasets again
            hand_back(outbox, due[index:])
            raise
    return report(outbox)


def _submit(deployment: str, cfg, run_dir: str, outbox: str, entry: dict, logger, live: bool = False) -> None:
    # a new attempt after a failed one is a new run; a poll that lost its record of the
    # submission (killed in between) submits again once the claim expires and gets the run back
    run = submit_reconstruct(deployment, cfg, run_dir, f"watch {entry['outbox_id']} dataset "
                             f"{entry['hash'] or 'live ' + entry['name']} attempt {entry['attempts']}",
                             **({"follow": True} if live else {}))
    record(outbox, entry["name"], status="submitted", flow_run_id=str(run.id), run_dir=run_dir)
    logger.info("submitted %s as flow run %s", entry["name"], run.name)


def _reconstruct_here(cfg, run_dir: str, outbox: str, entry: dict, max_attempts: int, logger,
                      live: bool = False) -> None:
    state = reconstruct(cfg.to_dict(), run_dir, follow=live, return_state=True)
    if state.is_completed():
        record(outbox, entry["name"], status="done", run_dir=run_dir)
        return
    error = state.result(raise_on_failure=False)
    if isinstance(error, Preempted):
        raise error
    attempts = record_failure(outbox, entry["name"], entry["attempts"], max_attempts, str(state.message)[:500],
                              run_dir=run_dir)
    logger.warning("reconstruction of %s failed (attempt %d of %d): %s", entry["name"], attempts,
                   max_attempts, state.message)


def _table(rows: list[dict], description: str) -> None:
    create_table_artifact([{k: str(v) for k, v in row.items()} for row in rows], description=description)
