"""dreamllm-fast: a fast, faithful inference engine for DreamLLM (ICLR 2024).

The top-level folders ``kernels/`` and ``export/`` install as ``dreamllm_fast.kernels`` and
``dreamllm_fast.export``: a top-level module named ``kernels`` would shadow the PyPI distribution of
that name, which transformers probes at import time.
"""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["dreamllm_fast", "dreamllm_fast.*"]) + [
    "dreamllm_fast.kernels",
    "dreamllm_fast.export",
]

setup(
    name="dreamllm-fast",
    version="0.1.0",
    description="Fast, faithful inference for DreamLLM: Triton kernels, CUDA-graph decoding, "
    "exported diffusion decoder",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"dreamllm_fast.kernels": "kernels", "dreamllm_fast.export": "export"},
    # the chat page of `dreamllm-fast serve` (dreamllm_fast/serving/webui.py): static files
    package_data={"dreamllm_fast.serving": ["static/*.*", "static/vendor/*"]},
    install_requires=[
        # 2.11 is what the GPU fleet runs; 2.14 is the newest release checked.
        "torch>=2.11,<2.15",
        # .ci/run tests both ends: the newest release the resolver picks, and 5.0.0 (with the
        # `kernels` release it pins, >=0.10.2,<0.11).
        "transformers>=5.0,<6",
        "diffusers>=0.30",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors>=0.4",
        "numpy",
        "Pillow",
        "tqdm",
        # Triton ships inside CUDA builds of torch; CPU builds need it for interpreter mode.
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",  # property tests (tests/decoding), the server's fuzzing (tests/serving)
            # The PyPI distribution that owns the top-level name `kernels` (transformers >= 5.25
            # pulls it in; diffusers imports it through transformers). Installed explicitly so the
            # tests that keep the checkout's kernels/ folder from shadowing it always have it.
            "kernels",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.1",
            "matplotlib",
            # the serving tests: the server's extra plus the official client they drive it with
            "fastapi>=0.100",
            "uvicorn>=0.23",
            "httpx>=0.25",
            "prometheus-client>=0.17",
            "pydantic>=2",
            "openai>=1.40",
            # the chat page's browser tests (tests/serving/test_webui_browser.py) drive Debian's
            # /usr/bin/chromium; no browser is downloaded
            "playwright>=1.40",
            # the Ray Serve tests (tests/serving/test_ray*.py): the 'ray' extra
            "ray[serve]>=2.56",
        ],
        # `dreamllm-fast serve`: the OpenAI-compatible HTTP server (httpx fetches allow-listed
        # image URLs).
        "serve": ["fastapi>=0.100", "uvicorn>=0.23", "httpx>=0.25", "prometheus-client>=0.17",
                  "pydantic>=2"],
        # `dreamllm-fast serve --ray` / `serve run deploy/ray-serve.yaml`: replicas on Ray Serve.
        # 2.56 is the first release whose serve.ingress() takes the app from the replica
        # (__serve_build_asgi_app__), which ray_app.py relies on; 2.60 is the newest checked.
        "ray": ["ray[serve]>=2.56", "fastapi>=0.100", "uvicorn>=0.23", "httpx>=0.25",
                "prometheus-client>=0.17", "pydantic>=2"],
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1", "polygraphy"],
        # TensorRT's wheels fetch their libraries from NVIDIA's index at install time.
        "tensorrt": ["tensorrt>=10", "onnx>=1.16", "polygraphy"],
        # No binary wheel: builds from source against the local CUDA toolkit.
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["dreamllm-fast=dreamllm_fast.cli:main"]},
)
