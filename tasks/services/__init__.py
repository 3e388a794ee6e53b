"""The services a run talks to: the MLflow registry and tracking, locks, the Ray cluster and its run
state, the local team stack.
"""
