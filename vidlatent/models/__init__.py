"""Model families: the causal VAE (vae.py) and the video transformer (dit.py)."""
