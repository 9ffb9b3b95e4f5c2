"""Image decoding and the resize + crop: ONE implementation, used by prepare and both loaders.

decode_image: encoded bytes -> (3, H, W) uint8 RGB, EXIF orientation applied. JPEG and plain 8-bit
PNG go through libjpeg-turbo / libpng in torchvision (the fast path); every other image (alpha,
palette with transparency, 16-bit, WebP, BMP, ...) goes through PIL and to_rgb, so any mode becomes
RGB the same way everywhere (alpha composited on white, 16-bit rescaled, not clipped).

resize_crop: the DDPM/ADM preprocessing: the shorter side to `size` with an antialiased bicubic
filter, then a square crop (centered, or at a given position along the longer side). ADM's
center_crop_arr first halves big images with PIL's BOX filter; that was a speed trick of PIL-era
code. torch's antialiased bicubic (the same kernel as PIL's, on uint8 with AVX2) needs no
pre-halving: at 256px it lands within 0.08/255 on average of ADM's result, and decode + resize
costs 1.6 ms instead of 3.8 ms for a 200-640px JPEG (measured on this repo's 2-core CPU box).
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the sample parts read as images, in this order
# Decompression-bomb guard stays on, but at a size that admits 1024x1024 CelebA-HQ and big LSUN scans.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000

# torchvision marks its image codecs deprecated in favour of torchcodec, yet decode_jpeg is still
# the fastest libjpeg-turbo path measured here. frombuffer warns (once) on the read-only bytes the
# decoders only read; a filter here costs nothing per image, a catch_warnings block 6 us.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class ImageError(ValueError):
    """An image that cannot be decoded; the message is a readable reason (no object addresses)."""


def sniff_ext(data: bytes) -> str:
    """The image type from the magic bytes: jpg, png, webp, gif, bmp, or '' when unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return ""


def _plain_png(data: bytes) -> bool:
    """8-bit gray or RGB PNG without transparency: libpng's RGB output equals PIL + to_rgb."""
    # IHDR is the first chunk: bit depth at byte 24, colour type at byte 25 (0 gray, 2 RGB).
    if len(data) < 26 or data[24] != 8 or data[25] not in (0, 2):
        return False
    idat = data.find(b"IDAT")
    return b"tRNS" not in data[: idat if idat > 0 else len(data)]


def _torchvision_reason(e: Exception) -> str:
    # "decode_jpeg, /path/to/decode_jpeg.cpp:171, Image is incomplete or truncated" -> the last part
    msg = str(e).strip()
    return re.sub(r"^\w+, \S+:\d+, ", "", msg) or type(e).__name__


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, I, F, LA, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: PIL's convert("L") clips at 255, so rescale the real range.
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite transparency on white instead of exposing whatever colour sits under alpha=0.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def from_pil(img: Image.Image) -> Tensor:
    """(3, H, W) uint8 RGB of a PIL image, EXIF orientation applied (any mode, as decode_image)."""
    arr = np.array(to_rgb(ImageOps.exif_transpose(img)))  # (H, W, 3) uint8, a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W) with HWC strides, like decode_jpeg


def _decode_pil(data: bytes) -> Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces a full decode, so truncated files fail here, not later
            return from_pil(img)
    except UnidentifiedImageError:
        raise ImageError(f"not an image of a known type ({len(data)} bytes)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def decode_image(data: bytes, ext: str = "") -> Tensor:
    """(3, H, W) uint8 RGB of encoded bytes (the type is read from the bytes; `ext` is only a hint)."""
    if not data:
        raise ImageError("empty (0 bytes)")
    kind = sniff_ext(data) or ext.lower()
    if kind in ("jpg", "jpeg") or (kind == "png" and _plain_png(data)):
        import torchvision.io as tio

        raw = torch.frombuffer(data, dtype=torch.uint8)  # zero-copy view; the decoders only read it
        try:
            if kind == "png":
                return tio.decode_png(raw, mode=tio.ImageReadMode.RGB, apply_exif_orientation=True)
            return tio.decode_jpeg(raw, mode=tio.ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError as e:
            raise ImageError(_torchvision_reason(e)) from None
    return _decode_pil(data)


def resize_crop(img: Tensor, size: int, pos: float | None = None) -> Tensor:
    """(3, size, size) uint8: shorter side to `size` (antialiased bicubic), then a square crop.

    pos None: the center crop (ADM's offset (n - size) // 2); pos u in [0, 1): a crop at offset
    floor((n - size + 1) * u) along the longer side (uniform over all offsets for a uniform u).
    """
    _, h, w = img.shape
    if h == w == size:
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        # (1, 3, H, W) uint8 in HWC memory: torch's vectorised uint8 path, output in the same layout.
        img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True)[0]

    def offset(n: int) -> int:
        if pos is None:
            return (n - size) // 2
        return min(n - size, int((n - size + 1) * pos))

    top, left = offset(nh), offset(nw)
    return img[:, top : top + size, left : left + size]


def is_upscaled(img: Tensor, size: int) -> bool:
    """Whether resize_crop(img, size) enlarges the image (its shorter side is below size)."""
    return min(img.shape[-2:]) < size


def encode_image(img: Tensor, fmt: str, quality: int = 95) -> bytes:
    """JPEG (at `quality`) or PNG bytes of a (3, H, W) uint8 image."""
    pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")
    out = io.BytesIO()
    if fmt == "jpeg":
        pil.save(out, format="JPEG", quality=quality)
    else:
        pil.save(out, format="PNG", compress_level=6)
    return out.getvalue()
