"""The Weibo dump format of Jin et al. (MM 2017), as described in its readme.txt.

Each post is three lines: 15 ``|``-separated meta fields (tweet id first, publish time in
ms fifth), the image URLs separated by ``|`` and ending in a ``null`` placeholder, then
the text (possibly empty). Files may start with a UTF-8 BOM.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

META_FIELDS = 15
_URL = re.compile(r"(?:https?|ftp)://[A-Za-z0-9\-._~:/?#@!$&'*+,;=%]+", re.IGNORECASE)
# Weibo replaces links by the glyph "O" followed by a link label.
_LINK_LABELS = re.compile(r"O(?:网页链接|秒拍视频|秒拍|网页|视频|长文|图片)")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class WeiboPost:
    post_id: str
    publish_time_ms: int | None
    image_urls: tuple[str, ...]
    text: str
    line: int
    """1-based line number of the post's meta line."""


@dataclass(frozen=True)
class BadWeiboRecord:
    line: int
    detail: str


def _is_meta_line(line: str) -> bool:
    fields = line.split("|")
    return len(fields) == META_FIELDS and fields[0].strip().isdigit()


def parse_weibo_dump(path: str | Path) -> Iterator[WeiboPost | BadWeiboRecord]:
    """Posts of one dump file, in file order; malformed stretches come out as bad records.

    After a malformed record the parser resynchronises on the next meta line, so one bad
    post never takes the rest of the file with it.
    """
    lines = Path(path).read_text(encoding="utf-8-sig").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r")
        if not _is_meta_line(line):
            start = i
            while i < len(lines) and not _is_meta_line(lines[i].rstrip("\r")):
                i += 1
            yield BadWeiboRecord(start + 1, f"{i - start} line(s) that do not start a post (expected "
                                            f"{META_FIELDS} '|'-separated meta fields, tweet id first)")
            continue
        if i + 1 >= len(lines) or _is_meta_line(lines[i + 1].rstrip("\r")):
            yield BadWeiboRecord(i + 1, "post is cut short: the image-URL and text lines are missing")
            i += 1
            continue
        urls_line = lines[i + 1].rstrip("\r")
        text = lines[i + 2].rstrip("\r") if i + 2 < len(lines) else ""
        step = 3
        if _is_meta_line(text):  # the text line is absent; do not swallow the next post
            text, step = "", 2
        fields = line.split("|")
        time_field = fields[4].strip()
        urls = tuple(u.strip() for u in urls_line.split("|") if u.strip() and u.strip().lower() != "null")
        yield WeiboPost(
            post_id=fields[0].strip(),
            publish_time_ms=int(time_field) if time_field.isdigit() else None,
            image_urls=urls,
            text=text,
            line=i + 1,
        )
        i += step


def image_name(url: str) -> str:
    """The image file name the dataset uses for a URL: its last path component."""
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def clean_text(text: str) -> str:
    """Post text without URLs, link placeholders, HTML entities or runs of whitespace."""
    text = html.unescape(text)
    text = _URL.sub(" ", text)
    text = _LINK_LABELS.sub(" ", text)
    return _SPACES.sub(" ", text).strip()
