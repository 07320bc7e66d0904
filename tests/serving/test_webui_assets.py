"""The chat page's files (dreamllm_fast/serving/static/, served by serving/webui.py): the vendored
libraries are the pinned npm releases, the page is served with its Content-Security-Policy, every
file the page loads is shipped, nothing outside static/ can be read, and the latent preview's
arithmetic (serving/progress.py). No model, no browser: milliseconds."""
import fnmatch
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("httpx", reason="the serving tests need httpx")

from fastapi.testclient import TestClient  # noqa: E402

from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.progress import (LATENT_RGB, latent_preview, preview_every,  # noqa: E402
                                            progress_event)
from dreamllm_fast.serving.webui import CSP, STATIC  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VENDOR = STATIC / "vendor"
MANIFEST = json.loads((VENDOR / "manifest.json").read_text())
# the version banner each release prints at the top of its file
BANNERS = {"marked": r"marked v(\S+) - a markdown parser", "dompurify": r"@license DOMPurify (\S+) "}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(None, ServeConfig())) as c:
        yield c


@pytest.mark.parametrize("package", sorted(MANIFEST["packages"]))
def test_vendored_files_are_the_pinned_release(package):
    spec = MANIFEST["packages"][package]
    for name, f in spec["files"].items():
        data = (VENDOR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"], \
            f"{name} differs from {package} {spec['version']} ({f['from']} of {spec['tarball']})"
    code = next(n for n in spec["files"] if n.endswith((".js", ".mjs")))
    m = re.search(BANNERS[package], (VENDOR / code).read_text(encoding="utf-8")[:600])
    assert m and m.group(1) == spec["version"], (package, m and m.group(1))
    assert any("LICENSE" in n for n in spec["files"]), f"{package}: its licence must ship beside it"
    assert spec["tarball"].endswith(f"/{package}-{spec['version']}.tgz")


def test_every_vendor_file_is_in_the_manifest():
    listed = {n for p in MANIFEST["packages"].values() for n in p["files"]} | {"manifest.json"}
    assert {p.name for p in VENDOR.iterdir()} == listed


def test_every_static_file_is_package_data():
    """A non-editable install ships what setup.py's package_data names: every file under static/."""
    text = (ROOT / "setup.py").read_text()
    globs = re.search(r'"dreamllm_fast\.serving":\s*\[([^\]]*)\]', text).group(1)
    patterns = re.findall(r'"([^"]+)"', globs)
    base = STATIC.parent
    for f in STATIC.rglob("*"):
        if f.is_file():
            rel = f.relative_to(base).as_posix()
            assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


def test_page_is_served_with_a_strict_csp(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert csp == CSP
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and "'unsafe-inline'" not in csp and "http" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts and all('src="/ui/' in s for s in scripts), "no inline script"
    assert not re.search(r"\son[a-z]+\s*=", html), "no inline event handler"
    assert not re.search(r"\sstyle\s*=", html), "no inline style"
    # every file the page loads is served, with its type and the same CSP
    for src in re.findall(r'(?:src|href)="(/ui/[^"]+)"', html):
        a = client.get(src)
        assert a.status_code == 200, src
        assert a.headers["content-security-policy"] == CSP
    imports = re.findall(r'from "\./([^"]+)"', (STATIC / "app.js").read_text())
    assert imports == ["vendor/marked.esm.js", "vendor/purify.es.mjs"]
    for name in imports:
        a = client.get("/ui/" + name)
        assert a.status_code == 200 and a.headers["content-type"].startswith("text/javascript")


@pytest.mark.parametrize("path", ["/ui/../webui.py", "/ui/..%2Fwebui.py", "/ui/%2e%2e/app.py",
                                  "/ui/vendor/../../protocol.py", "/ui/nope.js", "/ui/vendor"])
def test_nothing_outside_static_is_served(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert "import" not in r.text


def test_the_page_needs_no_key_but_the_api_does():
    with TestClient(create_app(None, ServeConfig(api_key="k"))) as c:
        assert c.get("/").status_code == 200
        assert c.get("/ui/app.js").status_code == 200
        assert c.get("/v1/models").status_code == 401


def test_latent_preview_is_the_fixed_linear_map():
    torch.manual_seed(0)
    lat = torch.randn(1, 4, 5, 7)
    got = latent_preview(lat)
    assert got.shape == (5, 7, 3) and got.dtype == torch.uint8
    m = torch.tensor(LATENT_RGB, dtype=torch.float64)
    want = ((torch.einsum("chw,cr->hwr", lat[0].double(), m) + 1) * 127.5).clamp(0, 255)
    # uint8 conversion truncates; the float32 product differs from float64 by < 1e-5
    assert (got.double() - want.floor()).abs().max() <= 1
    with pytest.raises(ValueError, match="latents"):
        latent_preview(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50, 1000])
def test_previews_come_every_few_steps_and_never_at_the_last(steps):
    lat = torch.zeros(1, 4, 2, 2)
    got = [s for s in range(1, steps + 1) if progress_event(0, s, steps, lat).preview is not None]
    assert len(got) <= 10 and steps not in got
    assert all(b - a == preview_every(steps) >= 2 for a, b in zip(got, got[1:]))
    ev = progress_event(0, steps, steps, lat)
    assert ev.delta() == {"image_progress": {"step": steps, "steps": steps}}


def test_a_failing_preview_leaves_progress_without_it(monkeypatch):
    from dreamllm_fast.serving import progress

    def boom(_):
        raise RuntimeError("no memory for the preview")

    monkeypatch.setattr(progress, "latent_preview", boom)
    ev = progress_event(0, 2, 10, torch.zeros(1, 4, 2, 2))
    assert ev.preview is None and ev.delta() == {"image_progress": {"step": 2, "steps": 10}}
