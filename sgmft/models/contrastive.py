"""CLIP-style contrastive training of the Chinese-CLIP backbone on image-text pairs.

:class:`ContrastiveCLIP` wraps a backbone of :mod:`sgmft.models.backbone` (any preset,
either implementation) and returns its L2-normalised pooled embeddings with the learned
logit scale (the backbone's own ``logit_scale``, so an exported backbone carries its
temperature); :func:`contrastive_loss` is the symmetric InfoNCE over the global batch;
:func:`retrieval_metrics` scores a held-out split. No Ray here: the gather across
workers uses ``torch.distributed`` when a process group is up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sgmft.config import BackboneConfig, ModelConfig
from sgmft.models.backbone import ClipBackbone, build_backbone

MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP clamps its learned temperature at 1/100 so the logits cannot run away."""


@dataclass
class ContrastiveOutput:
    text: torch.Tensor
    """(B, E) L2-normalised text embeddings."""
    image: torch.Tensor
    """(B, E) L2-normalised image embeddings."""
    logit_scale: torch.Tensor
    """exp of the learned log scale, clamped to at most 100."""


class ContrastiveCLIP(nn.Module):
    """A Chinese-CLIP backbone read as CLIP: pooled, projected, normalised embeddings."""

    def __init__(self, backbone_cfg: BackboneConfig, load_pretrained: bool = True):
        super().__init__()
        # the model config the optimizer reads (sgmft.optim): released weights or random init
        self.cfg = ModelConfig(backbone=backbone_cfg)
        self.backbone: ClipBackbone = build_backbone(backbone_cfg, load_pretrained=load_pretrained)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> ContrastiveOutput:
        out = self.backbone(input_ids, pixel_values)
        scale = self.backbone.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return ContrastiveOutput(F.normalize(out.text_embeds.float(), dim=-1), F.normalize(out.image_embeds.float(), dim=-1),
                                 scale)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, E) L2-normalised text embeddings alone (prompts for zero-shot labelling)."""
        return F.normalize(self.backbone(input_ids, None).text_embeds.float(), dim=-1)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, E) L2-normalised image embeddings alone."""
        return F.normalize(self.backbone(None, pixel_values).image_embeds.float(), dim=-1)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends each rank's rows their gradient from every rank's loss
    (an all-reduce, then this rank's slice: gloo has no reduce-scatter). Public collectives
    only; ``torch.distributed.nn``'s own is deprecated in favour of a private module."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows in rank order, with gradients flowing back to each rank's own rows,
    and this rank's offset: the negatives of the global batch. Unchanged without DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def contrastive_loss(out: ContrastiveOutput, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE: each of this rank's texts against every image of the global batch and
    each image against every text, the matching pair the target (equal batches per rank).
    ``gather=False`` keeps to this rank's batch (what the benchmark compares against)."""
    texts, offset = gather_with_grad(out.text) if gather else (out.text, 0)
    images = gather_with_grad(out.image)[0] if gather else out.image
    targets = torch.arange(out.text.shape[0], device=out.text.device) + offset
    text_to_image = out.logit_scale * out.text @ images.T
    image_to_text = out.logit_scale * out.image @ texts.T
    return (F.cross_entropy(text_to_image, targets) + F.cross_entropy(image_to_text, targets)) / 2


def retrieval_metrics(text: torch.Tensor, image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways over a held-out split: row i of ``text`` belongs with row i of ``image``.

    A query counts as found at k when its own partner ranks within the first k; ties go
    against it (its partner must score strictly higher than all but k-1 others).
    """
    similarity = text.float() @ image.float().T
    metrics = {}
    for name, scores in (("text_to_image", similarity), ("image_to_text", similarity.T)):
        own = scores.diagonal().unsqueeze(1)
        rank = (scores >= own).sum(dim=1) - 1  # others scoring at least as high as the partner
        for k in ks:
            metrics[f"{name}_recall@{k}"] = float((rank < k).float().mean())
    return metrics


def zero_shot_accuracy(prompt_embeds: torch.Tensor, image_embeds: torch.Tensor, label_ids: torch.Tensor) -> float:
    """Accuracy of labelling each image with the label whose prompt's embedding is nearest."""
    predicted = (image_embeds.float() @ prompt_embeds.float().T).argmax(dim=1)
    return float((predicted == label_ids).float().mean())
