"""Images in prompts: the part ``image_column`` adds, and its tokens by OpenAI's rule.

A column value that is a URL (``http(s)://`` or ``data:``) passes through; bytes become a
``data:`` URL whose media type is read from the bytes' signature (PNG, JPEG, GIF, WebP);
anything else is that row's error.

Tokens, as OpenAI publishes them for its vision models: ``detail: low`` costs 85; high
(and auto) scales the image to fit 2048 x 2048, then its shorter side to 768, and costs
85 + 170 per 512-pixel tile. The size of an image sent as bytes is read from its header;
a URL's is unknown here, so it is counted at the most a high-detail image can cost
(768 x 2048: 8 tiles), a bound, as TPM and budgets need.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

__all__ = ["MAX_IMAGE_TOKENS", "image_part", "image_size", "image_tokens", "part_tokens"]

_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
               (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))
BASE_TOKENS, TILE_TOKENS = 85, 170
MAX_IMAGE_TOKENS = BASE_TOKENS + TILE_TOKENS * 8  # 768 x 2048 after scaling: 2 x 4 tiles


def _media_type(data: bytes) -> str | None:
    for sig, mime in _SIGNATURES:
        if data.startswith(sig):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_part(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The chat content part of an image column's value, or (None, the row's error)."""
    if isinstance(value, str) and value.startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": value}}, None
    if isinstance(value, (bytes, bytearray)):
        mime = _media_type(bytes(value))
        if mime is None:
            return None, "image_column: bytes of no known image type (PNG, JPEG, GIF, WebP)"
        url = f"data:{mime};base64,{base64.b64encode(value).decode('ascii')}"
        return {"type": "image_url", "image_url": {"url": url}}, None
    return None, "image_column: neither an image URL nor image bytes"


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF or JPEG header; None if unreadable."""
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:3] == b"GIF" and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    if data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(data) and data[i] == 0xFF:
            marker, size = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return int(w), int(h)
            i += 2 + size
    return None


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """OpenAI's rule: low 85; else 85 + 170 per 512-px tile after scaling."""
    if detail == "low":
        return BASE_TOKENS
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h)) if min(w, h) > 0 else 1.0
    w, h = w * scale, h * scale
    return BASE_TOKENS + TILE_TOKENS * math.ceil(w / 512) * math.ceil(h / 512)


def _url_size(url: str) -> tuple[int, int] | None:
    if not url.startswith("data:") or "," not in url:
        return None
    try:  # the header is within the first few hundred bytes
        head = url.split(",", 1)[1][:4096]
        return image_size(base64.b64decode(head[: len(head) // 4 * 4]))
    except (binascii.Error, ValueError, struct.error):
        return None


def part_tokens(part: Any) -> int:
    """The prompt tokens of a non-text content part: an image by the rule, others 0
    (audio and files are not estimated)."""
    if not isinstance(part, dict) or part.get("type") not in ("image_url", "input_image"):
        return 0
    img = part.get("image_url")
    url = img.get("url") if isinstance(img, dict) else img
    detail = (img.get("detail") if isinstance(img, dict) else part.get("detail")) or "auto"
    if detail == "low":
        return BASE_TOKENS
    size = _url_size(url) if isinstance(url, str) else None
    return image_tokens(*size, detail) if size else MAX_IMAGE_TOKENS
