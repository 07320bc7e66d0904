"""A runner with a largest batch (a TensorRT engine's optimization profile: `max_rows`) gets
several images' rows in pieces of at most that many, and the result equals one call. The
batched server denoises up to --image-batch images (2 rows each with guidance) in one U-Net call;
the TensorRT profile's default is 2 images (4 rows)."""
import torch

from dreamllm_fast.export.backends import UNetBackend, VAEBackend


class Runner:
    def __init__(self, max_rows=None):
        self.calls = []
        if max_rows is not None:
            self.max_rows = max_rows

    def __call__(self, *args):
        n = args[0].shape[0]
        assert all(a.shape[0] == n for a in args), "inputs split unevenly"
        if getattr(self, "max_rows", None) is not None:
            assert n <= self.max_rows, f"{n} rows over the profile's {self.max_rows}"
        self.calls.append(n)
        out = args[0] * 2
        for a in args[1:]:  # every input's rows reach their own output rows
            out = out + a.reshape(n, -1).sum(1).reshape(n, *[1] * (out.dim() - 1))
        return out


def _unet(runner):
    return UNetBackend("test", runner, None, dtype=torch.float32, device=torch.device("cpu"),
                       module=None, requested="test")


def test_unet_rows_over_the_profile_run_in_pieces_equal_to_one_call():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, 8, 8, generator=g)
    t = torch.arange(10, dtype=torch.float32) * 100
    ctx = torch.randn(10, 3, 5, generator=g)
    whole = _unet(Runner())(x, t, ctx)
    capped = Runner(max_rows=4)
    out = _unet(capped)(x, t, ctx)
    assert capped.calls == [4, 4, 2]
    torch.testing.assert_close(out, whole, rtol=0, atol=0)
    small = Runner(max_rows=4)
    _unet(small)(x[:4], t[:4], ctx[:4])
    assert small.calls == [4]  # within the profile: one call
    scalar = Runner(max_rows=4)  # one timestep for every row is expanded before the split
    torch.testing.assert_close(_unet(scalar)(x, 500.0, ctx), _unet(Runner())(x, 500.0, ctx),
                               rtol=0, atol=0)


def test_vae_rows_over_the_profile_run_in_pieces():
    lat = torch.randn(5, 4, 8, 8)
    r = Runner(max_rows=2)
    out = VAEBackend("test", r, None, dtype=torch.float32, device=torch.device("cpu"), module=None,
                     requested="test")(lat)
    assert r.calls == [2, 2, 1]
    torch.testing.assert_close(out, lat * 2, rtol=0, atol=0)
