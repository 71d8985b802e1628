"""The README says what is true: every ```python block runs as written, the cheap ```bash
commands run, and every other command and path it names exists (scripts, benches, tests,
`kvalloc` subcommands and options, cargo examples, benches and tests).

```text blocks are output or pseudo-code and are not run; ```rust blocks are compiled by the
crate's doc tests, not here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest

from conftest import ROOT, VLLM_PYTHON

README = (ROOT / "README.md").read_text()
# The remote tier's example reads its server's URL from this variable (unset: no remote tier).
REMOTE_ENV = "KVALLOC_EXAMPLE_REMOTE_URL"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)


def _commands() -> list[str]:
    """Each command line of the ```bash blocks, comments and blank lines dropped."""
    out = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            cmd = line.split(" #")[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def _inline_commands() -> list[str]:
    """Commands quoted inline (`kvalloc simulate`, `cargo bench --bench manager`, ...), as in
    the performance tables: checked like the blocks' commands, never run."""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    heads = re.compile(r"^(kvalloc (?!\.)|scripts/|benches/|cargo |\.venv/bin/python -m )")
    return [c for c in spans if heads.match(c)]


PYTHON_BLOCKS = _blocks("python")
COMMANDS = _commands()
INLINE_COMMANDS = sorted(set(_inline_commands()) - set(COMMANDS))


def test_readme_has_its_examples():
    # A block renamed to ```py or ```sh would silently leave these tests.
    assert len(PYTHON_BLOCKS) >= 3
    assert not re.search(r"^```(py|python3|sh|shell|console)\s*$", README, re.M)
    assert "scripts/run.sh" in COMMANDS and "scripts/test.sh" in COMMANDS
    assert INLINE_COMMANDS


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, request, monkeypatch):
    block = PYTHON_BLOCKS[index]
    if "from vllm" in block:
        # vLLM is optional: its block runs in the venv benches/vllm/setup_venv.sh makes.
        if not VLLM_PYTHON.exists():
            pytest.skip("no .venv-vllm: run benches/vllm/setup_venv.sh to run the vLLM example")
        import subprocess

        proc = subprocess.run([str(VLLM_PYTHON), "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return
    server = None
    if REMOTE_ENV in block:
        server = request.getfixturevalue("remote_server")
        monkeypatch.setenv(REMOTE_ENV, server.url)
    ns: dict = {"__name__": "__main__"}
    exec(compile(block, f"README.md python block {index}", "exec"), ns)
    if server is not None:
        # The remote tier took part: the block's manager wrote records to the real server.
        remote = ns["m"].stats()["tiers"]["remote"]
        assert remote["bytes_written"] > 0, remote


def _kvalloc(args: list[str]) -> tuple[int, str]:
    from kvalloc import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(args)
    return rc, buf.getvalue()


def _cargo_targets(kind: str) -> set[str]:
    """The names of Cargo.toml's `[[example]]` or `[[bench]]` targets (no tomllib before 3.11)."""
    text = (ROOT / "Cargo.toml").read_text()
    return set(re.findall(rf'^\[\[{kind}\]\]\s*\nname\s*=\s*"([^"]+)"', text, re.M))


# Cheap enough to run on every test run (each well under a second).
RUN = {"kvalloc presets", "kvalloc inspect --model gpt-oss-120b"}


@pytest.mark.parametrize("cmd", COMMANDS + INLINE_COMMANDS)
def test_readme_command_is_real(cmd):
    """Runs the cheap commands; for the others checks that what they name exists, so a renamed
    script, subcommand, option or target fails here rather than in a reader's shell."""
    argv = shlex.split(cmd)
    head = argv[0]
    if head == "kvalloc":
        from kvalloc import cli

        if cmd in RUN:
            rc, out = _kvalloc(argv[1:])
            assert rc == 0 and out.strip(), cmd
            return
        args = cli.build_parser().parse_args(argv[1:])  # SystemExit on an unknown option
        assert args.command == argv[1]
    elif head.startswith(("scripts/", "benches/", ".ci/")):
        path = ROOT / head
        assert path.is_file() and path.stat().st_mode & 0o111, f"{head} is not an executable file"
    elif head == ".venv/bin/python":
        assert argv[1] == "-m", cmd
        module = argv[2]
        if module == "pytest":
            for a in argv[3:]:
                if a.endswith(".py") or "/" in a:
                    assert (ROOT / a.split("::")[0]).exists(), a
        else:
            import importlib.util

            assert importlib.util.find_spec(module) is not None, module
    elif head == "cargo":
        sub = argv[1]
        assert sub in {"test", "run", "fmt", "clippy", "bench", "doc"}, cmd
        for flag, kind in (("--example", "example"), ("--bench", "bench")):
            if flag in argv:
                assert argv[argv.index(flag) + 1] in _cargo_targets(kind), cmd
        if "--test" in argv:
            assert (ROOT / "tests" / f"{argv[argv.index('--test') + 1]}.rs").is_file(), cmd
    else:
        pytest.fail(f"README command not classified by this test: {cmd}")


def test_readme_reference_engine_commands_parse():
    """The reference engine's options the README shows are its own (it has no parser to import,
    so its --help must list each)."""
    import subprocess
    import sys

    used = {
        opt
        for cmd in COMMANDS
        if "kvalloc.reference" in cmd
        for opt in shlex.split(cmd)
        if opt.startswith("--")
    }
    assert used
    help_text = subprocess.run(
        [sys.executable, "-m", "kvalloc.reference", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    for opt in used:
        assert opt in help_text, opt


def test_readme_presets_are_real():
    """Every preset name the README passes to a command or to ModelSpec.preset exists."""
    import kvalloc

    names = set(re.findall(r'preset\("([^"]+)"\)', README))
    names |= set(re.findall(r"--model ([a-z0-9][\w.-]*)", README))
    names |= {n for n in re.findall(r"plan_memory -- (\S+)", README) if not n.endswith(".json")}
    assert names
    assert names <= set(kvalloc.ModelSpec.presets()), names - set(kvalloc.ModelSpec.presets())


def test_readme_paths_exist():
    """Every file or folder of the tree that the README names in backticks or links exists."""
    named = set(re.findall(r"`((?:scripts|benches|tests|docs|python|rust|\.ci)/[\w./-]+)`", README))
    named |= set(re.findall(r"\]\(((?:docs|python|rust)/[\w./-]+?)(?:#[\w-]+)?\)", README))
    assert named
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert not missing, missing


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_into_docs_reach_a_heading():
    links = re.findall(r"\]\(((?:docs)/[\w./-]+)#([\w-]+)\)", README)
    assert links
    for path, anchor in links:
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
        assert anchor in {_slug(h) for h in headings}, f"{path}#{anchor}"
