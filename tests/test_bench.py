"""The benchmark's report: one section per CPU kind, targets by kind, earlier kinds kept."""

from __future__ import annotations

import json

from peft_mtl.experiments import bench


def _result(kind: str, native: bool, lora_vs_plain: float, date: str) -> dict:
    cpu = {"model": f"CPU {kind}", "flags": ["avx2", "fma"] + (["amx_bf16"] if native else []),
           "native_bf16": native, "kind": kind}
    return {"machine": {"threads": 2, "precision": "bf16" if native else "fp32", "backbone": "b", "torch": "t",
                        "device": cpu["model"], "native_bf16": native, "cpu": cpu},
            "ratios": {"train_lora_vs_plain": lora_vs_plain, "inference_vs_plain": 3.0,
                       "smart_step_vs_lora_step": 2.4, "lora_step_gflops_vs_peak_of_precision_used": 0.45},
            "training": {"lora": {"examples_per_second": 1, "seconds_per_step": 1, "gflop_per_step": 1,
                                  "achieved_gflops": 1}},
            "plain_hf": {"train_examples_per_second": 1, "seconds_per_step": 1, "achieved_gflops": 1,
                         "inference_sentences_per_second": 1},
            "inference": {"one_adapter": {"sentences_per_second": 3}}, "adapters": {"swap_ms_median": 0.1},
            "gemm_gflops": {"fp32": 100.0, "bf16": 400.0 if native else None, "bf16_over_fp32": 4.0 if native else None},
            "peak_rss_mb": 1.0, "date": date}


def test_each_cpu_kind_keeps_its_own_section_and_targets(tmp_path):
    bench.write(_result("amx-box", True, 4.1, "2026-01-01"), tmp_path, "peft-mtl bench")
    bench.write(_result("avx2-box", False, 2.6, "2026-02-01"), tmp_path, "peft-mtl bench")
    bench.write(_result("avx2-box", False, 2.2, "2026-03-01"), tmp_path, "peft-mtl bench --quick")
    assert sorted(p.name for p in (tmp_path / "bench").glob("*.json")) == ["amx-box.json", "avx2-box.json"]
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"]["train_lora_vs_plain"] == 2.2
    text = (tmp_path / "bench.md").read_text()
    avx2, amx = text.index("## CPU avx2-box"), text.index("## CPU amx-box")
    assert avx2 < amx, "newest first"
    avx2_section, amx_section = text[avx2:amx], text[amx:]
    # The AVX2 CPU is held to issue 15's targets, the bf16 one to issue 6's.
    assert "| LoRA training examples/s vs plain pipeline | 2.2× | ≥ 2.5× | missed |" in avx2_section
    assert "| 45.0% | ≥ 50% | missed |" in avx2_section and "no native bf16" in avx2_section
    assert "| LoRA training examples/s vs plain pipeline | 4.1× | ≥ 4.0× | met |" in amx_section
    assert "| 45.0% | ≥ 40% | met |" in amx_section and "bf16 400.0 GFLOP/s" in amx_section
    assert "bf16 not measured (not native on this CPU)" in avx2_section


def test_cpu_info_names_the_kind_and_the_flags_that_matter():
    info = bench.cpu_info()
    assert info["model"] and info["kind"].endswith(("avx2", "avx512", "avx512-bf16", "amx"))
    assert set(info["flags"]) <= set(bench.CPU_FLAGS)
    assert info["native_bf16"] == ("avx512_bf16" in info["flags"] or "amx_bf16" in info["flags"])
