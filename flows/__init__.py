"""Prefect flows that run the DVC pipeline."""
