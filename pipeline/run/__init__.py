"""The job on top: stages composed by the runner, with a manifest that decides what re-runs."""
