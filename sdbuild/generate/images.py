"""Image files in and out, and the pixel arithmetic around them (float32 [H, W, 3] in [0, 1])."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sdbuild.generate.errors import GenerationError


def image_file_name(prompt: str, seed: int, index: int | None = None) -> str:
    """``<prompt words joined by _>[.<index>].<seed>.final.png``, as the seed's CLIs name images.

    The prompt part keeps at most 75 characters, and none that a file name cannot hold.
    """
    stem = "_".join(prompt.split())[:75]
    stem = re.sub(r"[/\\:*?\"<>|\x00-\x1f]", "_", stem) or "image"
    return f"{stem}{'' if index is None else f'.{index}'}.{seed}.final.png"


def load_image(path: Path, flag: str = "--image", mode: str = "RGB") -> np.ndarray:
    """An image file as float32 [height, width, 3] in [0, 1] (``mode`` ``L``: [height, width]); ``flag`` names it in errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode), np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise GenerationError(f"{flag} {path}: not an image Pillow can read ({type(e).__name__})") from None


def load_mask(path: Path) -> np.ndarray:
    """A mask image file as float32 [height, width] in [0, 1] (grayscale, as diffusers' mask processor converts it)."""
    return load_image(path, "--mask", mode="L")


def save_png(image: np.ndarray, path: Path, settings: dict) -> Path:
    """Write ``image`` [H, W, 3] in [0, 1] as a PNG with ``settings`` in its text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("software", "sdbuild")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path, pnginfo=info)
    return path


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[.., 3] in [0, 1] → uint8, rounded as diffusers' numpy_to_pil does."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image.astype(np.float32)
    return np.asarray(Image.fromarray(to_uint8(image)).resize((width, height), Image.BICUBIC), np.float32) / 255.0


# CLIP's image normalization (what the safety checker's feature extractor applies).
_CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
_CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


def _clip_pixels(image: np.ndarray, size: int = 224) -> np.ndarray:
    """CLIPImageProcessor's defaults: shortest side to ``size`` (bicubic), centre crop, normalize → [1, 3, size, size]."""
    from PIL import Image

    pil = Image.fromarray(to_uint8(image))
    scale = size / min(pil.size)
    pil = pil.resize((max(size, round(pil.width * scale)), max(size, round(pil.height * scale))), Image.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    pixels = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return ((pixels - _CLIP_MEAN) / _CLIP_STD).transpose(2, 0, 1)[None].astype(np.float32)
