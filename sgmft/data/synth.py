"""A deterministic synthetic Weibo-like dataset with controllable per-modality noise.

Each post gets a label, then two independent draws decide its modalities:
- text: with probability ``1 - text_noise`` a Chinese sentence from the label's phrase
  bank (place words, activities, emoji, hashtags); otherwise neutral chatter: everyday
  sentences shipped with the package (``chatter_zh.txt``; any naming a place or activity
  of any category left out), so the dataset is the same on every machine;
- image: with probability ``image_noise`` a neutral image (muted colours, random blobs),
  with ``image_swap`` the image of another category, otherwise the label's own picture
  (a hue, a shape and a texture per category, learnable by a tiny ViT at 32 px).
Because the draws are independent, a text-only model cannot fix posts whose text is
noise and an image-only model cannot fix posts whose image is, so fusion is measurable.

Independent draws also make combining two unimodal predictions optimal, so two further
kinds of post (off by default, shares ``two_object_share`` and ``misleading_share``) need
the modalities read *together*:
- two objects: the image holds two category pictures side by side, the label's and
  another's, and the text, naming no place, says which one counts: by position ("左边那张")
  or by the colour of its shape ("白色图案那边"; the other shape is black). Text alone is
  at chance, image alone at one half; only matching the text's words to image patches wins;
- misleading text: the text names another category's place as where the poster is *not*
  (a wish, a plan, a dream: "好想去健身房撸铁"), the image is the label's own picture.
  A model that maps place words to labels is fooled; one that lets the image speak when
  the modalities disagree is not.
Each post's ``meta_case`` names its case (:data:`CASES`); the report counts them.

Every random draw comes from a generator seeded by ``(seed, post index, stream)``:
the same arguments give byte-identical shards, and changing one stream (say the image
size) leaves the others as they were.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from sgmft.data import schema
from sgmft.data.labels import DEFAULT_LABELS, check_labels

if TYPE_CHECKING:
    from sgmft.config import SynthConfig

# Random streams per post; fixed numbers so adding a stream never shifts another.
_LABELS, _TEXT_NOISE, _IMAGE_KIND, _TEXT, _IMAGE, _ENCODING, _CASE = range(7)

CASES: dict[str, str] = {
    "both_cues": "the text names the label's place and the image is the label's picture",
    "text_only_cue": "the text names the label's place; the image is neutral",
    "image_only_cue": "the text names no place; the image is the label's picture",
    "no_cue": "neither modality says anything about the place (chance for any model)",
    "text_cue_swapped_image": "the text names the label's place; the image is another category's picture",
    "swapped_image": "the text names no place; the image is another category's picture (no model can be right)",
    "two_objects_by_position": "two category pictures side by side; the text says by position which one counts",
    "two_objects_by_colour": "two category pictures side by side; the text says by the colour of its shape which one counts",
    "misleading_text": "the text names another category's place as where the poster is not; the image is the label's picture",
}
"""``meta_case`` of a synthetic post -> what its modalities carry."""


# --- text -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TextBank:
    places: tuple[str, ...]
    activities: tuple[str, ...]
    hashtags: tuple[str, ...]


TEXT_BANKS: dict[str, TextBank] = {
    "home": TextBank(("家里", "我家", "卧室", "客厅", "阳台", "厨房", "沙发上", "被窝里"),
                     ("宅着追剧", "做饭", "大扫除", "睡懒觉", "陪爸妈吃饭", "收拾房间", "撸猫", "窝着看书"),
                     ("#宅家日常#", "#居家生活#", "#我的小窝#")),
    "school": TextBank(("学校", "教室", "图书馆", "宿舍", "操场", "食堂", "实验室", "校园"),
                       ("上自习", "考试", "赶论文", "上课", "复习", "刷题", "开班会", "听讲座"),
                       ("#校园生活#", "#期末考试#", "#开学季#")),
    "workplace": TextBank(("公司", "办公室", "工位", "会议室", "写字楼", "单位"),
                          ("加班", "开会", "写周报", "改方案", "赶项目", "对接客户", "打卡上班"),
                          ("#打工人#", "#加班日常#", "#职场#")),
    "restaurant": TextBank(("餐厅", "饭店", "火锅店", "日料店", "小馆子", "茶餐厅", "烧烤店"),
                           ("吃火锅", "聚餐", "点了一桌菜", "吃大餐", "撸串", "打卡网红菜"),
                           ("#美食#", "#吃货日常#", "#探店#")),
    "shopping": TextBank(("商场", "购物中心", "超市", "专柜", "步行街", "奥特莱斯"),
                         ("逛街", "买买买", "试衣服", "抢折扣", "血拼", "剁手"),
                         ("#购物#", "#剁手党#", "#逛街#")),
    "hospital": TextBank(("医院", "门诊", "急诊", "病房", "诊室", "药房"),
                         ("排队挂号", "看病", "打点滴", "做检查", "复查", "陪护"),
                         ("#医院#", "#健康#", "#看病#")),
    "transport": TextBank(("车站", "机场", "高铁站", "火车站", "地铁站", "候机厅", "站台"),
                          ("等车", "候机", "赶火车", "转机", "排队安检", "等晚点的航班"),
                          ("#旅途#", "#春运#", "#在路上#")),
    "scenic": TextBank(("公园", "景区", "山顶", "湖边", "古镇", "海边", "植物园"),
                       ("爬山", "看日落", "赏花", "拍风景", "散步", "露营"),
                       ("#旅行#", "#风景#", "#周末去哪儿#")),
    "gym": TextBank(("健身房", "健身中心", "瑜伽馆", "游泳馆", "动感单车房"),
                    ("撸铁", "跑步", "练腿", "上私教课", "燃脂", "拉伸"),
                    ("#健身打卡#", "#自律#", "#运动#")),
    "entertainment": TextBank(("电影院", "KTV", "影城", "游戏厅", "剧场", "密室"),
                              ("看电影", "唱K", "看首映", "刷夜", "玩剧本杀", "看演出"),
                              ("#观影#", "#K歌#", "#周末娱乐#")),
}

CUE_TEMPLATES = (
    "{time}在{place}{activity}{emoji}",
    "人在{place}，{activity}中，{feeling}{emoji}",
    "{tag}{time}去了{place}，{activity}，{feeling}",
    "{place}打卡✔ {activity}{emoji}{tag}",
    "又来{place}了，{activity}{emoji}",
    "{feeling}！{time}{place}{activity}。{tag}",
    "{activity}{activity2}，{place}真是{feeling2}{emoji}",
)
TIME_WORDS = ("今天", "周末", "下午", "晚上", "早上", "刚刚", "昨天", "难得")
FEELINGS = ("好开心", "累瘫了", "心情不错", "有点无聊", "太值了", "感动", "哈哈哈哈", "绝了")
FEELINGS_2 = ("太舒服了", "人好多", "太挤了", "氛围感拉满", "一言难尽", "越来越好了")
EMOJI = ("😊", "😂", "🙈", "👍", "😭", "✨", "[哈哈]", "[心]", "[doge]", "[微笑]", "[泪]", "")

CHATTER_FILE = "chatter_zh.txt"
"""Package data of :mod:`sgmft.data`: one neutral Weibo-style sentence per line, written
for this project (weather, moods, memes), naming no place or activity of any category."""


def cue_words(labels: Sequence[str]) -> list[str]:
    """Every place, activity and hashtag word that marks a label; noise text holds none."""
    words = set(labels)
    for label in labels:
        bank = _bank(label)
        words.update(bank.places)
        words.update(bank.activities)
        words.update(tag.strip("#") for tag in bank.hashtags)
    for bank in TEXT_BANKS.values():
        words.update(bank.places)
        words.update(bank.activities)
    return sorted(w for w in words if w)


def _bank(label: str) -> TextBank:
    # Labels without a curated bank still get cue text: their name as the place.
    return TEXT_BANKS.get(label) or TextBank((label, f"{label}附近"), ("打卡", "待了一下午", "见朋友"), (f"#{label}#",))


@functools.lru_cache(maxsize=1)
def _chatter_lines() -> tuple[str, ...]:
    text = resources.files("sgmft.data").joinpath(CHATTER_FILE).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def chatter_sentences(labels: Sequence[str], max_chars: int = 140) -> tuple[list[str], str]:
    """The packaged chatter usable as no-cue text for ``labels``, in file order, and its source.

    Sentences holding any cue word of ``labels`` (or of any curated category) are left
    out, so custom labels never leak into noise text; the report records the source and
    a digest of the sentences used.
    """
    banned = cue_words(labels)
    sentences: list[str] = []
    seen: set[str] = set()
    for line in _chatter_lines():
        text = line[:max_chars]
        if text not in seen and not any(w in text for w in banned):
            seen.add(text)
            sentences.append(text)
    if not sentences:
        raise schema.DatasetError(f"synthesize: every sentence of {CHATTER_FILE} names a cue word of the labels")
    return sentences, f"sgmft.data/{CHATTER_FILE}"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def cue_text(rng: np.random.Generator, label: str) -> str:
    """A post that says where it was written."""
    bank = _bank(label)
    activity, activity2 = rng.choice(len(bank.activities), size=2, replace=len(bank.activities) < 2)
    return _pick(rng, CUE_TEMPLATES).format(
        time=_pick(rng, TIME_WORDS), place=_pick(rng, bank.places),
        activity=bank.activities[activity], activity2=bank.activities[activity2],
        feeling=_pick(rng, FEELINGS), feeling2=_pick(rng, FEELINGS_2),
        emoji=_pick(rng, EMOJI), tag=_pick(rng, bank.hashtags),
    )


TWO_OBJECT_REFS: dict[str, tuple[str, ...]] = {
    # Where the label's picture is (position) or the colour of its shape; no place word.
    "left": ("左边", "左边那张", "左半边"),
    "right": ("右边", "右边那张", "右半边"),
    "white": ("白色图案那边", "有白色图案的那张", "白的那个"),
    "black": ("黑色图案那边", "有黑色图案的那张", "黑的那个"),
}
TWO_OBJECT_TEMPLATES = (
    "拼图里{ref}才是我现在待的地方{emoji}",
    "{time}拍的两张拼一起，{ref}是我这儿，另一半是朋友那边{emoji}",
    "猜猜我在哪？提示：{ref}{emoji}",
    "{ref}是我的位置，另一张是随手存的图",
    "两张图，我在{ref}，{feeling}{emoji}",
)
MISLEADING_TEMPLATES = (
    # Another category's place, framed as where the poster is not.
    "好想去{place}{activity}啊{emoji}",
    "下次再去{place}{activity}吧{emoji}",
    "{time}本来要去{place}的，结果没去成{emoji}",
    "梦到自己在{place}{activity}，醒了{emoji}",
    "只想马上飞到{place}{activity}，可惜不行{emoji}",
    "不在{place}，也不想{activity}{emoji}",
)


def two_object_text(rng: np.random.Generator, ref: str) -> str:
    """A post that names no place but says which of two pictures is where it was written."""
    return _pick(rng, TWO_OBJECT_TEMPLATES).format(
        ref=_pick(rng, TWO_OBJECT_REFS[ref]), time=_pick(rng, TIME_WORDS),
        feeling=_pick(rng, FEELINGS), emoji=_pick(rng, EMOJI))


def misleading_text(rng: np.random.Generator, other_label: str) -> str:
    """A post naming ``other_label``'s place and activity as somewhere the poster is not."""
    bank = _bank(other_label)
    return _pick(rng, MISLEADING_TEMPLATES).format(
        place=_pick(rng, bank.places), activity=_pick(rng, bank.activities),
        time=_pick(rng, TIME_WORDS), emoji=_pick(rng, EMOJI))


def chatter_text(rng: np.random.Generator, sentences: Sequence[str]) -> str:
    """A post that says nothing about a place: sometimes empty, as image-only posts are."""
    draw = rng.random()
    if draw < 0.08:
        return ""
    if draw < 0.3:
        return f"{_pick(rng, TIME_WORDS)}{_pick(rng, FEELINGS)}{_pick(rng, EMOJI)}"
    return _pick(rng, sentences)


# --- images ---------------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars", "diamond", "house", "dumbbell", "frame")
TEXTURES = ("hstripes", "vstripes", "checker", "dots", "diagonal", "smooth")
IMAGE_FORMATS = (("JPEG", 0.6), ("PNG", 0.25), ("WEBP", 0.15))


@dataclass(frozen=True)
class ImageStyle:
    hue: float
    shape: str
    texture: str


def category_style(index: int, num_labels: int) -> ImageStyle:
    """Category ``index``'s look: its own hue, shape and texture (cycled past 10 labels)."""
    return ImageStyle(hue=index / num_labels, shape=SHAPES[index % len(SHAPES)],
                      texture=TEXTURES[(index * 5) % len(TEXTURES)])


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _texture(kind: str, height: int, width: int, period: float) -> np.ndarray:
    """A zero-mean pattern in [-1, 1] over the canvas."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "hstripes":
        return np.sign(np.sin(2 * np.pi * y / period))
    if kind == "vstripes":
        return np.sign(np.sin(2 * np.pi * x / period))
    if kind == "checker":
        return np.sign(np.sin(np.pi * x / period) * np.sin(np.pi * y / period))
    if kind == "diagonal":
        return np.sign(np.sin(2 * np.pi * (x + y) / (period * 1.4)))
    if kind == "dots":
        return np.where((np.sin(2 * np.pi * x / period) > 0.6) & (np.sin(2 * np.pi * y / period) > 0.6), 1.0, -0.2)
    return np.zeros((height, width), np.float32)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    line = max(1, int(min(w, h) / 5))
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        draw.rectangle((cx - w / 6, y0, cx + w / 6, y1), fill=fill)
        draw.rectangle((x0, cy - h / 6, x1, cy + h / 6), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=line)
    elif shape == "bars":
        for k in range(3):
            left = x0 + k * w / 3
            draw.rectangle((left + w / 18, y0 + (2 - k) * h / 4, left + w / 3 - w / 18, y1), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "house":
        draw.polygon([(cx, y0), (x1, cy), (x0, cy)], fill=fill)
        draw.rectangle((x0 + w / 6, cy, x1 - w / 6, y1), fill=fill)
    elif shape == "dumbbell":
        draw.rectangle((x0, y0 + h / 4, x0 + w / 4, y1 - h / 4), fill=fill)
        draw.rectangle((x1 - w / 4, y0 + h / 4, x1, y1 - h / 4), fill=fill)
        draw.rectangle((x0, cy - h / 12, x1, cy + h / 12), fill=fill)
    elif shape == "frame":
        draw.rectangle(box, outline=fill, width=line)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _canvas(rng: np.random.Generator, size: int) -> tuple[int, int]:
    # Photos are rarely square; the preprocessing squashes them to S x S as CLIP does.
    ratio = float(rng.uniform(0.75, 1.33))
    return (size, max(8, round(size * ratio))) if rng.random() < 0.5 else (max(8, round(size / ratio)), size)


def draw_category_image(rng: np.random.Generator, style: ImageStyle, size: int) -> Image.Image:
    """A picture with the category's hue, textured background and shape, jittered."""
    width, height = _canvas(rng, size)
    return _category_panel(rng, style, width, height)


SHAPE_SHADES = ("white", "black")
"""The shape colours of a two-object picture, one per object (the text may name either)."""


def draw_two_object_image(rng: np.random.Generator, left: ImageStyle, right: ImageStyle, size: int,
                          left_shade: str) -> Image.Image:
    """Two category pictures side by side (``left``'s on the left half), each with its shape
    in one of :data:`SHAPE_SHADES`: ``left_shade`` on the left, the other on the right."""
    height = size
    half = max(4, round(size * float(rng.uniform(0.65, 0.8))))
    right_shade = SHAPE_SHADES[1 - SHAPE_SHADES.index(left_shade)]
    image = Image.new("RGB", (2 * half, height))
    image.paste(_category_panel(rng, left, half, height, left_shade), (0, 0))
    image.paste(_category_panel(rng, right, half, height, right_shade), (half, 0))
    return image


def _category_panel(rng: np.random.Generator, style: ImageStyle, width: int, height: int,
                    shade: str | None = None) -> Image.Image:
    """The category's picture on a ``width`` x ``height`` canvas; ``shade`` (white or black)
    fixes its shape's colour, else a pale tint of the complementary hue."""
    hue = style.hue + rng.normal(0, 0.015)
    top = np.array(_rgb(hue, rng.uniform(0.5, 0.8), rng.uniform(0.65, 0.9)), np.float32)
    bottom = np.array(_rgb(hue + rng.normal(0, 0.02), rng.uniform(0.5, 0.8), rng.uniform(0.45, 0.7)), np.float32)
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp
    period = min(width, height) / rng.uniform(5, 8)
    pixels = pixels + 28 * _texture(style.texture, height, width, period)[..., None]
    pixels += rng.normal(0, 6, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    scale = rng.uniform(0.4, 0.7) * min(width, height)
    cx, cy = rng.uniform(scale / 2, width - scale / 2), rng.uniform(scale / 2, height - scale / 2)
    fill = _rgb(hue + 0.5, rng.uniform(0.1, 0.5), rng.uniform(0.9, 1.0))
    if shade == "white":
        fill = _rgb(hue, 0.0, float(rng.uniform(0.95, 1.0)))
    elif shade == "black":
        fill = _rgb(hue, 0.0, float(rng.uniform(0.0, 0.08)))
    _draw_shape(ImageDraw.Draw(image), style.shape, (cx - scale / 2, cy - scale / 2, cx + scale / 2, cy + scale / 2), fill)
    return image


def draw_neutral_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A picture that says nothing about a place: muted noise and a few random blobs."""
    width, height = _canvas(rng, size)
    base = np.array(_rgb(rng.random(), rng.uniform(0, 0.2), rng.uniform(0.3, 0.9)), np.float32)
    noise = rng.normal(0, 1, size=(max(2, height // 8), max(2, width // 8), 3)).astype(np.float32)
    blurred = np.asarray(Image.fromarray(np.clip(128 + 40 * noise, 0, 255).astype(np.uint8), "RGB")
                         .resize((width, height), Image.Resampling.BILINEAR), np.float32) - 128
    image = Image.fromarray(np.clip(base + blurred, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.05, 0.2) * min(width, height)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 1)))
    return image


def encode_image(rng: np.random.Generator, image: Image.Image) -> tuple[bytes, str]:
    """Encode as JPEG, PNG or WebP (a seeded mix, as uploads are); deterministic bytes."""
    names, weights = zip(*IMAGE_FORMATS)
    fmt = names[int(rng.choice(len(names), p=weights))]
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=int(rng.integers(75, 96)))
    elif fmt == "WEBP":
        image.save(buffer, "WEBP", quality=int(rng.integers(75, 96)), method=4)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue(), fmt


# --- the dataset ----------------------------------------------------------------------

SIDES = ("left", "right")
_REGULAR_CASES = {
    (True, "cue"): "both_cues", (True, "neutral"): "text_only_cue", (True, "swap"): "text_cue_swapped_image",
    (False, "cue"): "image_only_cue", (False, "neutral"): "no_cue", (False, "swap"): "swapped_image",
}

META_FIELDS = [
    pa.field("meta_text_cue", pa.bool_()),
    pa.field("meta_image_kind", pa.string()),
    pa.field("meta_image_label", pa.string()),
    pa.field("meta_image_format", pa.string()),
    pa.field("meta_case", pa.string()),
    pa.field("meta_text_label", pa.string()),
    pa.field("meta_image_other_label", pa.string()),
    pa.field("meta_label_side", pa.string()),
    pa.field("meta_text_ref", pa.string()),
]
"""The ``meta_*`` columns of a synthetic dataset, after the columns every dataset has."""


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def _check_args(n: int, text_noise: float, image_noise: float, image_swap: float, image_size: int, labels: Sequence[str],
                two_object_share: float = 0.0, misleading_share: float = 0.0) -> None:
    problems = []
    if n < 1:
        problems.append(f"n must be >= 1, got {n}")
    for name, value in (("text_noise", text_noise), ("image_noise", image_noise), ("image_swap", image_swap),
                        ("two_object_share", two_object_share), ("misleading_share", misleading_share)):
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be in [0, 1], got {value}")
    if image_noise + image_swap > 1.0:
        problems.append(f"image_noise + image_swap must be <= 1, got {image_noise} + {image_swap}")
    if two_object_share + misleading_share > 1.0:
        problems.append(f"two_object_share + misleading_share must be <= 1, got {two_object_share} + {misleading_share}")
    for name, value in (("image_swap", image_swap), ("two_object_share", two_object_share), ("misleading_share", misleading_share)):
        if value > 0 and len(labels) < 2:
            problems.append(f"{name} needs at least two labels")
    if image_size < 8:
        problems.append(f"image_size must be >= 8, got {image_size}")
    if problems:
        raise schema.DatasetError("synthesize: " + "; ".join(problems))


def synthesize(
    out_dir: str | Path,
    n: int = 1200,
    seed: int = 0,
    text_noise: float = 0.3,
    image_noise: float = 0.3,
    image_swap: float = 0.1,
    image_size: int = 64,
    labels: Sequence[str] = DEFAULT_LABELS,
    *,
    two_object_share: float = 0.0,
    misleading_share: float = 0.0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    rows_per_shard: int = schema.DEFAULT_ROWS_PER_SHARD,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic dataset to ``out_dir``; return (and save) its report.

    A share ``two_object_share`` of posts are two-object posts and ``misleading_share``
    misleading-text posts (see the module docstring), decided by their own random stream;
    the rest follow the independent text and image draws. At shares of 0 the dataset is
    the one earlier versions wrote, plus the new ``meta_*`` columns.
    """
    labels = check_labels(labels)
    _check_args(n, text_noise, image_noise, image_swap, image_size, labels, two_object_share, misleading_share)
    sentences, text_source = chatter_sentences(labels)
    out = schema.prepare_output_dir(out_dir, overwrite)

    # Balanced classes: each label n // K or n // K + 1 times, in a seeded order.
    order = _rng(seed, n, _LABELS).permutation(n)
    post_labels = [labels[int(k) % len(labels)] for k in order]
    recipe = _Recipe(seed=seed, labels=labels, styles=[category_style(i, len(labels)) for i in range(len(labels))],
                     sentences=sentences, image_size=image_size, text_noise=text_noise, image_noise=image_noise,
                     image_swap=image_swap, two_object_share=two_object_share, misleading_share=misleading_share)
    rows = [_post(recipe, index, label) for index, label in enumerate(post_labels)]

    splits = schema.stratified_split(post_labels, val_frac, test_frac, seed)
    table_schema = schema.dataset_schema(META_FIELDS)
    for split in schema.SPLITS:
        schema.write_split([r for r, s in zip(rows, splits) if s == split], out, split, rows_per_shard, table_schema)
    schema.write_labels(out, labels)
    schema.write_quarantine(out, [])
    report = _report(rows, splits, labels, seed=seed, image_size=image_size, text_source=text_source,
                     sentences=sentences, noise={"text_noise": text_noise, "image_noise": image_noise,
                                                 "image_swap": image_swap, "two_object_share": two_object_share,
                                                 "misleading_share": misleading_share})
    schema.write_json(out / schema.REPORT_FILE, report)
    return report


@dataclass(frozen=True)
class _Recipe:
    """What every post of one synthetic dataset is drawn with."""

    seed: int
    labels: list[str]
    styles: list[ImageStyle]
    sentences: list[str]
    image_size: int
    text_noise: float
    image_noise: float
    image_swap: float
    two_object_share: float
    misleading_share: float


def _post(r: _Recipe, index: int, label: str) -> dict[str, Any]:
    """Post ``index`` of label ``label``: its case, text and image, each from its own random stream."""
    case_rng = _rng(r.seed, index, _CASE)
    u = case_rng.random()
    text_rng, image_rng = _rng(r.seed, index, _TEXT), _rng(r.seed, index, _IMAGE)
    meta: dict[str, Any] = {"meta_text_label": None, "meta_image_other_label": None,
                            "meta_label_side": None, "meta_text_ref": None}
    if u < r.two_object_share + r.misleading_share:
        label_index = r.labels.index(label)
        other = r.labels[(label_index + 1 + int(case_rng.integers(len(r.labels) - 1))) % len(r.labels)]
        text_cue = False
        if u < r.two_object_share:
            case, text, image, image_kind, image_label = _two_object_post(r, label, other, case_rng, text_rng, image_rng, meta)
        else:
            case, text = "misleading_text", misleading_text(text_rng, other)
            image_kind, image_label = "cue", label
            image = draw_category_image(image_rng, r.styles[label_index], r.image_size)
            meta.update(meta_text_label=other)
    else:
        text_cue, case, text, image, image_kind, image_label = _regular_post(r, index, label, text_rng, image_rng, meta)
    data, fmt = encode_image(_rng(r.seed, index, _ENCODING), image)
    return {
        "post_id": f"synth-{r.seed}-{index:06d}", "text": text, "image": data, "label": label,
        "meta_text_cue": text_cue, "meta_image_kind": image_kind,
        "meta_image_label": image_label, "meta_image_format": fmt, "meta_case": case, **meta,
    }


def _two_object_post(r: _Recipe, label: str, other: str, case_rng: np.random.Generator, text_rng: np.random.Generator,
                     image_rng: np.random.Generator, meta: dict[str, Any]) -> tuple[str, str, Image.Image, str, str]:
    """The label's picture and ``other``'s side by side; the text says which one counts."""
    side = SIDES[int(case_rng.integers(2))]
    shade = SHAPE_SHADES[int(case_rng.integers(2))]  # the label's shape colour
    by_colour = bool(case_rng.random() < 0.5)
    case, ref = ("two_objects_by_colour", shade) if by_colour else ("two_objects_by_position", side)
    text = two_object_text(text_rng, ref)
    left, right = (label, other) if side == "left" else (other, label)
    left_shade = shade if side == "left" else SHAPE_SHADES[1 - SHAPE_SHADES.index(shade)]
    image = draw_two_object_image(image_rng, r.styles[r.labels.index(left)], r.styles[r.labels.index(right)],
                                  r.image_size, left_shade)
    meta.update(meta_image_other_label=other, meta_label_side=side, meta_text_ref=ref)
    return case, text, image, "two_objects", label


def _regular_post(r: _Recipe, index: int, label: str, text_rng: np.random.Generator, image_rng: np.random.Generator,
                  meta: dict[str, Any]) -> tuple[bool, str, str, Image.Image, str, str | None]:
    """Independent draws: a cue or chatter text, and a cue, swapped or neutral image."""
    label_index = r.labels.index(label)
    text_cue = bool(_rng(r.seed, index, _TEXT_NOISE).random() >= r.text_noise)
    kind_draw = _rng(r.seed, index, _IMAGE_KIND)
    v = kind_draw.random()
    image_kind = "neutral" if v < r.image_noise else "swap" if v < r.image_noise + r.image_swap else "cue"
    text = cue_text(text_rng, label) if text_cue else chatter_text(text_rng, r.sentences)
    if text_cue and text_rng.random() < 0.35:
        text = f"{text} {_pick(text_rng, r.sentences)[:40]}"
    if image_kind == "neutral":
        image_label = None
        image = draw_neutral_image(image_rng, r.image_size)
    else:
        shift = 0 if image_kind == "cue" else 1 + int(kind_draw.integers(len(r.labels) - 1))
        image_label = r.labels[(label_index + shift) % len(r.labels)]
        image = draw_category_image(image_rng, r.styles[r.labels.index(image_label)], r.image_size)
    meta.update(meta_text_label=label if text_cue else None)
    return text_cue, _REGULAR_CASES[text_cue, image_kind], text, image, image_kind, image_label


def _report(rows: list[dict[str, Any]], splits: list[str], labels: list[str], *, seed: int, image_size: int,
            text_source: str, sentences: list[str], noise: dict[str, float]) -> dict[str, Any]:
    n = len(rows)
    counts = {s: {label: 0 for label in labels} for s in schema.SPLITS}
    for row, split in zip(rows, splits):
        counts[split][row["label"]] += 1
    kinds = Counter(r["meta_image_kind"] for r in rows)
    cases = Counter(r["meta_case"] for r in rows)
    cases_per_split = {s: Counter(r["meta_case"] for r, rs in zip(rows, splits) if rs == s) for s in schema.SPLITS}
    digest = hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()[:16]
    return {
        "kind": "synthetic",
        "seed": seed,
        "n": n,
        "labels": labels,
        "image_size": image_size,
        "noise": noise,
        "realized_noise": {
            "text_no_cue": round(sum(not r["meta_text_cue"] for r in rows) / n, 4),
            "image_neutral": round(kinds["neutral"] / n, 4),
            "image_swap": round(kinds["swap"] / n, 4),
            "two_objects": round(kinds["two_objects"] / n, 4),
            "misleading_text": round(cases["misleading_text"] / n, 4),
        },
        "cases": {case: cases[case] for case in CASES},
        "cases_per_split": {s: {case: c[case] for case in CASES} for s, c in cases_per_split.items()},
        "image_formats": dict(sorted(Counter(r["meta_image_format"] for r in rows).items())),
        "noise_text": {"source": text_source, "sentences": len(sentences), "sha256_16": digest},
        "splits": {s: sum(c.values()) for s, c in counts.items()},
        "counts": counts,
        "read": n, "kept": n, "quarantined": 0, "quarantine_reasons": {},
    }


def synthesize_from_config(out_dir: str | Path, cfg: SynthConfig, **kwargs: Any) -> dict[str, Any]:
    """:func:`synthesize` with the arguments of a :class:`sgmft.config.SynthConfig`."""
    return synthesize(out_dir, n=cfg.n, seed=cfg.seed, text_noise=cfg.text_noise, image_noise=cfg.image_noise,
                      image_swap=cfg.image_swap, image_size=cfg.image_size, two_object_share=cfg.two_object_share,
                      misleading_share=cfg.misleading_share, **kwargs)
