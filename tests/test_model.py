"""SG-MFT head: shapes, padding, gradients, similarity weights, ablation switches, checkpoints."""

import dataclasses

import pytest
import torch

from sgmft.model_dir import ModelDirError, save_model_dir
from sgmft.config import Config, model_config_for
from sgmft.models.head import InterpolationAttention
from sgmft.models.model import build_model, load_model_dir

B, L = 3, 16


def tiny(**overrides):
    cfg = model_config_for("tiny", num_labels=5, dropout=0.0, classifier_dropout=0.0, **overrides)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def batch(context_length=L):
    torch.manual_seed(1)
    ids = torch.zeros(B, context_length, dtype=torch.long)
    lengths = [16, 5, 2]
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(200, 20000, (n,))
        ids[i, 0], ids[i, n - 1] = 101, 102
    return ids, torch.randn(B, 3, 32, 32)


def test_shapes_and_similarity_weights_are_valid():
    model = tiny()
    ids, pixels = batch()
    out = model(ids, pixels)
    assert out.logits.shape == (B, 5)
    (p_m,), (p_e,) = out.modality_similarity, out.element_similarity
    assert p_m.shape == (B, 64) and ((p_m > 0) & (p_m < 1)).all()
    assert p_e.shape == (B, L, 17)
    torch.testing.assert_close(p_e.sum(-1), torch.ones(B, L))


def test_softmax_similarity_norm_is_bounded():
    model = tiny(similarity_norm="softmax")
    p_m = model(*batch()).modality_similarity[0]
    assert (p_m > 0).all() and (p_m <= 1).all() and torch.allclose(p_m.amax(-1), torch.ones(B))


def test_padding_does_not_change_outputs():
    model = tiny()
    ids, pixels = batch()
    padded = torch.cat([ids, torch.zeros(B, 20, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(ids, pixels).logits, model(padded, pixels).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "last_k", "frozen"])
def test_gradients_reach_every_trainable_parameter(policy):
    model = tiny()
    model.set_backbone_policy(policy, 1)
    model.train()
    ids, pixels = batch()
    model(ids, pixels).logits.sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    # the cn_clip logit scale is part of CLIP's contrastive loss, not of this forward
    missing = [n for n, p in trainable if (p.grad is None or not p.grad.abs().sum() > 0) and "logit_scale" not in n]
    assert not missing, missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(model.get_parameter(n).grad is None for n in frozen)


def test_interpolation_extremes_select_one_attention_path():
    torch.manual_seed(0)
    block = InterpolationAttention(64, 4, 0.0, guided=True).eval()
    x, other = torch.randn(B, 7, 64), torch.randn(B, 5, 64)
    mask = torch.ones(B, 7, dtype=torch.bool)
    ones, zeros = torch.ones(B, 64), torch.zeros(B, 64)
    ca = block.cross_attn(x, other, None)
    sa = block.self_attn(x, x, mask)
    torch.testing.assert_close(block(x, mask, other, None, ones), block.norm(x + ca))
    torch.testing.assert_close(block(x, mask, other, None, zeros), block.norm(x + sa))


def _param_count(model):
    return sum(p.numel() for p in model.head.parameters())


@pytest.mark.parametrize(
    "switch, removed",
    [
        ({"coarse_guidance": False}, "similarity"),
        ({"fine_guidance": False}, "text_ffn.w3"),
        ({"use_sim": False}, "sim_layers"),
        ({"fusion": "concat"}, "fusion.text_layers"),
        ({"modalities": "text"}, "image_project"),
        ({"modalities": "image"}, "text_project"),
        ({"linear_probe": True}, "classifier"),
    ],
)
def test_each_ablation_switch_removes_its_block(switch, removed):
    full, ablated = tiny(), tiny(**switch)
    full_names = {n for n, _ in full.head.named_parameters()}
    ablated_names = {n for n, _ in ablated.head.named_parameters()}
    assert any(removed in n for n in full_names)
    assert not any(removed in n for n in ablated_names)
    assert _param_count(ablated) < _param_count(full)
    ids, pixels = batch()
    assert ablated(ids, pixels).logits.shape == (B, 5)
    assert not torch.allclose(full(ids, pixels).logits, ablated(ids, pixels).logits)


def test_unimodal_models_ignore_the_other_modality():
    ids, pixels = batch()
    text_only, image_only = tiny(modalities="text"), tiny(modalities="image")
    torch.testing.assert_close(text_only(ids, pixels).logits, text_only(ids, torch.randn_like(pixels)).logits)
    other_ids = ids.clone()
    other_ids[0, 1:15] = 777
    torch.testing.assert_close(image_only(ids, pixels).logits, image_only(other_ids, pixels).logits)
    # and the fused model uses both
    full = tiny()
    assert not torch.allclose(full(ids, pixels).logits, full(ids, torch.randn_like(pixels)).logits)
    assert not torch.allclose(full(ids, pixels).logits, full(other_ids, pixels).logits)


def test_linear_probe_freezes_the_backbone():
    model = tiny(linear_probe=True)
    assert model.backbone.is_frozen
    assert all(p.requires_grad for p in model.head.parameters())


def test_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    model = tiny()
    cfg = Config(model=model.cfg)
    labels = [f"l{i}" for i in range(5)]
    path = save_model_dir(tmp_path / "m", model, cfg, labels, {"val_accuracy": 0.5})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "labels.json", "metrics.json", "model.safetensors"]
    loaded = load_model_dir(path)
    ids, pixels = batch()
    torch.testing.assert_close(model(ids, pixels).logits, loaded.model(ids, pixels).logits)
    assert loaded.labels == labels and loaded.metrics["val_accuracy"] == 0.5
    # saving again replaces the directory whole; no staging directories are left behind
    save_model_dir(path, model, cfg, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_model_dir_errors_are_named(tmp_path):
    model = tiny()
    cfg = Config(model=model.cfg)
    with pytest.raises(ModelDirError, match="labels"):
        save_model_dir(tmp_path / "m", model, cfg, ["a", "b"])
    path = save_model_dir(tmp_path / "m", model, cfg, list("abcde"))
    (path / "labels.json").unlink()
    with pytest.raises(ModelDirError, match="labels.json is missing"):
        load_model_dir(path)
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=32))
    save_model_dir(tmp_path / "x", tiny(d_model=32), other, list("abcde"))
    (tmp_path / "x" / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ModelDirError, match="does not match the model"):
        load_model_dir(tmp_path / "x")


def test_model_summary_reports_backbone_and_head(capsys):
    from sgmft.cli import main

    assert main(["model", "summary", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "backbone" in out and "head" in out and "FLOPs" in out
