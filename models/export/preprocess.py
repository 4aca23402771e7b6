"""Reference image preprocessing for the bundled EfficientNet-Lite0 model.

This is the single definition the Rust side mirrors:
  1. decode, apply EXIF orientation (PIL ImageOps.exif_transpose), convert('RGB')
     (alpha is dropped, not composited; grayscale is replicated to 3 channels);
  2. resize so the SHORTER side is 256 with PIL BILINEAR; the other side is
     round(long * 256 / short), rounding half up;
  3. center crop 224x224 at left = floor((w - 224) / 2), top = floor((h - 224) / 2);
  4. float32 (x - 127) / 128, NCHW, RGB.
"""
import numpy as np
from PIL import Image, ImageOps

RESIZE_SHORTER = 256
CROP = 224
MEAN = 127.0
STD = 128.0


def resized_size(w: int, h: int, shorter: int = RESIZE_SHORTER):
    """(new_w, new_h) with the shorter side == `shorter`, other side rounded half up."""
    if w <= h:
        return shorter, (h * shorter * 2 + w) // (2 * w)
    return (w * shorter * 2 + h) // (2 * h), shorter


def load_rgb(path) -> Image.Image:
    img = Image.open(path)
    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def preprocess_pil(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 array [1, 3, 224, 224]."""
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = resized_size(w, h)
    img = img.resize((nw, nh), Image.BILINEAR)
    left = (nw - CROP) // 2
    top = (nh - CROP) // 2
    img = img.crop((left, top, left + CROP, top + CROP))
    x = np.asarray(img, dtype=np.float32)  # HWC
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None, ...])


def preprocess_path(path) -> np.ndarray:
    return preprocess_pil(load_rgb(path))
