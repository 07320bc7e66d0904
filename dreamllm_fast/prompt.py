"""Prompt construction: the chat template, special-token spans, and the embedding plan.

The layout follows the original DreamLLM's:
- an input image is ``<im_start>`` + P x ``<im_patch>`` + ``<im_end>`` whose P patch slots are
  overwritten by the projected CLIP features (P = 256 for the released model);
- an image the assistant generated earlier is the dream span ``<dream_start>`` + Q query slots +
  ``<dream_end>`` followed by that image's span (Q = 64 for the released model);
- chat uses the "vicuna_v1.1" template the model was fine-tuned on; text-to-image and ``complete``
  use the raw content after ``<s>``.

The whole prompt is written as one string with the literal special tokens and tokenized once, as the
original does, so the legacy SentencePiece spacing around special tokens is reproduced exactly. The
result is a `Prompt`: token ids plus the positions whose embeddings are substituted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, Union

from .config import DreamLLMConfig, SpecialTokens
from .errors import ContextOverflowError, InvalidInputError

SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"user": "USER", "assistant": "ASSISTANT"}


class _Image:
    """Marker for an image inside normalized content (holds the raw object, loaded later)."""

    __slots__ = ("source",)

    def __init__(self, source):
        self.source = source


Item = Union[str, _Image]


def _is_image_like(x: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    import torch

    return isinstance(x, (Image.Image, torch.Tensor)) or type(x).__name__ == "ndarray"


def normalize_content(content: Any) -> list[Item]:
    """Content as a list of text strings and image markers.

    Accepts a string, a PIL image (or tensor/array), an `os.PathLike` to an image file, a dict
    ``{"type": "text", "text": ...}`` / ``{"type": "image", "image": ...}``, or a list of these.
    A plain string is always text; to pass an image by file name use a `pathlib.Path` or a dict.
    """
    if isinstance(content, (str, dict)) or _is_image_like(content) or isinstance(content, os.PathLike):
        content = [content]
    if not isinstance(content, (list, tuple)):
        raise InvalidInputError(
            f"content must be a string, an image, or a list of them; got {type(content).__name__}"
        )
    out: list[Item] = []
    for x in content:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            kind = x.get("type")
            if kind == "text" and isinstance(x.get("text"), str):
                out.append(x["text"])
            elif kind == "image" and x.get("image") is not None:
                out.append(_Image(x["image"]))
            else:
                raise InvalidInputError(
                    f"content dict must be {{'type': 'text', 'text': str}} or "
                    f"{{'type': 'image', 'image': PIL.Image | path}}; got keys {sorted(x)}"
                )
        elif _is_image_like(x) or isinstance(x, os.PathLike):
            out.append(_Image(x))
        else:
            raise InvalidInputError(
                f"content item of type {type(x).__name__} is neither text nor an image"
            )
    return out


@dataclass
class Prompt:
    """Token ids of a prompt and where embeddings replace the placeholder tokens.

    ids:          [L] token ids (placeholders included)
    image_slots:  start position of each image's P feature slots, in the order of `images`
    dream_slots:  start position of each dream span's Q query slots
    images:       the raw image objects for `image_slots` (loaded and encoded by the pipeline)
    """

    ids: list[int]
    image_slots: list[int] = field(default_factory=list)
    dream_slots: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class PromptBuilder:
    """Builds `Prompt`s for one tokenizer and model config."""

    def __init__(self, tokenizer, config: DreamLLMConfig, special: SpecialTokens):
        self.tok = tokenizer
        self.cfg = config
        self.sp = special
        P, Q = config.vision.num_patches, config.num_dream_queries
        self._image_span = "<im_start>" + "<im_patch>" * P + "<im_end>"
        self._dream_span = "<dream_start>" + "<im_patch>" * Q + "<dream_end>"

    # -- strings ------------------------------------------------------------------------------
    def _render_items(self, items: Sequence[Item], generated: bool, images: list, join: str) -> str:
        """Text with image spans; `generated` images (assistant turns) carry their dream span.

        join: what separates an image from adjacent text ("\n" in chat turns, "" in the raw
        modes). An argument, not builder state: one builder serves concurrent calls (the server
        tokenizes requests on several threads while its worker builds prompts).
        """
        parts: list[str] = []
        prev_image = False
        for i, it in enumerate(items):
            if isinstance(it, _Image):
                span = (self._dream_span if generated else "") + self._image_span
                # LLaVA-style data: "<image>\n" + text, so an image and a text are joined by "\n"
                # in chat turns (the raw modes below pass join="").
                if parts and not prev_image and join:
                    parts.append(join)
                parts.append(span)
                images.append(it.source)
                prev_image = True
            else:
                if prev_image and join:
                    parts.append(join)
                parts.append(it)
                prev_image = False
        return "".join(parts)

    def _check_text(self, items: Iterable[Item]) -> None:
        for it in items:
            if isinstance(it, str):
                for t in ("<im_start>", "<im_end>", "<im_patch>", "<dream_start>", "<dream_end>"):
                    if t in it:
                        raise InvalidInputError(
                            f"text contains the special token {t!r}; pass images as image items "
                            f"(PIL.Image, pathlib.Path or {{'type': 'image'}}), not as token strings"
                        )

    def chat_text(self, messages: Sequence[dict], images: list) -> str:
        """The vicuna_v1.1 SFT prompt, ending with the open "ASSISTANT:" turn."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidInputError("messages must be a non-empty list of {'role', 'content'} dicts")
        system = SYSTEM_MESSAGE
        msgs = list(messages)
        if isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
            sys_items = normalize_content(msgs[0].get("content", ""))
            if any(isinstance(x, _Image) for x in sys_items):
                raise InvalidInputError("the system message cannot contain images")
            system = "".join(sys_items)
            msgs = msgs[1:]
        text = system + " "
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidInputError(f"message {i} must be a dict with 'role' and 'content'")
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                raise InvalidInputError(
                    f"message {i} has role {m['role']!r}; roles must alternate user, assistant, "
                    f"... starting with user (after an optional system message)"
                )
            items = normalize_content(m["content"])
            self._check_text(items)
            body = self._render_items(items, generated=(want == "assistant"), images=images, join="\n")
            text += f"{ROLES[want]}: {body}" + (" " if want == "user" else "</s>")
        if not msgs or msgs[-1]["role"] != "user":
            raise InvalidInputError("the last message must be from the user (the assistant answers it)")
        return text + "ASSISTANT:"

    def raw_text(self, content: Any, images: list) -> str:
        items = normalize_content(content)
        self._check_text(items)
        return self._render_items(items, generated=False, images=images, join="")

    # -- ids ----------------------------------------------------------------------------------
    def tokenize(self, text: str, images: list, dream_queries: bool = False) -> Prompt:
        """Tokenize (with BOS) and locate the substitution slots.

        dream_queries: append ``<dream_start>`` + Q query slots (the text-to-image condition).
        """
        ids = list(self.tok(text, add_special_tokens=True).input_ids)
        if not ids or ids[0] != self.sp.bos:
            ids = [self.sp.bos] + ids
        if dream_queries:
            ids += [self.sp.dream_start] + [self.sp.im_patch] * self.cfg.num_dream_queries
        P, Q = self.cfg.vision.num_patches, self.cfg.num_dream_queries
        image_slots = [i + 1 for i, t in enumerate(ids) if t == self.sp.im_start]
        dream_slots = [i + 1 for i, t in enumerate(ids) if t == self.sp.dream_start]
        for s in image_slots:
            if ids[s:s + P] != [self.sp.im_patch] * P or (s + P < len(ids) and ids[s + P] != self.sp.im_end):
                raise InvalidInputError("malformed image span in the prompt")  # pragma: no cover
        for s in dream_slots:
            if ids[s:s + Q] != [self.sp.im_patch] * Q:
                raise InvalidInputError("malformed dream span in the prompt")  # pragma: no cover
        if len(image_slots) != len(images):  # pragma: no cover - guarded by _check_text
            raise InvalidInputError(f"{len(images)} images but {len(image_slots)} image spans")
        return Prompt(ids=ids, image_slots=image_slots, dream_slots=dream_slots, images=list(images))

    def chat(self, messages: Sequence[dict]) -> Prompt:
        images: list = []
        return self.tokenize(self.chat_text(messages, images), images)

    def raw(self, content: Any, dream_queries: bool = False) -> Prompt:
        images: list = []
        return self.tokenize(self.raw_text(content, images), images, dream_queries=dream_queries)

    def check_fits(self, prompt: Prompt, extra: int, max_len: int, what: str) -> None:
        """Refuse, before any work, a request that cannot fit the context."""
        need = len(prompt) + extra
        if need > max_len:
            n_img = len(prompt.images)
            raise ContextOverflowError(
                f"{what} needs {need} positions ({len(prompt)} prompt tokens, including "
                f"{n_img} image span(s) of {self.cfg.image_span_len} tokens, + {extra} to generate) "
                f"but the context holds {max_len}; shorten the prompt, pass fewer images, or lower "
                f"max_new_tokens"
            )
