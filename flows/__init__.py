"""Prefect flows and tasks, storage I/O, run state and the command line."""
