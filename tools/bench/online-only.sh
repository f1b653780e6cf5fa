#!/usr/bin/env bash
# online-only.sh: what an online-only device costs, with real daemons on 127.0.0.1. Device A
# and a joined device B; B writes MB MiB of random data through its mount (dd bs=1M
# conv=fsync) and, after drop_caches, reads it back (cmp against the source). Once with B
# normal (the baseline: its data on its own disk), once with B online-only (every commit
# stored on A first, every read fetched from A), in the same run; prints both and the ratios.
#
#   tools/bench/online-only.sh [MB]     (default 256; root for drop_caches; release binaries)
set -euo pipefail
MB=${1:-256}
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/pvfs-target}/release
W=$(mktemp -d /tmp/pvfs-online-only.XXXXXX)
cleanup() {
    for m in "$W"/*/m*; do fusermount3 -u -z "$m" 2>/dev/null || true; done
    pkill -f "pvfs mount $W" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
head -c $((MB << 20)) /dev/urandom > "$W/src"
cpu() { awk '{print $14 + $15}' /proc/"$1"/stat; }
pid_of() { pgrep -f "pvfs mount $1 " | head -1; }
now() { date +%s.%N; }

# run MODE: prints "write_MBps read_MBps cpuA_write cpuB_write cpuA_read cpuB_read"
run() {
    local d="$W/$1" pa pb
    mkdir -p "$d"
    local port=$(( 20000 + RANDOM % 20000 ))
    "$BIN/pvfs" mount "$d/ma" --data "$d/a" --listen 127.0.0.1:$port --background
    "$BIN/pvfs" join "$("$BIN/pvfs-admin" --data "$d/a" invite)" --data "$d/b" --name b >/dev/null 2>&1
    [ "$1" = online ] && printf '[store]\nonline_only = true\n' >> "$d/b/config.toml"
    "$BIN/pvfs" mount "$d/mb" --data "$d/b" --listen 127.0.0.1:0 --background
    until "$BIN/pvfs-admin" --data "$d/b" peers | grep -q .; do sleep 0.1; done
    pa=$(pid_of "$d/ma"); pb=$(pid_of "$d/mb")
    local t0 a0 b0 t1 a1 b1 t2 t3 a3 b3
    t0=$(now); a0=$(cpu "$pa"); b0=$(cpu "$pb")
    dd if="$W/src" of="$d/mb/big" bs=1M conv=fsync status=none
    t1=$(now); a1=$(cpu "$pa"); b1=$(cpu "$pb")
    echo 3 > /proc/sys/vm/drop_caches
    t2=$(now)
    cmp "$W/src" "$d/mb/big"
    t3=$(now); a3=$(cpu "$pa"); b3=$(cpu "$pb")
    local stored
    stored=$("$BIN/pvfs-admin" --data "$d/b" --json stats \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])')
    echo "B $1: $stored bytes of content on B's disk" >&2
    awk -v m="$MB" -v t0="$t0" -v t1="$t1" -v t2="$t2" -v t3="$t3" -v hz="$(getconf CLK_TCK)" \
        -v a0="$a0" -v a1="$a1" -v a3="$a3" -v b0="$b0" -v b1="$b1" -v b3="$b3" 'BEGIN {
        printf "%.1f %.1f %.2f %.2f %.2f %.2f\n", m * 1.048576 / (t1 - t0), m * 1.048576 / (t3 - t2),
            (a1 - a0) / hz, (b1 - b0) / hz, (a3 - a1) / hz, (b3 - b1) / hz }'
    fusermount3 -u -z "$d/mb" 2>/dev/null || true
    fusermount3 -u -z "$d/ma" 2>/dev/null || true
}
read -r nw nr naw nbw nar nbr < <(run normal)
read -r ow or oaw obw oar obr < <(run online)
printf '%-34s %10s %10s %7s\n' "$MB MiB through B's mount" "normal B" "online B" ratio
awk -v a="$nw" -v b="$ow" 'BEGIN { printf "%-34s %7.1f MB/s %5.1f MB/s %6.2fx\n", "write + fsync", a, b, b / a }'
awk -v a="$nr" -v b="$or" 'BEGIN { printf "%-34s %7.1f MB/s %5.1f MB/s %6.2fx\n", "cold read back (cmp)", a, b, b / a }'
echo "CPU-s, write: normal A $naw B $nbw; online A $oaw B $obw"
echo "CPU-s, read:  normal A $nar B $nbr; online A $oar B $obr"
