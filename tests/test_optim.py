"""Optimizer set-up and restore: layer-wise rates, and resume onto another device."""

from __future__ import annotations

import torch

from sgmft.config import Config, TrainConfig
from sgmft.models.model import build_model
from sgmft.optim import build_optimization, build_optimizer, param_groups


def _trained_state(cfg: Config) -> dict:
    """Optimizer and schedule state after two real steps on the CPU, as a checkpoint holds it."""
    torch.manual_seed(0)
    model = build_model(cfg.model, load_pretrained=False)
    optimizer, scheduler = build_optimization(model, cfg.train, torch.device("cpu"), total_updates=10)
    for _ in range(2):
        logits = model(input_ids=torch.randint(1, 100, (2, 8)), pixel_values=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).logits
        logits.sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def test_restored_optimizer_state_sits_with_its_parameters_on_another_device():
    """A state saved on one device and restored for a model on another (here the meta device,
    which stands for a GPU on a CPU-only machine) must follow the parameters; restoring before
    the move left the moments on the CPU and failed the first GPU step."""
    cfg = Config()
    state = _trained_state(cfg)
    model = build_model(cfg.model, load_pretrained=False)
    target = torch.device("meta")
    optimizer, scheduler = build_optimization(model, cfg.train, target, total_updates=10, state=state)
    checked = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert param.device == target
            for key, value in optimizer.state[param].items():
                # the step count stays on the CPU unless fused or capturable (the meta device has no fused kernel)
                if torch.is_tensor(value) and key != "step":
                    assert value.device == param.device, (key, value.device)
                    checked += 1
    assert checked >= 2 * sum(1 for p in model.parameters() if p.requires_grad)
    assert scheduler.last_epoch == 2


def test_layer_decay_lowers_rates_towards_the_embeddings():
    cfg = Config()
    model = build_model(cfg.model, load_pretrained=False)
    train = TrainConfig(lr=1e-3, backbone_lr=1e-4, layer_decay=0.5)
    rates = sorted({g["lr"] for g in param_groups(model, train)})
    assert rates[-1] == 1e-3 and len(rates) >= 3 and rates[0] < 1e-4


def test_a_random_init_backbone_trains_at_the_head_lr_unless_rates_are_set():
    from sgmft.optim import backbone_rates

    cfg = Config()  # tiny, random init, backbone_lr and layer_decay at their defaults
    model = build_model(cfg.model, load_pretrained=False)
    assert {g["lr"] for g in param_groups(model, TrainConfig(lr=2e-3))} == {2e-3}
    assert backbone_rates(cfg.model, TrainConfig(lr=2e-3)) == (2e-3, 1.0)
    # either rate set by the user: both are used as given
    assert backbone_rates(cfg.model, TrainConfig(lr=2e-3, backbone_lr=5e-4)) == (5e-4, 0.8)
    assert backbone_rates(cfg.model, TrainConfig(lr=2e-3, layer_decay=0.9)) == (1e-4, 0.9)
    # released weights configured: the defaults protect them
    cfg.model.backbone.checkpoint = "/weights/clip_cn_vit-b-16.pt"
    assert backbone_rates(cfg.model, TrainConfig(lr=2e-3)) == (1e-4, 0.8)
    cfg.model.backbone.checkpoint, cfg.model.backbone.download_root = None, "/weights"
    assert backbone_rates(cfg.model, TrainConfig(lr=2e-3)) == (1e-4, 0.8)


def test_the_optimizer_is_fused_on_cpu_and_steps_like_the_unfused_one():
    torch.manual_seed(0)
    model = build_model(Config().model, load_pretrained=False)
    twin = build_model(Config().model, load_pretrained=False)
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, TrainConfig())
    plain = torch.optim.AdamW(param_groups(twin, TrainConfig()), betas=(0.9, 0.98), eps=1e-6, foreach=False)
    assert fused.defaults["fused"]
    for net in (model, twin):
        for param in net.parameters():
            if param.requires_grad:
                torch.manual_seed(param.numel())
                param.grad = torch.randn_like(param)
    for _ in range(3):
        fused.step()
        plain.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
