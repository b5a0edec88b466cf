"""AdamW with layer-wise learning-rate decay over the backbone, and warmup + cosine."""

from __future__ import annotations

import math

import torch

from sgmft.config import TrainConfig
from sgmft.models.sgmft import SGMFTModel


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or "embedding" in name


def param_groups(model: SGMFTModel, cfg: TrainConfig) -> list[dict]:
    """Head at ``lr``; backbone layer l of a tower of depth n at ``backbone_lr * layer_decay**(n+1-l)``."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            layer, depth = model.backbone.layer_of(name.removeprefix("backbone."))
            lr = cfg.backbone_lr * cfg.layer_decay ** (depth + 1 - layer)
        else:
            lr = cfg.lr
        groups.setdefault((lr, _no_decay(name, param)), []).append(param)
    return [
        {"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        for (lr, no_decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))
    ]


def build_optimizer(model: SGMFTModel, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine decay to zero at ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimization(model: SGMFTModel, cfg: TrainConfig, device: torch.device, total_updates: int,
                       state: dict | None = None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """Move ``model`` to ``device``, then build its optimizer and schedule and restore ``state``.

    The order matters: ``Optimizer.load_state_dict`` places each saved moment tensor on its
    parameter's device at load time, so loading before the move would leave the moments on
    the CPU and the first GPU ``optimizer.step()`` would fail.
    """
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = warmup_cosine(optimizer, total_updates, cfg.warmup_ratio)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return optimizer, scheduler
