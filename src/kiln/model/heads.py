"""Optional heads some imported families carry (BERT): switched on by ModelConfig.mlm_head / .pooler."""

from __future__ import annotations

import torch
import torch.nn as nn

from kiln.model.config import ModelConfig
from kiln.model.layers import make_norm


class MLMTransform(nn.Module):
    """BERT's `cls.predictions.transform`: dense -> activation -> norm, applied before the (biased) LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}.get(
            cfg.activation, nn.SiLU())
        self.norm = make_norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h[:, 0])), the sentence vector of classification heads. Not used by forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class SequenceClassifier(nn.Module):
    """A kiln Transformer + pooling + dropout + linear layer: (ids, mask, types) -> logits [B, n_classes].

    pooling: mean (over real tokens), cls (first token), pooler (BERT's dense+tanh on the first token),
    last (last real token; decoders, whose last position is the only one that saw the whole text)."""

    def __init__(self, backbone: nn.Module, n_classes: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        cfg = backbone.config
        if pooling == "auto":
            pooling = "last" if cfg.arch == "decoder" else "mean"
        if pooling == "pooler" and backbone.pooler is None:
            from kiln.errors import KilnError

            raise KilnError("pooling 'pooler' needs a backbone with a BERT pooler (model.pooler); use mean or cls")
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        b = self.backbone
        if b.config.arch == "decoder":
            h = b.hidden(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        else:
            h = b.encode(input_ids, src_mask=attention_mask, token_type_ids=token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        if self.pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "pooler":
            return b.pooler(h)
        last = attention_mask.long().sum(1).clamp_min(1) - 1  # right padding
        return h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.head(self.dropout(self.features(input_ids, attention_mask, token_type_ids)))


class SequenceRegressor(SequenceClassifier):
    """SequenceClassifier with one output in the target's units: shift + scale * linear(pooled) -> [B, 1]. shift and
    scale (the training targets' mean and standard deviation; plain numbers kept in labels.json, not weights) let
    the linear layer learn a standardised target at any scale, starting as the constant predictor (the mean)."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean", dropout: float = 0.1, shift: float = 0.0,
                 scale: float = 1.0):
        super().__init__(backbone, 1, pooling, dropout)
        self.shift, self.scale = float(shift), float(scale)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return super().forward(input_ids, attention_mask, token_type_ids).float() * self.scale + self.shift


class ImageClassifier(nn.Module):
    """An image model (kiln's Transformer with model.channels > 0) + pooling + dropout + linear layer:
    pixels [B, C, H, W] -> logits [B, n_classes]. HF's ViTForImageClassification is pooling cls, no dropout.

    pooling: cls (the class token), mean (over the patches), pooler (dense+tanh on the class token, ViTModel's)."""

    def __init__(self, backbone: nn.Module, n_classes: int, pooling: str = "auto", dropout: float = 0.0):
        super().__init__()
        cfg = backbone.config
        if pooling == "auto":
            pooling = "cls" if cfg.class_token else "mean"
        if pooling in ("cls", "pooler") and not cfg.class_token:
            from kiln.errors import KilnError

            raise KilnError(f"pooling {pooling!r} needs a class token (model.class_token true); use mean")
        if pooling == "pooler" and backbone.pooler is None:
            from kiln.errors import KilnError

            raise KilnError("pooling 'pooler' needs a backbone with a pooler (model.pooler); use cls or mean")
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.backbone.encode(pixel_values)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "pooler":
            return self.backbone.pooler(h)
        return h[:, int(self.backbone.config.class_token):].mean(1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(pixel_values)))


def token_states(backbone: nn.Module, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
    """The backbone's last hidden states [B, T, d_model] (an encoder-decoder's encoder)."""
    if backbone.config.arch == "decoder":
        return backbone.hidden(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    return backbone.encode(input_ids, src_mask=attention_mask, token_type_ids=token_type_ids)


class SpanHead(nn.Module):
    """Extractive QA (BertForQuestionAnswering's `qa_outputs`): a linear layer on every token's hidden state ->
    start and end logits [B, T, 2]."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, 2)
        nn.init.normal_(self.head.weight, std=backbone.config.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.head(token_states(self.backbone, input_ids, attention_mask, token_type_ids))


class TokenClassifier(nn.Module):
    """A label per token (BertForTokenClassification: dropout + `classifier`): logits [B, T, n_labels]."""

    def __init__(self, backbone: nn.Module, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.d_model, n_labels)
        nn.init.normal_(self.head.weight, std=backbone.config.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.head(self.dropout(token_states(self.backbone, input_ids, attention_mask, token_type_ids)))
