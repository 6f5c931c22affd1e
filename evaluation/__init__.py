"""Evaluation of trained generators (FID)."""
