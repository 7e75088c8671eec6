"""Representation metrics, feature extraction and probes."""
