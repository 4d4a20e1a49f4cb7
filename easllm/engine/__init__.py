"""Inference engines: the narrow interface every backend fits, and the backends."""
