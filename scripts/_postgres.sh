# PostgreSQL for the store tests (tests/test_store_contract.py, tests/pg_check.py): a throw-away cluster.
#
# Sourced by scripts/test: when `initdb`/`pg_ctl` are missing (on PATH or in /usr/lib/postgresql/*/bin)
# it installs Debian's `postgresql` package (as root: apt-get update, then install), starts a cluster in a
# temporary folder on a free port as an unprivileged user (`multigen-pg`, created when scripts/test runs
# as root: postgres refuses to run as root), exports its URL in MULTIGEN_TEST_PG and removes it all when
# the test run exits. When that fails it says why in MULTIGEN_TEST_PG_ERROR: the PostgreSQL tests then fail
# under CI=true and are skipped elsewhere. A MULTIGEN_TEST_PG already set (a server of your own) is used as
# it is. Run as a script, it starts or stops one cluster for tests/pg_check.py (no install):
#   bash scripts/_postgres.sh start      # prints: URL FOLDER
#   bash scripts/_postgres.sh stop FOLDER
#   bash scripts/_postgres.sh restart FOLDER   # an immediate (crash-like) restart, same port and options
MULTIGEN_PG_USER="${MULTIGEN_PG_USER:-multigen-pg}"

multigen_pg_bindir() {  # the folder of initdb and pg_ctl, or nothing
  local d
  d="$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")"
  if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  return 1
}

multigen_pg_install() {  # Debian's postgresql package, as root
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "not root or no apt-get: install PostgreSQL with: apt-get install postgresql"
    return 1
  fi
  echo "multigen: installing PostgreSQL (Debian package postgresql) for the store tests" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
    || { echo "apt-get install postgresql failed"; return 1; }
}

multigen_pg_run() {  # run a command as the cluster's owner (root cannot run postgres)
  if [ "$(id -u)" = "0" ]; then
    (cd / && runuser -u "$MULTIGEN_PG_USER" -- "$@")  # from a folder that user may enter
  else
    "$@"
  fi
}

multigen_pg_start() {  # prints "URL FOLDER" of a new cluster; on failure prints why and returns 1
  local bin base dir port
  bin="$(multigen_pg_bindir)" || { echo "initdb/pg_ctl not found"; return 1; }
  if [ "$(id -u)" = "0" ] && ! id "$MULTIGEN_PG_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$MULTIGEN_PG_USER" >/dev/null 2>&1 \
      || { echo "could not create the user $MULTIGEN_PG_USER"; return 1; }
  fi
  base="${TMPDIR:-/tmp}"
  [ "$(id -u)" = "0" ] && base=/tmp  # root's TMPDIR may be closed to the cluster's user
  dir="$(mktemp -d "$base/multigen-pg.XXXXXX")" || { echo "mktemp failed"; return 1; }
  chmod 755 "$dir"
  [ "$(id -u)" = "0" ] && chown "$MULTIGEN_PG_USER" "$dir"
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  if ! multigen_pg_run "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale --no-sync \
       >"$dir/initdb.log" 2>&1; then
    echo "initdb failed: $(tail -n 3 "$dir/initdb.log" | tr '\n' ' ')"; rm -rf "$dir"; return 1
  fi
  # a test cluster: durability off (fsync, full page writes), sockets in its own folder, TCP on localhost
  if ! multigen_pg_run "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 start \
       -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c max_connections=200" \
       >/dev/null 2>&1; then
    echo "pg_ctl start failed: $(tail -n 3 "$dir/server.log" 2>/dev/null | tr '\n' ' ')"; rm -rf "$dir"; return 1
  fi
  echo "postgresql://postgres@127.0.0.1:$port/postgres $dir"
}

multigen_pg_stop() {  # stop and remove the cluster in folder $1
  local bin dir="$1"
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  bin="$(multigen_pg_bindir)" && multigen_pg_run "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1
  rm -rf "$dir"
}

multigen_pg_restart() {  # restart the cluster in folder $1 at once, as a crash would (postmaster.opts keeps
  # its port and options); returns when it accepts connections again
  local bin dir="$1"
  [ -n "$dir" ] && [ -d "$dir/data" ] || { echo "no cluster in '$dir'"; return 1; }
  bin="$(multigen_pg_bindir)" || { echo "initdb/pg_ctl not found"; return 1; }
  if ! multigen_pg_run "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m immediate -w -t 30 restart \
       >/dev/null 2>&1; then
    echo "pg_ctl restart failed: $(tail -n 3 "$dir/server.log" 2>/dev/null | tr '\n' ' ')"; return 1
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run as a script
  set -u
  case "${1:-}" in
    start) multigen_pg_start ;;
    stop) multigen_pg_stop "${2:-}" ;;
    restart) multigen_pg_restart "${2:-}" ;;
    *) echo "usage: bash scripts/_postgres.sh start | stop FOLDER | restart FOLDER" >&2; exit 2 ;;
  esac
  exit $?
fi

# sourced by scripts/test
if [ -z "${MULTIGEN_TEST_PG:-}" ]; then
  _mg_pg_why=""
  if ! multigen_pg_bindir >/dev/null; then
    _mg_pg_why="$(multigen_pg_install)" || true
  fi
  if _mg_pg_out="$(multigen_pg_start)"; then
    export MULTIGEN_TEST_PG="${_mg_pg_out% *}"
    MULTIGEN_TEST_PG_DIR="${_mg_pg_out##* }"
    trap 'multigen_pg_stop "$MULTIGEN_TEST_PG_DIR"' EXIT
  else
    export MULTIGEN_TEST_PG_ERROR="${_mg_pg_why:+$_mg_pg_why; }$_mg_pg_out"
    echo "multigen: no PostgreSQL for the store tests ($MULTIGEN_TEST_PG_ERROR);" \
         "they are skipped (they fail under CI=true)" >&2
  fi
  unset _mg_pg_why _mg_pg_out
fi
