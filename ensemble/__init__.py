"""Blend every model's out-of-fold predictions into one submission (`python -m ensemble.blend`)."""
