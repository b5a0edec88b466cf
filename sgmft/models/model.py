"""The whole SG-MFT model: a Chinese-CLIP backbone and the SG-MFT head, built from a config
or loaded from a model directory.

The head (:mod:`sgmft.models.head`) and the backbones (:mod:`sgmft.models.backbone`) do
not import each other; this module puts them together. Loading reads safetensors and
JSON only (:mod:`sgmft.model_dir` names the files): no pickle is ever loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch import nn

from sgmft.model_dir import CONFIG, METRICS, WEIGHTS, ModelDirError, check_model_dir, read_json
from sgmft.config import Config, ModelConfig
from sgmft.models.backbone import ClipBackbone, build_backbone
from sgmft.models.head import SGMFTOutput, build_head, uses_image, uses_text
from sgmft.models.outputs import BackboneOutput


class SGMFTModel(nn.Module):
    """Chinese-CLIP backbone + SG-MFT head: token ids and pixels in, logits out."""

    def __init__(self, cfg: ModelConfig, backbone: ClipBackbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = build_head(cfg, backbone.text_width, backbone.image_width, backbone.embed_dim)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                features: BackboneOutput | None = None) -> SGMFTOutput:
        """From token ids and pixels, or from cached backbone ``features`` (frozen backbone)."""
        return self.head(features if features is not None else self.features(input_ids, pixel_values))

    def features(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> BackboneOutput:
        ids = input_ids if uses_text(self.cfg) else None
        pixels = pixel_values if uses_image(self.cfg) else None
        if self.backbone.is_frozen:
            with torch.no_grad():
                return self.backbone(ids, pixels)
        return self.backbone(ids, pixels)

    def set_backbone_policy(self, policy: str, last_k: int = 0) -> None:
        """Apply a backbone policy; a linear probe always runs on a frozen backbone."""
        self.backbone.apply_policy("frozen" if self.cfg.linear_probe else policy, last_k)
        self.backbone.freeze_unused(text=uses_text(self.cfg), image=uses_image(self.cfg), pooled=self.cfg.linear_probe)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone.is_frozen:
            self.backbone.eval()  # a frozen backbone keeps its dropout and batch-norm statistics fixed
        return self


class SGMFTHeadModel(nn.Module):
    """SG-MFT without its backbone, for training on cached backbone features.

    Same ``forward(features=...)`` and the same ``head.*`` parameter names as
    :class:`SGMFTModel`, so its weights complete a full model once the frozen backbone
    that made the features is added (``sgmft.runs.complete_model_dir``).
    """

    def __init__(self, cfg: ModelConfig, text_width: int, image_width: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.head = build_head(cfg, text_width, image_width, embed_dim)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                features: BackboneOutput | None = None) -> SGMFTOutput:
        if features is None:
            raise ValueError("a head-only model runs on cached backbone features, not on token ids and pixels")
        return self.head(features)


def build_model(cfg: ModelConfig, load_pretrained: bool = True) -> SGMFTModel:
    """The full model for ``cfg``. A linear probe always runs on a frozen backbone."""
    model = SGMFTModel(cfg, build_backbone(cfg.backbone, load_pretrained=load_pretrained))
    model.set_backbone_policy(cfg.backbone.policy, cfg.backbone.trainable_last_k)
    return model


@dataclass
class LoadedModel:
    model: SGMFTModel
    config: Config
    labels: list[str]
    metrics: dict[str, Any]
    path: Path

    @property
    def version(self) -> str:
        return str(self.metrics.get("version") or self.path.name)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model directory for inference (eval mode)."""
    path = Path(path)
    config, labels = check_model_dir(path)
    model = build_model(config.model, load_pretrained=False)
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    except RuntimeError as exc:  # safetensors' report of missing, unexpected or reshaped tensors
        raise ModelDirError(f"{path / WEIGHTS} does not match the model of {path / CONFIG}: {exc}") from exc
    model.to(device).eval()
    return LoadedModel(model=model, config=config, labels=labels, metrics=read_json(path / METRICS, {}), path=path)
