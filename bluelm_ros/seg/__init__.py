"""Semantic segmentation models (DSNet) and their checkpoint loaders."""
