"""Deep Interest Network (Zhou et al., KDD'18) with the defaults of the DIEN reference code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iacn_torchrec.models.layers import MLP, AttentionUnit, jagged_history, segment_ids, segment_sum
from iacn_torchrec.modules.embeddings import EmbeddedBatch

__all__ = ["DINConfig", "DIN"]


@dataclass
class DINConfig:
    """DIN hyper-parameters (defaults: DIEN's ``Model_DIN``).

    Attributes:
        att_hidden: attention-unit hidden widths on ``[q, k, q-k, q·k]``.
        att_activation: attention-unit activation (DIEN's code: sigmoid; ``dice`` in the padded path:
            see :class:`~iacn_torchrec.models.layers.AttentionUnit`).
        att_softmax: softmax-normalise the masked attention scores (DIEN's code: yes).
        tower_hidden: tower widths after the input BatchNorm.
        tower_activation: ``dice`` (DIN/DIEN) or ``prelu``.
        tower_input_bn: BatchNorm on the tower input (DIEN's ``bn1``). The reference code calls it
            without ``training=True``, so it only ever applies its never-updated moving statistics
            (an affine layer in effect); here it normalises with batch statistics in training and
            running ones at eval, as DeepCTR-Torch does.
        dropout: dropout after each tower activation (0 in the reference).
    """

    att_hidden: tuple[int, ...] = (80, 40)
    att_activation: str = "sigmoid"
    att_softmax: bool = True
    tower_hidden: tuple[int, ...] = (200, 80)
    tower_activation: str = "dice"
    tower_input_bn: bool = True
    dropout: float = 0.0


class DIN(nn.Module):
    """DIN on an :class:`EmbeddedBatch`.

    ``a = Σ_t softmax_t(att(e_t, e_i)) e_i`` over the real behaviours (computed on the jagged
    behaviours, not the padded ``[B, L, D]`` view); the tower reads
    ``[user, e_t, Σ_i e_i, e_t·Σ_i e_i, a]`` (``[B, Du + 4D]``) → BN → 200 → 80 → 1.

    Args:
        user_dim: Du. item_dim: D (the item representation ``item ⊕ cate``). max_len: L.
    """

    #: reads ``hist_values`` when given, never the padded ``hist``: an export passes only the former
    reads_jagged_history = True

    def __init__(self, user_dim: int, item_dim: int, max_len: int, config: DINConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DINConfig()
        self.user_dim, self.item_dim, self.max_len = user_dim, item_dim, max_len
        self.attention = AttentionUnit(item_dim, item_dim, config.att_hidden, config.att_activation,
                                       softmax=config.att_softmax)
        self.tower = MLP(user_dim + 4 * item_dim, config.tower_hidden, 1, activation=config.tower_activation,
                         input_bn=config.tower_input_bn, dropout=config.dropout)

    def forward(self, emb: EmbeddedBatch) -> tuple[torch.Tensor, None]:
        """Returns (logits ``[B]``, None)."""
        B = emb.target.shape[0]
        # Jagged: the attention MLP runs on the N = Σ n_u real behaviours only (Beauty: ~6.6 of 20).
        offsets = None
        if emb.hist_values is not None:
            values, offsets = emb.hist_values, emb.hist_offsets
            segments = segment_ids(emb.hist_lengths, values.shape[0])
        else:
            values, segments = jagged_history(emb.hist, emb.hist_lengths)
        att, _ = self.attention.forward_jagged(emb.target, values, segments, B, offsets=offsets)
        hist_sum = segment_sum(values, segments, B, offsets)
        x = torch.cat([emb.user, emb.target, hist_sum, emb.target * hist_sum, att], dim=1)
        return self.tower(x).squeeze(-1), None
