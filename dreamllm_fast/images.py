"""Input images: loading with clear errors, and CLIP preprocessing (CLIPImageProcessor)."""
from __future__ import annotations

import io
import os
from typing import Any, Sequence

import torch

from .errors import ImageLoadError


def load_image(src: Any):
    """A PIL RGB image from a PIL image, a path, bytes, a [3,H,W]/[H,W,3] array or tensor."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (str, os.PathLike)):
        try:
            with Image.open(src) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise ImageLoadError(f"image file {os.fspath(src)!r} does not exist") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageLoadError(
                f"image file {os.fspath(src)!r} cannot be decoded ({e}); pass a PNG, JPEG or "
                f"another format Pillow reads"
            ) from None
    if isinstance(src, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(src)) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ImageLoadError(f"image bytes cannot be decoded ({e})") from None
    if isinstance(src, torch.Tensor) or type(src).__name__ == "ndarray":
        t = torch.as_tensor(src)
        if t.dim() == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
            t = t.permute(1, 2, 0)
        if t.dim() != 3 or t.shape[-1] != 3:
            raise ImageLoadError(f"image array must be [H, W, 3] or [3, H, W], got {list(t.shape)}")
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                raise ImageLoadError("image array contains NaN or Inf")
            t = (t.clamp(0, 1) * 255).round()
        return Image.fromarray(t.to(torch.uint8).cpu().numpy(), "RGB")
    raise ImageLoadError(
        f"cannot use an object of type {type(src).__name__} as an image; pass a PIL.Image, a "
        f"path, bytes, or an [H, W, 3] array"
    )


class ImagePreprocessor:
    """CLIP preprocessing exactly as the original: resize shortest side (bicubic), center crop,
    rescale by 1/255, normalize with the CLIP mean/std (transformers' CLIPImageProcessor)."""

    def __init__(self, preprocessor_config: dict):
        try:  # transformers >= 5.x names the PIL implementation; the plain name wants torchvision
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        cfg = {k: v for k, v in preprocessor_config.items()
               if k not in ("image_processor_type", "feature_extractor_type", "processor_class")}
        self.processor = CLIPImageProcessor(**cfg)

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """images -> pixel_values [N, 3, S, S] float32."""
        pil = [load_image(im) for im in images]
        return self.processor(images=pil, return_tensors="pt")["pixel_values"]
