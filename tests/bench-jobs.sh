#!/usr/bin/env bash
# Benchmark: what idle scheduled jobs cost an agent — resident memory, CPU
# time and wake-ups (context switches of all its threads) — with 0, 1, 100
# and 1000 jobs configured, every agent connected to one hub and measured
# over the same window; next to Debian's cron with 1 and 1000 crontab lines
# measured the same way in the same run.
#
#   tests/bench-jobs.sh [SECONDS]     (default 60)
#
# Jobs are due once a year (cron "0 0 0 1 1 *"; the 1000-job agent is run
# twice, once with "@every 8760h"), so nothing runs: this is the cost of
# waiting. Prints Markdown rows for docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-60}

if ! command -v cron >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cron >/dev/null
fi
cargo build --locked --release --workspace --bins >/dev/null 2>&1
bin=target/release

work=$(mktemp -d /tmp/outpost-bench-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work" /etc/cron.d/outpost-bench
}
trap cleanup EXIT

"$bin/outpost-hub" init --data-dir "$work/hub" >/dev/null
printf 'data_dir = "%s"\n[quic]\nlisten = "127.0.0.1:0"\n[http]\nlisten = "127.0.0.1:0"\n' "$work/hub" > "$work/hub.toml"
"$bin/outpost-hub" serve --config "$work/hub.toml" 2>"$work/hub.log" & pids+=($!)
for _ in $(seq 100); do [ -s "$work/hub/http.addr" ] && break; sleep 0.1; done

declare -A agent
start_agent() { # name count schedule
    local name=$1 count=$2 schedule=$3
    local token
    token=$("$bin/outpost-hub" token create --data-dir "$work/hub" --ttl 10m)
    "$bin/outpost-agent" enroll --token "$token" --data-dir "$work/$name" --name "$name" >/dev/null
    # The reference config without its own jobs, then exactly COUNT jobs.
    sed -e "s|^data_dir = .*|data_dir = \"$work/$name\"|" -e '/^\[\[job\]\]/,$d' -e 's/^port = 7444/port = 0/' configs/agent.toml > "$work/$name.toml"
    for i in $(seq "$count"); do
        printf '[[job]]\nname = "job-%d"\nschedule = "%s"\ncommand = ["true"]\n' "$i" "$schedule" >> "$work/$name.toml"
    done
    "$bin/outpost-agent" run --config "$work/$name.toml" 2>"$work/$name.log" & agent[$name]=$!; pids+=($!)
}
start_agent jobs-0 0 "0 0 0 1 1 *"
start_agent jobs-1 1 "0 0 0 1 1 *"
start_agent jobs-100 100 "0 0 0 1 1 *"
start_agent jobs-1000 1000 "0 0 0 1 1 *"
start_agent every-1000 1000 "@every 8760h"

# Context switches of all threads, and CPU ticks (user + system).
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s}'; }
ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; }
rss() { awk '/^VmRSS/ {print $2}' /proc/"$1"/status; }
hz=$(getconf CLK_TCK)
row() { # label pid switches0 ticks0
    local s1 t1
    s1=$(switches "$2"); t1=$(ticks "$2")
    awk -v l="$1" -v r="$(rss "$2")" -v s="$((s1 - $3))" -v t="$((t1 - $4))" -v w="$window" -v hz="$hz" \
        'BEGIN { printf "| %s | %.1f MiB | %.2f | %.2f%% |\n", l, r / 1024, s / w, 100 * t / hz / w }'
}

sleep 15 # start-up settles (enrollment, first telemetry, job list sent)
for name in jobs-0 jobs-1 jobs-100 jobs-1000 every-1000; do
    grep -q "Connected to the hub" "$work/$name.log" || { echo "$name never connected" >&2; exit 1; }
done
declare -A s0 t0
for name in "${!agent[@]}"; do s0[$name]=$(switches "${agent[$name]}"); t0[$name]=$(ticks "${agent[$name]}"); done
sleep "$window"
echo "| process (idle ${window} s) | RSS | wake-ups/s (context switches) | CPU |"
echo "|---|---|---|---|"
for name in jobs-0 jobs-1 jobs-100 jobs-1000 every-1000; do
    row "outpost-agent, $name (configs/agent.toml)" "${agent[$name]}" "${s0[$name]}" "${t0[$name]}"
done
for name in "${!agent[@]}"; do kill "${agent[$name]}" 2>/dev/null || true; done

cron_row() { # lines
    rm -f /etc/cron.d/outpost-bench
    for i in $(seq "$1"); do echo "0 0 1 1 * root true # $i"; done > /etc/cron.d/outpost-bench
    cron -f -L 0 & local pid=$!; pids+=($pid)
    sleep 5
    local s t
    s=$(switches "$pid"); t=$(ticks "$pid")
    sleep "$window"
    row "Debian cron $(dpkg-query -W -f='${Version}' cron), $1 crontab lines" "$pid" "$s" "$t"
    kill "$pid"
}
cron_row 1
cron_row 1000
