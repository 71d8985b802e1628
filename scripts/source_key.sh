#!/usr/bin/env bash
# Prints a key of what the extension's build depends on in the tree DIR (default this
# checkout): the Rust and Python sources, manifests and lockfile, the profile-guided build's
# training run and what it imports, the compiler, RUSTFLAGS. scripts/setup.sh records it with
# the build it installs (and scripts/pgo_build.sh with its profile), so that a run with nothing
# changed installs nothing.
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
{
  find rust python/kvalloc -type f ! -name '*.so' ! -path '*/__pycache__/*' -print0 \
    | sort -z | xargs -0 sha256sum
  for f in Cargo.toml Cargo.lock pyproject.toml scripts/pgo_train.py benches/step_workload.py \
      benches/as_kvalloc.py; do
    if [ -f "$f" ]; then sha256sum "$f"; fi
  done
  rustc -vV
  echo "RUSTFLAGS=${RUSTFLAGS:-}"
} | sha256sum | cut -c1-16
