"""A GPU error that poisons the CUDA context (a device-side assert, an illegal address) cannot be
recovered in-process: every later kernel fails. The schedulers then fail the request, turn /health
into 503 `model_failed` (Ray Serve's check_health replaces such a replica; a supervisor restarts
a plain server) and refuse new work with 503 instead of failing it one request at a time.

The error is injected into the decode step (`EngineDecodeBatch.launch`) on the CPU with the
message torch raises for a device-side assert; an ordinary error leaves the server serving
(tests/serving/test_batched.py)."""
import pytest
import torch

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")

from serving_helpers import LiveServer, wait_until  # noqa: E402

from dreamllm_fast.devices import device_failed  # noqa: E402
from dreamllm_fast.engine.decode import EngineDecodeBatch  # noqa: E402
from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import (BatchedScheduler, SequentialScheduler, ServeConfig,  # noqa: E402
                                   create_app)

ASSERT = ("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously "
          "reported at some other API call")


def test_device_failed_tells_fatal_device_errors_from_others():
    assert device_failed(RuntimeError(ASSERT))
    assert device_failed(RuntimeError("CUDA error: an illegal memory access was encountered"))
    if hasattr(torch, "AcceleratorError"):
        assert device_failed(torch.AcceleratorError("anything"))
    assert not device_failed(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not device_failed(ValueError("device-side assert"))  # not a runtime error of torch's
    assert not device_failed(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("scheduler", [BatchedScheduler, SequentialScheduler])
def test_a_poisoned_device_fails_the_request_and_marks_the_server_failed(scheduler, tiny_ckpt,
                                                                         monkeypatch):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False)
    sched = scheduler(pipe, warmup=False)
    calls = []

    def launch(self):
        calls.append(1)
        raise RuntimeError(ASSERT)

    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0}
    with LiveServer(create_app(sched, ServeConfig(model_name="t"))) as srv:
        assert sched.wait_ready(60)
        url = srv.url + "/v1/chat/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 200  # a healthy server first
        monkeypatch.setattr(EngineDecodeBatch, "launch", launch)
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]  # details: the log
        wait_until(lambda: sched.health().failed, 10, "the scheduler to report itself failed")
        h = httpx.get(srv.url + "/health", timeout=10)
        assert h.status_code == 503 and h.json()["error"]["code"] == "model_failed"
        assert "device failed" in h.json()["error"]["message"] and "restart" in h.json()["error"]["message"]
        n = len(calls)
        r = httpx.post(url, json=body, timeout=60)  # refused up front: no more work on the device
        assert r.status_code == 503 and len(calls) == n
