"""The `kvalloc` command line: inspect, through the installed console script and in-process."""

import json
import shutil
import subprocess
import sys

import pytest

from kvalloc.cli import main


def test_inspect_default_model_shows_full_group_bytes(capsys):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "mimo-v2.5-pro" in out
    assert "51,200" in out  # full group bytes per token
    for ctx in ("8K", "32K", "128K"):
        assert ctx in out


def test_inspect_json(capsys):
    assert main(["inspect", "--model", "gemma-3-27b", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"] == "gemma-3-27b"
    assert [g["bytes_per_token"] for g in rep["groups"]] == [81_920, 425_984]
    assert [s["context_tokens"] for s in rep["per_sequence"]] == [8192, 32768, 131072]
    for s in rep["per_sequence"]:
        assert s["dense_bytes"] > s["swa_aware_bytes"] > 0


def test_inspect_config_path(shared_configs, capsys):
    assert main(["inspect", "--config", str(shared_configs / "mimo-v2-flash.json"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [g["bytes_per_token"] for g in rep["groups"]] == [23_040, 199_680]


def test_inspect_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8,
                               "layer_types": ["linear_attention", "full_attention"]}))
    assert main(["inspect", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "linear_attention" in err and "layer 0" in err


def test_console_script_is_installed():
    exe = shutil.which("kvalloc") or str(__import__("pathlib").Path(sys.executable).parent / "kvalloc")
    res = subprocess.run([exe, "inspect", "--json"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["groups"][0]["bytes_per_token"] == 51_200


def test_stubs_match_the_extension():
    """The hand-written _core.pyi agrees with the compiled module (mypy.stubtest)."""
    pytest.importorskip("mypy")
    res = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kvalloc._core", "--ignore-missing-stub"],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
