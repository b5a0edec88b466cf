"""The two reference implementations of Chinese-CLIP check each other."""

import numpy as np
import pytest
import torch

from sgmft.config import BackboneConfig
from sgmft.models.backbone import (
    CnClipBackbone,
    HFChineseClipBackbone,
    architecture,
    build_backbone,
    cn_clip_to_hf_state_dict,
)


def _inputs(image_size: int):
    import cn_clip.clip

    texts = ["今天在学校图书馆自习，好安静", "", "周末和朋友去万达商场看电影🎬 #周末#"]
    ids = cn_clip.clip.tokenize(texts, context_length=52)
    pixels = torch.randn(len(texts), 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return ids, pixels


def _redraw_every_parameter(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, LayerNorm weights and biases included: at their defaults
    (ones and zeros) a conversion that swaps or drops them would still pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("logit_scale"):
                continue
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + (1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.0))


@pytest.mark.parametrize("preset", ["tiny", pytest.param("small", marks=pytest.mark.slow)])
def test_cn_clip_and_hf_give_the_same_embeddings(preset):
    torch.manual_seed(0)
    native = CnClipBackbone(preset).eval()
    _redraw_every_parameter(native)
    hf = HFChineseClipBackbone(preset).eval()
    state = cn_clip_to_hf_state_dict(native.clip.state_dict(), architecture(preset)["vision_layers"])
    missing, unexpected = hf.hf.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]
    ids, pixels = _inputs(native.image_size)
    with torch.no_grad():
        a, b = native(ids, pixels), hf(ids, pixels)
    assert a.text_embeds.shape == (3, native.embed_dim)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, atol=1e-4, rtol=0)
    mask = a.text_mask.unsqueeze(-1)
    torch.testing.assert_close(a.text_tokens * mask, b.text_tokens * mask, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.image_tokens, b.image_tokens, atol=1e-4, rtol=0)
    # and cn_clip's own pooled encoders agree with our token-level reading of the same model
    with torch.no_grad():
        torch.testing.assert_close(native.clip.encode_text(ids), a.text_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(native.clip.encode_image(pixels), a.image_embeds, atol=1e-5, rtol=0)


def test_token_level_shapes_and_mask():
    backbone = CnClipBackbone("tiny").eval()
    ids, pixels = _inputs(backbone.image_size)
    out = backbone(ids, pixels)
    grid = (backbone.image_size // 8) ** 2
    assert out.image_tokens.shape == (3, grid + 1, backbone.image_width)
    assert out.text_tokens.shape == (3, 52, backbone.text_width)
    assert out.text_mask[1].sum() == 2  # empty text is [CLS][SEP]
    assert out.text_mask.dtype == torch.bool


def test_a_model_pickles_as_cn_clip_s_own_class_and_tokenizing_imports_no_torch():
    """A fresh process tokenizes without torch (a Ray Data worker, a Serve ingress), and a model
    built after that is cn_clip's own ``CLIP``, found under its module's name when it is pickled
    and loaded back; the whole ``cn_clip.clip`` package is there."""
    import subprocess
    import sys

    code = """if True:
        import io, sys
        from sgmft.data.preprocess import tokenize
        ids = tokenize(["我在学校"])
        print(ids.shape, "torch" in sys.modules)
        import torch
        import cn_clip.clip
        from sgmft.config import ModelConfig
        from sgmft.models.model import build_model
        model = build_model(ModelConfig(), load_pretrained=False).eval()
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        print(cn_clip.clip.model.CLIP is type(model.backbone.clip) is type(loaded.backbone.clip),
              callable(cn_clip.clip.load_from_name), cn_clip.clip.tokenize(["我在学校"]).tolist()[0] == ids.tolist()[0])
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["(1, 52) False", "True True True"], out.stdout


def test_released_presets_build_from_cn_clip_jsons():
    arch = architecture("ViT-B-16")
    assert (arch["vision_width"], arch["vision_layers"], arch["text_hidden_size"]) == (768, 12, 768)
    assert architecture("ViT-H-14")["text_hidden_size"] == 1024
    assert architecture("RN50")["vision_layers"] == [3, 4, 6, 3]


@pytest.mark.slow  # builds a full RN50
def test_rn50_gives_spatial_tokens():
    backbone = CnClipBackbone("RN50").eval()
    with torch.no_grad():
        tokens, pooled = backbone.encode_image(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 2048) and pooled.shape == (1, 1024)


@pytest.mark.parametrize("policy, k", [("frozen", 0), ("last_k", 1), ("full", 0)])
def test_backbone_policy(policy, k):
    backbone = build_backbone(BackboneConfig(preset="tiny", policy=policy, trainable_last_k=k))
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    if policy == "frozen":
        assert not trainable and backbone.is_frozen
    elif policy == "full":
        assert len(trainable) == len(list(backbone.parameters()))
    else:
        assert any("resblocks.1." in n for n in trainable) and not any("resblocks.0." in n for n in trainable)
        assert any("encoder.layer.1." in n for n in trainable) and not any("encoder.layer.0." in n for n in trainable)
        assert not any("embeddings" in n for n in trainable)


def test_released_weights_load_from_a_local_file_and_missing_files_are_named(tmp_path):
    source = CnClipBackbone("tiny")
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in source.clip.state_dict().items()}, "epoch": 3}, path)
    loaded = build_backbone(BackboneConfig(preset="tiny", checkpoint=str(path)))
    for (name, a), b in zip(source.clip.state_dict().items(), loaded.clip.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="clip_cn_vit-b-16.pt"):
        build_backbone(BackboneConfig(preset="ViT-B-16", download_root=str(tmp_path)))


def test_hf_from_pretrained_directory(tmp_path):
    hf = HFChineseClipBackbone("tiny")
    hf.hf.save_pretrained(tmp_path / "hf")
    again = build_backbone(BackboneConfig(preset="tiny", implementation="hf", checkpoint=str(tmp_path / "hf")))
    ids, pixels = _inputs(hf.image_size)
    with torch.no_grad():
        np.testing.assert_allclose(hf.eval()(ids, pixels).image_embeds, again.eval()(ids, pixels).image_embeds, atol=1e-6)


def test_hf_refuses_download_root_without_a_checkpoint_and_incomplete_directories(tmp_path):
    with pytest.raises(ValueError, match="model.backbone.checkpoint"):
        build_backbone(BackboneConfig(preset="tiny", implementation="hf", download_root=str(tmp_path)))
    from safetensors.torch import load_file, save_file

    HFChineseClipBackbone("tiny").hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "visual_projection" not in k}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="visual_projection"):
        build_backbone(BackboneConfig(preset="tiny", implementation="hf", checkpoint=str(tmp_path / "hf")))


@pytest.mark.slow  # builds a full RN50
def test_rn50_stages_count_as_layers_1_to_4():
    backbone = CnClipBackbone("RN50")
    assert backbone.layer_of("visual.layer1.0.conv1.weight") == (1, 4)
    assert backbone.layer_of("visual.layer4.2.conv3.weight") == (4, 4)
    assert backbone.layer_of("visual.conv1.weight") == (0, 4)
    backbone.apply_policy("last_k", 1)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad and n.startswith("clip.visual.layer")}
    assert trainable and all(n.startswith("clip.visual.layer4.") for n in trainable)
