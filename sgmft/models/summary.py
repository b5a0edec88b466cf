"""Parameter counts and forward FLOPs of backbone and head, measured on one real forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from sgmft.config import ModelConfig
from sgmft.models.model import SGMFTModel, build_model


@dataclass
class PartCost:
    name: str
    params: int
    trainable: int
    flops: int  # forward FLOPs per post


def _count(module: torch.nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_costs(model: SGMFTModel, context_length: int = 52, batch: int = 2) -> list[PartCost]:
    """Counts FLOPs with torch's FlopCounterMode on random inputs of the model's own sizes."""
    size = model.backbone.image_size
    ids = torch.randint(1000, 20000, (batch, context_length))
    pixels = torch.randn(batch, 3, size, size)
    model.eval()
    with FlopCounterMode(display=False) as backbone_counter:
        features = model.features(ids, pixels)
    with FlopCounterMode(display=False) as head_counter:
        model.head(features)
    rows = []
    for name, module, counter in (("backbone", model.backbone, backbone_counter), ("head (SIM+SFM+classifier)", model.head, head_counter)):
        params, trainable = _count(module)
        rows.append(PartCost(name, params, trainable, counter.get_total_flops() // batch))
    return rows


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def format_costs(rows: list[PartCost], title: str) -> str:
    total_params = sum(r.params for r in rows)
    total_flops = sum(r.flops for r in rows)
    lines = [title, f"{'part':<28}{'params':>10}{'trainable':>11}{'FLOPs/post':>12}{'share':>8}"]
    for r in rows:
        share = r.flops / total_flops if total_flops else 0.0
        lines.append(f"{r.name:<28}{_human(r.params):>10}{_human(r.trainable):>11}{_human(r.flops):>12}{share:>8.1%}")
    lines.append(f"{'total':<28}{_human(total_params):>10}{'':>11}{_human(total_flops):>12}")
    return "\n".join(lines)


def summarize(cfg: ModelConfig, context_length: int = 52) -> str:
    model = build_model(cfg, load_pretrained=False)
    title = f"SG-MFT on {cfg.backbone.preset} ({cfg.backbone.implementation}), D={cfg.d_model}, image {model.backbone.image_size}px, {context_length} tokens"
    return format_costs(model_costs(model, context_length), title)
