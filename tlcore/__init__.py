"""tlcore: transfer learning in pure PyTorch.

Models, transfer strategies, losses, the training engine, data loading, embedded datasets,
metrics and compression. Nothing here imports an orchestrator (Prefect, Ray, DVC, MLflow) or
reads a config file: callers pass typed arguments.
"""

__version__ = "0.1.0"
