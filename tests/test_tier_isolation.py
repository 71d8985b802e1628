"""Deployment secrets, model identities and the disk directory through the Python API, with real
bytes (issue #21): instances share lower-tier records only with the same model and the same
secret; every served block's bytes are checked by the tier engine."""

from __future__ import annotations

import pytest

import kvalloc
from tier_engine import CONFIG, Engine, conversation, resume


def _write(**kw) -> None:
    """One instance serves a conversation and shuts down cleanly (all of it below L1)."""
    e = Engine(**kw)
    assert e.serve(conversation(3, 3)) == 0
    e.m.flush()


def _hits(**kw) -> int:
    """A fresh instance's hit (bytes checked) for the conversation's next turn."""
    return Engine(**kw).serve(conversation(3, 4))


@pytest.fixture(params=["disk", "remote"])
def stores(request, tmp_path):
    if request.param == "disk":
        yield dict(disk_dir=str(tmp_path), disk_bytes=64 << 20)
    else:
        server = request.getfixturevalue("remote_server")
        yield dict(remote_url=server.url, remote_bytes=64 << 20)


def test_instances_share_records_only_under_the_same_secret(stores):
    _write(secret=b"deployment one", **stores)
    assert _hits(secret="deployment two", **stores) == 0
    assert _hits(**stores) == 0  # no secret at all
    if "disk_dir" in stores:  # the others removed what they could not check
        _write(secret=b"deployment one", **stores)
    assert _hits(secret=b"deployment one", **stores) == resume(conversation(3, 3))


def test_the_secret_can_come_from_the_environment(stores, monkeypatch):
    monkeypatch.setenv("KVALLOC_SECRET", "from the environment")
    _write(**stores)
    assert _hits(secret="from the environment", **stores) == resume(conversation(3, 3))


def test_models_with_other_ids_share_nothing(stores):
    _write(model_id="org/base", **stores)
    assert _hits(model_id="org/base-tuned", **stores) == 0
    assert _hits(model_id="org/base", **stores) == resume(conversation(3, 3))


def test_model_id_comes_from_the_config_or_the_caller():
    assert kvalloc.ModelSpec.from_hf_config(CONFIG).model_id is None
    named = {**CONFIG, "_name_or_path": "org/m", "_commit_hash": "abc123"}
    spec = kvalloc.ModelSpec.from_hf_config(named)
    assert spec.model_id == "org/m@abc123"
    assert kvalloc.ModelSpec.from_hf_config(named, model_id="mine").model_id == "mine"
    assert spec.fingerprint == kvalloc.ModelSpec.from_hf_config(CONFIG).fingerprint
    with pytest.raises(kvalloc.InvalidArgumentError, match="model_id"):
        kvalloc.ModelSpec.from_hf_config(CONFIG, model_id="")
    with pytest.raises(kvalloc.ConfigError, match="_name_or_path"):
        kvalloc.ModelSpec.from_hf_config({**CONFIG, "_name_or_path": 5})


def test_bad_secrets_and_model_ids_are_refused(tmp_path):
    spec = kvalloc.ModelSpec.from_hf_config(CONFIG)
    kw = dict(disk_dir=str(tmp_path), disk_bytes=1 << 20)
    for bad in ["", b""]:
        with pytest.raises(kvalloc.InvalidArgumentError, match="secret"):
            kvalloc.KVCacheManager(spec, 96 << 10, secret=bad, **kw)
    with pytest.raises(kvalloc.InvalidArgumentError, match="secret"):
        kvalloc.KVCacheManager(spec, 96 << 10, secret=42, **kw)
    with pytest.raises(kvalloc.InvalidArgumentError, match="model_id"):
        kvalloc.KVCacheManager(spec, 96 << 10, model_id="", **kw)


def test_empty_disk_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = kvalloc.ModelSpec.from_hf_config(CONFIG)
    with pytest.raises(kvalloc.InvalidArgumentError, match="dir"):
        kvalloc.KVCacheManager(spec, 96 << 10, disk_dir="", disk_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == [], "nothing is created in the working directory"


def test_disk_start_up_skips_fifos_and_directories_named_like_records(tmp_path):
    import os

    _write(disk_dir=str(tmp_path), disk_bytes=64 << 20)
    record = next(tmp_path.rglob("*.kvb"))
    os.mkfifo(record.with_name("00" * 8 + "-0.kvb"))
    (record.parent / ("11" * 8 + "-0.kvb")).mkdir()
    assert _hits(disk_dir=str(tmp_path), disk_bytes=64 << 20) == resume(conversation(3, 3))
    assert record.with_name("00" * 8 + "-0.kvb").exists(), "left alone"
    for p in tmp_path.rglob("*"):  # owner-only: cached KV is tenant data
        mode = p.stat().st_mode & 0o777
        if p.is_file():
            assert mode == 0o600, p
        elif p.is_dir() and p.suffix != ".kvb":
            assert mode == 0o700, p
