"""What the flows keep between their runs, beside the run directories: a sweep's spec, points
and table (sweeps.py), the Optuna study of a tuning sweep, which its trials' runs report to
(tuning.py), and a watched inbox's state file (inbox.py). Orchestration, not physics: it imports
ptycho_core and no Prefect; ptycho_core knows nothing of it."""
