"""bench/targets.py: each performance target judged met / missed / not run from a report's rows
and kernel files. The figures below are synthetic (a CPU cannot measure a GPU): they test the
judging, never the engine."""
from dreamllm_fast.bench.targets import MET, MISSED, NOT_RUN, TARGETS, evaluate, markdown


def _ev(rows=(), kernels=None, gpu_report=None):
    meta = {"gpu_report": gpu_report} if gpu_report else {}
    return {"report": {"rows": list(rows), "meta": meta}, "kernels": kernels or {}}


def _status(ev):
    return {t["key"]: t["status"] for t in evaluate(ev)}


def test_nothing_measured_is_not_run_never_met():
    st = _status(_ev())
    assert set(st) == {t.key for t in TARGETS} and set(st.values()) == {NOT_RUN}
    assert len(TARGETS) >= 18  # one line per target of the project


def test_decode_targets_take_the_worst_context():
    rows = [{"stage": "decode", "provider": "engine", "context": 128, "ms": 100.0, "frac_of_floor": 0.95},
            {"stage": "decode", "provider": "engine", "context": 1024, "ms": 105.0, "frac_of_floor": 0.91},
            {"stage": "decode", "provider": "compile_static", "context": 128, "ms": 125.0},
            {"stage": "decode", "provider": "compile_static", "context": 1024, "ms": 140.0},
            {"stage": "decode", "provider": "reference", "context": 128, "ms": 700.0},
            {"stage": "decode", "provider": "reference", "context": 1024, "ms": 600.0},
            {"stage": "decode", "provider": "reference", "context": 2048, "error": "x"}]
    by = {t["key"]: t for t in evaluate(_ev(rows))}
    assert by["decode_floor"]["status"] == MET and by["decode_floor"]["value"] == 0.91
    assert by["decode_vs_compile"]["status"] == MET and by["decode_vs_compile"]["value"] == 1.25
    assert by["decode_vs_hf"]["status"] == MISSED and "context 1024" in by["decode_vs_hf"]["detail"]
    rows[1]["frac_of_floor"] = 0.89
    assert _status(_ev(rows))["decode_floor"] == MISSED


def test_quantized_rows_are_judged_against_the_bf16_engine_of_the_same_run():
    rows = [{"stage": "decode", "provider": "engine", "context": 128, "ms": 100.0, "frac_of_floor": 0.9},
            {"stage": "decode", "provider": "engine", "weights": "int8", "context": 128, "ms": 50.0,
             "frac_of_floor": 0.85},
            {"stage": "decode", "provider": "engine", "weights": "fp8", "context": 128, "ms": 70.0}]
    st = _status(_ev(rows))
    assert st["int8_decode"] == MET and st["fp8_decode"] == MISSED  # 2.0x; 1.43x < 1.6x
    rows[1]["frac_of_floor"] = 0.7  # fast enough, but far from its own floor
    assert _status(_ev(rows))["int8_decode"] == MISSED
    assert _status(_ev(rows))["decode_floor"] == MET  # quantized rows never stand in for bf16 ones


def test_latency_serving_and_kernel_targets():
    rows = [{"stage": "prefill", "provider": "engine", "ms": 18.0, "floor_ms": 13.0},
            {"stage": "t2i", "provider": "engine", "steps": 50, "ms": 440.0},
            {"stage": "t2i", "provider": "engine", "steps": 2, "ms": 20.0},
            {"stage": "unet", "provider": "eager", "ms": 30.0}, {"stage": "unet", "provider": "graphs", "ms": 8.0},
            {"stage": "serve", "concurrency": 1, "tokens_per_s": 100.0, "ttft_p50_ms": 20.0},
            {"stage": "serve", "concurrency": 16, "tokens_per_s": 1100.0, "ttft_p50_ms": 30.0}]
    kernels = {"launch_overhead": {"rows": [{"provider": "ours", "op": "rmsnorm", "eager_us": 12.0},
                                            {"provider": "ours", "op": "rope", "eager_us": 25.0},
                                            {"provider": "torch", "op": "rmsnorm", "eager_us": 90.0}]},
               "attention": {"rows": [{"case": "causal_770", "provider": "triton", "graph_us": 50.0},
                                      {"case": "causal_770", "provider": "sdpa_flash_causal", "graph_us": 47.0},
                                      {"case": "packed", "provider": "triton", "graph_us": 40.0},
                                      {"case": "packed", "provider": "sdpa_explicit_mask", "graph_us": 60.0}]},
               "decode_attention": {"rows": [{"provider": "triton", "batch": 1, "context": 2047, "frac_copy_bw": 0.7}]}}
    st = _status(_ev(rows, kernels))
    assert st["ttft"] == MET and st["t2i"] == MET and st["unet_step"] == MET  # best backend: graphs
    assert st["serve_scaling"] == MISSED and st["serve_ttft"] == MET  # 11x < 12x; 1.5x <= 2x
    assert st["host_cost"] == MISSED and st["prefill_attention"] == MET and st["packed_attention"] == MET
    assert st["decode_attention"] == MISSED
    assert st["interleaved"] == NOT_RUN and st["memory"] == NOT_RUN


def test_the_report_time_target_needs_the_whole_plan_in_480_s():
    phases = [{"name": "env", "status": "ok"}, {"name": "kernels", "status": "ok"},
              {"name": "compile", "status": "skipped", "extra": True}]
    assert _status(_ev(gpu_report={"elapsed_s": 470.0, "phases": phases}))["report_time"] == MET
    phases[1]["status"] = "timeout"
    assert _status(_ev(gpu_report={"elapsed_s": 470.0, "phases": phases}))["report_time"] == MISSED
    phases[1]["status"] = "ok"
    assert _status(_ev(gpu_report={"elapsed_s": 500.0, "phases": phases}))["report_time"] == MISSED


def test_a_malformed_row_is_not_run_with_its_reason_and_the_table_renders():
    ev = _ev([{"stage": "prefill", "provider": "engine", "ms": "fast", "floor_ms": 13.0}])
    by = {t["key"]: t for t in evaluate(ev)}
    assert by["ttft"]["status"] == NOT_RUN and "could not be judged: TypeError" in by["ttft"]["detail"]
    md = markdown(ev)
    assert md.count("\n") == len(TARGETS) + 1 and "| not run |" in md
