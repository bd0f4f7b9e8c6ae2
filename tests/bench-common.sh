# Sourced by the benchmarks: a hub data dir and config, the real tree the
# backup benchmarks measure on, and how one step is timed. Needs $work (a
# scratch directory) and $bin (the release binaries) set by the caller.

# init_hub: a hub data dir in $work/hub and $work/hub.toml (QUIC on a free
# loopback port, HTTP on any); sets $admin (its admin token) and $port.
# With $pg_url set (start_pg), the hub's store is that database.
init_hub() {
    port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$work/hub.toml" <<CFG
data_dir = "$work/hub"
log = "warn"
[quic]
listen = "127.0.0.1:$port"
[http]
listen = "127.0.0.1:0"
[fleet]
# The benchmarks measure what the hub ingests, not the per-device allowance.
device_records_per_sec = 10000000
device_bytes_per_sec = "4 GiB"
CFG
    if [ -n "${pg_url:-}" ]; then
        printf '[store]\nbackend = "postgres"\nurl = "%s"\n' "$pg_url" >>"$work/hub.toml"
        "$bin/outpost-hub" init --config "$work/hub.toml" >"$work/init.out"
    else
        "$bin/outpost-hub" init --data-dir "$work/hub" >"$work/init.out"
    fi
    admin=$(tail -1 "$work/init.out")
}

# start_pg: a private PostgreSQL cluster in $work/pg with default (durable)
# settings, on a unix socket there, with pg_stat_statements loaded; sets
# $pg_url (database "outpost") and $pg_bin, and stops it on exit (call
# stop_pg from the EXIT trap). PostgreSQL refuses root: as root its programs
# run as the postgres user.
start_pg() {
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    as_pg=(); [ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
    mkdir -p "$work/pg"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$work/pg"; chmod 755 "$work" "$(dirname "$work")"; fi
    pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "${as_pg[@]}" "$pg_bin/initdb" -D "$work/pg/data" -U outpost --auth=trust -E UTF8 >/dev/null
    cat >>"$work/pg/data/postgresql.conf" <<PGCONF
listen_addresses = ''
unix_socket_directories = '$work/pg'
port = $pg_port
max_connections = 300
shared_preload_libraries = 'pg_stat_statements'
PGCONF
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start >/dev/null
    pg_running=1
    "${as_pg[@]}" "$pg_bin/createdb" -h "$work/pg" -p "$pg_port" -U outpost outpost
    psql_pg -c "CREATE EXTENSION pg_stat_statements"
    pg_url="host=$work/pg port=$pg_port user=outpost dbname=outpost"
}
stop_pg() { [ -n "${pg_running:-}" ] && "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -m fast -w stop >/dev/null 2>&1; pg_running=; }
psql_pg() { "${as_pg[@]}" "$pg_bin/psql" -h "$work/pg" -p "$pg_port" -U outpost -d outpost -XAtq -v ON_ERROR_STOP=1 "$@"; }

# A tree the project made none of: documentation, translations, man pages,
# time zones, locales, C headers, Python and Perl libraries of this machine
# (tens of thousands of small files, many identical to another, symlinks).
REAL_TREE=(/usr/share/doc /usr/share/locale /usr/share/man /usr/share/zoneinfo /usr/share/i18n /usr/share/perl
    /usr/include /usr/lib/python3 /usr/lib/python3.11)

# copy_real_tree DIR: copies the real tree under DIR, keeping absolute paths.
copy_real_tree() {
    mkdir -p "$1"
    for d in "${REAL_TREE[@]}"; do
        [ -e "$d" ] && mkdir -p "$1$(dirname "$d")" && cp -a "$d" "$1$d"
    done
}

# measure LABEL COMMAND...: runs COMMAND with a cold page cache (as root)
# and prints "| LABEL | seconds | peak MiB |"; stops the script if it fails.
# init_backup_repos: an outpost-agent config ($work/agent.toml, set "data"
# of $data, a fresh key, repository $work/outpost-repo) and a restic
# repository ($work/restic-repo, exported for restic) for the same data.
init_backup_repos() {
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/backup.key"
    chmod 600 "$work/backup.key"
    cat >"$work/agent.toml" <<CFG
data_dir = "$work/agent"
[backups]
key_file = "$work/backup.key"
dir = "$work/outpost-repo"
[[backup]]
name = "data"
paths = ["$data"]
CFG
    export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$work/restic-repo
    restic init >/dev/null
}

measure() {
    local label=$1; shift
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "%e %M" -o "$work/time.out" "$@" >"$work/cmd.out" 2>&1 || { cat "$work/cmd.out" >&2; exit 1; }
    read -r secs kib <"$work/time.out"
    echo "| $label | $secs s | $((kib / 1024)) MiB |"
}

# port_in_log LOG KEY: the port a process logged as KEY=127.0.0.1:PORT
# (node_exporter's "address=", the agent's "listen="), waiting up to 10 s.
port_in_log() {
    local port=""
    for _ in $(seq 100); do
        port=$(grep -o "$2=127.0.0.1:[0-9]*" "$1" | head -1 | cut -d: -f2) && [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { echo "no $2 in $1" >&2; return 1; }
    echo "$port"
}

# timed LABEL URL [CURL_ARG...]: R requests of URL (curl given the extra
# arguments: a token header, a cookie jar), a Markdown row
# "| LABEL | median | p95 | bytes |"; fails on an answer other than 200.
timed() {
    local label=$1 url=$2
    shift 2
    for _ in $(seq 1 "$R"); do
        curl -s -o /dev/null -w '%{time_total} %{size_download} %{http_code}\n' "$@" "$url"
    done | sort -n | awk -v label="$label" -v r="$R" '
        { t[NR] = $1; size = $2; if ($3 != 200) bad = $3 }
        END { if (bad) { print "| " label " | HTTP " bad " |"; exit 1 }
              printf "| %s | %.1f ms | %.1f ms | %d |\n", label, t[int((r + 1) / 2)] * 1000, t[int(r * 0.95 + 0.999)] * 1000, size }'
}
