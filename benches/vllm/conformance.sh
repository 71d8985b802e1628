#!/usr/bin/env bash
# vLLM's own scheduler tests as kvalloc's conformance suite: vLLM 0.32.0's
# tests/v1/core/test_scheduler.py and three smaller scheduler test files (TESTS below), run
# twice (stock vLLM, then with every scheduler the tests build a kvalloc.vllm.KvallocScheduler,
# its tables checked on every call: verify), then a summary. Exits non-zero when a test that passes
# stock fails with kvalloc and is not in benches/vllm/conformance_skips.txt.
#
#   benches/vllm/conformance.sh              # both runs
#   benches/vllm/conformance.sh kvalloc      # the kvalloc run only (no stock comparison)
#   benches/vllm/conformance.sh both -k preempt   # extra arguments go to pytest
#
# Idempotent. Makes .venv-vllm (benches/vllm/setup_venv.sh) when missing, fetches vLLM's sdist
# (its tests/ tree; vLLM's files are not edited) and a config-only Hugging Face cache into
# benches/vllm/.conformance/ (ignored), and runs offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/benches/vllm
VENV="${KVALLOC_VLLM_VENV:-.venv-vllm}"
WORK=$HERE/.conformance
VLLM_VERSION=0.32.0
SDIST_URL=https://files.pythonhosted.org/packages/d5/df/5471312c76e335eaa2b8333e87ea39f0d37bfe24f10a582620e34ff12e33/vllm-0.32.0.tar.gz
SDIST_SHA256=d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad
# vLLM's scheduler tests that drive it through the manager's public interface (test_prefix_caching.py
# and test_single_type_kv_cache_manager.py test vLLM's own manager: not a conformance suite).
TESTS=(
  tests/v1/core/test_scheduler.py
  tests/v1/core/test_priority_scheduler_random.py
  tests/v1/core/test_priority_preemption_bug.py
  tests/v1/core/test_worker_slot_overflow.py
)

which="${1:-both}"
case "$which" in stock|kvalloc|both) shift || true ;; *) which=both ;; esac

[ -f "$VENV/.vllm-installed" ] || KVALLOC_VLLM_VENV="$VENV" benches/vllm/setup_venv.sh
py="$ROOT/$VENV/bin/python"
# vLLM's tests/conftest.py imports tblib, which vLLM's runtime requirements leave out.
"$py" -c 'import tblib' 2>/dev/null || "$py" -m pip install -q --disable-pip-version-check tblib

# vLLM's test tree, from the pinned sdist (its metadata build fails, so pip cannot keep it).
tree=$WORK/vllm-$VLLM_VERSION
if [ ! -f "$tree/.unpacked" ]; then
  mkdir -p "$WORK"
  sdist=$WORK/vllm-$VLLM_VERSION.tar.gz
  if [ ! -f "$sdist" ]; then
    curl -sSfL -o "$sdist.part" "$SDIST_URL" || {
      echo "cannot fetch vLLM's sdist ($SDIST_URL); put vllm-$VLLM_VERSION.tar.gz in $WORK/" >&2
      exit 1
    }
    mv "$sdist.part" "$sdist"
  fi
  echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet -
  rm -rf "$tree"
  tar -xzf "$sdist" -C "$WORK" "vllm-$VLLM_VERSION/tests" "vllm-$VLLM_VERSION/pyproject.toml"
  rm "$sdist"
  touch "$tree/.unpacked"
fi

# A Hugging Face cache holding only the config.json of each model the tests name (and, for the
# multimodal one, a five-token tokenizer and its image processor's configs: vLLM builds its processor;
# the tests pass token ids).
hf=$WORK/hf-home
for dir in "$HERE"/hf-cache-configs/*/; do
  name=$(basename "$dir")
  repo=$hf/hub/models--$name
  rev=0000000000000000000000000000000000000000
  mkdir -p "$repo/refs" "$repo/snapshots/$rev"
  printf %s "$rev" > "$repo/refs/main"
  cp "$dir"* "$repo/snapshots/$rev/"
done

run() {
  local mode=$1; shift
  local start=$SECONDS
  rm -f "$WORK/$mode.json"
  (
    cd "$tree"
    HF_HOME="$hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_LOGGING_LEVEL=WARNING \
      PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
      KVALLOC_VLLM_OPTIONS='{"verify": true}' \
      KVALLOC_CONFORMANCE="$mode" KVALLOC_CONFORMANCE_SKIPS="$HERE/conformance_skips.txt" \
      KVALLOC_CONFORMANCE_OUT="$WORK/$mode.json" \
      "$py" -m pytest -p conformance_plugin -q -p no:cacheprovider "${TESTS[@]}" "$@" > "$WORK/$mode.log" 2>&1
  ) || true
  echo "$mode run: $(( SECONDS - start )) s ($(tail -n 1 "$WORK/$mode.log"))" >&2
}

[ "$which" = kvalloc ] || run stock "$@"
[ "$which" = stock ] || run kvalloc "$@"
"$py" "$HERE/conformance_report.py" "$WORK" "$HERE/conformance_skips.txt"
