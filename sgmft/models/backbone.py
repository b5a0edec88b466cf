"""Chinese-CLIP backbones that return token-level features.

Two real implementations of the same network check each other (see the parity test):
``cn_clip`` (the package's own CLIP) and Hugging Face ``ChineseCLIPModel``. Both give
the final text hidden states with their padding mask, the image tokens (CLS + patches,
final LayerNorm applied) and the pooled CLIP embeddings.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgmft.models.outputs import BackboneOutput
from sgmft.config import CLIP_MEAN, CLIP_STD, CUSTOM, PAD_TOKEN_ID, RELEASED, BackboneConfig, check_preset, image_size_of

# Re-exported: sgmft.config is the one place these facts live.
__all__ = ["PAD_TOKEN_ID", "CLIP_MEAN", "CLIP_STD", "RELEASED", "CUSTOM", "image_size_of", "normalize_pixels"]


def architecture(preset: str) -> dict[str, Any]:
    """cn_clip's ``CLIP(**kwargs)`` arguments for a preset (from the package's own JSONs)."""
    if preset in CUSTOM:
        return dict(CUSTOM[preset])
    check_preset(preset)
    vision, text = RELEASED[preset].vision_config, RELEASED[preset].text_config
    import cn_clip.clip

    config_dir = Path(cn_clip.clip.__file__).parent / "model_configs"
    info = json.loads((config_dir / f"{vision}.json").read_text())
    info.update(json.loads((config_dir / f"{text}.json").read_text()))
    if isinstance(info["vision_layers"], str):  # RN50 stores "[3,4,6,3]"
        info["vision_layers"] = json.loads(info["vision_layers"])
    if preset == "ViT-H-14":
        info["vision_head_width"] = 80  # as cn_clip's ViT-H-14 checkpoint expects
    return info


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (B, 3, S, S) -> float32 CLIP-normalised, on the device the pixels are on.

    Pixels travel as bytes (a quarter of float32) from preprocessing to the model's
    device; this is the first operation there. Float input is taken as already normalised.
    """
    if pixels.dtype != torch.uint8:
        return pixels
    offset, scale = _normalisation(pixels.device)
    return torch.addcmul(offset, pixels.float(), scale)


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, scale) on ``device``, made once: a host-to-device copy per forward would
    cost a transfer each step and cannot be captured in a CUDA graph."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD], device=device).view(1, 3, 1, 1)
    offset = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], device=device).view(1, 3, 1, 1)
    return offset, scale


class ClipBackbone(nn.Module):
    """Common interface: widths, depth per tower, and the trainability policy."""

    text_width: int
    image_width: int
    embed_dim: int
    image_size: int
    _layer_patterns: tuple[tuple[re.Pattern, str], ...] = ()
    _tower_depth: dict[str, int]
    _first_block_index: dict[str, int] = {}  # a tower whose block names count from 1 (ResNet's layer1..layer4)
    _pooled_parts: tuple[str, ...] = ()  # the CLIP projections to the joint space, and its logit scale
    _text_parts: tuple[str, ...] = ()

    def forward(self, input_ids: torch.Tensor | None, pixel_values: torch.Tensor | None) -> BackboneOutput:
        out = BackboneOutput()
        if input_ids is not None:
            out.text_mask = input_ids.ne(PAD_TOKEN_ID)
            out.text_tokens, out.text_embeds = self.encode_text(input_ids, out.text_mask)
        if pixel_values is not None:
            out.image_tokens, out.image_embeds = self.encode_image(normalize_pixels(pixel_values))
        return out

    def encode_text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def layer_of(self, name: str) -> tuple[int, int]:
        """(layer index, tower depth) of a parameter: 0 = embeddings, 1..depth = blocks,
        depth+1 = final norm/projection."""
        for pattern, tower in self._layer_patterns:
            match = pattern.search(name)
            if match:
                depth = self._tower_depth[tower]
                if match.groups():
                    return int(match.group(1)) + 1 - self._first_block_index.get(tower, 0), depth
                return 0, depth
        return max(self._tower_depth.values()) + 1, max(self._tower_depth.values())

    def apply_policy(self, policy: str, last_k: int) -> None:
        """frozen: nothing trains; last_k: the final k layers of each tower (and what follows them)."""
        for name, param in self.named_parameters():
            if policy == "full":
                param.requires_grad_(True)
            elif policy == "frozen":
                param.requires_grad_(False)
            else:
                layer, depth = self.layer_of(name)
                param.requires_grad_(last_k > 0 and layer > depth - last_k)

    def freeze_unused(self, text: bool, image: bool, pooled: bool) -> None:
        """Freeze what a head never reads, so no trainable parameter goes without a gradient (DDP)."""
        for name, param in self.named_parameters():
            is_pooled = any(part in name for part in self._pooled_parts)
            in_text = any(part in name for part in self._text_parts)
            if (is_pooled and not pooled) or (in_text and not text) or (not in_text and not is_pooled and not image):
                param.requires_grad_(False)

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())


class CnClipBackbone(ClipBackbone):
    """The ``cn_clip`` package's CLIP, read at token level."""

    def __init__(self, preset: str, arch: dict[str, Any] | None = None):
        super().__init__()
        arch = arch or architecture(preset)
        self.preset = preset
        # The package as it is: importing it costs a model-building process ~2 s (its __init__
        # imports torchvision), and keeps cn_clip.clip.model.CLIP the class a pickled model names.
        from cn_clip.clip.model import CLIP

        self.clip = CLIP(**arch)
        self.is_resnet = isinstance(arch["vision_layers"], (list, tuple))
        self.embed_dim = arch["embed_dim"]
        self.text_width = arch["text_hidden_size"]
        self.image_width = arch["vision_width"] * 32 if self.is_resnet else arch["vision_width"]
        self.image_size = arch["image_resolution"]
        vision_depth = 4 if self.is_resnet else arch["vision_layers"]
        self._tower_depth = {"vision": vision_depth, "text": arch["text_num_hidden_layers"]}
        self._pooled_parts = ("text_projection", "visual.proj", "visual.attnpool", "logit_scale")
        self._text_parts = ("bert.", "text_projection")
        vision_block = r"visual\.layer(\d)\." if self.is_resnet else r"visual\.transformer\.resblocks\.(\d+)\."
        self._first_block_index = {"vision": 1} if self.is_resnet else {}
        self._layer_patterns = (
            (re.compile(vision_block), "vision"),
            (re.compile(r"bert\.encoder\.layer\.(\d+)\."), "text"),
            (re.compile(r"visual\.(?:conv|bn|class_embedding|positional_embedding|ln_pre)"), "vision"),
            (re.compile(r"bert\.embeddings\."), "text"),
        )

    def encode_text(self, input_ids, mask):
        hidden = self.clip.bert(input_ids, attention_mask=mask.to(self.clip.dtype))[0]
        return hidden, hidden[:, 0, :] @ self.clip.text_projection

    def encode_image(self, pixel_values):
        visual = self.clip.visual
        x = pixel_values.to(self.clip.dtype)
        if self.is_resnet:
            x = self._resnet_grid(x)  # (B, C, H, W) before attention pooling
            pooled = visual.attnpool(x)
            return x.flatten(2).transpose(1, 2), pooled
        x = visual.conv1(x).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        x = visual.transformer(x.transpose(0, 1)).transpose(0, 1)
        tokens = visual.ln_post(x)
        return tokens, tokens[:, 0, :] @ visual.proj

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learned log inverse temperature (contrastive pretraining trains it)."""
        return self.clip.logit_scale

    def save_released(self, path: Path) -> None:
        """Write the weights as cn_clip's released ``.pt`` files hold them, so that
        :meth:`load_released` (``model.backbone.checkpoint``) reads them back."""
        torch.save({"state_dict": {f"module.{k}": v for k, v in self.clip.state_dict().items()}}, path)

    def _resnet_grid(self, x: torch.Tensor) -> torch.Tensor:
        v = self.clip.visual
        for conv, bn in ((v.conv1, v.bn1), (v.conv2, v.bn2), (v.conv3, v.bn3)):
            x = v.relu(bn(conv(x)))
        x = v.avgpool(x)
        return v.layer4(v.layer3(v.layer2(v.layer1(x))))

    def load_released(self, cfg: BackboneConfig) -> None:
        """Load released cn_clip weights from ``checkpoint`` or ``download_root`` (never downloads)."""
        path = _released_path(cfg)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        state = checkpoint.get("state_dict", checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items() if "bert.pooler" not in k}
        missing, unexpected = self.clip.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not match preset {self.preset}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.clip.float()


def _released_path(cfg: BackboneConfig) -> Path:
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
    elif cfg.download_root and cfg.preset in RELEASED:
        path = Path(cfg.download_root) / RELEASED[cfg.preset].file_name
    else:
        raise ValueError("model.backbone: set checkpoint or download_root to load released weights")
    if not path.is_file():
        raise FileNotFoundError(
            f"released Chinese-CLIP weights not found at {path}; copy them there first "
            "(this platform never downloads weights at run time)"
        )
    return path


def hf_config(preset: str):
    """A transformers ChineseCLIPConfig with the same architecture as the cn_clip preset."""
    from transformers import ChineseCLIPConfig

    arch = architecture(preset)
    if isinstance(arch["vision_layers"], (list, tuple)):
        raise ValueError("the Hugging Face ChineseCLIP has no ResNet vision tower; use implementation: cn_clip for RN50")
    text = {
        "vocab_size": arch["vocab_size"],
        "hidden_size": arch["text_hidden_size"],
        "num_hidden_layers": arch["text_num_hidden_layers"],
        "num_attention_heads": arch["text_num_attention_heads"],
        "intermediate_size": arch["text_intermediate_size"],
        "max_position_embeddings": arch["text_max_position_embeddings"],
        "type_vocab_size": arch["text_type_vocab_size"],
        "hidden_act": arch["text_hidden_act"],
        "hidden_dropout_prob": arch["text_hidden_dropout_prob"],
        "attention_probs_dropout_prob": arch["text_attention_probs_dropout_prob"],
        "layer_norm_eps": 1e-12,
    }
    width = arch["vision_width"]
    vision = {
        "hidden_size": width,
        "intermediate_size": width * 4,
        "num_hidden_layers": arch["vision_layers"],
        "num_attention_heads": width // arch.get("vision_head_width", 64),
        "image_size": arch["image_resolution"],
        "patch_size": arch["vision_patch_size"],
        "projection_dim": arch["embed_dim"],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    return ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["embed_dim"])


class HFChineseClipBackbone(ClipBackbone):
    """transformers' ``ChineseCLIPModel``, read at token level."""

    def __init__(self, preset: str, pretrained_dir: str | None = None):
        super().__init__()
        from transformers import ChineseCLIPModel

        if pretrained_dir:
            if not Path(pretrained_dir).is_dir():
                raise FileNotFoundError(f"Hugging Face model directory {pretrained_dir} does not exist")
            self.hf, loading = ChineseCLIPModel.from_pretrained(pretrained_dir, local_files_only=True, output_loading_info=True)
            # transformers fills missing weights with random ones and only logs it: here that is an error
            missing = [k for k in loading["missing_keys"] if not k.endswith("position_ids")]
            if missing or loading["mismatched_keys"]:
                raise ValueError(f"{pretrained_dir} is not a complete ChineseCLIPModel for preset {preset}: "
                                 f"missing {missing[:5]}, mismatched {list(loading['mismatched_keys'])[:5]}")
        else:
            self.hf = ChineseCLIPModel(hf_config(preset))
        self.preset = preset
        cfg = self.hf.config
        self.embed_dim = cfg.projection_dim
        self.text_width = cfg.text_config.hidden_size
        self.image_width = cfg.vision_config.hidden_size
        self.image_size = cfg.vision_config.image_size
        self._tower_depth = {"vision": cfg.vision_config.num_hidden_layers, "text": cfg.text_config.num_hidden_layers}
        self._pooled_parts = ("text_projection", "visual_projection", "logit_scale")
        self._text_parts = ("text_model.", "text_projection")
        self._layer_patterns = (
            (re.compile(r"hf\.vision_model\.encoder\.layers\.(\d+)\."), "vision"),
            (re.compile(r"hf\.text_model\.encoder\.layer\.(\d+)\."), "text"),
            (re.compile(r"hf\.vision_model\.(?:embeddings|pre_layrnorm)"), "vision"),
            (re.compile(r"hf\.text_model\.embeddings\."), "text"),
        )

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learned log inverse temperature (contrastive pretraining trains it)."""
        return self.hf.logit_scale

    def save_released(self, path: Path) -> None:
        """Write the model as a Hugging Face directory, which ``model.backbone.checkpoint`` names."""
        self.hf.save_pretrained(str(path))

    def encode_text(self, input_ids, mask):
        hidden = self.hf.text_model(
            input_ids=input_ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        return hidden, self.hf.text_projection(hidden[:, 0, :])

    def encode_image(self, pixel_values):
        vision = self.hf.vision_model
        tokens = vision.post_layernorm(vision(pixel_values=pixel_values).last_hidden_state)
        return tokens, self.hf.visual_projection(tokens[:, 0, :])


def build_backbone(cfg: BackboneConfig, load_pretrained: bool = True) -> ClipBackbone:
    """Build the configured backbone; with ``load_pretrained`` also load released weights if configured."""
    wants_weights = load_pretrained and bool(cfg.checkpoint or cfg.download_root)
    if cfg.implementation == "hf" and cfg.download_root and not cfg.checkpoint:
        raise ValueError("model.backbone: the hf implementation loads a Hugging Face model directory named by "
                         "model.backbone.checkpoint; download_root names cn_clip's released .pt files")
    if cfg.implementation == "hf":
        backbone: ClipBackbone = HFChineseClipBackbone(cfg.preset, cfg.checkpoint if wants_weights else None)
    else:
        backbone = CnClipBackbone(cfg.preset)
        if wants_weights:
            backbone.load_released(cfg)
    backbone.apply_policy(cfg.policy, cfg.trainable_last_k)
    return backbone


def cn_clip_to_hf_state_dict(state: dict[str, torch.Tensor], num_vision_layers: int) -> dict[str, torch.Tensor]:
    """Rename (and split) a cn_clip CLIP state dict into the ChineseCLIPModel layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("bert."):
            out["text_model." + key[len("bert."):]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "logit_scale":
            out["logit_scale"] = value
    v = "vision_model."
    out[v + "embeddings.class_embedding"] = state["visual.class_embedding"]
    out[v + "embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out[v + "embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for part in ("weight", "bias"):
            out[f"{v}{theirs}.{part}"] = state[f"visual.{ours}.{part}"]
    out["visual_projection.weight"] = state["visual.proj"].t().contiguous()
    for i in range(num_vision_layers):
        src, dst = f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, val = state[f"{src}attn.in_proj_{part}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{part}"] = q
            out[f"{dst}self_attn.k_proj.{part}"] = k
            out[f"{dst}self_attn.v_proj.{part}"] = val
            out[f"{dst}self_attn.out_proj.{part}"] = state[f"{src}attn.out_proj.{part}"]
            out[f"{dst}layer_norm1.{part}"] = state[f"{src}ln_1.{part}"]
            out[f"{dst}layer_norm2.{part}"] = state[f"{src}ln_2.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = state[f"{src}mlp.c_fc.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = state[f"{src}mlp.c_proj.{part}"]
    return out
