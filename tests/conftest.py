from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The venv benches/vllm/setup_venv.sh makes; tests of the vLLM plug-in run in it, or skip.
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(),
    reason="no .venv-vllm: run benches/vllm/setup_venv.sh (vLLM for CPU, ~4 min, 6 GB) to run the vLLM tests",
)
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_configs() -> Path:
    """The real configs in ../shared/data/configs (falls back to the package's presets copy)."""
    d = SHARED / "configs"
    if not d.is_dir():
        d = ROOT / "rust" / "kvalloc" / "presets"
    return d


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """A real Valkey/Redis server on loopback, started and stopped by scripts/remote-store.sh;
    over TLS only when given a directory for its test certificates (``ca.crt``, ``client.crt``
    and ``.key``, and ``other-ca.crt``, a CA that signed nothing here)."""

    def __init__(self, password: str | None = None, tls_dir: Path | None = None) -> None:
        self.port = _free_port()
        self.password = password
        self.tls_dir = tls_dir
        self.start()

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls_dir else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def cert(self, name: str) -> str:
        assert self.tls_dir is not None
        return str(self.tls_dir / name)

    @property
    def pid(self) -> int:
        return int((ROOT / ".remote-store" / f"server-{self.port}.pid").read_text())

    def _script(self, *args: str) -> None:
        import subprocess

        subprocess.run([str(ROOT / "scripts" / "remote-store.sh"), *args], check=True,
                       capture_output=True, timeout=60)

    def start(self) -> None:
        if self.tls_dir:
            self._script("start-tls", str(self.port), str(self.tls_dir))
        else:
            self._script("start", str(self.port), *([self.password] if self.password else []))

    def stop(self) -> None:
        import signal

        try:
            self.signal(signal.SIGCONT)  # a stopped server would sit on its SIGTERM
        except (OSError, ValueError):
            pass
        self._script("stop", str(self.port))

    def signal(self, sig: int) -> None:
        import os

        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL; waits until it is gone (or a zombie), and removes its pidfile."""
        import signal
        import time

        pid = self.pid
        self.signal(signal.SIGKILL)
        def gone() -> bool:
            try:
                return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
            except OSError:
                return True

        while not gone():
            time.sleep(0.01)
        (ROOT / ".remote-store" / f"server-{self.port}.pid").unlink(missing_ok=True)


@pytest.fixture
def remote_server():
    """A fresh server per test (a test may kill and restart it)."""
    server = RemoteServer()
    yield server
    server.stop()


@pytest.fixture
def remote_server_with_password():
    server = RemoteServer(password="s3cret-pw")
    yield server
    server.stop()


@pytest.fixture
def remote_tls_server(tmp_path):
    """A server that speaks only TLS, with a certificate of a fresh test CA."""
    server = RemoteServer(tls_dir=tmp_path / "tls")
    yield server
    server.stop()


class RemoteCluster:
    """A Valkey/Redis Cluster of three primaries on loopback, started, restarted and stopped by
    ``scripts/remote-store.sh cluster`` (state in a temp dir)."""

    def __init__(self, dir: Path, primaries: int = 3) -> None:
        self.dir = dir
        self.ports = _cluster_ports(primaries)
        self.start()

    def _script(self, *args: str) -> str:
        import subprocess

        out = subprocess.run([str(ROOT / "scripts" / "remote-store.sh"), "cluster", *args],
                             check=True, capture_output=True, text=True, timeout=120)
        return out.stdout.strip()

    @property
    def url(self) -> str:
        return self._script("url", str(self.dir))

    def start(self) -> None:
        """Starts the nodes that are not running (a killed one rejoins, empty)."""
        self._script("start", str(self.dir), *map(str, self.ports))

    def stop(self) -> None:
        self._script("stop", str(self.dir))

    def kill(self, i: int) -> None:
        """SIGKILLs node ``i`` and waits until its port refuses connections."""
        import os
        import signal
        import socket
        import time

        os.kill(int((self.dir / str(self.ports[i]) / "pid").read_text()), signal.SIGKILL)
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.ports[i]), timeout=1).close()
            except OSError:
                return
            time.sleep(0.02)


def _cluster_ports(n: int) -> list[int]:
    """Free loopback ports whose cluster bus ports (port + 10000) are free too."""
    import os
    import socket

    def free(p: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return True
            except OSError:
                return False

    ports: list[int] = []
    p = 30000 + (os.getpid() * 31) % 4000
    while len(ports) < n:
        if free(p) and free(p + 10000):
            ports.append(p)
        p += 1
    return ports


@pytest.fixture
def remote_cluster(tmp_path):
    """A fresh three-primary cluster per test (a test may kill and restart a node)."""
    cluster = RemoteCluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()
