"""Data sources, the synthetic chest phantom and the grain input pipeline."""
