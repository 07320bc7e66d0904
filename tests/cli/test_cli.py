"""The command line: each subcommand's happy path, and one-line errors with exit code 2."""
import subprocess
import sys

import pytest
from PIL import Image

from dreamllm_fast.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "dreamllm_fast.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_help_of_every_subcommand():
    for cmd in ("demo", "chat", "t2i", "generate", "make-tiny", "convert", "export"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_demo_writes_pngs_and_text(tmp_path, monkeypatch, capsys):
    import dreamllm_fast.cli as cli

    monkeypatch.setattr(cli, "DEFAULT_CACHE", tmp_path / "cache")
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--steps", "2"]) == 0  # the defaults, as a user runs it
    text = capsys.readouterr().out
    for section in ("chat on an image", "text-to-image", "interleaved answer", "timings:"):
        assert section in text
    assert "(2 text part(s), 1 image(s))" in text  # the tiny model's walk draws one image
    # the interleaved answer shows text, then the image, then text again
    doc = text.split("== interleaved answer ==")[1].split("(2 text part(s)")[0].strip().splitlines()
    img = [i for i, line in enumerate(doc) if line.startswith("[image: ")]
    assert len(img) == 1 and 0 < img[0] < len(doc) - 1, doc
    assert doc[0].strip() and doc[-1].strip()
    for name in ("demo_t2i.png", "demo_interleaved_0.png", "demo_input.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 0


def test_t2i_chat_generate_make_tiny_convert(tmp_path, tiny_ckpt, capsys):
    png = tmp_path / "x.png"
    assert main(["t2i", "-c", str(tiny_ckpt), "a cat", "--steps", "2", "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size == (64, 64)
    assert main(["chat", "-c", str(tiny_ckpt), "what is it?", "--image", str(png),
                 "--max-new-tokens", "5"]) == 0
    assert main(["generate", "-c", str(tiny_ckpt), "story", "--steps", "1",
                 "--out-dir", str(tmp_path / "g"), "--max-new-tokens", "120"]) == 0
    assert (tmp_path / "g" / "generated_0.png").is_file()
    assert main(["make-tiny", str(tmp_path / "t2")]) == 0
    assert main(["convert", str(tmp_path / "t2"), str(tmp_path / "t3")]) == 0
    assert (tmp_path / "t3" / "model.safetensors").is_file()


def test_errors_are_one_line_and_exit_2(tmp_path, tiny_ckpt, capsys):
    # One real process proves what a user sees (stderr, exit status, no traceback). The other
    # errors run in-process on the CPU: as subprocesses on a GPU machine each built the engine
    # with CUDA graphs (Triton compiles included) before failing, over 45 s for the test.
    r = run("chat", "-c", str(tmp_path / "missing"), "hi")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not a directory" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.jpg"
    bad.write_text("no image here")
    for argv, msg in (
            (["chat", "-c", str(tiny_ckpt), "hi", "--image", str(bad)], "cannot be decoded"),
            (["t2i", "-c", str(tiny_ckpt), "a cat", "--steps", "0"], "num_inference_steps")):
        capsys.readouterr()
        assert main([*argv, "--device", "cpu"]) == 2  # any other exception would fail the test
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1


def test_t2i_sampler_flag(tmp_path, tiny_ckpt, monkeypatch):
    """--sampler reaches text_to_image (default ddpm); an unknown name is an argparse error."""
    from dreamllm_fast.pipeline import DreamLLMPipeline

    seen = []
    orig = DreamLLMPipeline.text_to_image

    def spy(self, *a, **kw):
        seen.append(kw.get("sampler"))
        return orig(self, *a, **kw)

    monkeypatch.setattr(DreamLLMPipeline, "text_to_image", spy)
    png = tmp_path / "s.png"
    for extra in ([], ["--sampler", "dpmpp-2m"]):
        assert main(["t2i", "-c", str(tiny_ckpt), "a cat", "--steps", "2", "--out", str(png),
                     "--device", "cpu", *extra]) == 0
    assert seen == ["ddpm", "dpmpp-2m"] and png.is_file()
    with pytest.raises(SystemExit) as e:
        main(["t2i", "-c", str(tiny_ckpt), "a cat", "--sampler", "euler"])
    assert e.value.code == 2
