"""Decode any image PIL reads into uint8 RGB, cheaply and defensively.

- JPEGs decode at 1/2, 1/4 or 1/8 scale when that still covers the target (PIL's draft, a
  DCT-domain reduction); other formats are shrunk by an integer box reduction (Image.reduce)
  down to no less than twice the target, before the exact resize that follows.
- A decompression-bomb guard refuses images whose decoded pixel count (after draft) exceeds
  MAX_PIXELS, reading only the header.
- EXIF orientation is applied; CMYK, palette, grayscale, RGBA/LA (alpha dropped, as
  torchvision's loader does) and 16-bit images become 8-bit RGB.
- Truncated, corrupt and empty files raise BadImage with a one-line reason.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFile, ImageOps

MAX_PIXELS = 1 << 26  # decoded pixels (8192 x 8192); larger images are skipped as bombs
# PIL's own guard refuses a huge JPEG at open(), before draft() could decode it at 1/8 scale;
# the guard above replaces it and runs after draft().
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never half-grey


class BadImage(ValueError):
  """An image that cannot be decoded; the message says why."""


def _sixteen_bit(im: Image.Image) -> Image.Image:
  """16-bit (or 32-bit integer) grayscale -> 8-bit by the top byte (x / 257, rounded)."""
  a = np.asarray(im).astype(np.float64)
  return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), 'L')


def _float(im: Image.Image) -> Image.Image:
  a = np.asarray(im, np.float64)
  a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a  # [0, 1] floats are common
  return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), 'L')


# mode -> function to an 8-bit mode that convert('RGB') handles without warnings or clipping
_TO_8BIT = {'I;16': _sixteen_bit, 'I;16L': _sixteen_bit, 'I;16B': _sixteen_bit,
            'I;16N': _sixteen_bit, 'I': _sixteen_bit, 'F': _float,
            'P': lambda im: im.convert('RGBA'), 'PA': lambda im: im.convert('RGBA')}


def target_size(w: int, h: int, size: int) -> tuple[int, int]:
  """(w, h) after scaling the longer side to `size` (never enlarging: upsampling is the
  resize's job)."""
  s = min(1.0, size / max(w, h))
  return max(1, math.ceil(w * s)), max(1, math.ceil(h * s))


def decode(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """uint8 (H, W, 3) RGB, upright, with the longer side >= min(size, original longer side)."""
  if not data:
    raise BadImage('empty file (0 bytes)')
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      tw, th = target_size(w, h, size)
      if im.format == 'JPEG':
        im.draft('RGB', (tw, th))  # keeps both sides >= the target
      dw, dh = im.size
      if dw * dh > max_pixels:
        raise BadImage(f'{w}x{h} pixels ({dw}x{dh} after draft) exceed the decompression-bomb '
                       f'limit of {max_pixels} pixels')
      im.load()
      factor = min(dw // tw, dh // th) // 2
      if factor >= 2:
        im = im.reduce(factor)
      try:
        im = ImageOps.exif_transpose(im)
      except Exception:  # pylint: disable=broad-except  # a malformed EXIF block: keep as is
        pass
      im = _TO_8BIT.get(im.mode, lambda x: x)(im)
      return np.asarray(im.convert('RGB'))
  except BadImage:
    raise
  except Image.UnidentifiedImageError:
    raise BadImage('not an image PIL can identify (corrupt or unknown format)') from None
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
    raise BadImage(f'{type(e).__name__}: {e}') from None
