"""`dreamllm-fast serve`: its flags and the server's start (dreamllm_fast/cli.py registers them).

Nothing of the server is imported until the command runs: `serve` needs the 'serve' extra
(FastAPI, uvicorn), `--ray` the 'ray' extra.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import DreamLLMError


def cmd_serve(args, resolve_checkpoint) -> int:
    """Serve until interrupted. resolve_checkpoint(args): fills in `args.checkpoint` when none was
    given (cli.py passes its `default_checkpoint`)."""
    if args.ray:  # replicas on a Ray cluster: serving/ray_app.py
        try:
            from .serving.ray_app import serve_on_ray
        except ImportError as e:
            raise DreamLLMError(f"--ray needs the 'ray' extra ({e}): "
                                f"pip install 'dreamllm-fast[ray]'") from None
        return serve_on_ray(args)
    try:
        import uvicorn

        from .serving import MediaLimits, ServeConfig, create_app
        from .serving.factory import DEFAULT_MAX_BATCH, build_scheduler, pipeline_loader
        from .serving.security import API_KEY_ENV, is_loopback
    except ImportError as e:
        raise DreamLLMError(f"serving needs the 'serve' extra ({e.name} is missing): "
                            f"pip install 'dreamllm-fast[serve]'") from None
    import socket

    resolve_checkpoint(args)  # no --checkpoint: cli.default_checkpoint writes the tiny one
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this port "
              f"can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    if args.scheduler == "sequential":
        for flag in ("max_batch", "prefill_chunk", "image_batch"):
            if getattr(args, flag) is not None:
                print(f"note: the sequential scheduler serves one request at a time; "
                      f"--{flag.replace('_', '-')} applies to the batched scheduler only",
                      file=sys.stderr)
    cfg = ServeConfig(
        model_name=args.model_name or Path(args.checkpoint).name, api_key=api_key,
        max_body_bytes=int(args.max_body_mb * 2**20), max_n=args.max_n,
        body_timeout_s=args.body_timeout, max_temperature=args.max_temperature,
        media=MediaLimits(max_image_bytes=int(args.max_image_mb * 2**20),
                          max_image_pixels=args.max_image_pixels, max_images=args.max_input_images,
                          max_image_side=args.max_image_side, max_aspect_ratio=args.max_aspect_ratio,
                          allowed_hosts=tuple(args.allow_image_host or ()),
                          fetch_timeout_s=args.image_fetch_timeout))

    scheduler = build_scheduler(args.scheduler, pipeline_loader(args), max_queue=args.max_queue,
                                max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                                image_batch=args.image_batch, warmup=not args.no_warmup,
                                device=args.device, dtype=args.dtype)
    how = ("one request at a time" if args.scheduler == "sequential" else
           f"up to {args.max_batch or DEFAULT_MAX_BATCH} sequences together")
    from .serving.app import lower_pillow_guard

    lower_pillow_guard(cfg.media.max_image_pixels)  # this process is the server
    # Bind here (not in uvicorn) so that --port 0 works and the real port is printed.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise DreamLLMError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick "
                            f"another --port") from None
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {cfg.model_name!r} on http://{url_host}:{port} ({args.scheduler} scheduler: "
          f"{how}; /health turns ready once the model is loaded)", flush=True)
    from .serving.slow_clients import header_timeout_protocol

    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, cfg), log_level=args.log_level,
                                           timeout_graceful_shutdown=5,
                                           http=header_timeout_protocol(args.header_timeout)))
    server.run(sockets=[sock])
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The server's flags (cli.py adds the runtime ones: device, dtype, backends, weights)."""
    p.add_argument("--checkpoint", "-c", default=None,
                   help="checkpoint directory (default: the embedded tiny random checkpoint)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $DREAMLLM_API_KEY; none)")
    p.add_argument("--scheduler", default="batched", choices=("batched", "sequential"),
                   help="batched: continuous batching of every request kind (default); "
                        "sequential: one request at a time (the baseline)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="batched: sequences holding a KV slot at once; the engine gets that many "
                        "slots and decode graphs at 1, 2, 4, ... up to it (default 8)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="batched: prompt tokens per prefill pass between two decode steps "
                        "(default: the engine's chunk, 1024)")
    p.add_argument("--image-batch", type=int, default=None,
                   help="batched: images denoised together, one U-Net call per step "
                        "(default: --max-batch)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait; more get 429 with Retry-After (default 64)")
    p.add_argument("--max-n", type=int, default=8, help="largest n (choices/images) per request")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (MiB)")
    p.add_argument("--max-image-mb", type=float, default=16.0, help="encoded size limit per image (MiB)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="pixel limit per input image, checked on the header before decoding")
    p.add_argument("--max-image-side", type=int, default=4096,
                   help="pixels a side per input image, from the header before decoding (default 4096)")
    p.add_argument("--max-aspect-ratio", type=float, default=20.0,
                   help="long side / short side per input image, from the header before decoding "
                        "(default 20: a 4096x1 PNG cost ~2 GB in CLIP preprocessing)")
    p.add_argument("--max-input-images", type=int, default=None,
                   help="input images per request (default: as many as fit the context, 7 at "
                        "2048 tokens; the count is checked before any image is decoded)")
    p.add_argument("--max-temperature", type=float, default=2.0,
                   help="largest temperature accepted (default 2: OpenAI's range)")
    p.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request's line and headers; the "
                        "connection is closed after (default 30)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request body; 408 after "
                        "(default 30)")
    p.add_argument("--allow-image-host", action="append", metavar="HOST[:PORT]",
                   help="fetch http(s) image URLs from this host (repeatable; default: none, "
                        "data: URLs only)")
    p.add_argument("--image-fetch-timeout", type=float, default=10.0,
                   help="seconds allowed for fetching one image URL")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--no-warmup", action="store_true",
                   help="report ready without the warm-up chat and 1-step image")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    r = p.add_argument_group("Ray Serve (--ray; the 'ray' extra)")
    r.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: replicas (one GPU, one engine each) behind one "
                        "endpoint, on this machine or a Ray cluster")
    r.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else the cluster 'ray start' "
                        "made on this machine, else a new local one)")
    r.add_argument("--replicas", type=int, default=1,
                   help="replicas (the initial count when autoscaling)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    r.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    r.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling target of requests per replica (Ray's default: 2)")
    r.add_argument("--max-ongoing-requests", type=int, default=8,
                   help="requests Ray hands one replica at once; more wait in Ray's proxy")
    r.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (default: 1 where the cluster has GPUs, else 0)")
