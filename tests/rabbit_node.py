"""An extra RabbitMQ node for one test module (``scripts/rabbitnode``), and throwaway TLS
certificates for it (the ``openssl`` command line).

The node gets what the shared broker on 5672 must not: a TLS listener, a plugin, a
broker-wide setting such as a memory alarm. It is named after its AMQP port, has its own
directory, cookie and distribution port, and is always stopped (the directory removed) when
the module's fixture ends. Imported as ``from rabbit_node import ...`` (see ``helpers``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "rabbitnode"
#: the AMQP port of the extra node (AMQPS on the next one); the cluster uses 5701-5703
PORT = 5711
TLS_PORT = PORT + 1
DIST_PORT = 25712
#: a boot takes 5-30 s on two busy cores; the script gives up after its own timeout
START_TIMEOUT, STOP_TIMEOUT = 180.0, 120.0


def node_dir() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "aio-celery-tls"


class RabbitNode:
    """A running node started by :func:`running_node`."""

    name = f"aio-celery-{PORT}@localhost"

    @staticmethod
    def url(user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{PORT}//"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <this node> ARGS...``: its output; the test fails on an error."""
        return _script("ctl", *args, timeout=timeout)

    def connections(self, *fields: str) -> list[dict[str, Any]]:
        """``list_connections`` of ``fields``, each row a dict; ``client_properties``, if
        asked for, as a dict too."""
        rows = json.loads(self.ctl("-t", "10", "list_connections", *fields,
                                   "--formatter", "json") or "[]")
        for row in rows:
            if "client_properties" in row:
                row["client_properties"] = {key: value for key, _, value
                                            in row["client_properties"]}
        return list(rows)


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "AIO_CELERY_NODE_DIR": str(node_dir()),
            "AIO_CELERY_NODE_PORT": str(PORT), "AIO_CELERY_NODE_DIST_PORT": str(DIST_PORT),
            **extra}


def _script(*args: str, timeout: float, extra: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=_env(extra or {}))
    if done.returncode != 0:
        pytest.fail(f"scripts/rabbitnode {' '.join(args)} exited with {done.returncode}\n"
                    f"{done.stdout}\n{done.stderr}", pytrace=False)
    return done.stdout


@contextlib.contextmanager
def running_node(conf: str = "", plugins: tuple[str, ...] = ()) -> Iterator[RabbitNode]:
    """Start the node with ``conf`` (rabbitmq.conf lines) and ``plugins``; stop it and
    remove its directory afterwards, whatever happened."""
    with tempfile.NamedTemporaryFile("w", suffix=".conf", prefix="aio-celery-node-") as file:
        file.write(conf)
        file.flush()
        os.chmod(file.name, 0o644)
        try:
            _script("start", timeout=START_TIMEOUT,
                    extra={"AIO_CELERY_NODE_CONF": file.name,
                           "AIO_CELERY_NODE_PLUGINS": ",".join(plugins)})
            yield RabbitNode()
        finally:
            subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=STOP_TIMEOUT,
                           check=False, env=_env({}))


# --- certificates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificates:
    """A throwaway CA with a server and a client certificate it signed, and a second CA
    that signed nothing here (the wrong one)."""

    directory: Path
    client_name: str

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def other_ca(self) -> Path:
        return self.directory / "other-ca.pem"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests make their certificates with the openssl command: "
                    "apt-get install openssl", pytrace=False)
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed:\n{done.stderr}", pytrace=False)


_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
_CA_EXTENSIONS = ("-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=aio-celery test {name}", *_CA_EXTENSIONS,
             cwd=directory)


def _signed(directory: Path, name: str, subject: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n" + extensions)
    _openssl("req", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
             subject, cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out",
             f"{name}.pem", cwd=directory)


@contextlib.contextmanager
def certificates(client_name: str) -> Iterator[Certificates]:
    """Make the certificates in a new directory, removed afterwards. The server's is for
    ``localhost`` and ``127.0.0.1``; the client's common name is ``client_name``."""
    directory = Path(tempfile.mkdtemp(prefix="aio-celery-tls-certs-"))
    try:
        _ca(directory, "ca")
        _ca(directory, "other-ca")
        _signed(directory, "server", "/CN=localhost",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        _signed(directory, "client", f"/CN={client_name}", "extendedKeyUsage=clientAuth\n")
        # The node runs as the user rabbitmq when we are root: it must read its key (a
        # throwaway one) and certificates
        directory.chmod(0o755)
        for path in directory.iterdir():
            path.chmod(0o644)
        yield Certificates(directory, client_name)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
