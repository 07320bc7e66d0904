"""Public API: `DreamLLMPipeline` for chat, text-to-image and interleaved documents.

The pipeline owns the request logic (validation, prompt layout, the diffusion loop, image
feedback); the decode loop (dreamllm_fast/decoding.py) owns token generation; a backend owns the
model math, through the protocols of dreamllm_fast/backend.py (`Backend`, `Session`,
`DecodeBatch`).

``backend="reference"`` is the transformers + diffusers oracle (dreamllm_fast/reference);
``backend="engine"`` the fast engine (dreamllm_fast/engine); dreamllm_fast/devtools/stub.py a backend
whose math costs nothing (host-overhead benchmark, loop tests).

Each call is a list of named, timed steps (check_inputs -> encode -> prefill -> decode ->
condition -> diffuse -> decode_latents); `last_timings` holds the seconds of the latest call.
"""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .config import SpecialTokens
from .diffusion import (DEFAULT_SAMPLER, check_diffusion_args, check_sampler, decode_latents,
                        denoise, make_noise_scheduler, max_inference_steps, prepare_latents, to_pil)
from .errors import EngineBusyError, InvalidInputError
from .images import ImagePreprocessor
from .loading import BACKENDS, diffusion_backends, load_model, resolve_device_dtype  # noqa: F401 (re-exported)
from .prompt import Prompt, PromptBuilder
from .decoding import DecodeLoop
from .detokenize import StopStrings
from .sampling import SamplingParams, draw_seed

class DreamLLMPipeline:
    """DreamLLM's three jobs behind one object. Serves one call at a time (thread-safe refusal)."""

    def __init__(self, model, tokenizer, progress: bool = True):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.special: SpecialTokens = model.special
        self.prompts = PromptBuilder(tokenizer, self.config, self.special)
        self.preprocess = ImagePreprocessor(self.config.vision.preprocessor)
        self.progress = progress
        # the context: the model's positions, or less when the engine's cache holds fewer
        self.max_len = min(self.config.llm.max_position_embeddings, model.max_len)
        self.run_ahead = True  # the decode loop enqueues step n+1 before reading step n
        self.record_logits = False  # tests: keep every token's logits in last_sequence.logits
        self.last_sequence = None
        self._last_ids: list[int] = []
        self._last_reason: Optional[str] = None
        self.last_timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._uncond: Optional[torch.Tensor] = None  # the empty prompt's condition: a constant
        # Diffusion backends (eager module calls by default; export backends may replace them).
        self.unet = model.unet_eps
        self.vae_decode = model.vae_decode
        self.stepper = None  # the "graphs" U-Net backend's whole-step runner (diffusion.denoise_step)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device, None] = None,
                        dtype: Union[str, torch.dtype, None] = None, backend: Optional[str] = None,
                        unet_backend: str = "eager", vae_backend: str = "eager",
                        progress: bool = True, engine_config=None,
                        weights: Optional[str] = None) -> "DreamLLMPipeline":
        """Load a checkpoint directory in the official release layout, offline.

        device: default "cuda" when available, else "cpu". dtype: default bf16 on CUDA and fp32 on
        the CPU. backend: "engine" (the fast engine; the default on CUDA) or "reference"
        (transformers + diffusers; the default on the CPU, where the engine runs the same torch
        reference ops). engine_config: an `EngineConfig` for the engine's runtime knobs.
        weights: "bf16" (the linears unquantized, in `dtype`), "int8" or "fp8" (every LLaMA linear
        and the LM head quantized per output channel at load; the engine only, so the default
        backend is then the engine on the CPU too; fp8 needs compute capability >= 8.9 on CUDA).
        Default: the checkpoint's own format (bf16, or what `convert --weights` wrote). Overrides
        `engine_config.weights` when both are given.
        """
        model, tok = load_model(path, device, dtype, backend, engine_config, weights)
        pipe = cls(model, tok, progress=progress)
        pipe.set_diffusion_backends(unet_backend, vae_backend)
        return pipe

    def set_diffusion_backends(self, unet: str = "eager", vae: str = "eager", **opts) -> None:
        """Choose how the U-Net and VAE run: "eager" | "compiled" | "onnxruntime" | "tensorrt" |
        "graphs" (captured modules; its U-Net also captures the whole denoising step)."""
        self.unet, self.vae_decode, self.stepper = diffusion_backends(self.model, unet, vae, **opts)

    # ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self):
        """One call at a time; timings reset per call; nothing survives a failed call."""
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError(
                "this pipeline is serving another call; calls are served one at a time: wait for "
                "it, or load a second pipeline"
            )
        self.last_timings = {}
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _step(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            self.last_timings[name] = self.last_timings.get(name, 0.0) + time.perf_counter() - t0

    # -- shared pieces -------------------------------------------------------------------------
    # The public pieces below are what a server's scheduler (serving/batched.py) composes around
    # its own decode loop; they take no lock and time nothing (no device sync): the caller owns
    # the model, as the worker thread of a scheduler does.
    def embed_prompt(self, prompt: Prompt, features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[L, H] embeddings of `prompt` with image features and dream queries substituted.

        features: the projected CLIP features of `prompt.images`, [N, P, H] (computed here when
        None; `encode_pixels` on `preprocess(prompt.images)` gives the same tensor).
        """
        emb = self.model.embed_tokens(prompt.ids).clone()
        if prompt.images:
            feats = self.model.encode_images(self.preprocess(prompt.images)) if features is None \
                else features
            P = feats.shape[1]
            for s, f in zip(prompt.image_slots, feats):
                emb[s:s + P] = f.to(emb.dtype)
        Q = self.model.dream_queries.shape[0]
        for s in prompt.dream_slots:
            emb[s:s + Q] = self.model.dream_queries.to(emb.dtype)
        return emb

    def _embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        feats = None
        if prompt.images:
            with self._step("encode"):
                feats = self.model.encode_images(self.preprocess(prompt.images))
        return self.embed_prompt(prompt, feats)

    def dream_embeds(self) -> torch.Tensor:
        """[1 + Q, H]: `<dream_start>` then the Q dream queries, the dream branch appended to a
        live sequence whose condition rows are 1..Q."""
        return torch.cat([self.model.embed_tokens([self.special.dream_start]), self.model.dream_queries])

    def feedback_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """[P + 3, H]: `<dream_end> <im_start>` + a drawn image's projected features [P, H] +
        `<im_end>`, the pass that feeds a generated image back before text resumes."""
        sp = self.special
        head = self.model.embed_tokens([sp.dream_end, sp.im_start])
        return torch.cat([head, features.to(head.dtype), self.model.embed_tokens([sp.im_end])])

    def uncond_condition(self, negative: Optional[Prompt] = None) -> torch.Tensor:
        """[Q, C] condition of the unconditional branch: a built negative prompt, or (None) the
        empty prompt's, computed once per pipeline and cached."""
        return self._uncond_condition(negative)

    def kv_slots(self) -> tuple[int, Optional[int]]:
        """(used, total) KV-cache slots of the backend; total None: sessions are not bounded."""
        return self.model.kv_slots()

    def _sampling(self, max_new_tokens, do_sample, temperature, top_k, top_p) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p)

    def _condition(self, prompt: Prompt) -> torch.Tensor:
        """Projected condition [Q, C] of a prompt ending with `<dream_start>` + Q query slots."""
        session = self.model.new_session()
        try:
            emb = self._embed_prompt(prompt)
            s = prompt.dream_slots[-1]
            Q = self.model.dream_queries.shape[0]
            with self._step("condition"):
                return session.extend_dream(emb, list(range(s, s + Q)))
        finally:
            session.close()

    def _uncond_condition(self, negative: Optional[Prompt]) -> torch.Tensor:
        """Condition of the unconditional branch: a built negative prompt, or the empty prompt."""
        if negative is None:
            if self._uncond is None:  # "<s> <dream_start> Q..": computed once per model
                self._uncond = self._condition(self.prompts.raw("", dream_queries=True))
            return self._uncond
        return self._condition(negative)

    def _t2i_prompt(self, content) -> Prompt:
        p = self.prompts.raw(content, dream_queries=True)
        self.prompts.check_fits(p, 0, self.max_len, "the text-to-image prompt")
        return p

    @staticmethod
    def _is_batch(prompt: Any) -> bool:
        """A list of strings, or a list of lists, is a batch; anything else is one prompt."""
        return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
            isinstance(p, (str, list, tuple)) for p in prompt)

    # -- text-to-image -------------------------------------------------------------------------
    def encode_condition(self, prompt, negative_prompt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The U-Net conditioning of a prompt: (cond, uncond), each [B, Q, cross_attention_dim].

        prompt: text, or content mixing text and images (in-context generation), or a batch
        (a list of texts or of content lists). negative_prompt: same batch size, or None for the
        empty prompt (the model's constant unconditional embedding).
        """
        with self._call():
            return self._encode_condition(prompt, negative_prompt)

    def _encode_condition(self, prompt, negative_prompt):
        with self._step("check_inputs"):
            prompts = list(prompt) if self._is_batch(prompt) else [prompt]
            if negative_prompt is None:
                negs = [None] * len(prompts)
            else:
                negs = list(negative_prompt) if self._is_batch(negative_prompt) else [negative_prompt]
                if len(negs) != len(prompts):
                    raise InvalidInputError(
                        f"negative_prompt has {len(negs)} entries but prompt has {len(prompts)}"
                    )
            built = [self._t2i_prompt(p) for p in prompts]
            negs = [None if n is None else self._t2i_prompt(n) for n in negs]
        # Each row runs on its own (unpadded): the original's padded batches shift positions by
        # the pad count, which is an artifact, not the model.
        cond = torch.stack([self._condition(p) for p in built])
        uncond = torch.stack([self._uncond_condition(n) for n in negs])
        return cond, uncond

    def text_to_image(self, prompt, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                      negative_prompt=None, generator: Optional[torch.Generator] = None,
                      latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                      num_images_per_prompt: int = 1, height: Optional[int] = None,
                      width: Optional[int] = None, progress: Optional[bool] = None,
                      sampler: str = DEFAULT_SAMPLER):
        """Generate images. output_type "pil" -> list of PIL images; "pt" -> [B, 3, H, W] in [0, 1].

        Randomness follows diffusers: initial latents from `generator` first, then each DDPM
        step's noise from the same generator. sampler: "ddpm" (the original's, the default),
        "dpmpp-2m" or "unipc" (diffusers' multistep schedulers: fewer steps, not the model's
        evaluated setting; see the README).
        """
        with self._call():
            if output_type not in ("pil", "pt"):
                raise InvalidInputError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
            if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
                raise InvalidInputError(
                    f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
            check_diffusion_args(num_inference_steps, guidance_scale,
                                 max_inference_steps(self.config.diffusion.scheduler))
            check_sampler(sampler)
            shape = self._latent_shape(height, width)
            cond, uncond = self._encode_condition(prompt, negative_prompt)
            cond = cond.repeat_interleave(num_images_per_prompt, 0)
            uncond = uncond.repeat_interleave(num_images_per_prompt, 0)
            images = self._diffuse(cond, uncond, guidance_scale, num_inference_steps, generator,
                                   latents, shape, progress, sampler)
            return images if output_type == "pt" else to_pil(images)

    def latent_shape(self, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of a height x width image (None: the native size)."""
        return self._latent_shape(height, width)

    def _latent_shape(self, height, width) -> tuple[int, int, int]:
        d = self.config.diffusion
        f = d.vae_scale_factor
        h = height or d.default_resolution
        w = width or d.default_resolution
        for name, v in (("height", h), ("width", w)):
            if not isinstance(v, int) or v < f or v % f:
                raise InvalidInputError(f"{name} must be a positive multiple of {f}, got {v!r}")
        return d.latent_channels, h // f, w // f

    def _diffuse(self, cond, uncond, guidance_scale, steps, generator, latents, shape, progress,
                 sampler: str = DEFAULT_SAMPLER):
        """[B, Q, C] conditions -> images [B, 3, H, W] in [0, 1]."""
        d = self.config.diffusion
        with self._step("diffuse"):
            lat = prepare_latents((cond.shape[0],) + tuple(shape), cond.dtype, self.model.device,
                                  generator, latents)
            lat = denoise(self.unet, make_noise_scheduler(d.scheduler, sampler), cond, uncond,
                          guidance_scale, steps, lat, generator,
                          progress=self.progress if progress is None else progress,
                          stepper=self.stepper)
        with self._step("decode_latents"):
            return decode_latents(self.vae_decode, lat, d.vae_scaling_factor)

    # -- chat ----------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stream: bool = False,
             generator: Optional[torch.Generator] = None,
             stop: Union[str, Sequence[str], None] = None) -> Union[str, Iterator[str]]:
        """Answer the last user message (text and images) with text.

        Stops at `</s>`, at id 1 (the original's legacy eos), at `<dream_start>` (drawing is
        `generate`'s job), after max_new_tokens, or where a `stop` string appears (neither it nor
        anything after it is returned). stream=True returns an iterator of text pieces.
        """
        sp = self._sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        stop = StopStrings(stop).stops  # a bad value fails here, before any work
        prompt = self.prompts.chat(messages)
        self.prompts.check_fits(prompt, sp.max_new_tokens, self.max_len, "the chat request")
        it = self._chat_stream(prompt, sp, generator, stop)
        return it if stream else "".join(it)

    def _chat_stream(self, prompt, sp, generator, stop) -> Iterator[str]:
        with self._call():
            stops = {self.special.eos, self.special.bos, self.special.dream_start}
            yield from self._decode_text(prompt, sp, generator, stops, images=None, stop=stop)

    def last_token_ids(self) -> list[int]:
        """The token ids generated by the latest chat/generate/complete call (for tests)."""
        return list(self._last_ids)

    def last_finish_reason(self) -> Optional[str]:
        """Why the latest chat/generate/complete call ended: "stop" (a stop token or a `stop`
        string), "length", "context", "max_images" (an image it did not draw), "cancelled" (the
        stream was closed early) or "error"; None before any call."""
        return self._last_reason

    def _decode_text(self, prompt: Prompt, sp: SamplingParams, generator, stops, images, stop=()):
        """Prefill, then the decode loop with this one sequence; yields text pieces, and PIL images
        when `images` is a dict of diffusion settings (interleaved generation: `<dream_start>`
        pauses the sequence, the dream branch runs here, the sequence resumes after the image).

        Randomness: a sampled request draws one seed from `generator` before anything else; its
        tokens' noise is a function of (seed, position), and the generator goes on to drive the
        diffusion noise. A greedy request draws nothing.
        """
        self._last_ids: list[int] = []
        self._last_reason: Optional[str] = None
        seq = None
        seed = draw_seed(generator) if sp.do_sample else 0
        session = self.model.new_session()
        loop = DecodeLoop(self.model, self.tokenizer, self.max_len, run_ahead=self.run_ahead,
                          record_logits=self.record_logits)
        try:
            emb = self._embed_prompt(prompt)
            with self._step("prefill"):
                logits = session.extend(emb)
            pause = {self.special.dream_start} if images is not None else ()
            seq = loop.add(session, logits, sp, seed, stop_ids=stops, pause_ids=pause,
                           stop_strings=stop)
            self.last_sequence = seq
            n_images = 0
            Q, P = self.model.dream_queries.shape[0], self.config.vision.num_patches
            while not seq.finished:
                t0 = time.perf_counter()
                events = loop.step()
                self.last_timings["decode"] = self.last_timings.get("decode", 0.0) + time.perf_counter() - t0
                for ev in events:
                    if ev.text:
                        yield ev.text
                    if ev.kind == "pause":
                        # <dream_start> Q.. then the image span: stop if the context cannot hold it.
                        if n_images >= images["max_images"]:
                            loop.finish(seq, "max_images")
                            break
                        if session.length + Q + P + 4 > self.max_len:
                            loop.finish(seq, "context")
                            break
                        image, logits = self._dream(session, images, generator)
                        n_images += 1
                        yield image
                        loop.resume(seq, logits)
        finally:
            try:
                loop.close()
            finally:
                if seq is not None:
                    self._last_ids = seq.token_ids
                    self._last_reason = seq.finish_reason
                session.close()

    def _dream(self, session, opts, generator):
        """Queries into the live cache -> condition -> image -> fed back; returns (image, logits)."""
        Q = self.model.dream_queries.shape[0]
        emb = self.dream_embeds()
        with self._step("condition"):
            cond = session.extend_dream(emb, list(range(1, Q + 1)))
        if opts["uncond"] is None:  # once per call: every image of the answer shares it
            opts["uncond"] = self._uncond_condition(opts["negative_prompt"])
        uncond = opts["uncond"]
        images = self._diffuse(cond[None], uncond[None], opts["guidance_scale"],
                               opts["num_inference_steps"], generator, None,
                               self._latent_shape(None, None), None, opts["sampler"])
        pil = to_pil(images)[0]
        with self._step("encode"):
            feats = self.model.encode_images(self.preprocess([pil]))[0]
        back = self.feedback_embeds(feats)
        with self._step("prefill"):
            logits = session.extend(back)
        return pil, logits

    # -- interleaved ---------------------------------------------------------------------------
    def generate(self, messages: Sequence[dict], max_new_tokens: int = 512, max_images: int = 4,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, negative_prompt=None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, generator: Optional[torch.Generator] = None,
                 sampler: str = DEFAULT_SAMPLER, stop: Union[str, Sequence[str], None] = None) -> list:
        """An interleaved answer: a list of text strings and PIL images, in order.

        Whenever the model emits `<dream_start>`, the dream queries are appended to the live
        cache, an image is drawn from their condition, and it is fed back as
        `<dream_end> <im_start> features <im_end>` before text resumes. `stop` strings end the
        answer where they appear (within one text segment: never across an image).
        """
        sp = self._sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        return self._interleave(self.prompts.chat(messages), sp, max_images, num_inference_steps,
                                guidance_scale, negative_prompt, generator, "the generate request",
                                sampler, stop)

    def complete(self, content, max_new_tokens: int = 128, max_images: int = 4,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, negative_prompt=None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, generator: Optional[torch.Generator] = None,
                 sampler: str = DEFAULT_SAMPLER, stop: Union[str, Sequence[str], None] = None) -> list:
        """Raw continuation of `<s>` + content, without the chat template (in-context few-shot:
        "<img> This is a Welsh Corgi. <img> This is a Koala. <img> This is"). Returns the same
        list of texts and images as `generate` (`stop` as there)."""
        sp = self._sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        return self._interleave(self.prompts.raw(content), sp, max_images, num_inference_steps,
                                guidance_scale, negative_prompt, generator, "the completion", sampler,
                                stop)

    def _interleave(self, prompt, sp, max_images, steps, guidance_scale, negative_prompt,
                    generator, what, sampler: str = DEFAULT_SAMPLER, stop=None) -> list:
        if not isinstance(max_images, int) or max_images < 0:
            raise InvalidInputError(f"max_images must be an integer >= 0, got {max_images!r}")
        check_diffusion_args(steps, guidance_scale,
                             max_inference_steps(self.config.diffusion.scheduler))
        check_sampler(sampler)
        stop = StopStrings(stop).stops
        self.prompts.check_fits(prompt, sp.max_new_tokens, self.max_len, what)
        negative = None if negative_prompt is None else self._t2i_prompt(negative_prompt)
        opts = dict(max_images=max_images, num_inference_steps=steps,
                    guidance_scale=guidance_scale, negative_prompt=negative, uncond=None,
                    sampler=sampler)
        out: list = []
        with self._call():
            for piece in self._decode_text(prompt, sp, generator,
                                           {self.special.eos, self.special.bos}, images=opts,
                                           stop=stop):
                if isinstance(piece, str) and out and isinstance(out[-1], str):
                    out[-1] += piece
                else:
                    out.append(piece)
        return out
