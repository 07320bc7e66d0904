"""`dreamllm-fast serve`: its defaults (127.0.0.1, the key from the environment) and its wiring,
with uvicorn's server replaced by a recorder (the real server is tested in the other modules)."""
import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
uvicorn = pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")

from dreamllm_fast import cli  # noqa: E402


class _Recorder:
    """Stands in for uvicorn.Server: records the app and the bound sockets, serves nothing."""

    last = None

    def __init__(self, config):
        self.config = config
        _Recorder.last = self

    def run(self, sockets):
        self.sockets = sockets
        self.bound = sockets[0].getsockname()[:2]
        sockets[0].close()


@pytest.fixture
def recorder(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(uvicorn, "Server", _Recorder)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    monkeypatch.delenv("DREAMLLM_API_KEY", raising=False)
    return _Recorder


def test_help_and_defaults():
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    args = cli.build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None
    assert args.scheduler == "batched" and args.max_queue == 64 and args.max_batch is None
    # issue 20: slow clients are cut off; input images default to what fits the context
    assert args.header_timeout == 30.0 and args.body_timeout == 30.0
    assert args.max_input_images is None and args.max_temperature == 2.0


def test_serve_binds_loopback_by_default_and_wires_the_limits(recorder, tiny_ckpt, capsys):
    assert cli.main(["serve", "-c", str(tiny_ckpt), "--port", "0", "--max-queue", "3",
                     "--max-image-pixels", "1000", "--allow-image-host", "img.local:8080",
                     "--max-body-mb", "1", "--model-name", "m1", "--max-batch", "6",
                     "--prefill-chunk", "32", "--image-batch", "2", "--max-input-images", "3",
                     "--backend", "engine", "--device", "cpu", "--header-timeout", "7",
                     "--body-timeout", "9", "--max-temperature", "4", "--max-image-side", "512",
                     "--max-aspect-ratio", "4"]) == 0
    host, port = recorder.last.bound
    assert host == "127.0.0.1" and port > 0
    out = capsys.readouterr()
    assert f"on http://127.0.0.1:{port}" in out.out and "up to 6 sequences together" in out.out
    assert "warning" not in out.err and "note" not in out.err
    app = recorder.last.config.app
    cfg, sched = app.state.config, app.state.scheduler
    assert cfg.model_name == "m1" and cfg.api_key is None and cfg.max_body_bytes == 2**20
    assert cfg.media.max_image_pixels == 1000 and cfg.media.allowed_hosts == ("img.local:8080",)
    assert cfg.media.max_images == 3
    assert cfg.media.max_image_side == 512 and cfg.media.max_aspect_ratio == 4
    assert cfg.body_timeout_s == 9 and cfg.max_temperature == 4
    from dreamllm_fast.serving.slow_clients import header_timeout_protocol

    proto = recorder.last.config.http  # uvicorn's protocol class, with the header timer
    assert proto.__name__ == header_timeout_protocol(7).__name__ and proto.header_timeout_s == 7
    assert sched.name == "batched" and sched.max_queue == 3 and sched.max_batch == 6
    assert sched.prefill_chunk == 32 and sched.max_images == 2
    # the engine the scheduler loads has one KV slot per sequence and decode graphs up to 6
    ec = sched._load().model.engine_config
    assert ec.max_batch == 6 and ec.cuda_graph_batch_sizes == (1, 2, 4, 6) and ec.precision == "fp32"
    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's own guard, lowered to ours in the server process


def test_the_sequential_scheduler_says_the_batch_flags_do_not_apply(recorder, tiny_ckpt, capsys):
    assert cli.main(["serve", "-c", str(tiny_ckpt), "--port", "0", "--scheduler", "sequential",
                     "--max-batch", "8", "--max-queue", "3"]) == 0
    out = capsys.readouterr()
    assert "one request at a time" in out.out
    assert "--max-batch applies to the batched scheduler only" in out.err
    sched = recorder.last.config.app.state.scheduler
    assert sched.name == "sequential" and sched.max_queue == 3


def test_api_key_from_the_environment_and_warning_when_exposed(recorder, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setenv("DREAMLLM_API_KEY", "from-env")
    assert cli.main(["serve", "-c", str(tiny_ckpt), "--port", "0"]) == 0
    assert recorder.last.config.app.state.config.api_key == "from-env"
    assert cli.main(["serve", "-c", str(tiny_ckpt), "--port", "0", "--api-key", "flag"]) == 0
    assert recorder.last.config.app.state.config.api_key == "flag"
    monkeypatch.delenv("DREAMLLM_API_KEY")
    assert cli.main(["serve", "-c", str(tiny_ckpt), "--port", "0", "--host", "0.0.0.0"]) == 0
    assert recorder.last.bound[0] == "0.0.0.0"
    assert "without an API key" in capsys.readouterr().err


def test_port_in_use_is_a_one_line_error(recorder, tiny_ckpt, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert cli.main(["serve", "-c", str(tiny_ckpt), "--port", str(s.getsockname()[1])]) == 2
    finally:
        s.close()
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
