"""SG-MFT: the Similarity-Guided Interaction Module (SIM), the Similarity-aware Fusion
Module (SFM) and the classifier, on top of token-level Chinese-CLIP features.

Shapes: B batch, Lt text tokens, Lv image tokens, D model width. Text masks are bool,
True for real tokens; padded tokens never act as keys and never enter a pooled vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sgmft.config import ModelConfig
from sgmft.models.layers import Attention, Dropout
from sgmft.models.outputs import BackboneOutput


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens, ignoring padding. x: (B, L, D), mask: (B, L) or None."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def pool(x: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    return x[:, 0, :] if how == "cls" else masked_mean(x, mask)


class FeedForwardBlock(nn.Module):
    """LN(x + W2 act(W1 x)): the standard transformer FFN with residual and LayerNorm."""

    def __init__(self, d_model: int, mult: int, dropout: float):
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(d_model, d_model * mult), nn.ReLU(), Dropout(dropout), nn.Linear(d_model * mult, d_model))
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.ffn(x)))


class ModalitySimilarity(nn.Module):
    """Coarse, modality-wise similarity P_m in (0, 1]^D from the pooled, L2-normalised streams."""

    def __init__(self, d_model: int, norm: str, pooling: str):
        super().__init__()
        # t*v of unit vectors is O(1/D) per dimension; a scale of D starts P_m away from a flat 0.5.
        # Learned as its logarithm: an optimizer step then changes it by a ratio, the same at D=64
        # as at D=1024, and it cannot change sign.
        self.log_scale = nn.Parameter(torch.tensor(math.log(d_model)))
        self.bias = nn.Parameter(torch.zeros(()))
        self.norm = norm
        self.pooling = pooling

    def forward(self, text, text_mask, image, image_mask) -> torch.Tensor:
        t = F.normalize(pool(text, text_mask, self.pooling), dim=-1)
        v = F.normalize(pool(image, image_mask, self.pooling), dim=-1)
        logits = self.log_scale.exp() * (t * v) + self.bias
        if self.norm == "softmax":
            p = torch.softmax(logits, dim=-1)
            return p / p.amax(dim=-1, keepdim=True)
        return torch.sigmoid(logits)


class InterpolationAttention(nn.Module):
    """X_C = LN(X + CA(X <- other) * P_m + SA(X) * (1 - P_m)); without guidance CA + SA."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, guided: bool):
        super().__init__()
        self.self_attn = Attention(d_model, num_heads, dropout)
        self.cross_attn = Attention(d_model, num_heads, dropout)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.guided = guided

    def forward(self, x, x_mask, other, other_mask, p_m: torch.Tensor | None) -> torch.Tensor:
        sa = self.self_attn(x, x, x_mask)
        ca = self.cross_attn(x, other, other_mask)
        if self.guided:
            p = p_m.unsqueeze(1)  # one weight per dimension, shared by every token
            mixed = ca * p + sa * (1.0 - p)
        else:
            mixed = ca + sa
        return self.norm(x + self.drop(mixed))


class SimilarityAwareFFN(nn.Module):
    """LN(X_t + W2 ReLU(X_t W1 + (P_e X_v) W3 + b1) + b2), P_e = softmax(X_t X_v^T / sqrt(D))."""

    def __init__(self, d_model: int, mult: int, dropout: float, guided: bool):
        super().__init__()
        hidden = d_model * mult
        self.w1 = nn.Linear(d_model, hidden)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if guided else None
        self.w2 = nn.Linear(hidden, d_model)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, text, image, image_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.w1(text)
        p_e = None
        if self.w3 is not None:
            scores = text @ image.transpose(1, 2) / math.sqrt(text.shape[-1])
            if image_mask is not None:
                scores = scores.masked_fill(~image_mask.unsqueeze(1), float("-inf"))
            p_e = torch.softmax(scores, dim=-1)
            h = h + self.w3(p_e @ image)
        return self.norm(text + self.drop(self.w2(self.drop(F.relu(h))))), p_e


class SIMLayer(nn.Module):
    """One Similarity-Guided Interaction layer: coarse interpolation attention, then fine FFN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, p = cfg.d_model, cfg.num_heads, cfg.dropout
        self.similarity = ModalitySimilarity(d, cfg.similarity_norm, cfg.pooling) if cfg.coarse_guidance else None
        self.text_attention = InterpolationAttention(d, h, p, cfg.coarse_guidance)
        self.image_attention = InterpolationAttention(d, h, p, cfg.coarse_guidance)
        self.text_ffn = SimilarityAwareFFN(d, cfg.ffn_mult, p, cfg.fine_guidance)
        self.image_ffn = FeedForwardBlock(d, cfg.ffn_mult, p)

    def forward(self, text, text_mask, image, image_mask, p_m: torch.Tensor | None = None):
        """``p_m`` may be given to override the computed similarity (for analysis and tests)."""
        if p_m is None and self.similarity is not None:
            p_m = self.similarity(text, text_mask, image, image_mask)
        text_c = self.text_attention(text, text_mask, image, image_mask, p_m)
        image_c = self.image_attention(image, image_mask, text, text_mask, p_m)
        text_s, p_e = self.text_ffn(text_c, image_c, image_mask)
        return text_s, self.image_ffn(image_c), p_m, p_e


class CrossAttentionBlock(nn.Module):
    """LN(x + CA(x <- context)), then the FFN block."""

    def __init__(self, d_model: int, num_heads: int, mult: int, dropout: float):
        super().__init__()
        self.cross_attn = Attention(d_model, num_heads, dropout)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForwardBlock(d_model, mult, dropout)

    def forward(self, x, context, context_mask):
        return self.ffn(self.norm(x + self.drop(self.cross_attn(x, context, context_mask))))


class SimilarityAwareFusion(nn.Module):
    """SFM: stacked cross-attention per direction; M_fuse = pool(text stream) + pool(image stream)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        make = lambda: CrossAttentionBlock(cfg.d_model, cfg.num_heads, cfg.ffn_mult, cfg.dropout)  # noqa: E731
        self.text_layers = nn.ModuleList(make() for _ in range(cfg.num_sfm_layers))
        self.image_layers = nn.ModuleList(make() for _ in range(cfg.num_sfm_layers))
        self.pooling = cfg.pooling

    def forward(self, text, text_mask, image, image_mask):
        t, v = text, image
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            # both directions attend to the other stream's SIM output, as the paper's CA(F_S)
            t = text_layer(t, image, image_mask)
            v = image_layer(v, text, text_mask)
        return pool(t, text_mask, self.pooling) + pool(v, image_mask, self.pooling)


class ConcatFusion(nn.Module):
    """Ablation: concatenate the pooled streams and mix them with an MLP instead of SFM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * cfg.d_model, cfg.d_model), nn.GELU(), Dropout(cfg.dropout))
        self.pooling = cfg.pooling

    def forward(self, text, text_mask, image, image_mask):
        return self.mlp(torch.cat([pool(text, text_mask, self.pooling), pool(image, image_mask, self.pooling)], dim=-1))


class UnimodalEncoder(nn.Module):
    """Ablation (text-only / image-only): self-attention layers of the same depth as SFM, pooled."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.d_model, cfg.num_heads, cfg.d_model * cfg.ffn_mult, cfg.dropout, batch_first=True)
            for _ in range(cfg.num_sfm_layers)
        )
        self.pooling = cfg.pooling

    def forward(self, x, mask):
        padding = None if mask is None else ~mask
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return pool(x, mask, self.pooling)


class Classifier(nn.Module):
    """LN -> Linear -> GELU -> Dropout -> Linear over the label set."""

    def __init__(self, d_model: int, num_labels: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(), Dropout(dropout), nn.Linear(d_model, num_labels)
        )

    def forward(self, x):
        return self.net(x)


@dataclass
class SGMFTOutput:
    logits: torch.Tensor
    fused: torch.Tensor | None = None
    modality_similarity: list[torch.Tensor] = field(default_factory=list)
    """P_m of each SIM layer, (B, D)."""
    element_similarity: list[torch.Tensor] = field(default_factory=list)
    """P_e of each SIM layer, (B, Lt, Lv)."""


def uses_text(cfg: ModelConfig) -> bool:
    return cfg.linear_probe or cfg.modalities in ("both", "text")


def uses_image(cfg: ModelConfig) -> bool:
    return cfg.linear_probe or cfg.modalities in ("both", "image")


class SGMFTHead(nn.Module):
    """Everything after the backbone; runs on live or cached backbone features."""

    def __init__(self, cfg: ModelConfig, text_width: int, image_width: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.linear_probe:
            self.probe = nn.Linear(2 * embed_dim, cfg.num_labels)
            return
        project = lambda width: nn.Sequential(nn.Linear(width, d), nn.LayerNorm(d))  # noqa: E731
        if cfg.modalities != "both":
            width = text_width if cfg.modalities == "text" else image_width
            self.project = project(width)
            self.encoder = UnimodalEncoder(cfg)
        else:
            self.text_project = project(text_width)
            self.image_project = project(image_width)
            self.sim_layers = nn.ModuleList(SIMLayer(cfg) for _ in range(cfg.num_sim_layers if cfg.use_sim else 0))
            self.fusion = SimilarityAwareFusion(cfg) if cfg.fusion == "sfm" else ConcatFusion(cfg)
        self.classifier = Classifier(d, cfg.num_labels, cfg.classifier_dropout)

    def forward(self, features: BackboneOutput) -> SGMFTOutput:
        cfg = self.cfg
        if cfg.linear_probe:
            pooled = torch.cat([F.normalize(features.text_embeds, dim=-1), F.normalize(features.image_embeds, dim=-1)], dim=-1)
            return SGMFTOutput(logits=self.probe(pooled.float()), fused=pooled)
        if cfg.modalities == "text":
            fused = self.encoder(self.project(features.text_tokens.float()), features.text_mask)
            return SGMFTOutput(logits=self.classifier(fused), fused=fused)
        if cfg.modalities == "image":
            fused = self.encoder(self.project(features.image_tokens.float()), None)
            return SGMFTOutput(logits=self.classifier(fused), fused=fused)
        text_mask = features.text_mask
        text = self.text_project(features.text_tokens.float())
        image = self.image_project(features.image_tokens.float())
        out = SGMFTOutput(logits=torch.empty(0))
        for layer in self.sim_layers:
            text, image, p_m, p_e = layer(text, text_mask, image, None)
            if p_m is not None:
                out.modality_similarity.append(p_m)
            if p_e is not None:
                out.element_similarity.append(p_e)
        out.fused = self.fusion(text, text_mask, image, None)
        out.logits = self.classifier(out.fused)
        return out


def build_head(cfg: ModelConfig, text_width: int, image_width: int, embed_dim: int) -> SGMFTHead:
    """The head, initialised from the last ``torch.manual_seed`` alone (in a forked RNG).

    Whether or not a backbone was built first (training on cached features builds none), the
    same seed gives the same initial head, so a cached and an end-to-end run of one config
    train the same model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed())
        return SGMFTHead(cfg, text_width, image_width, embed_dim)
