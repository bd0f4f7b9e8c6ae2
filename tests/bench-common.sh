# Sourced by the benchmarks: a hub data dir and config, the real tree the
# backup benchmarks measure on, and how one step is timed. Needs $work (a
# scratch directory) and $bin (the release binaries) set by the caller.

# init_hub: a hub data dir in $work/hub and $work/hub.toml (QUIC on a free
# loopback port, HTTP on any); sets $admin (its admin token) and $port.
init_hub() {
    "$bin/outpost-hub" init --data-dir "$work/hub" >"$work/init.out"
    admin=$(tail -1 "$work/init.out")
    port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$work/hub.toml" <<CFG
data_dir = "$work/hub"
log = "warn"
[quic]
listen = "127.0.0.1:$port"
[http]
listen = "127.0.0.1:0"
CFG
}

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
measure() {
    local label=$1; shift
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "%e %M" -o "$work/time.out" "$@" >"$work/cmd.out" 2>&1 || { cat "$work/cmd.out" >&2; exit 1; }
    read -r secs kib <"$work/time.out"
    echo "| $label | $secs s | $((kib / 1024)) MiB |"
}
