"""`--weights` reaches the served pipeline: the serve flags, the Ray Serve args, the loader both use."""
from types import SimpleNamespace

import pytest

from dreamllm_fast.cli import build_parser
from dreamllm_fast.serving.factory import pipeline_loader


def test_serve_flag_and_loader_pass_the_weights_through(tiny_ckpt):
    args = build_parser().parse_args(["serve", "--checkpoint", str(tiny_ckpt), "--weights", "int8",
                                      "--device", "cpu", "--dtype", "fp32"])
    assert args.weights == "int8"
    pipe = pipeline_loader(args)()  # what the sequential scheduler loads
    assert pipe.model.engine_config.weights.value == "int8"
    from dreamllm_fast.serving.batched import serving_engine_config

    batched = pipeline_loader(args)(engine_config=serving_engine_config(2, "cpu", "fp32"))
    assert batched.model.engine_config.weights.value == "int8" and batched.model.engine_config.max_batch == 2
    plain = pipeline_loader(SimpleNamespace(**{**vars(args), "weights": None}))()
    assert plain.model.name == "reference"  # default: the checkpoint's own (bf16) format, CPU backend


def test_ray_serve_args_take_the_weights():
    pytest.importorskip("ray")
    from dreamllm_fast.serving.ray_app import RayServeArgs, args_from_cli

    ns = build_parser().parse_args(["serve", "--ray", "--checkpoint", "x", "--weights", "fp8"])
    assert args_from_cli(ns).weights == "fp8"
    assert RayServeArgs(checkpoint="x").weights is None
    with pytest.raises(Exception, match="weights"):
        RayServeArgs(checkpoint="x", weights="int4")
