"""Triton launches run on their tensors' GPU, whatever the thread's current device.

Triton's launcher uses the CURRENT device (torch ops carry a device guard, Triton's launcher does
not): an engine on cuda:1, or a server's worker thread whose current device is 0, would launch
device-1 pointers on device 0. One machine here has no GPU, let alone two, so the dispatch is
checked with a stand-in tensor and a recorded `torch.cuda.device` switch.
"""
import contextlib

import torch

from dreamllm_fast.kernels import dispatch


class _OnGpu1:
    """Stands in for a tensor on cuda:1 (the dispatcher only asks for its device index)."""

    def get_device(self):
        return 1


def _run(monkeypatch, current: int):
    switched = []

    @contextlib.contextmanager
    def device(idx):
        switched.append(idx)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    dispatch._on_device(_OnGpu1(), lambda *a, **k: seen.append((a, k, list(switched))), 1, x=2)
    return switched, seen


def test_launch_switches_to_the_tensors_device(monkeypatch):
    switched, seen = _run(monkeypatch, current=0)
    assert switched == [1] and seen == [((1,), {"x": 2}, [1])], "the launcher must run inside the switch"


def test_no_switch_when_the_devices_agree_or_on_the_cpu(monkeypatch):
    switched, seen = _run(monkeypatch, current=1)
    assert switched == [] and len(seen) == 1
    calls = []
    dispatch._on_device(torch.zeros(1), lambda: calls.append(1))  # CPU tensor (interpreter mode): no CUDA call
    assert calls == [1]
