"""Synthetic image-text pairs for contrastive pretraining: texts that say what is pictured
and where.

Each pair shows one object, or two side by side, each a shape in a named colour on a
plain, noisy background; its text names the colour and the shape of every object and, for
two, which is on the left and which on the right ("左边是红色的三角形，右边是蓝色的圆环").
Matching such texts to images takes colours, shapes and positions read at patch level:
what SG-MFT's similarity guidance needs a backbone to have learnt. The vocabulary is
colours, shapes and positions only: no place, activity or hashtag of the location task
(:func:`sgmft.data.synth.cue_words`), and the pictures carry none of its category
textures, so pretraining on these pairs cannot teach the location labels.

A pair dataset has the layout of any dataset (``sgmft/data/schema.py``) with a null
``label`` and an empty label list; ``post_id`` names the pair. Draws are seeded by
(seed, pair index, stream), so the same arguments give byte-identical shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from sgmft.data import schema
from sgmft.data.synth import SHAPES, _draw_shape, _rgb, encode_image

COLOURS: dict[str, tuple[float, float, float]] = {
    "红色": (0.0, 0.9, 0.9), "橙色": (0.08, 0.9, 0.95), "黄色": (0.16, 0.9, 0.95), "绿色": (0.33, 0.85, 0.8),
    "青色": (0.5, 0.85, 0.85), "蓝色": (0.62, 0.85, 0.9), "紫色": (0.76, 0.75, 0.85), "粉色": (0.9, 0.5, 0.98),
    "白色": (0.0, 0.0, 0.98), "黑色": (0.0, 0.0, 0.05),
}
"""Colour names and their hue, saturation and value. White and black are there because the
location task's two-object posts name a picture by its shape's colour, white or black."""
SHAPE_NAMES: dict[str, str] = {"disc": "圆形", "square": "正方形", "triangle": "三角形", "cross": "十字", "ring": "圆环",
                               "bars": "竖条", "diamond": "菱形", "house": "五边形", "dumbbell": "工字形", "frame": "方框"}
"""The shapes of :data:`sgmft.data.synth.SHAPES`, named by their geometry alone."""
ONE_TEMPLATES = ("图里是一个{a}", "画面中间有个{a}", "一个{a}", "只有一个{a}")
TWO_TEMPLATES = ("左边是{left}，右边是{right}", "右边是{right}，左边是{left}", "{left}在左，{right}在右",
                 "左{left}右{right}")
PAIR_FIELDS = [pa.field("meta_objects", pa.string())]
"""What each pair shows, as ``colour shape[|colour shape]`` from left to right."""

_OBJECTS, _TEXT, _IMAGE, _ENCODING = range(4)


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream, 7])  # 7: not the location set's streams


def _describe(colour: str, shape: str) -> str:
    return f"{colour}的{SHAPE_NAMES[shape]}"


def _panel(rng: np.random.Generator, width: int, height: int, colour: tuple[float, float, float], shape: str) -> Image.Image:
    """One object on a mid-grey, noisy background (apart from white and black alike), jittered
    in size, place and shade."""
    grey = float(rng.uniform(0.4, 0.6))
    pixels = np.full((height, width, 3), 255 * grey, np.float32) + rng.normal(0, 8, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    scale = rng.uniform(0.5, 0.8) * min(width, height)
    cx, cy = rng.uniform(scale / 2, width - scale / 2), rng.uniform(scale / 2, height - scale / 2)
    hue, saturation, value = colour
    fill = _rgb(hue + rng.normal(0, 0.01), saturation * rng.uniform(0.9, 1.0), value + rng.uniform(-0.04, 0.02))
    _draw_shape(ImageDraw.Draw(image), shape, (cx - scale / 2, cy - scale / 2, cx + scale / 2, cy + scale / 2), fill)
    return image


def pair(seed: int, index: int, image_size: int, two_object_share: float) -> dict[str, Any]:
    """Pair ``index``: its objects, text and encoded image, each from its own random stream."""
    rng = _rng(seed, index, _OBJECTS)
    count = 2 if rng.random() < two_object_share else 1
    colours = list(COLOURS)
    objects = [(colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))]) for _ in range(count)]
    text_rng, image_rng = _rng(seed, index, _TEXT), _rng(seed, index, _IMAGE)
    if count == 1:
        text = ONE_TEMPLATES[int(text_rng.integers(len(ONE_TEMPLATES)))].format(a=_describe(*objects[0]))
        image = _panel(image_rng, image_size, image_size, COLOURS[objects[0][0]], objects[0][1])
    else:
        template = TWO_TEMPLATES[int(text_rng.integers(len(TWO_TEMPLATES)))]
        text = template.format(left=_describe(*objects[0]), right=_describe(*objects[1]))
        half = image_size // 2
        image = Image.new("RGB", (2 * half, image_size))
        for side, (colour, shape) in enumerate(objects):
            image.paste(_panel(image_rng, half, image_size, COLOURS[colour], shape), (side * half, 0))
    data, _ = encode_image(_rng(seed, index, _ENCODING), image)
    return {"post_id": f"pair-{seed}-{index:06d}", "text": text, "image": data, "label": None,
            "meta_objects": "|".join(f"{c} {s}" for c, s in objects)}


def synthesize_pairs(out_dir: str | Path, n: int = 4000, seed: int = 0, image_size: int = 64,
                     two_object_share: float = 0.7, val_frac: float = 0.1, test_frac: float = 0.1,
                     overwrite: bool = False) -> dict[str, Any]:
    """Write ``n`` synthetic pairs to ``out_dir`` (train/val/test, no labels); return its report."""
    if n < 10:
        raise schema.DatasetError(f"synthesize_pairs: n={n} gives no pair to every split (need at least 10)")
    if not 0.0 <= two_object_share <= 1.0:
        raise schema.DatasetError(f"synthesize_pairs: two_object_share={two_object_share} is not in [0, 1]")
    if image_size < 8:
        raise schema.DatasetError(f"synthesize_pairs: image_size={image_size} is under 8 pixels")
    schema.check_fractions(val_frac, test_frac)
    out = schema.prepare_output_dir(out_dir, overwrite)
    rows = [pair(seed, index, image_size, two_object_share) for index in range(n)]
    splits = schema.stratified_split([None] * n, val_frac, test_frac, seed)
    table_schema = schema.dataset_schema(PAIR_FIELDS)
    for split in schema.SPLITS:
        schema.write_split([r for r, s in zip(rows, splits) if s == split], out, split, schema.DEFAULT_ROWS_PER_SHARD,
                           table_schema)
    schema.write_labels(out, [])
    schema.write_quarantine(out, [])
    report = {"kind": "synthetic-pairs", "seed": seed, "n": n, "image_size": image_size,
              "two_object_share": two_object_share, "splits": {s: splits.count(s) for s in schema.SPLITS},
              "read": n, "kept": n, "quarantined": 0, "quarantine_reasons": {}}
    schema.write_json(out / schema.REPORT_FILE, report)
    return report
