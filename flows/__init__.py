"""Prefect 3 flows: the transfer pipeline and scheduled retraining (flows -> tasks -> tlcore)."""
