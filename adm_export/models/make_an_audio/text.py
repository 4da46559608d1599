"""Make-An-Audio's text encoder: MS-CLAP 2022's text tower (BERT + projection), public names."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from adm_export.devices import PlacedModule


class Projection(nn.Module):
    """MS-CLAP's projection head: ``layer_norm(l1(x) + l2(gelu(l1(x))))`` (``linear1``, ``linear2`` unbiased)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        e1 = self.linear1(x)
        return self.layer_norm(e1 + self.drop(self.linear2(F.gelu(e1))))


class ClapTextEncoder(PlacedModule, nn.Module):
    """Make-An-Audio's ``FrozenCLAPEmbedder.caption_encoder``: BERT ``base`` and ``projection``.

    Its ``encode`` runs BERT on the padded tokens *without* an attention mask (as the original
    does) and projects every token state: context ``(B, 77, 1024)``.

    Args:
        bert_config: transformers ``BertConfig`` of the text tower.
        d_proj: Width of the projection (the U-Net's context width).
    """

    def __init__(self, bert_config, d_proj: int):
        super().__init__()
        from transformers import BertModel

        self.base = BertModel(bert_config)
        self.projection = Projection(bert_config.hidden_size, d_proj)

    def forward(self, input_ids):
        return self.projection(self.base(input_ids=input_ids).last_hidden_state)
