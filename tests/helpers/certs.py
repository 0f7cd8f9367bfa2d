"""Self-signed certificates for the TLS tests, made with the openssl CLI (``scripts/test.sh``
installs it): EC P-256, valid one day, for ``localhost`` and ``127.0.0.1``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """(key, certificate) files ``<name>.key`` / ``<name>.pem`` under ``directory``."""
    assert shutil.which("openssl"), (
        "the TLS tests need the openssl CLI (scripts/test.sh installs it)"
    )
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


def server_and_client(directory: Path) -> dict[str, Path]:
    """A server pair and a client pair, each its own CA."""
    server_key, server_cert = self_signed(directory, "server")
    client_key, client_cert = self_signed(directory, "client")
    return {
        "server_key": server_key,
        "server_cert": server_cert,
        "client_key": client_key,
        "client_cert": client_cert,
    }
