"""Wide & Deep (Cheng et al., DLRS'16) on the behaviour-sequence features of DESIGN.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from iacn_torchrec.models.layers import MLP, effective_length, masked_sum, sequence_mask
from iacn_torchrec.modules.embeddings import EmbeddedBatch

__all__ = ["WideDeepConfig", "WideDeep"]


@dataclass
class WideDeepConfig:
    """Defaults of DIEN's reference ``Model_WideDeep``: ``bn1`` on the deep input, then dense 200 →
    PReLU → dense 80 → PReLU → output.

    Attributes:
    deep_hidden: deep MLP widths (then a 1-unit output).
    deep_activation: deep MLP activation (see :func:`~iacn_torchrec.models.layers.activation_layer`).
    deep_input_bn: BatchNorm on the deep input (the reference's ``bn1``).
    dropout: dropout after each deep activation (0 in the reference).
    """

    deep_hidden: tuple[int, ...] = (200, 80)
    deep_activation: str = "prelu"
    deep_input_bn: bool = True
    dropout: float = 0.0


class WideDeep(nn.Module):
    """``logit = wide + deep`` with

    - wide: ``w·[e_t, s, e_t ⊙ s] + b`` where ``s = Σ_i e_i`` over the real behaviours (``[B, 3D] → [B]``);
    - deep: MLP on ``[user, e_t, s]`` (``[B, Du + 2D]``) → BN → 200 → 80 → 1, PReLU (the reference's).

    ``forward`` returns (logits ``[B]``, None).
    """

    def __init__(
        self, user_dim: int, item_dim: int, max_len: int, config: WideDeepConfig | None = None
    ) -> None:
        super().__init__()
        self.config = config = config or WideDeepConfig()
        self.user_dim, self.item_dim, self.max_len = user_dim, item_dim, max_len
        self.wide = nn.Linear(3 * item_dim, 1)
        self.deep = MLP(user_dim + 2 * item_dim, config.deep_hidden, 1, activation=config.deep_activation,
                        input_bn=config.deep_input_bn, dropout=config.dropout)

    def forward(self, emb: EmbeddedBatch) -> tuple[torch.Tensor, None]:
        T = effective_length(emb.hist_lengths, emb.hist.shape[1])
        mask = sequence_mask(emb.hist_lengths, T)
        s = masked_sum(emb.hist[:, :T], mask)
        wide = self.wide(torch.cat([emb.target, s, emb.target * s], dim=1))
        deep = self.deep(torch.cat([emb.user, emb.target, s], dim=1))
        return (wide + deep).squeeze(-1), None
