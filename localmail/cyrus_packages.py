"""Cyrus IMAP from Debian's packages, unpacked into a folder instead of installed.

``cyrus-imapd`` conflicts with ``dovecot-imapd`` as an installed package, and the tests need both
servers. So the packages (with ``sasl2-bin`` for ``saslpasswd2`` and the libraries the machine
lacks) are fetched with ``apt-get download``, unpacked with ``dpkg -x`` and run from that folder
with ``LD_LIBRARY_PATH`` pointing into it. ``python -m localmail.cyrus_packages`` does it (bin/test
runs it when the folder is missing); ``EMAILOPS_CYRUS_ROOT`` moves the folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT_ENVIRONMENT_VARIABLE = "EMAILOPS_CYRUS_ROOT"
PACKAGES = ("cyrus-imapd", "cyrus-common", "sasl2-bin")
# Written last: a folder without it is an interrupted unpack and is made again.
READY_FILE = "unpacked.txt"
# Debian's multiarch library folders (usr/lib/x86_64-linux-gnu, ...), relative to a root.
LIBRARY_DIR_PATTERNS = ("usr/lib/*-linux-gnu", "lib/*-linux-gnu")
BINARIES = ("master", "imapd", "lmtpd", "idled", "ctl_cyrusdb")


class CyrusNotUnpacked(RuntimeError):
    """The unpacked Cyrus is missing or cannot run on this machine."""


def default_root() -> Path:
    configured = os.environ.get(ROOT_ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured)
    # Not under root's home (mode 0700): Cyrus's processes run as the ``mail`` user and exec from here.
    return Path("/var/cache/emailops/cyrus-imapd")


@dataclass(frozen=True)
class CyrusInstallation:
    """Paths into an unpacked Cyrus and the environment its programs need."""

    tree: Path

    @property
    def bin_dir(self) -> Path:
        return self.tree / "usr" / "lib" / "cyrus" / "bin"

    @property
    def saslpasswd2(self) -> Path:
        return self.tree / "usr" / "sbin" / "saslpasswd2"

    def environment(self) -> dict[str, str]:
        """This process's environment with the unpacked libraries and SASL plugins found first.

        libsasl2 looks for its plugins (PLAIN, LOGIN, sasldb) only where it was built to, unless
        ``SASL_PATH`` says otherwise: the unpacked ones (when the machine lacks libsasl2-modules)
        come first, the machine's after.
        """
        library_dirs = [d for pattern in LIBRARY_DIR_PATTERNS for d in sorted(self.tree.glob(pattern))]
        inherited = os.environ.get("LD_LIBRARY_PATH")
        sasl_dirs = [
            *self.tree.glob("usr/lib/*-linux-gnu/sasl2"),
            *Path("/").glob("usr/lib/*-linux-gnu/sasl2"),
        ]
        return {
            **os.environ,
            "LD_LIBRARY_PATH": ":".join([*map(str, library_dirs), *([inherited] if inherited else [])]),
            "SASL_PATH": ":".join(map(str, sasl_dirs)),
        }


def find_installation(root: Path | None = None) -> CyrusInstallation:
    """The unpacked Cyrus under ``root``; raises ``CyrusNotUnpacked`` saying how to get it."""
    root = root or default_root()
    tree = root / "tree"
    if not (tree / READY_FILE).is_file():
        raise CyrusNotUnpacked(
            f"Cyrus IMAP is not unpacked in {root}: run `python -m localmail.cyrus_packages` as root "
            f"(bin/test does), or point {ROOT_ENVIRONMENT_VARIABLE} at an unpacked copy"
        )
    return CyrusInstallation(tree)


def _installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "installed"


def _hard_dependencies(package: str) -> list[str]:
    """The packages ``package`` depends on without an alternative (``apt-cache depends``)."""
    output = subprocess.run(
        ["apt-cache", "depends", "--no-recommends", "--no-suggests", package],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = []
    for line in output.splitlines():
        # "  Depends: libfoo" is a plain dependency; "  |Depends:" starts a list of alternatives,
        # which the machine's own packages (an MTA, debconf) already satisfy or Cyrus never runs.
        field, _, name = line.strip().partition(": ")
        if field == "Depends" and not name.startswith("<"):
            names.append(name)
    return names


def packages_to_fetch() -> list[str]:
    """``PACKAGES`` plus every library they need (transitively) that is not installed here."""
    wanted = list(PACKAGES)
    seen = set(wanted)
    queue = list(wanted)
    while queue:
        for dependency in _hard_dependencies(queue.pop()):
            if dependency in seen or not dependency.startswith("lib") or _installed(dependency):
                continue
            seen.add(dependency)
            wanted.append(dependency)
            queue.append(dependency)
    return wanted


def _missing_libraries(installation: CyrusInstallation) -> list[str]:
    missing = []
    for program in [*(installation.bin_dir / b for b in BINARIES), installation.saslpasswd2]:
        output = subprocess.run(
            ["ldd", str(program)], capture_output=True, text=True, check=True, env=installation.environment()
        ).stdout
        missing += [f"{program.name}: {line.strip()}" for line in output.splitlines() if "not found" in line]
    return missing


def fetch(root: Path | None = None) -> CyrusInstallation:
    """Download and unpack Cyrus into ``root`` (needs root and Debian's package sources)."""
    root = root or default_root()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    if subprocess.run(["apt-cache", "show", PACKAGES[0]], capture_output=True, check=False).returncode:
        subprocess.run(["apt-get", "update", "-qq"], check=True)  # no package lists yet (fresh machine)
    packages = packages_to_fetch()
    debs = root / "debs"
    shutil.rmtree(debs, ignore_errors=True)  # no older versions next to the new ones
    debs.mkdir()
    subprocess.run(["apt-get", "download", "-q", *packages], cwd=debs, check=True)
    staging = Path(tempfile.mkdtemp(prefix="tree-", dir=root))
    staging.chmod(0o755)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
    installation = CyrusInstallation(staging)
    missing = _missing_libraries(installation)
    if missing:
        shutil.rmtree(staging)
        raise CyrusNotUnpacked("unpacked Cyrus lacks libraries: " + "; ".join(missing))
    (staging / READY_FILE).write_text("\n".join(sorted(p.name for p in debs.glob("*.deb"))) + "\n")
    tree = root / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    staging.rename(tree)
    return CyrusInstallation(tree)


def main() -> int:
    try:
        installation = find_installation()
    except CyrusNotUnpacked:
        installation = fetch()
    print(f"Cyrus IMAP unpacked in {installation.tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
