"""Prefect flows (reconstruct, sweep, watch) and the ptyflow command line; bookkeeping/ holds what
the flows keep between runs (sweep tables, the Optuna study, the inbox's state).

Importing the package does not import Prefect (1.3 s): the CLI starts the embedded server first
and commands that run no flow never pay for it. Importing a flow module changes no logging: every
flow body's first call, send_core_logs_to_prefect, hands the core's logs to Prefect."""

import logging


def _inside_a_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def send_core_logs_to_prefect() -> None:
    """The core (ptycho_core) logs to the ``ptyflow`` logger, which Prefect does not store: a
    damaged checkpoint or a stale lock taken over inside a flow run would never reach the run's
    logs in the UI. Records emitted inside a flow or task run also go to that run's logs, through
    Prefect's own API handler; outside a run (the CLI before a flow starts) nothing changes.
    Idempotent; PREFECT_LOGGING_TO_API_ENABLED=false still turns it off."""
    from prefect.logging.handlers import APILogHandler

    core = logging.getLogger("ptyflow")
    if any(isinstance(handler, APILogHandler) for handler in core.handlers):
        return
    handler = APILogHandler()
    handler.addFilter(_inside_a_run)
    core.addHandler(handler)

