"""Lumbar disc geometry and latent shape codes from spine MRI, distributed on Ray."""
