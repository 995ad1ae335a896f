"""Ray Tune sweeps over the pipeline's models (the autoencoder's bottleneck size)."""
