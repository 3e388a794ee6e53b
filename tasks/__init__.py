"""Pipeline stages. Each is ``python -m tasks.<stage>`` (from dvc.yaml) and a function the flows call."""
