"""The GPU benchmark's arithmetic on a CPU smoke size: FLOPs are counted, the co-teaching step
adds one forward of the partner, and the report's ratios come from the same run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_gpu import main, paper_shape  # noqa: E402


def test_tiny_run_counts_flops_and_the_partner_forward(capsys):
    results = main(
        ["--shape", "tiny", "--device", "cpu", "--precision", "32", "--steps", "1"]
        + ["--warmup", "0", "--workers", "0", "--loader-batches", "2"]
    )
    fine, clip, cot = results["fine-grained"], results["global CLIP"], results["co-teaching"]
    for r in (fine, clip, cot):
        assert r["step_s"] > 0 and r["tflop_per_step"] > 0 and r["peak_mib"] > 0
    # forward + backward is ~3 forwards; co-teaching adds the partner's forward (no backward)
    assert 1.2 < cot["tflop_per_step"] / fine["tflop_per_step"] < 1.45
    assert results["loader_samples_per_s"] > 0
    printed = capsys.readouterr().out
    assert "co-teaching step / fVLM step" in printed and "MFU" in printed


def test_paper_shape_is_read_from_the_paper_config():
    shape = paper_shape()
    assert shape["crop_size"] == [128, 256, 288]
    assert shape["vision"]["hidden_size"] == 768 and shape["vision"]["num_layers"] == 12
    assert shape["text"]["hidden_size"] == 768 and shape["text"]["num_hidden_layers"] == 12
