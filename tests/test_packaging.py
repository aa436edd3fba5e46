"""What ships: the wheel and the daemon's image hold the runtime (``emailops``, ``prod``) and
nothing else; the test servers and the demo (``localmail``, whose relay needs aiosmtpd, absent
from the image) stay in the checkout. The image itself is checked in tests/test_container.py."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME_PACKAGES = {"emailops", "prod"}
# Importable only in a checkout (or a test environment): the runtime must never need them.
NOT_SHIPPED = {"localmail", "aiosmtpd", "tests", "bench"}
BUILD_FILES = {"pyproject.toml", "README.md", "requirements-frozen.txt"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel pip builds from the checkout's packaging files and its top-level packages,
    copied first so that the build leaves no ``build/`` or ``*.egg-info`` in the checkout."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in REPO.iterdir():
        if (package / "__init__.py").is_file():
            shutil.copytree(package, source / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    assert (source / "localmail").is_dir()  # the build sees the test servers and must leave them out
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(source)],
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = out.glob("emailops-*.whl")
    return zipfile.ZipFile(built)


def _top_level(names: list[str]) -> set[str]:
    return {PurePosixPath(name).parts[0] for name in names}


def test_the_wheel_holds_the_runtime_packages_and_nothing_else(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    dist_info = {top for top in _top_level(names) if top.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert _top_level(names) - dist_info == RUNTIME_PACKAGES
    shipped = {name for name in names if name.endswith(".py")}
    in_checkout = {
        path.relative_to(REPO).as_posix()
        for package in RUNTIME_PACKAGES
        for path in (REPO / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert shipped == in_checkout


def _imported_top_levels(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_shipped_module_imports_what_is_not_shipped(wheel: zipfile.ZipFile) -> None:
    """Imports inside functions and under TYPE_CHECKING count too: any of them would fail in the
    image, which has neither the test servers nor aiosmtpd."""
    offenders: dict[str, set[str]] = {}
    imported: set[str] = set()
    for name in wheel.namelist():
        if name.endswith(".py"):
            modules = _imported_top_levels(wheel.read(name).decode())
            imported |= modules
            if modules & NOT_SHIPPED:
                offenders[name] = modules & NOT_SHIPPED
    assert {"imapclient", "sqlalchemy", "emailops"} <= imported  # the scan reads real imports
    assert offenders == {}


def test_the_daemon_image_copies_only_the_packaging_files_and_the_runtime() -> None:
    """The Dockerfile installs the wheel, and its COPY lines put sources in /app, its working
    directory, where ``python -m`` would find them: only the runtime packages may be there."""
    dockerfile = (REPO / "Dockerfile").read_text()
    sources: set[str] = set()
    for line in re.findall(r"^COPY\s+(.+)$", dockerfile, re.MULTILINE):
        words = [word for word in line.split() if not word.startswith("--")]
        sources.update(word.rstrip("/") for word in words[:-1])
    assert sources >= RUNTIME_PACKAGES
    assert sources <= RUNTIME_PACKAGES | BUILD_FILES, sorted(sources - RUNTIME_PACKAGES - BUILD_FILES)
