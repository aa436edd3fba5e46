"""A throwaway certificate authority and a server certificate for loopback test servers.

Made with the ``openssl`` command line tool (Debian's ``openssl`` package), so the test harness
needs no Python crypto library. The server certificate names ``localhost`` and ``127.0.0.1`` and
is signed by the CA, so clients verify it the normal way by trusting ``ca_file`` alone.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Extensions that make the chain acceptable to strict verifiers (Python's ssl, OpenSSL 3).
_CA_EXTENSIONS = (
    "basicConstraints=critical,CA:TRUE",
    "keyUsage=critical,keyCertSign,cRLSign",
    "subjectKeyIdentifier=hash",
)
_SERVER_EXTENSIONS = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName={names}
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""
_VALID_DAYS = "7"


class CertificateError(RuntimeError):
    """The openssl tool is missing or failed."""


@dataclass(frozen=True)
class TestCertificates:
    """Paths of a CA certificate and of a server certificate and key signed by it (all PEM)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CertificateError(f"openssl {args[0]} failed: {result.stderr.strip()}")


# The names a loopback server's certificate is valid for, as subjectAltName entries.
LOOPBACK_NAMES = ("DNS:localhost", "IP:127.0.0.1", "IP:127.0.0.2")


def make_test_certificates(directory: Path, names: tuple[str, ...] = LOOPBACK_NAMES) -> TestCertificates:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` into ``directory`` and return their paths.
    The server certificate is valid for ``names`` (other names test host name verification).

    EC P-256 keys keep generation in the tens of milliseconds, so every server instance can have
    its own CA.
    """
    if shutil.which("openssl") is None:
        raise CertificateError("the openssl command is missing; install Debian's 'openssl' package")
    directory.mkdir(parents=True, exist_ok=True)
    ec_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca_args = [a for ext in _CA_EXTENSIONS for a in ("-addext", ext)]
    _openssl(
        "req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", _VALID_DAYS,
        "-subj", "/CN=EmailOps test CA", *ca_args, cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-new", *ec_key, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost", cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(_SERVER_EXTENSIONS.format(names=",".join(names)))
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", _VALID_DAYS, "-extfile", "server.ext", cwd=directory,
    )  # fmt: skip
    for private in ("ca.key", "server.key"):
        (directory / private).chmod(0o600)
    return TestCertificates(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
