"""The ``ptyflow`` command line: demo, run, sweep, simulate, inspect, inspect-data, init-config.

User errors end in one line on stderr and a non-zero exit code, never a traceback.
Prefect is imported only by the commands that run flows, so the others start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

# the CLI's clock for its timing line's "start-up and imports": from here, before typer, rich and
# what a command imports (the interpreter's own start, tens of ms, is not in it). Reading the
# process's start from /proc instead (its start ticks against /proc/uptime) worked on Linux only,
# and on this project's sandboxed machine it once said 63.8 s in a demo that took 19 s in all
CLI_CLOCK_START = time.perf_counter()

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from tasks import stopping  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Automatic-differentiation electron ptychography, run as Prefect flows.")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

EXIT_USER_ERROR = 2
EXIT_NUMERICAL = 3
EXIT_STORAGE = 4
EXIT_DISTRIBUTED = 5  # a rank of a multi-process run died; the newest checkpoint is intact
EXIT_OUT_OF_MEMORY = 6  # the GPU ran out of memory where a smaller batch cannot help
EXIT_ACQUISITION_STOPPED = 7  # live mode: the data stopped growing short of the planned scan


def _quiet_prefect(verbose: bool) -> None:
    """Before Prefect is imported: keep its console handler quiet (run logs still reach the API).

    Failures are reported once by ``main``; warnings of the run (a skipped damaged checkpoint, a
    stale lock taken over) are printed as single lines by ``_show_run_warnings``.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")


class _WarningLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            console.print(f"[yellow]warning:[/yellow] {record.getMessage()}", highlight=False)


def _show_run_warnings() -> None:
    """After Prefect configured its loggers (its dictConfig replaces their handlers)."""
    handler = _WarningLines()
    for name in ("ptyflow", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addHandler(handler)


class BarReporter:
    """Progress bar over iterations, plus one line per segment above it."""

    def __init__(self, progress, total: int, done: int):
        self.progress = progress
        self.bar = progress.add_task("iterations", total=total, completed=done)

    def iteration_done(self, state, row: dict) -> None:
        self.progress.update(self.bar, completed=state.iteration, description=f"loss {row['loss']:.4g}")

    def segment_done(self, outcome) -> None:
        self.progress.console.print(
            f"iterations {outcome.first_iteration + 1}-{outcome.iteration}: loss {outcome.loss:.5g}, "
            f"{outcome.seconds_per_iteration:.3f} s/iteration, checkpoint {outcome.checkpoint.name}"
        )


def _seconds_since_cli_start() -> float:
    """Seconds since this module began to load (CLI_CLOCK_START): the imports and the set-up."""
    return time.perf_counter() - CLI_CLOCK_START


def _import_in_the_background() -> None:
    """Imports a run needs later and pays for once per process, done in a thread while the
    embedded server starts (the main thread only polls its health then) or, with a configured
    server, while the main thread waits for Prefect's first API calls: torch._dynamo, which
    torch imports at the first optimizer's construction; fastapi, which Prefect imports to serialize
    the flow's parameters; zarr and matplotlib for the export."""
    import threading

    def imports():
        import importlib

        try:
            for name in ("torch._dynamo", "zarr", "fastapi.encoders"):
                importlib.import_module(name)
            from ptycho_core.io.figures import pyplot

            pyplot()
        except Exception:  # noqa: BLE001 - the run imports them again and reports any error itself
            pass

    threading.Thread(target=imports, name="ptyflow-imports", daemon=True).start()


def _early_server(verbose: bool):
    """The embedded server (None with a configured one), started before anything else: it takes
    seconds to answer and comes up in its own process while this one imports and checks."""
    _quiet_prefect(verbose)
    from pydantic import ValidationError

    from flows.embedded import start_embedded_server

    try:
        return start_embedded_server()
    except ValidationError as exc:  # Prefect's settings are read first here
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        raise UserError(f"Prefect settings: {problems}; check the PREFECT_* environment variables and the "
                        "active profile (prefect profile inspect)") from None


@contextlib.contextmanager
def _stopped_on_error(server):
    """Until prefect_backend owns it, an early server is stopped by any error (a bad config or
    spec, Ctrl-C) so that no process is left behind."""
    try:
        yield
    except BaseException:
        if server is not None:
            server.stop()
        raise


def _run_flow(config, run_dir: Path, server, verbose: bool = False, devices: Optional[str] = None,
              before: Optional[dict] = None, follow: bool = False) -> dict:
    """Run the reconstruct flow in this process (embedded Prefect unless a server is configured).

    server: what the caller's _early_server returned (an embedded server, or None when one is
    configured).
    before: seconds of the caller's own stages before this call (the demo's simulation), shown
    on the timing line instead of counting as start-up."""
    before = before or {}
    clock = time.perf_counter()
    started_for = _seconds_since_cli_start() - sum(before.values())  # typer, the imports, the set-up
    from flows.embedded import prefect_backend

    with _stopped_on_error(server):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from tasks import progress as progress_hooks
        from flows.reconstruct import reconstruct, resolve_config, with_devices
        from ptycho_core.io.readers import check_data_path
        from ptycho_core.rundir import newest_checkpoint, start_iteration

        import_seconds = started_for + time.perf_counter() - clock
        if not verbose:
            _show_run_warnings()
        cfg = with_devices(resolve_config(config), devices)
        if not follow:  # a live run waits for its data file itself
            check_data_path(cfg.data)
        done_ckpt = newest_checkpoint(run_dir, warn=lambda m: None) if run_dir.exists() else None
        first = start_iteration(cfg)
        done = done_ckpt.iteration if done_ckpt else first
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    _import_in_the_background()  # against a configured server too: they overlap Prefect's calls
    started = time.perf_counter()
    with prefect_backend(started=server) as url:
        server_seconds = time.perf_counter() - started
        if verbose:
            console.print(f"Prefect API: {url or 'Prefect default'}")
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            reporter = BarReporter(bar, first + cfg.recon_params.iterations, done)
            try:
                flow_started = time.perf_counter()
                with stopping.stage("Prefect's calls"), progress_hooks.reporting_to(reporter):
                    summary = reconstruct(cfg.to_dict(), str(run_dir), follow=follow)
                flow_seconds = time.perf_counter() - flow_started
            except BaseException:
                if stopping.requested():
                    stopping.note_saved(_what_is_saved(run_dir))
                raise
        server_stop = time.perf_counter()
    stop_seconds = time.perf_counter() - server_stop
    stages = summary.pop("stage_seconds")
    timing = {**before, "start-up and imports": import_seconds, "waiting for the server": server_seconds,
              # live mode: preprocessing and the iterations while the scan is acquired are one stage
              ("following the acquisition" if follow else "preprocessing"): stages["preprocess"],
              "iterations": stages["iterations"], "segment set-up, checkpoints, figures": stages["segments"] - stages["iterations"],
              "export and figures": stages["export"],
              "Prefect and the rest": flow_seconds - stages["preprocess"] - stages["segments"] - stages["export"],
              "server stop": stop_seconds}
    # one line, "name X.XX s" pairs: what benchmarks/run.py --user-path reads
    out.print("timing: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timing.items()))
    return summary


def _what_is_saved(run_dir: Path) -> str:
    """What a rerun of a stopped run starts from, by the checkpoint files' names (none is read)."""
    from ptycho_core.checkpoint import list_checkpoints, parse_checkpoint_name

    names = [parse_checkpoint_name(p.name) for p in list_checkpoints(run_dir / "checkpoints")]
    newest = max((n for n in names if n), default=None)
    if newest is None:
        return f"no checkpoint yet in {run_dir}"
    iteration, batches = newest
    return f"iteration {iteration}{f' (+{batches} batches)' if batches else ''} is checkpointed in {run_dir}"


def _print_summary(summary: dict, seconds: float) -> None:
    out.print(f"reconstructed to iteration {summary['iteration']} in {seconds:.1f} s "
              f"(final loss {summary['final_loss']:.5g}, {summary['median_seconds_per_iteration']:.3f} s/iteration)")
    if summary.get("validation_loss") is not None:
        out.print(f"held-out patterns: validation loss {summary['validation_loss']:.5g} "
                  f"(lowest {summary['best_validation_loss']:.5g})")
    if summary.get("acquisition", "").startswith("ended short"):
        out.print(f"acquisition {summary['acquisition']} (live.finish_incomplete)")
    if summary.get("scan_fit"):  # how far off the scan was: what a user checks the microscope by
        out.print(f"scan: {summary['scan_fit']['in_words']}")
    if "phase_pearson" in summary:
        per = ", ".join(f"{v:.3f}" for v in summary["phase_pearson_per_slice"])
        out.print(f"phase Pearson vs ground truth: {summary['phase_pearson']:.3f}" + (f" (per slice: {per})" if per else ""))
    out.print(f"result:  {summary['result']}")
    out.print(f"figures: {Path(summary['figures'][0]).parent if summary['figures'] else '-'}")


@app.command()
def run(
    config: Path = typer.Argument(..., help="configuration YAML"),
    run_dir: Path = typer.Option(..., "--run-dir", "-o", help="run directory (created; rerun to resume)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Prefect's own log lines"),
    devices: Optional[str] = typer.Option(
        None, "--devices", help="recon_params.devices for this run: a GPU count (4), GPU ids (0,2) or cpu:N"),
    follow: bool = typer.Option(
        False, "--follow", help="live mode: the data file is still being written; reconstruct from its first rows "
        "on, and finish when the planned scan is complete (settings: the config's live group)"),
):
    """Reconstruct the dataset of CONFIG into RUN_DIR (resumes what is already there)."""
    started = time.perf_counter()
    server = _early_server(verbose)
    if follow:
        from ptycho_core.stages.live import wait_for_data

        with _stopped_on_error(server), stopping.stage("the wait for the data file"):
            wait_for_data(config)  # only when the file states part of the config
    summary = _run_flow(str(config), run_dir.resolve(), server, verbose, devices, follow=follow)
    _print_summary(summary, time.perf_counter() - started)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("ptyflow-demo"), "--out", help="where the data and the run go"),
    slices: int = typer.Option(1, help="number of object slices to simulate and reconstruct"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Simulate a small dataset with known truth, reconstruct it through the flow, report quality."""
    from ptycho_core.simulate import simulate

    started = time.perf_counter()
    server = _early_server(verbose)  # comes up while the data are simulated
    with _stopped_on_error(server), stopping.stage("the simulation"):
        config = simulate("small", out_dir / "data", seed=0, n_slices=slices)
    simulated = time.perf_counter() - started
    out.print(f"simulated the 'small' preset into {out_dir / 'data'}")
    summary = _run_flow(str(config), (out_dir / "run").resolve(), server, verbose,
                        before={"simulation": simulated})
    _print_summary(summary, time.perf_counter() - started)


@app.command()
def sweep(
    base_config: Path = typer.Argument(..., help="configuration YAML every point starts from"),
    spec: Path = typer.Argument(..., help="sweep spec YAML: mode, parameters (dotted keys -> values), n"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="folder for the points' run directories and the table"),
    inline: bool = typer.Option(
        False, "--inline", help="with a configured server: run the points in this process, not on the workers"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Reconstruct every point of a parameter sweep: embedded (or --inline) one after the other in
    this process; with a configured server, as child runs of its `reconstruct` deployment."""
    server = _early_server(verbose)  # comes up while the flows are imported and the spec checked
    with _stopped_on_error(server):
        from flows.embedded import prefect_backend
        from flows.sweep import RECONSTRUCT_DEPLOYMENT, sweep as sweep_flow
        from flows.bookkeeping.sweeps import load_sweep_spec

        if not verbose:
            _show_run_warnings()
        spec_model = load_sweep_spec(spec)
    # the embedded server has no deployments; a configured one must have it (checked by the flow)
    deployment = None if server is not None or inline else RECONSTRUCT_DEPLOYMENT
    with prefect_backend(started=server), stopping.stage("Prefect's calls"):
        rows = sweep_flow(str(base_config), spec_model.model_dump(), str(out_dir.resolve()), deployment=deployment)
    keys = list(spec_model.parameters)
    for row in rows:
        values = ", ".join(f"{k}={_short(row.get(k))}" for k in keys)
        loss = f"{row['final_loss']:.5g}" if row.get("final_loss") is not None else "-"
        held_out = f", validation loss {row['validation_loss']:.5g}" if row.get("validation_loss") is not None else ""
        quality = f", phase Pearson {row['phase_pearson']:.3f}" if row.get("phase_pearson") is not None else ""
        pruned = f" at iteration {row['pruned_at_iteration']}" if row.get("pruned_at_iteration") else ""
        out.print(f"{row['point']}: {values}: {row['state']}{pruned}, loss {loss}{held_out}{quality}")
    out.print(f"table: {out_dir / 'sweep.csv'}   figure: {out_dir / 'sweep_phases.png'}")
    if (out_dir / "best_config.yaml").is_file():
        out.print(f"best trial's config: {out_dir / 'best_config.yaml'}   study: {out_dir / 'study_history.png'}")


@app.command()
def simulate(
    out_dir: Path = typer.Option(..., "--out", help="folder for data.h5 and config.yaml"),
    preset: str = typer.Option("small", help="small or medium"),
    seed: int = typer.Option(0),
    slices: Optional[int] = typer.Option(None, help="object slices (default: the preset's)"),
    dose: Optional[float] = typer.Option(None, help="dose in e/Å² for Poisson noise (default: the preset's)"),
    noise_free: bool = typer.Option(False, "--noise-free", help="no Poisson noise"),
):
    """Write a simulated dataset with ground truth and a config that reconstructs it."""
    from ptycho_core.simulate import PRESETS, simulate as run_simulation

    if preset not in PRESETS:
        raise UserError(f"--preset: '{preset}' is not one of {', '.join(PRESETS)}")
    dose_arg = None if noise_free else (dose if dose is not None else "preset")
    config = run_simulation(preset, out_dir, seed=seed, n_slices=slices, dose_e_per_ang2=dose_arg)
    out.print(f"wrote {out_dir / 'data.h5'} and {config}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a run directory, a checkpoint (.h5/.hdf5) or a result.zarr"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output with stable keys"),
):
    """Report what a run directory, checkpoint or export holds."""
    from ptycho_core.inspect import inspect_path

    report = inspect_path(path)
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    for key, value in report.items():
        if key == "scan_fit" and value:
            out.print(f"scan_fit: {value['in_words']}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out.print(f"{key}:")
            for row in value:
                out.print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
        else:
            out.print(f"{key}: {value}")


def _short(value) -> str:
    """A calibration value for people: floats to 6 significant digits, also inside a mapping."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value)


def _data_settings(path: Path, data_format: str, key: Optional[str]):
    from types import SimpleNamespace

    return SimpleNamespace(path=str(path.resolve()), format=data_format, meas_key=key, scan_shape=None)


@app.command("setup-server")
def setup_server(
    heartbeat_seconds: int = typer.Option(
        30, min=30, help="PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the flow runs (deployments/prefect.yaml sets 30)"),
):
    """Create (or update) on the Prefect server at PREFECT_API_URL the automation that marks flow
    runs Crashed when their heartbeats stop (a killed process or a lost node)."""
    from prefect.settings import PREFECT_API_URL

    from flows.facility import MISSED_HEARTBEATS, ZOMBIE_AUTOMATION, ensure_zombie_automation

    if not PREFECT_API_URL.value():
        raise UserError("setup-server needs a Prefect server: set PREFECT_API_URL (e.g. http://host:4200/api)")
    automation_id, created = ensure_zombie_automation(heartbeat_seconds)
    out.print(f"automation '{ZOMBIE_AUTOMATION}' ({automation_id}) {'created' if created else 'updated'}: a flow run "
              f"without a heartbeat for {MISSED_HEARTBEATS * heartbeat_seconds} s is set Crashed")


@app.command("inspect-data")
def inspect_data(
    path: Path = typer.Argument(..., help="a data file (HDF5, Dectris master, EMD/py4DSTEM, Velox, .dm4, .mib, npy, mat, tiff, zarr, EMPAD raw)"),
    data_format: str = typer.Option("auto", "--format", help="data.format, when the extension does not tell"),
    key: Optional[str] = typer.Option(None, "--key", help="data.meas_key: the dataset of patterns"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output with stable keys"),
):
    """Report what a data file holds and the calibration it states, without reading its patterns."""
    from ptycho_core.io.readers import describe_data

    report = describe_data(_data_settings(path, data_format, key))
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    for name, value in report.items():
        if isinstance(value, dict):
            out.print(f"{name}:" + ("" if value else " none stated"))
            for k, v in value.items():
                out.print(f"  {k}: {_short(v)}")
        else:
            out.print(f"{name}: {value}")


@app.command("init-config")
def init_config(
    path: Path = typer.Argument(..., help="the data file to reconstruct"),
    data_format: str = typer.Option("auto", "--format", help="data.format, when the extension does not tell"),
    key: Optional[str] = typer.Option(None, "--key", help="data.meas_key: the dataset of patterns"),
):
    """Print a starter config.yaml for PATH: what the file states filled in, the rest marked TODO."""
    from ptycho_core.io.readers import describe_data
    from ptycho_core.io.starter import starter_config

    report = describe_data(_data_settings(path, data_format, key))
    sys.stdout.write(starter_config(report, data_format, key))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


class UserError(Exception):
    """A problem the user can fix; reported as one line."""


def main() -> None:
    """Console entry point: run the app and turn known errors into one clear line."""
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except BaseException as exc:  # noqa: BLE001 - a stop by SIGTERM/SIGINT is reported, not re-raised
        stop = _as_stop(exc)
        if stop is None:
            if isinstance(exc, Exception):
                sys.exit(_report(exc))
            raise
        saved = stopping.saved()
        console.print(f"[yellow]{stop}[/yellow]{f'; {saved}' if saved else ''}; rerun the same command to resume",
                      highlight=False)
        sys.exit(stop.exit_code)


def _as_stop(exc: BaseException) -> Optional[stopping.Stopped]:
    """The stop by a signal that ``exc`` ends this process with, if any: a Stopped; Prefect's
    TerminationSignal (its own SIGTERM handler, active while its engine sets a flow run up or
    closes it); or any other error once a signal came (a Stopped raised inside a library's
    callback reaches here wrapped, e.g. by pydantic's serializer). A preemption in the iterations
    (rundir.Preempted) keeps its own line, which names the checkpoint."""
    if isinstance(exc, stopping.Stopped):
        return exc
    rundir = sys.modules.get("ptycho_core.rundir")
    if rundir is not None and isinstance(exc, rundir.Preempted):
        return None
    pending = stopping.pending_stop()
    prefect_exceptions = sys.modules.get("prefect.exceptions")
    if pending is None and prefect_exceptions is not None and isinstance(exc, prefect_exceptions.TerminationSignal):
        return stopping.Stopped("SIGTERM", "Prefect's calls")
    return pending


def _report(exc: Exception) -> int:
    """Print a known error as one line and return the exit code; re-raise anything else. (The
    error classes are imported here, not at start-up: `ptyflow run` starts its embedded server
    before it imports torch.)"""
    import click
    import torch

    from ptycho_core.checkpoint import CheckpointError, StorageError
    from ptycho_core.config import ConfigError
    from ptycho_core.collective import DistributedError
    from ptycho_core.engine import NumericalError
    from ptycho_core.io.readers import DataError
    from ptycho_core.rundir import Preempted, RunDirError
    from ptycho_core.stages.live import AcquisitionStopped

    if isinstance(exc, Preempted):
        console.print(f"[yellow]{exc}[/yellow]; rerun the same command to resume")
        signal_exit = {"SIGTERM": 143, "SIGINT": 130}
        return next((code for name, code in signal_exit.items() if name in str(exc)), 143)
    if isinstance(exc, (ConfigError, DataError, CheckpointError, RunDirError, UserError)):
        console.print(f"[red]error:[/red] {_one_line(exc)}", highlight=False)
        return EXIT_USER_ERROR
    if isinstance(exc, AcquisitionStopped):
        console.print(f"[red]{_one_line(exc)}[/red]", highlight=False)
        return EXIT_ACQUISITION_STOPPED
    if isinstance(exc, NumericalError):
        console.print(f"[red]numerical failure:[/red] {exc}", highlight=False)
        return EXIT_NUMERICAL
    if isinstance(exc, StorageError):
        console.print(f"[red]storage error:[/red] {exc}", highlight=False)
        return EXIT_STORAGE
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        console.print(f"[red]out of memory:[/red] {_one_line(exc)}", highlight=False)
        return EXIT_OUT_OF_MEMORY
    if isinstance(exc, DistributedError):
        console.print(f"[red]a process of the run failed:[/red] {_one_line(exc)}; the newest checkpoint is kept, "
                      "rerun the same command to resume", highlight=False)
        return EXIT_DISTRIBUTED
    if isinstance(exc, click.ClickException):  # usage errors and the like
        exc.show()
        return exc.exit_code
    raise exc


def console_main() -> None:
    """The `ptyflow` command: main(), then no garbage collection at exit. The interpreter's last
    collection walks every object torch and Prefect made (1.3 s measured after a small run) and
    frees nothing this process still needs: files are closed and Prefect's queues drained by then."""
    import gc

    stopping.install()  # first: a scheduler's SIGTERM may come at any moment from now on
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    console_main()
