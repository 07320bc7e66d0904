"""Live progress of an image being drawn inside a streamed chat answer.

While an interleaved answer's image is denoised, the batched scheduler (batched.py
`_image_step`) emits an `ImageProgress` event after each U-Net step; app.py streams it as an
extra field of the choice's delta, next to (never instead of) the OpenAI fields:

    {"index": 0, "delta": {"image_progress": {"step": 12, "steps": 50,
                                              "preview": "data:image/png;base64,..."}}, ...}

`preview` comes every `preview_every(steps)` steps (at most ten per image, never at the last step:
the image itself follows). It is the latents seen through a fixed linear map from the 4 latent
channels to RGB (`LATENT_RGB`), the widely used cheap approximation of what the VAE would
decode, at latent resolution (64 x 64 for a 512 x 512 image): one [h*w, 4] x [4, 3] product, no
VAE. Clients that do not know the field ignore it (the official `openai` client keeps it in
`delta.model_extra`; tests/serving/test_webui_progress.py checks that it parses every chunk).

The worker thread never waits for the preview: on a GPU the small product is copied to host
memory asynchronously with an event, and the PNG is encoded on the event loop's thread pool
(`ImageProgress.delta`), which waits for that event.
"""
from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

# latent channel -> (R, G, B) for Stable Diffusion's 4-channel VAE latents (unscaled, as the
# sampler holds them); the output is roughly in [-1, 1]
LATENT_RGB = ((0.298, 0.207, 0.208),
              (0.187, 0.286, 0.173),
              (-0.158, 0.189, 0.264),
              (-0.184, -0.271, -0.473))
MAX_PREVIEWS = 10
log = logging.getLogger("dreamllm_fast.serving")


def preview_every(steps: int) -> int:
    """Steps between two previews: at most `MAX_PREVIEWS` per image, and never every step."""
    return max(2, math.ceil(steps / MAX_PREVIEWS))


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """latents [1, 4, h, w] (any device, any float dtype) -> uint8 RGB [h, w, 3] on the same
    device (no sync)."""
    if latents.dim() != 4 or latents.shape[1] != len(LATENT_RGB):
        raise ValueError(f"a preview needs latents [1, {len(LATENT_RGB)}, h, w], got "
                         f"{list(latents.shape)}")
    m = _MAPS.get(latents.device)
    if m is None:  # once per device: a host-to-device copy is a sync
        m = _MAPS[latents.device] = torch.tensor(LATENT_RGB, dtype=torch.float32,
                                                 device=latents.device).mul_(127.5)
    rgb = torch.matmul(latents[0].float().permute(1, 2, 0), m)  # [h, w, 3] in ~[-127.5, 127.5]
    return rgb.add_(127.5).clamp_(0, 255).to(torch.uint8)


_MAPS: dict = {}


class Preview:
    """A preview on its way to the host: started on the worker, read on the event loop."""

    def __init__(self, rgb: torch.Tensor):
        self.event = None
        if rgb.device.type == "cuda":
            host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
            host.copy_(rgb, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            rgb = host
        self.rgb = rgb

    def png_data_url(self) -> str:
        from PIL import Image

        if self.event is not None:
            self.event.synchronize()
        buf = io.BytesIO()
        Image.fromarray(self.rgb.numpy(), "RGB").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class ImageProgress:
    """Choice `index` has taken `step` of the `steps` U-Net steps of its current image."""

    index: int
    step: int
    steps: int
    preview: Optional[Preview] = None

    def delta(self) -> dict:
        """The chunk's delta (encodes the preview PNG: run it off the event loop if it has one)."""
        p = {"step": self.step, "steps": self.steps}
        if self.preview is not None:
            p["preview"] = self.preview.png_data_url()
        return {"image_progress": p}


def progress_event(index: int, step: int, steps: int, latents: torch.Tensor) -> ImageProgress:
    """The event after `step` of `steps` steps, with a preview of `latents` when one is due. A
    preview that fails is left out (logged): it must never fail the image it shows."""
    preview = None
    if step < steps and step % preview_every(steps) == 0 and latents.shape[1] == len(LATENT_RGB):
        try:
            preview = Preview(latent_preview(latents))
        except Exception:  # noqa: BLE001 - a nicety; the image goes on
            log.exception("the latent preview failed; sending progress without it")
    return ImageProgress(index, step, steps, preview)
