"""Experiments that compare methods or test what an encoder learned: results, not speed (speed
lives in benchmarks/)."""
