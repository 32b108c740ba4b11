"""Weights resolution, model bundles, quantization and labels."""
