"""Prefect flows (reconstruct, sweep, watch) and the ptyflow command line."""
