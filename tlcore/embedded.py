"""The embedded datasets' names: one list for :mod:`tlcore.datasets` (which builds them) and for the params
check (which must not import torch to know them)."""

EMBEDDED = ("synth_digits", "optdigits", "optdigits_rotated", "optdigits_noisy", "optdigits_colour")
