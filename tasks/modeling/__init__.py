"""What training, evaluating and serving a model share: jobs, the Ray Train adapter, checkpoints, how a
model is fed, hardware, the run plan and the gate.
"""
