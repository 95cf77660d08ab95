"""iacn-torchrec: the Interest-aware Capsule Network (IaCN) as an auxiliary task for TorchRec models."""

__version__ = "0.1.0"
