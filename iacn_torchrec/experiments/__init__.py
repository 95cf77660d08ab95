"""Experiments: the paper's tables reproduced on a prepared dataset (``iacn reproduce``)."""
