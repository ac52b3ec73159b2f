"""Prefect tasks: thin wrappers that call ptycho_core (one stage of the pipeline each)."""
