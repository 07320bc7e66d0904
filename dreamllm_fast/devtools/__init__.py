"""Development tools: checks, stand-ins and harnesses for tests and benchmarks, not the serving path.

- `check7b`: the released 7B engine stage by stage on fake CUDA tensors (no GPU) or a real GPU
  (`python -m dreamllm_fast.devtools.check7b`); `fake_cuda`: the tools it runs on (launch counts,
  host-sync and live-memory guards, a fake checkpoint).
- `parity`: the fp32-arbiter comparison of the engine's and the reference's low-precision drift.
- `testing`: random checkpoints in memory at any preset's shapes (7B benchmarks and GPU tests).
- `stub`: a backend whose math costs nothing (decode-loop tests, host-overhead benchmark, the chat
  page's controlled answers); `host_overhead`: the decode loop's host cost through the real
  pipeline over the stub, and tokens/s through the loop.
- `request_path`: one chat request's path from the HTTP route to the decode-attention kernel, as
  the files the calls in progress cross (`python -m dreamllm_fast.devtools.request_path`).

Nothing in the runtime path (engine, pipeline, serving) imports this package; the bench harness
(`dreamllm-fast bench`) and the tests do.
"""
