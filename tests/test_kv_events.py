"""kvalloc.kv_events: a manager's events published in vLLM's wire format over ZeroMQ.

A plain pyzmq SUB socket and msgpack decode what a vLLM consumer expects (multipart topic,
8-byte big-endian sequence number, msgpack ``[ts, events, data_parallel_rank]`` with events
tagged BlockStored / BlockRemoved / AllBlocksCleared) and replay them to exactly the blocks the
manager caches; kvalloc's own events (resume points, lower tiers) arrive only on the extension
socket and replay to ``resume_points`` and ``lower_blocks``. With ``.venv-vllm``, vLLM's own
``KVEventBatch`` decoder reads every batch of the vLLM socket."""

import json
import subprocess
import textwrap

import msgpack
import numpy as np
import pytest
import zmq

from conftest import ROOT, VLLM_PYTHON, needs_vllm
from kvalloc import KVCacheManager, ModelSpec
from kvalloc.kv_events import KVEventPublisher, resume_hit

B = 16
# The fields of vLLM 0.32's event structs (vllm/distributed/kv_events.py): required ones, and
# all a decoder accepts.
STORED_REQUIRED = {"block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name"}
STORED_FIELDS = STORED_REQUIRED | {"extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
                                   "locality", "ownership", "session_id"}
REMOVED_REQUIRED = {"block_hashes", "medium"}
REMOVED_FIELDS = REMOVED_REQUIRED | {"group_idx", "locality", "ownership"}


def small_spec() -> ModelSpec:
    # One full layer and three sliding layers of window 32 (two blocks).
    return ModelSpec.from_hf_config(
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1]}
    )


def seq(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def subscriber(ctx: zmq.Context, endpoint: str, topic: bytes = b"") -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def receive_all(sub: zmq.Socket) -> list[list[bytes]]:
    """Every message waiting (each sent before this is called; a generous bound on delivery
    is the only wait, never asserted on)."""
    out = []
    while sub.poll(2000):
        out.append(sub.recv_multipart())
        while sub.poll(0):
            out.append(sub.recv_multipart())
    return out


def run_workload(pub: KVEventPublisher, m: KVCacheManager) -> dict[int, np.ndarray]:
    """Conversations over a small device cache and host memory, a step, an abort and a reset;
    each drained batch published with the requests' tokens. Returns the prompts by id."""
    prompts: dict[int, np.ndarray] = {}
    system = seq(0, 64)
    for rid in range(1, 25):
        prompt = np.concatenate([system, seq(rid % 5 * 10_000, 40 + 13 * (rid % 4))])
        prompts[rid] = prompt
        if m.admit(rid, prompt) is not None:
            m.extend(rid, np.arange(7, 27, dtype=np.int64))
            prompts[rid] = np.concatenate([prompt, np.arange(7, 27, dtype=np.int64)])
            (m.abort if rid % 7 == 0 else m.finish)(rid)
        m.wait_loads()
        pub.publish(m.take_events(), tokens=prompts)
    prompts[100] = np.concatenate([system, seq(777_000, 50)])
    pub.publish(m.step(admit=[(100, prompts[100])]).events, tokens=prompts)
    pub.publish(m.step(finish=[100]).events, tokens=prompts)
    assert m.reset_prefix_cache()
    pub.publish(m.take_events())
    prompts[200] = np.concatenate([system, seq(888_000, 70)])
    m.admit(200, prompts[200])
    m.finish(200)
    pub.publish(m.take_events(), tokens=prompts)
    return prompts


@pytest.fixture
def published():
    """The workload's messages as a plain vLLM consumer (all topics) and a kvalloc-aware one
    (the extension socket) received them, with the manager."""
    ctx = zmq.Context.instance()
    m = KVCacheManager(small_spec(), 64 << 10, host_bytes=64 << 10, events=True)
    pub = KVEventPublisher("tcp://127.0.0.1:*", block_size=B, extensions_endpoint="tcp://127.0.0.1:*",
                           groups=m.spec.groups)
    main = subscriber(ctx, pub.endpoint)
    ext = subscriber(ctx, pub.extensions_endpoint, b"kvalloc")
    assert pub.wait_for_subscriber() and pub.wait_for_subscriber(extensions=True)
    prompts = run_workload(pub, m)
    got = receive_all(main), receive_all(ext)
    main.close()
    ext.close()
    pub.close()
    return m, prompts, got


def decode(messages: list[list[bytes]], topic: bytes) -> list[list]:
    """As vLLM's consumer does: (topic, seq, payload); seq counts from 0 without a gap."""
    batches = []
    for i, frames in enumerate(messages):
        assert len(frames) == 3
        t, seq_bytes, payload = frames
        assert t == topic and len(seq_bytes) == 8 and int.from_bytes(seq_bytes, "big") == i
        batch = msgpack.unpackb(payload)
        assert isinstance(batch[0], float) and batch[2] == 0 and len(batch) == 3
        batches.append(batch[1])
    return batches


def test_a_plain_subscriber_decodes_vllm_batches(published):
    m, prompts, (main, _) = published
    assert len(main) > 10
    chains = {rid: m.block_hashes(p).tolist() for rid, p in prompts.items()}
    where: dict[int, list[tuple[int, int]]] = {}
    for rid, hs in chains.items():
        for i, h in enumerate(hs):
            where.setdefault(h, []).append((rid, i))
    blocks: set[tuple[int, int]] = set()
    kinds = set()
    for events in decode(main, b""):
        for e in events:
            kinds.add(e["type"])
            if e["type"] == "BlockStored":
                assert STORED_REQUIRED <= set(e) <= STORED_FIELDS | {"type"}
                assert e["medium"] == "GPU" and e["block_size"] == B and e["lora_id"] is None
                g = e["group_idx"]
                assert (e["kv_cache_spec_kind"], e.get("kv_cache_spec_sliding_window")) == (
                    ("full_attention", None) if g == 0 else ("sliding_window", 32))
                # A chain of blocks of one prompt: hashes, parent and token ids are its own.
                n = len(e["block_hashes"])
                owners = [(rid, i) for rid, i in where[e["block_hashes"][0]]
                          if chains[rid][i:i + n] == e["block_hashes"]]
                assert owners, e
                rid, first = owners[0]
                hs = chains[rid]
                assert e["parent_block_hash"] == (hs[first - 1] if first else None)
                toks = prompts[rid][first * B:(first + len(e["block_hashes"])) * B].tolist()
                assert e["token_ids"] in (toks, [])  # [] for a promotion (no request)
                for h in e["block_hashes"]:
                    assert (g, h) not in blocks
                    blocks.add((g, h))
            elif e["type"] == "BlockRemoved":
                assert REMOVED_REQUIRED <= set(e) <= REMOVED_FIELDS | {"type"}
                assert e["medium"] == "GPU"
                for h in e["block_hashes"]:
                    blocks.remove((e["group_idx"], h))
            else:
                assert e == {"type": "AllBlocksCleared"}
                blocks.clear()
    assert kinds == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    cached = m.cached_blocks()
    assert blocks == set(zip(cached["group"].tolist(), cached["hash"].tolist()))
    assert len(blocks) > 0


def test_kvalloc_events_come_only_on_the_extension_socket(published):
    m, prompts, (main, ext) = published
    resume: dict[int, int] = {}
    lower: set[tuple[str, int, int]] = set()
    kinds = set()
    for events in decode(ext, b"kvalloc"):
        for e in events:
            kinds.add(e["type"])
            if e["type"] == "Resumable":
                assert e["num_tokens"] == (e["block_index"] + 1) * B
                resume[e["block_hash"]] = e["block_index"]
            elif e["type"] == "NotResumable":
                del resume[e["block_hash"]]
            elif e["type"] == "AllBlocksCleared":
                resume.clear()
            else:
                assert (e["medium"], e["locality"]) == ("CPU", "LOCAL")  # host memory
                for h in e["block_hashes"]:
                    if e["type"] == "BlockStored":
                        lower.add((e["medium"], e["group_idx"], h))
                    else:
                        lower.remove((e["medium"], e["group_idx"], h))
    assert kinds == {"Resumable", "NotResumable", "AllBlocksCleared", "BlockStored", "BlockRemoved"}
    points = m.resume_points()
    assert resume == dict(zip(points["hash"].tolist(), points["block"].tolist()))
    held = m.lower_blocks()
    assert lower == {("CPU", g, h) for t, g, h in zip(*(held[k].tolist() for k in ("tier", "group", "hash")))}
    assert len(resume) > 0 and len(lower) > 0
    # The vLLM socket never carries them, nor lower-tier media.
    for events in decode(main, b""):
        assert all(e["type"] in ("BlockStored", "BlockRemoved", "AllBlocksCleared") for e in events)
        assert all(e.get("medium", "GPU") == "GPU" for e in events)
    # A router trusting them never estimates more than the manager's hit.
    for p in prompts.values():
        for cut in (len(p), len(p) - 5, 70, 100):
            probe = p[:cut]
            est = resume_hit(resume, m.block_hashes(probe), len(probe), B)
            assert est <= m.match_prefix(probe)


@needs_vllm
def test_vllms_decoder_reads_every_batch(published, tmp_path):
    m, _, (main, ext) = published
    (tmp_path / "main").write_bytes(msgpack.packb([f[2] for f in main]))
    (tmp_path / "ext").write_bytes(msgpack.packb([f[2] for f in ext]))
    code = f"""
        import json, msgspec
        from vllm.distributed.kv_events import KVEventBatch
        dec = msgspec.msgpack.Decoder(type=KVEventBatch)
        out = {{"main": [], "ext_rejected": 0}}
        for payload in msgspec.msgpack.decode(open({str(tmp_path / "main")!r}, "rb").read()):
            b = dec.decode(payload)
            out["main"].append([b.data_parallel_rank] + [
                [type(e).__name__, list(getattr(e, "block_hashes", [])), getattr(e, "group_idx", None),
                 getattr(e, "medium", None)] for e in b.events])
        for payload in msgspec.msgpack.decode(open({str(tmp_path / "ext")!r}, "rb").read()):
            try:
                dec.decode(payload)
            except msgspec.ValidationError:
                out["ext_rejected"] += 1
        print(json.dumps(out))
    """
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(VLLM_PYTHON), "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    plain = [[e["type"], e.get("block_hashes", []), e.get("group_idx"), e.get("medium")]
             for events in decode(main, b"") for e in events]
    assert [e for batch in got["main"] for e in batch[1:]] == plain
    assert all(batch[0] == 0 for batch in got["main"])
    # Why the extension socket exists: vLLM's decoder rejects kvalloc's events outright.
    assert got["ext_rejected"] > 0
