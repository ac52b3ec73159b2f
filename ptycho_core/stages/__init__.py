"""The three stages of a run directory (rundir.py has the contract they keep): prepare,
segment, export. The Prefect tasks of tasks/ call them one each."""
