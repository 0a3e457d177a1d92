"""The VoG benchmark runs and writes its section (numbers are for docs/benchmarks.md, not asserted)."""

from __future__ import annotations

import subprocess
import sys


def test_vog_benchmark_quick_run_writes_its_section(repo, tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.vog", "--quick", "--write", str(out)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "## VoG" in text and "## Another section" in text and "kept" in text
    assert "`compute_split`" in text and "`vog_scores` over the store" in text
    assert "max relative difference 0.0e+00" in text, "streamed VoG must equal the formula on the dequantised array"
