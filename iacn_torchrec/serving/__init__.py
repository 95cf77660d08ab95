"""Serving and explaining trained models.

* :mod:`~iacn_torchrec.serving.export` — ``iacn export``: a TorchScript artefact holding the main
  model and the merged ``E_orig ⊕ E_aux`` tables only (IaCN dropped), vocabularies and a manifest.
* :mod:`~iacn_torchrec.serving.artifact` — loading an artefact and turning raw ids into its
  padded inputs; imports torch and numpy only (no torchrec, no training code).
* :mod:`~iacn_torchrec.serving.score` — ``iacn score``: batch scoring of raw samples.
* :mod:`~iacn_torchrec.serving.bench` — ``iacn bench serve``: exported vs eager latency/throughput.
* :mod:`~iacn_torchrec.serving.explain` — ``iacn explain``: a user's interest capsules.

This package ``__init__`` imports nothing, so ``iacn score`` stays free of the training stack.
"""
