"""What a backbone hands the SG-MFT head: the one type both sides of that seam share.

Its own module, so that the head (:mod:`sgmft.models.head`) and the backbones
(:mod:`sgmft.models.backbone`) need not import each other: only the full model
(:mod:`sgmft.models.model`) puts the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BackboneOutput:
    """Token-level and pooled features of one batch. Absent modalities are None."""

    text_tokens: torch.Tensor | None = None  # (B, Lt, dt)
    text_mask: torch.Tensor | None = None  # (B, Lt) bool, True for real tokens
    image_tokens: torch.Tensor | None = None  # (B, Lv, dv)
    text_embeds: torch.Tensor | None = None  # (B, E) pooled CLIP embedding
    image_embeds: torch.Tensor | None = None  # (B, E)
