"""Frozen-encoder evaluation: feature extraction, metrics, probes, the held-out summary logged
during pretraining, linear evaluation of a checkpoint, and the plots of all of these."""
