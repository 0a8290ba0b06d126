"""Frozen-feature evaluators: k-NN (knn.py)."""
