"""What a facility's Prefect server needs besides the deployments: the automation that marks
flow runs Crashed when their process died without telling anyone (a SIGKILL, a node lost).

Flow runs send a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (the
deployments set 30). The automation expects, after each heartbeat, another heartbeat or a final
state within ``3 x`` that period; when neither comes it sets the run Crashed. A Crashed child is a
failed attempt to the watch flow, which retries it; a sweep reports it in its table.
"""

from __future__ import annotations

from datetime import timedelta

ZOMBIE_AUTOMATION = "ptyflow: crash flow runs whose heartbeats stopped"
MISSED_HEARTBEATS = 3


def ensure_zombie_automation(heartbeat_seconds: int = 30) -> tuple[str, bool]:
    """Create the automation on the configured server, or update it to ``heartbeat_seconds``;
    returns (its id, whether it was created now). Running it again changes nothing else."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = timedelta(seconds=MISSED_HEARTBEATS * heartbeat_seconds)
    trigger = EventTrigger(
        match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed", "prefect.flow-run.AwaitingRetry",
                "prefect.flow-run.Paused", "prefect.flow-run.Suspended"},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=within,
    )
    action = ChangeFlowRunState(
        state=StateType.CRASHED,
        message=f"no heartbeat for {within.total_seconds():.0f} s: the process running this flow run died "
                "(SIGKILL, out of memory, node lost)")
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        created = Automation(name=ZOMBIE_AUTOMATION, description=__doc__.split("\n\n")[1].replace("\n", " "),
                             trigger=trigger, actions=[action]).create()
        return str(created.id), True
    existing.trigger, existing.actions, existing.enabled = trigger, [action], True
    existing.update()
    return str(existing.id), False
