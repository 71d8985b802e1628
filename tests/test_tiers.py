"""Tiers with real bytes through the Python API: host memory, disk files, a real Valkey/Redis
server (started by scripts/remote-store.sh), restarts, corruption, a killed server, two
processes sharing one store, and bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import kvalloc
from tier_engine import Engine, conversation, resume, spec

ROOT = Path(__file__).resolve().parent.parent


def test_host_round_trip_random_bytes_layer_by_layer():
    e = Engine(host_bytes=4 << 20)
    first = conversation(0, 3)
    assert e.serve(first) == 0
    e.churn(range(10, 30))
    nxt = conversation(0, 4)
    hits = e.m.match_prefix_tiers(nxt)
    assert hits["device"] < resume(first) == hits["host"], hits
    assert e.serve(nxt) == resume(first)  # bytes checked inside, layer by layer
    st = e.m.stats()
    assert st["tiers"]["host"]["promoted_tokens"] > 0
    assert st["tiers"]["host"]["real"] is True
    assert st["exposed_load_seconds"] >= 0.0


def test_disk_tier_round_trip_and_restart(tmp_path):
    kw = dict(host_bytes=64 << 10, disk_dir=str(tmp_path), disk_bytes=64 << 20)
    e = Engine(**kw)
    convs = [conversation(f, 3) for f in range(6)]
    for c in convs:
        e.serve(c)
    e.churn(range(10, 40))
    assert e.m.stats()["tiers"]["disk"]["records"] > 0
    files = list(tmp_path.rglob("*.kvb"))
    assert files, "real files under the directory"
    e.m.flush()  # a planned shutdown: everything cached goes to the lower tiers
    e.m.validate()
    del e  # the process "restarts": a new manager, a new (empty) device buffer, the same dir
    e2 = Engine(**kw)
    st = e2.m.stats()["tiers"]["disk"]
    assert st["records"] > 0, "the disk index is recovered"
    served_from_disk = 0
    for c in convs:
        nxt = np.concatenate([c, [7, 7, 7]])
        hits = e2.m.match_prefix_tiers(nxt)
        if hits["disk"] > hits["host"]:
            assert e2.serve(nxt) == hits["disk"]  # bytes checked
            served_from_disk += 1
    assert served_from_disk > 0
    assert e2.m.stats()["tiers"]["disk"]["promoted_tokens"] > 0


def test_corrupted_disk_record_is_a_miss_never_wrong_bytes(tmp_path):
    kw = dict(host_bytes=0, disk_dir=str(tmp_path), disk_bytes=64 << 20)
    e = Engine(**kw)
    first = conversation(0, 3)
    e.serve(first)
    e.churn(range(10, 30))
    nxt = conversation(0, 4)
    assert e.m.match_prefix_tiers(nxt)["disk"] == resume(first)
    for f in tmp_path.rglob("*.kvb"):  # flip one payload byte in every record
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    hit = e.serve(nxt)  # bytes of whatever is served are checked inside
    assert hit is not None and hit < resume(first)
    st = e.m.stats()
    assert st["promotion_failures"] > 0
    assert st["tiers"]["disk"]["store"]["checksum_failures"] > 0


def test_torn_disk_record_detected_after_restart(tmp_path):
    kw = dict(host_bytes=0, disk_dir=str(tmp_path), disk_bytes=64 << 20)
    e = Engine(**kw)
    e.serve(conversation(0, 3))
    e.churn(range(10, 30))
    n = e.m.stats()["tiers"]["disk"]["used_bytes"]
    del e
    files = sorted(tmp_path.rglob("*.kvb"))
    f = files[0]
    f.write_bytes(f.read_bytes()[:20])  # a torn write
    e2 = Engine(**kw)
    # Bytes, not records: the torn file may be one group of a block whose others survive.
    assert e2.m.stats()["tiers"]["disk"]["used_bytes"] < n
    assert not f.exists(), "the torn record is removed on recovery"
    e2.churn(range(50, 55))  # still serves, with checked bytes


def test_remote_round_trip(remote_server):
    e = Engine(remote_url=remote_server.url, remote_bytes=64 << 20)
    first = conversation(0, 3)
    e.serve(first)
    e.churn(range(10, 30))
    nxt = conversation(0, 4)
    hits = e.m.match_prefix_tiers(nxt)
    assert hits["remote"] == resume(first) > hits["device"], hits
    assert e.serve(nxt) == resume(first)
    st = e.m.stats()["tiers"]["remote"]
    assert st["real"] and st["promoted_tokens"] > 0 and st["store"]["puts"] > 0


def step_admissions(e: Engine, ids: range, turns: int, families: int | None = None) -> None:
    """Admits one conversation per id through ``step`` (family ``id % families``, or the id;
    finishing each that got in): no exception reaches the engine whatever the store does."""
    for f in ids:
        out = e.m.step(admit=[(10_000 + f, conversation(f % families if families else f, turns))])
        assert len(out[0]) == 1
        if out[0][0] >= 0:
            e.m.finish(10_000 + f)


def assert_service_resumes(e: Engine, family: int) -> None:
    """Past the reconnect back-off, a conversation pushed down to the store resumes from it."""
    import time

    time.sleep(0.3)
    first = conversation(family, 3)
    e.serve(first)
    e.churn(range(40, 60))
    assert e.serve(conversation(family, 4)) == resume(first), "service resumes with the store back"


def test_remote_cluster_round_trip_and_a_killed_primary(remote_cluster):
    """A ``redis+cluster://`` URL: records spread over three primaries; one killed mid-run is
    misses (every hit's bytes still checked), and once restarted the tier serves again."""
    url = remote_cluster.url
    assert url.startswith("redis+cluster://127.0.0.1:")
    e = Engine(remote_url=url, remote_bytes=64 << 20)
    first = conversation(0, 3)
    e.serve(first)
    e.churn(range(10, 30))
    nxt = conversation(0, 4)
    hits = e.m.match_prefix_tiers(nxt)
    assert hits["remote"] == resume(first) > hits["device"], hits
    assert e.serve(nxt) == resume(first)
    remote_cluster.kill(1)
    step_admissions(e, range(30, 60), 3, families=12)
    e.m.validate()
    st = e.m.stats()["tiers"]["remote"]
    assert st["store"]["unavailable"] > 0, st
    remote_cluster.start()
    assert_service_resumes(e, 99)


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_remote_killed_mid_run_then_back(remote_server, end):
    e = Engine(remote_url=remote_server.url, remote_bytes=64 << 20)
    e.churn(range(0, 10))
    getattr(remote_server, end)()  # SIGTERM, or SIGKILL
    step_admissions(e, range(10, 30), 2)  # evictions that cannot be written are counted
    st = e.m.stats()["tiers"]["remote"]
    assert st["store"]["unavailable"] > 0 or st["write_failures"] > 0
    e.m.validate()
    remote_server.start()
    assert_service_resumes(e, 99)


def test_remote_frozen_server_does_not_hold_the_steps(remote_server):
    """A hung server (SIGSTOP): admissions go on, their remote reads and writes are counted
    timeouts (misses and failed writes), never wrong bytes; after SIGCONT hits resume."""
    import signal
    import time

    e = Engine(host_bytes=32 << 10, remote_url=remote_server.url, remote_bytes=64 << 20,
               remote_timeout_ms=50)
    for f in range(6):
        e.serve(conversation(f, 3))
    e.churn(range(100, 130))
    assert e.m.match_prefix_tiers(conversation(0, 4))["remote"] == resume(conversation(0, 3))
    remote_server.signal(signal.SIGSTOP)
    try:
        # A lookup of an unknown prompt asks the store about all its blocks in one call.
        t = time.perf_counter()
        assert e.m.match_prefix_tiers(conversation(999, 6))["remote"] <= 48
        assert time.perf_counter() - t < 3.0
        for f in range(12):
            prompt = conversation(f % 6, 4) if f % 2 == 0 else conversation(200 + f, 3)
            t = time.perf_counter()
            assert e.serve(prompt) is not None  # bytes of any hit checked inside
            # A hang guard, not a timing target: a call's deadline is 50 ms.
            assert time.perf_counter() - t < 3.0
        store = e.m.stats()["tiers"]["remote"]["store"]
        assert store["timeouts"] > 0 and store["unavailable"] >= store["timeouts"], store
        e.m.validate()
    finally:
        remote_server.signal(signal.SIGCONT)
    time.sleep(2.2)  # past the longest reconnect back-off
    first = conversation(77, 3)
    e.serve(first)
    e.churn(range(300, 330))
    nxt = conversation(77, 4)
    assert e.m.match_prefix_tiers(nxt)["remote"] == resume(first)
    assert e.serve(nxt) == resume(first), "served from the remote store again, bytes checked"


def test_a_thread_waiting_for_kv_does_not_hold_the_manager(remote_server):
    """One thread waits for a load held by a frozen server (up to its deadline); another
    steps the manager meanwhile, and the load settles ready for the first."""
    import signal
    import threading
    import time

    e = Engine(remote_url=remote_server.url, remote_bytes=64 << 20, remote_timeout_ms=5000,
               load_deadline_ms=3000)
    for f in range(4):
        e.serve(conversation(f, 3))
    e.churn(range(100, 130))
    nxt = conversation(0, 4)
    assert e.m.match_prefix_tiers(nxt)["remote"] == resume(conversation(0, 3))
    remote_server.signal(signal.SIGSTOP)
    try:
        assert e.m.admit(999, nxt) is None and e.m.waiting_for_kv(999)
        ready = []
        waiter = threading.Thread(target=lambda: ready.append(e.m.wait_for_kv(999)))
        waiter.start()
        time.sleep(0.05)
        t = time.perf_counter()
        e.m.step()                          # not behind the waiting thread
        e.m.validate()
        assert waiter.is_alive()
        assert time.perf_counter() - t < 2.0  # a hang guard, not a timing target
    finally:
        remote_server.signal(signal.SIGCONT)
    waiter.join(timeout=30)
    assert ready == [True]
    assert 999 in e.m.take_ready()
    assert e.m.admit(999, nxt) is not None
    e.m.validate()


def test_load_settings_are_checked():
    for kw in ({"load_policy": "sometimes"}, {"load_deadline_ms": -1},
               {"prefill_tokens_per_second": 0}, {"prefill_tokens_per_second": float("nan")},
               {"async_loads": "yes"}):
        with pytest.raises(kvalloc.InvalidArgumentError):
            kvalloc.KVCacheManager(spec(), 1 << 20, block_tokens=16, **kw)
    m = kvalloc.KVCacheManager(spec(), 1 << 20, block_tokens=16)
    with pytest.raises(kvalloc.InvalidArgumentError):
        m.record_prefill(100, 0.0)
    with pytest.raises(kvalloc.InvalidArgumentError):
        m.wait_for_kv(1, timeout=-1)
    m.record_prefill(1000, 0.5)
    assert m.stats()["loads"]["prefill_tokens_per_second"] == 2000.0
    assert not m.waiting_for_kv(1) and m.take_ready() == [] and m.wait_for_kv(1) is False
    m.validate()


def test_remote_tls_round_trip(remote_tls_server):
    s = remote_tls_server
    assert s.url.startswith("rediss://")
    e = Engine(remote_url=s.url, remote_bytes=64 << 20, remote_tls_ca=Path(s.cert("ca.crt")))
    first = conversation(0, 3)
    e.serve(first)
    e.churn(range(10, 30))
    nxt = conversation(0, 4)
    assert e.m.match_prefix_tiers(nxt)["remote"] == resume(first)
    assert e.serve(nxt) == resume(first)  # bytes over TLS, checked layer by layer
    st = e.m.stats()["tiers"]["remote"]["store"]
    assert st["puts"] > 0 and st["gets"] > 0 and st["unavailable"] == 0, st


def test_remote_tls_untrusted_server_is_unavailable(remote_tls_server):
    s = remote_tls_server
    e = Engine(remote_url=s.url, remote_bytes=64 << 20, remote_tls_ca=s.cert("other-ca.crt"))
    first = conversation(0, 3)
    e.serve(first)
    e.churn(range(10, 30))  # no exception: the store is unavailable to it
    assert e.m.match_prefix_tiers(conversation(0, 4))["remote"] < resume(first)
    st = e.m.stats()["tiers"]["remote"]["store"]
    assert st["unavailable"] > 0 and st["puts"] == 0, st
    e.m.validate()


def test_remote_transport_arguments_are_checked(remote_tls_server, tmp_path):
    s = remote_tls_server

    def make(**kw):
        kvalloc.KVCacheManager(spec(), 96 << 10, **kw)

    tls = dict(remote_url=s.url, remote_bytes=1 << 20)
    plain = dict(remote_url=f"redis://127.0.0.1:{s.port}", remote_bytes=1 << 20)
    with pytest.raises(kvalloc.InvalidArgumentError, match="tls_ca.*rediss://"):
        make(remote_tls_ca=s.cert("ca.crt"), **plain)
    with pytest.raises(kvalloc.InvalidArgumentError, match="remote_url"):
        make(remote_tls_ca=s.cert("ca.crt"))
    with pytest.raises(kvalloc.InvalidArgumentError, match="tls_ca"):
        make(remote_tls_ca=tmp_path / "none", **tls)
    with pytest.raises(kvalloc.InvalidArgumentError, match="tls_key"):
        make(remote_tls_cert=s.cert("client.crt"), **tls)
    for bad in (0, -5, "50", 1.5):
        with pytest.raises(kvalloc.InvalidArgumentError, match="remote_timeout_ms"):
            make(remote_timeout_ms=bad, **tls)


def test_remote_password(remote_server_with_password):
    s = remote_server_with_password
    ok = Engine(remote_url=s.url, remote_bytes=64 << 20, remote_password=s.password)
    first = conversation(0, 3)
    ok.serve(first)
    ok.churn(range(10, 30))
    assert ok.m.match_prefix_tiers(conversation(0, 4))["remote"] == resume(first)
    bad = Engine(remote_url=s.url, remote_bytes=64 << 20, remote_password="wrong")
    bad.serve(first)
    bad.churn(range(10, 30))  # no exception: the store is unavailable to it
    assert bad.m.stats()["tiers"]["remote"]["store"]["unavailable"] > 0


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from tier_engine import Engine, conversation
    e = Engine(remote_url={url!r}, remote_bytes=64 << 20, write_through=True)
    assert e.serve(conversation(5, 3)) == 0
    print("ok")
    """
)


def test_two_processes_share_the_remote_store(remote_server):
    code = WRITER.format(tests=str(ROOT / "tests"), url=remote_server.url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # A second instance (this process) never saw the conversation; the store has it.
    e = Engine(remote_url=remote_server.url, remote_bytes=64 << 20)
    nxt = conversation(5, 4)
    hits = e.m.match_prefix_tiers(nxt)
    assert hits["device"] == 0 and hits["remote"] == resume(conversation(5, 3)), hits
    assert e.serve(nxt) == resume(conversation(5, 3))  # bytes written by the other process


def test_other_models_never_share_remote_records(remote_server):
    e = Engine(remote_url=remote_server.url, remote_bytes=64 << 20, write_through=True)
    e.serve(conversation(5, 3))
    other = kvalloc.ModelSpec.from_hf_config({**__import__("tier_engine").CONFIG, "head_dim": 16})
    m = kvalloc.KVCacheManager(other, 1 << 20, remote_url=remote_server.url, remote_bytes=64 << 20)
    m.register_device(np.zeros(1 << 20, np.uint8))
    assert m.match_prefix_tiers(conversation(5, 4))["remote"] == 0


def test_register_device_bad_input():
    m = kvalloc.KVCacheManager(spec(), 96 << 10, host_bytes=1 << 20)
    with pytest.raises(kvalloc.InvalidArgumentError, match="uint8"):
        m.register_device(np.zeros(96 << 10, np.float32))
    with pytest.raises(kvalloc.InvalidArgumentError, match="bytes"):
        m.register_device(np.zeros(1024, np.uint8))
    with pytest.raises(kvalloc.InvalidArgumentError):
        m.register_device([0] * 10)
    ro = np.zeros(96 << 10, np.uint8)
    ro.flags.writeable = False
    with pytest.raises(kvalloc.InvalidArgumentError):
        m.register_device(ro)
    m.admit(1, np.arange(40))
    with pytest.raises(kvalloc.InvalidArgumentError, match="before the first admission"):
        m.register_device(np.zeros(96 << 10, np.uint8))
    with pytest.raises(kvalloc.InvalidArgumentError, match="disk_bytes"):
        kvalloc.KVCacheManager(spec(), 96 << 10, disk_dir="/tmp/x")
    with pytest.raises(kvalloc.InvalidArgumentError, match="url"):
        kvalloc.KVCacheManager(spec(), 96 << 10, remote_url="not a url", remote_bytes=1 << 20)
    with pytest.raises(kvalloc.InvalidArgumentError):
        m.load_handle(1).wait_layer(0, timeout=-1)
    with pytest.raises(kvalloc.RequestError):
        m.load_handle(12345)
