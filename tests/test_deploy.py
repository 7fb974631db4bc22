"""What ships for deployment (issue 15): the systemd unit, parsed and (where systemd-analyze exists) verified, and
the Dockerfile, checked for consistency with the tree (no Docker daemon runs here: the image is not built in CI)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "herald.service"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as systemd reads it: sections of keys, each key's values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
            continue
        assert current is not None, f"line {number}: a setting before any section"
        key, eq, value = stripped.partition("=")
        assert eq, f"line {number}: not KEY=VALUE: {line!r}"
        # systemd takes a '#' after a value as part of the value: comments go on lines of their own.
        assert "#" not in value, f"line {number}: a comment after a value is read as the value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return unit_sections(UNIT.read_text(encoding="utf-8"))["Service"]


def one(service, key: str) -> str:
    values = service.get(key)
    assert values, f"[Service] {key} is not set"
    return values[-1]


def test_the_unit_runs_herald_serve_as_a_dedicated_user(service):
    """ExecStart runs `herald serve --config ...` with options serve has, as a user that is not root."""
    argv = shlex.split(one(service, "ExecStart"))
    assert Path(argv[0]).name == "herald" and argv[1] == "serve"
    options = {opt for p in main.commands["serve"].params for opt in p.opts}
    assert all(a in options for a in argv[2:] if a.startswith("-")), argv
    assert "--config" in argv
    assert one(service, "User") not in ("", "root", "0")
    assert one(service, "Group") not in ("", "root", "0")


def test_reload_is_sighup_and_stop_is_sigterm_with_a_bound(service):
    """systemctl reload sends SIGHUP (profiles reloaded, log reopened); stop sends SIGTERM and waits a bounded time."""
    assert re.fullmatch(r"/bin/kill -(HUP|s HUP|SIGHUP) \$MAINPID", one(service, "ExecReload"))
    assert one(service, "KillSignal") == "SIGTERM"
    assert 20 <= int(one(service, "TimeoutStopSec")) <= 120
    assert one(service, "Restart") == "on-failure"


@pytest.mark.parametrize(
    "key, value",
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallFilter", "@system-service"),
        ("UMask", "0077"),
    ],
)
def test_the_unit_is_hardened(service, key, value):
    """Each hardening option is set as the deployment notes say."""
    assert one(service, key) == value


def test_the_service_writes_only_its_data_and_log_folders(service):
    """ProtectSystem=strict makes everything read-only; ReadWritePaths opens exactly the state and logs folders."""
    writable = one(service, "ReadWritePaths").split()
    assert sorted(writable) == sorted(
        [f"/var/lib/{one(service, 'StateDirectory')}", f"/var/log/{one(service, 'LogsDirectory')}"]
    )
    assert one(service, "StateDirectoryMode") == "0700"


def test_systemd_analyze_verifies_the_unit(tmp_path):
    """`systemd-analyze verify` accepts the unit with no warning (ExecStart pointed at this environment's herald)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here; the unit was parsed by the tests above only")
    herald = Path(sys.executable).parent / "herald"
    if not herald.exists():
        pytest.skip(f"no herald console script beside {sys.executable} to point ExecStart at")
    text = UNIT.read_text(encoding="utf-8").replace("/opt/herald/bin/herald", str(herald))
    copy = tmp_path / "herald.service"
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # an unknown key is only a warning: none allowed


# -- the Dockerfile (not built here: no Docker daemon on this machine) ------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_dockerfile_starts_from_python_3_11_slim(dockerfile):
    """The base image is the Python Herald supports, slim."""
    assert dockerfile[0] == ("FROM", "python:3.11-slim")


def test_everything_the_dockerfile_copies_exists(dockerfile):
    """Each COPY source is in the tree (and `COPY . .` brings the rest)."""
    sources = []
    for word, args in dockerfile:
        if word == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    missing = [s for s in sources if s != "." and not (ROOT / s).exists()]
    assert missing == []


def test_the_dockerfile_installs_herald_with_the_test_extras(dockerfile):
    """pip installs the package with [test], an extra setup.cfg defines."""
    runs = " ".join(args for word, args in dockerfile if word == "RUN")
    assert re.search(r"pip install (-e )?'?\.\[test\]'?", runs), runs
    assert re.search(r"^test =$", (ROOT / "setup.cfg").read_text(), re.M)


def test_the_default_command_is_a_real_cli_command_run_as_a_user(dockerfile):
    """CMD runs `herald demo`, a command of the CLI; the container runs as a user of its own, not root."""
    import json

    cmd = json.loads(next(args for word, args in dockerfile if word == "CMD"))
    assert cmd[0] == "herald" and cmd[1] in main.commands
    assert cmd == ["herald", "demo"]
    users = [args for word, args in dockerfile if word == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_the_documented_docker_lines_match_the_image():
    """The README and the Dockerfile give the same build and test lines, and pytest is what the image has."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    text = DOCKERFILE.read_text(encoding="utf-8")
    for line in ("docker build -t herald .", "docker run --rm herald pytest -q -p no:cacheprovider"):
        assert line in text and line in readme, line


def test_dockerignore_keeps_secrets_and_the_virtualenv_out_but_not_what_the_tests_read():
    """.git, .venv and TLS keys stay out of the image; tests, docs, samples, mappings and the README go in."""
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for p in patterns:
            negate = p.startswith("!")
            pattern = p[1:] if negate else p
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or path == pattern:
                result = not negate
        return result

    for path in (".git", ".venv", "certs/server-key.pem", "certs/ca.pem", "herald-data"):
        assert ignored(path), path
    needed = ["README.md", "setup.cfg", "pyproject.toml", "herald.example.toml", "certs/README.md"]
    needed += [f"{d}/x" for d in ("tests", "docs", "sample_messages", "mappings", "gateway", "mllp", "bench", "deploy")]
    assert [p for p in needed if ignored(p)] == []
