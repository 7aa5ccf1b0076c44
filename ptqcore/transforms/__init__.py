"""Equivalence-preserving transforms: rotations, smoothing scales, norm folding."""
