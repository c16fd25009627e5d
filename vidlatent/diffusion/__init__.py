"""Flow matching (flow.py) and the sampling loop (sampling.py)."""
