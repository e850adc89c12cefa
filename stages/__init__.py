"""The six pipeline stages of dvc.yaml, one module each, run as `python -m stages.<name>`; the library they call is
`sft_pipeline`."""
