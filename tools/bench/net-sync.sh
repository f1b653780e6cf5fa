#!/usr/bin/env bash
# net-sync.sh: initial sync of a large namespace to a newly joined device, with real daemons
# on 127.0.0.1. Prints the time until the new device holds every name, the bytes it received,
# and the daemons' resident memory.
#
#   tools/bench/net-sync.sh [FILES]     (default 100000; needs the release binaries built)
set -euo pipefail
FILES=${1:-100000}
BIN=${CARGO_TARGET_DIR:-$HOME/.cache/pvfs-target}/release
W=$(mktemp -d /tmp/pvfs-netsync.XXXXXX)
cleanup() {
    for m in "$W"/m*; do fusermount3 -u -z "$m" 2>/dev/null || true; done
    pkill -f "pvfs mount $W" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
rss() { awk '/VmRSS/ {print $2" kB"}' /proc/"$1"/status; }
pid_of() { pgrep -f "pvfs mount $W/$1 " | head -1; }
PA=$(( 20000 + RANDOM % 20000 ))
"$BIN/pvfs" mount "$W/ma" --data "$W/a" --listen 127.0.0.1:$PA --background
# FILES empty files in directories of 1000, made through the mount.
python3 - "$W/ma" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000}")
    if i % 1000 == 0:
        os.mkdir(d)
    with open(os.path.join(d, f"f{i}"), "w") as f:
        f.write(str(i))
PY
echo "made $FILES files on A"
T=$("$BIN/pvfs-admin" --data "$W/a" invite)
"$BIN/pvfs" join "$T" --data "$W/c" --name newcomer >/dev/null 2>&1
start=$(date +%s.%N)
"$BIN/pvfs" mount "$W/mc" --data "$W/c" --listen 127.0.0.1:0 --background
while :; do
    n=$("$BIN/pvfs-admin" --data "$W/c" --json stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["files"])')
    [ "$n" -ge "$FILES" ] && break
    sleep 0.2
done
end=$(date +%s.%N)
rx=$("$BIN/pvfs-admin" --data "$W/c" --json peers | python3 -c 'import json,sys; print(sum(p["bytes_received"] for p in json.load(sys.stdin)))')
echo "initial sync of $FILES files to a new device: $(python3 -c "print(f'{$end-$start:.1f}')") s, $(python3 -c "print(f'{$rx/1e6:.1f}')") MB received"
echo "resident memory: A $(rss "$(pid_of ma)"), new device $(rss "$(pid_of mc)")"
