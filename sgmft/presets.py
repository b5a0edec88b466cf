"""Facts about the Chinese-CLIP presets, in one torch-free place.

Data preprocessing, the models and the HTTP API read these; none of them needs torch or
cn_clip to know an image size or the pad token. Which presets a config may name, and the
head width of each, are the config schema's (:data:`sgmft.config.HEAD_WIDTH`): neither
module imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PAD_TOKEN_ID = 0
"""Token id of padding in the cn_clip vocabulary; positions holding it are masked."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Chinese-CLIP's pixel normalisation, applied on the model's device to uint8 pixels."""


@dataclass(frozen=True)
class ReleasedPreset:
    """A released cn_clip checkpoint: its architecture JSONs, input size and file name."""

    vision_config: str
    text_config: str
    image_size: int
    file_name: str


RELEASED: dict[str, ReleasedPreset] = {
    "ViT-B-16": ReleasedPreset("ViT-B-16", "RoBERTa-wwm-ext-base-chinese", 224, "clip_cn_vit-b-16.pt"),
    "ViT-L-14": ReleasedPreset("ViT-L-14", "RoBERTa-wwm-ext-base-chinese", 224, "clip_cn_vit-l-14.pt"),
    "ViT-L-14-336": ReleasedPreset("ViT-L-14-336", "RoBERTa-wwm-ext-base-chinese", 336, "clip_cn_vit-l-14-336.pt"),
    "ViT-H-14": ReleasedPreset("ViT-H-14", "RoBERTa-wwm-ext-large-chinese", 224, "clip_cn_vit-h-14.pt"),
    "RN50": ReleasedPreset("RN50", "RBT3-chinese", 224, "clip_cn_rn50.pt"),
}


def _text_arch(hidden: int, layers: int, heads: int, dropout: float) -> dict[str, Any]:
    return {
        "vocab_size": 21128,  # the cn_clip vocabulary
        "text_attention_probs_dropout_prob": dropout,
        "text_hidden_act": "gelu",
        "text_hidden_dropout_prob": dropout,
        "text_hidden_size": hidden,
        "text_initializer_range": 0.02,
        "text_intermediate_size": hidden * 4,
        "text_max_position_embeddings": 512,
        "text_num_attention_heads": heads,
        "text_num_hidden_layers": layers,
        "text_type_vocab_size": 2,
    }


CUSTOM: dict[str, dict[str, Any]] = {
    # Random-init presets for CPU: `tiny` for tests and the demo, `small` for benchmarks.
    "tiny": {
        "embed_dim": 64, "image_resolution": 32, "vision_layers": 2, "vision_width": 64,
        "vision_patch_size": 8, "vision_head_width": 32, **_text_arch(64, 2, 2, 0.0),
    },
    "small": {
        "embed_dim": 256, "image_resolution": 112, "vision_layers": 4, "vision_width": 256,
        "vision_patch_size": 16, "vision_head_width": 64, **_text_arch(256, 4, 4, 0.1),
    },
}


def check_preset(preset: str) -> str:
    if preset not in CUSTOM and preset not in RELEASED:
        raise ValueError(f"unknown backbone preset {preset!r}; known: {[*CUSTOM, *RELEASED]}")
    return preset


def image_size_of(preset: str) -> int:
    """The square input resolution of a preset's vision tower."""
    check_preset(preset)
    if preset in CUSTOM:
        return int(CUSTOM[preset]["image_resolution"])
    return RELEASED[preset].image_size
