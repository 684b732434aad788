"""ML-Decoder (Ridnik et al., "ML-Decoder: Scalable and Versatile Classification Head", WACV 2023, arXiv 2111.12933).

Queries cross-attend to the spatial tokens of the last feature map; each query's output is read by its own small
fully-connected layer ("group decoding"), so that thousands of classes need at most `num_groups` queries. Written
here with torch.nn primitives from the paper (Sec. 3) and the constants of its official code
(github.com/Alibaba-MIIL/ML_Decoder, src_files/ml_decoder/ml_decoder.py):

- the tokens are projected to the decoder width (`embed_dim`, 768) by a Linear layer and a ReLU;
- `num_groups` = 100 queries at most: min(num_classes, 100); each reads ceil(num_classes / queries) classes, the
  surplus outputs of the last group cut off; the group weights start Xavier-normal, the class biases at 0;
- the queries are fixed (non-learnable), drawn from N(0, 1) like the official `nn.Embedding` with
  `requires_grad_(False)`: a buffer, saved in the checkpoint, that no optimizer touches;
- 1 decoder layer (`num_layers`), 8 attention heads (`num_heads`), feed-forward width 2048 (`ff_dim`), dropout 0.1
  (`dropout`, on the attention weights and on each residual branch), post-norm LayerNorms (eps 1e-5), ReLU;
- no self-attention: the paper removes it, since among fixed queries it is a fixed map at inference; its residual
  stays as the official layer keeps it (the query plus a dropout of itself, then its LayerNorm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DecoderLayer(nn.Module):
    """One ML-Decoder layer: the self-attention's residual without the attention, cross-attention, feed-forward."""

    def __init__(self, embed_dim: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.cross_attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(embed_dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.norm3 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, memory: Tensor) -> Tensor:
        """queries [B, K, D] attend to memory [B, L, D]; returns [B, K, D]."""
        queries = self.norm1(queries + self.dropout(queries))
        attended = self.cross_attention(queries, memory, memory, need_weights=False)[0]
        queries = self.norm2(queries + self.dropout(attended))
        fed = self.linear2(self.dropout(F.relu(self.linear1(queries))))
        return self.norm3(queries + self.dropout(fed))


class MLDecoderHead(nn.Module):
    """ML-Decoder: fixed queries cross-attending to the tokens [B, L, C], then group fully-connected decoding."""

    name = "ml-decoder"

    def __init__(self, in_features: int, num_classes: int, embed_dim: int = 768, num_layers: int = 1,
                 num_heads: int = 8, ff_dim: int = 2048, dropout: float = 0.1, num_groups: int = 100) -> None:
        super().__init__()
        if min(embed_dim, num_layers, num_heads, ff_dim, num_groups) < 1 or not 0 <= dropout < 1:
            raise ValueError("embed_dim, num_layers, num_heads, ff_dim and num_groups must be at least 1, dropout in "
                             "[0, 1)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        queries = min(num_classes, num_groups)
        self.num_classes = num_classes
        self.embed = nn.Linear(in_features, embed_dim)
        self.register_buffer("queries", torch.randn(queries, embed_dim))
        self.layers = nn.ModuleList(DecoderLayer(embed_dim, num_heads, ff_dim, dropout) for _ in range(num_layers))
        self.group_weight = nn.Parameter(torch.empty(queries, embed_dim, math.ceil(num_classes / queries)))
        nn.init.xavier_normal_(self.group_weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits [B, num_classes] of the tokens [B, L, in_features]."""
        memory = F.relu(self.embed(tokens))
        decoded = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            decoded = layer(decoded, memory)
        # Group FC: query k's output [B, D] times its own weights [D, G]; as one batched product over the queries.
        groups = torch.matmul(decoded.transpose(0, 1), self.group_weight).transpose(0, 1)  # [B, K, G]
        return groups.flatten(1)[:, : self.num_classes] + self.bias
