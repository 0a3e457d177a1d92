"""Each benchmark script runs in its quick preset and writes its own section, keeping the others
(the numbers are for docs/benchmarks.md, not asserted here; only the checks a benchmark makes of
its own correctness are)."""

from __future__ import annotations

import subprocess
import sys

import pytest

EXPECTED = {
    "attribution": ["## Attribution engine", "IG-50", "12-method grid"],
    "retrain": ["## ROAR/KAR retraining data", "bit-identical: yes", "(c) ablated, streaming"],
    "vog": [
        "## VoG",
        "`compute_split`",
        "`vog_scores` over the store",
        "max relative difference 0.0e+00",  # streamed VoG equals the formula on the dequantised array
    ],
    "road": ["## ROAD imputation", "| 32×32×3 | 10% |", "| 32×32×3 | 90% |", "| 224×224×3 | 50% |"],
    "recipes": ["## Training recipes: time to accuracy", "| fast |", "retrainings", "PFLOPs"],
    "lime": [
        "## LIME",
        "| ResNet8 16/32/64 | `lime` | `segment_mean`",
        "| ResNet8 16/32/64 | `lime_g` | `road` |",
        "| ResNet8 16/32/64 | `lime_g` | `biharmonic` |",
        "Spearman correlation",
    ],
    "perturbation": ["## Meaningful perturbation: batched masks", "`meaningful_perturbation`", "`mp_g`", "(a) ÷ (b)"],
    "insecurity": [
        "## Insecurity maps: 2ndG against gradient",
        "| ResNet8 16/32/64 | `cs` |",
        "| ResNet8 16/32/64 | `cs`, `entropy`, `hp` at once |",
        "all ≤ 1e-05: yes",  # 2ndG − gradient equals ½|q| from layer_quadratic
    ],
    "metrics": [
        "## Metrics: roar against Quantus",
        "| `pointing_game` | `PointingGame` | roar `tolerance=0` |",
        "| `model_randomisation` | `MPRT` |",
        "| `max_sensitivity` | `MaxSensitivity` |",
        "all ≤ 1e-05: yes",  # roar's values equal Quantus's on the same inputs
    ],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_quick_run_writes_its_section(name, repo, tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    command = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--write", str(out)]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "## Another section" in text and "kept" in text
    assert f"`python -m benchmarks.{name} --quick --write" in text
    for expected in EXPECTED[name]:
        assert expected in text, expected
