"""The ROAD benchmark runs and writes its section, keeping the others (numbers are for docs/benchmarks.md,
not asserted)."""

from __future__ import annotations

import subprocess
import sys


def test_road_benchmark_quick_run_writes_its_section(repo, tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.road", "--quick", "--write", str(out)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "## ROAD imputation" in text and "## Another section" in text and "kept" in text
    assert "`python -m benchmarks.road --quick --write" in text
    for cell in ("| 32×32×3 | 10% |", "| 32×32×3 | 90% |", "| 224×224×3 | 50% |"):
        assert cell in text
    assert "scipy's images/s at 32×32" in text
