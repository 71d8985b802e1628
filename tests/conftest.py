from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
    """A real Valkey/Redis server on loopback, started and stopped by scripts/remote-store.sh."""

    def __init__(self, password: str | None = None) -> None:
        self.port = _free_port()
        self.password = password
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _script(self, *args: str) -> None:
        import subprocess

        subprocess.run([str(ROOT / "scripts" / "remote-store.sh"), *args], check=True,
                       capture_output=True, timeout=60)

    def start(self) -> None:
        self._script("start", str(self.port), *([self.password] if self.password else []))

    def stop(self) -> None:
        self._script("stop", str(self.port))


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
