#!/usr/bin/env bash
# pvfs benchmark: pvfs beside native ext4 and libfuse's passthrough_hp (3.14, built
# from Debian's fuse3 source package), all in the same run. See README.md.
#
# Knobs (environment):
#   BENCH_SIZE_MB=2048        size of the sequential write/read files
#   BENCH_FIO_MB=1024         size of the fio random-read file (also the append base file)
#   BENCH_FIO_RUNTIME=20      fio runtime in seconds
#   BENCH_FIO_DIRECT=0        fio direct= (0: buffered, page-cache hits count; 1: O_DIRECT)
#   BENCH_APPEND_ITERS=200    4 KiB append+fsync iterations
#   BENCH_TREE_FILES=30000    files in the untar tree (>= 30000 recommended)
#   BENCH_FS="native passthrough pvfs"   which filesystems to run, in this order
#   BENCH_TESTS="seq fio append tree"    which tests to run
#   BENCH_SCRATCH=/var/tmp/pvfs-bench    scratch dir on the local disk (not tmpfs); wiped per run
#   BENCH_CACHE=$HOME/.cache/pvfs-bench  passthrough_hp build, generated inputs, results
#   BENCH_RESULTS_DIR=$BENCH_CACHE/results
#   BENCH_KEEP=0              1: keep the scratch dir (data) after the run
#   BENCH_STEP_TIMEOUT=900    per-step timeout in seconds (a hung step fails the run)
#   BENCH_REMOUNT_COLD=1      1: remount the FUSE filesystems before every cold measurement
#                             (drops the daemons' own caches too); 0: drop_caches only
#   BENCH_RM_TIMEOUT=300      cap for the tree's rm -rf; past it the row shows ">N" and the
#                             rate of the part that was removed (the rest goes at cleanup)
#   BENCH_TREE_SHRINK=auto    1: during passthrough_hp's tree test, evict dentries/inodes
#                             (echo 2 > drop_caches) every 0.5 s so that it stays under its
#                             open-file limit; auto: only if that limit is below the tree's
#                             inode count (+10%); 0: never
#   PVFS_BIN_DIR=$HOME/.cache/pvfs-target/release   where pvfs and pvfs-admin are
#   PVFS_MOUNT_ARGS=""        extra args for `pvfs mount` (e.g. "--fuse-threads 4")
#   PT_OPTS="--nosplice"      passthrough_hp options (default: caches on, splice off)
set -euo pipefail

SIZE_MB=${BENCH_SIZE_MB:-2048}
FIO_MB=${BENCH_FIO_MB:-1024}
FIO_RUNTIME=${BENCH_FIO_RUNTIME:-20}
FIO_DIRECT=${BENCH_FIO_DIRECT:-0}
APPEND_ITERS=${BENCH_APPEND_ITERS:-200}
TREE_FILES=${BENCH_TREE_FILES:-30000}
FS_LIST=${BENCH_FS:-native passthrough pvfs}
TESTS=${BENCH_TESTS:-seq fio append tree}
SCRATCH=${BENCH_SCRATCH:-/var/tmp/pvfs-bench}
CACHE=${BENCH_CACHE:-$HOME/.cache/pvfs-bench}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$CACHE/results}
KEEP=${BENCH_KEEP:-0}
STEP_TIMEOUT=${BENCH_STEP_TIMEOUT:-900}
REMOUNT_COLD=${BENCH_REMOUNT_COLD:-1}
TREE_SHRINK=${BENCH_TREE_SHRINK:-auto}
RM_TIMEOUT=${BENCH_RM_TIMEOUT:-300}
PVFS_BIN_DIR=${PVFS_BIN_DIR:-$HOME/.cache/pvfs-target/release}
PVFS_MOUNT_ARGS=${PVFS_MOUNT_ARGS:-}
PT_OPTS=${PT_OPTS:---nosplice}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/../.." && pwd)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
has() { [[ " $1 " == *" $2 "* ]]; }

[[ $(id -u) == 0 ]] || die "run as root (drop_caches, mounts)"
for v in SIZE_MB FIO_MB FIO_RUNTIME APPEND_ITERS TREE_FILES STEP_TIMEOUT RM_TIMEOUT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer"
done

# ---------------------------------------------------------------- tools
need_apt=()
command -v fio >/dev/null || need_apt+=(fio)
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v python3 >/dev/null || need_apt+=(python3)
if ((${#need_apt[@]})); then
    log "installing ${need_apt[*]}"
    apt-get install -y "${need_apt[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y "${need_apt[@]}" >/dev/null; }
fi
PVFS="$PVFS_BIN_DIR/pvfs"
PVFS_ADMIN="$PVFS_BIN_DIR/pvfs-admin"
if has "$FS_LIST" pvfs; then
    [[ -x $PVFS && -x $PVFS_ADMIN ]] || die "pvfs binaries not found in $PVFS_BIN_DIR (cargo build --release)"
fi

# ---------------------------------------------------------------- passthrough_hp build
PT_BIN="$CACHE/bin/passthrough_hp"
PT_RECIPE="recipe-2"   # bump to force a rebuild when the build steps below change
build_passthrough_hp() {
    [[ -x $PT_BIN && $(cat "$CACHE/bin/passthrough_hp.recipe" 2>/dev/null) == "$PT_RECIPE" ]] && return 0
    log "building passthrough_hp (libfuse from Debian's fuse3 source package) into $CACHE"
    local pkgs=()
    command -v meson >/dev/null || pkgs+=(meson)
    command -v ninja >/dev/null || pkgs+=(ninja-build)
    command -v g++ >/dev/null || pkgs+=(g++)
    command -v dpkg-source >/dev/null || pkgs+=(dpkg-dev)
    if ((${#pkgs[@]})); then
        apt-get install -y "${pkgs[@]}" >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y "${pkgs[@]}" >/dev/null; }
    fi
    local src="$CACHE/src" build="$CACHE/build-fuse3"
    rm -rf "$src" "$build"
    mkdir -p "$src"
    # Use the system's deb-src entries if there are any; otherwise a private source
    # list (the system's apt configuration is left untouched).
    if ! (cd "$src" && apt-get source --download-only fuse3 >"$src/apt.log" 2>&1); then
        local codename apt_dir="$CACHE/apt"
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
        mkdir -p "$apt_dir/lists/partial" "$apt_dir/sources.list.d"
        echo "deb-src http://deb.debian.org/debian $codename main" >"$apt_dir/sources.list"
        local o=(-o "Dir::Etc::SourceList=$apt_dir/sources.list"
                 -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
                 -o "Dir::State::Lists=$apt_dir/lists"
                 -o "APT::Sandbox::User=root")
        apt-get "${o[@]}" update >>"$src/apt.log" 2>&1 || { cat "$src/apt.log" >&2; die "apt-get update (deb-src) failed"; }
        (cd "$src" && apt-get "${o[@]}" source --download-only fuse3 >>"$src/apt.log" 2>&1) ||
            { cat "$src/apt.log" >&2; die "apt-get source fuse3 failed"; }
    fi
    local dsc
    dsc=$(ls "$src"/fuse3_*.dsc | head -n1)
    (cd "$src" && dpkg-source -x "$(basename "$dsc")" fuse3 >>"$src/apt.log" 2>&1) || die "dpkg-source -x failed"
    local ver
    ver=$(sed -n "s/.*version *: *'\([0-9.]*\)'.*/\1/p" "$src/fuse3/meson.build" | head -n1)
    log "libfuse source version $ver ($(basename "$dsc"))"
    [[ $ver == 3.14* ]] || log "WARNING: expected libfuse 3.14, got $ver"
    (cd "$src/fuse3" && meson setup "$build" -Dbuildtype=release -Ddefault_library=static \
        -Dexamples=true -Dutils=false -Dtests=false >"$src/meson.log" 2>&1) ||
        { tail -n 30 "$src/meson.log" >&2; die "meson setup failed"; }
    # libfuse 3.14's passthrough_hp.cc tests HAVE_UTIMENSAT / HAVE_POSIX_FALLOCATE /
    # HAVE_SETXATTR but never includes the generated fuse_config.h, so as shipped it
    # answers EOPNOTSUPP to utimensat() on a path (tar, touch), fallocate and xattrs.
    # Pass the features meson detected as -D flags (no source change).
    local defs
    defs=$(sed -n -E 's/^#define (HAVE_(UTIMENSAT|POSIX_FALLOCATE|SETXATTR))$/-D\1/p' "$build/fuse_config.h" | tr '\n' ' ')
    log "passthrough_hp cpp_args: $defs"
    meson configure "$build" -Dcpp_args="$defs" >>"$src/meson.log" 2>&1 || die "meson configure failed"
    ninja -C "$build" example/passthrough_hp >"$src/ninja.log" 2>&1 ||
        { tail -n 30 "$src/ninja.log" >&2; die "ninja failed"; }
    mkdir -p "$CACHE/bin"
    cp "$build/example/passthrough_hp" "$PT_BIN.tmp"
    echo "$ver ($(basename "$dsc"), static libfuse, built with $defs)" >"$CACHE/bin/passthrough_hp.version"
    echo "$PT_RECIPE" >"$CACHE/bin/passthrough_hp.recipe"
    mv "$PT_BIN.tmp" "$PT_BIN"
}
if has "$FS_LIST" passthrough; then
    build_passthrough_hp
    # libfuse >= 3.16 examples use kernel passthrough unless told otherwise.
    if "$PT_BIN" --help 2>&1 | grep -q -- '--nopassthrough' && [[ $PT_OPTS != *--nopassthrough* ]]; then
        PT_OPTS="$PT_OPTS --nopassthrough"
    fi
fi

# ---------------------------------------------------------------- inputs (cached)
INPUTS="$CACHE/inputs"
mkdir -p "$INPUTS" "$RESULTS_DIR"
RAND_IN="$INPUTS/random-${SIZE_MB}M.bin"
TEXT_IN="$INPUTS/text-${SIZE_MB}M.txt"
FIO_IN="$INPUTS/fio-random-${FIO_MB}M.bin"
TREE_TAR="$INPUTS/tree-${TREE_FILES}.tar"

gen_random() { # file MiB
    [[ -f $1 ]] && return 0
    log "generating $1 from /dev/urandom"
    head -c "$(($2 * 1048576))" /dev/urandom >"$1.tmp" && mv "$1.tmp" "$1"
}
gen_text() { # file MiB
    [[ -f $1 ]] && return 0
    log "generating compressible text $1"
    python3 - "$2" >"$1.tmp" <<'EOF'
# Text-like data: a 16 MiB pool of pseudo-words with a Zipf-like distribution, then
# the output is random-length slices (64..2048 B) from random offsets of the pool.
# Compresses about 3x with zstd/gzip inside a 64 KiB window; no two large chunks
# are equal, so block/chunk dedup finds (almost) nothing.
import random, sys
total = int(sys.argv[1]) * 1048576
r = random.Random(20240601)
syl = ["ka","lo","mi","ne","ru","ta","shi","po","den","var","ex","in","on","str","ing",
       "able","tion","er","al","ly","pre","con","fn","mut","let","impl","u8","vec"]
vocab = ["".join(r.choice(syl) for _ in range(r.randint(1, 4))) for _ in range(20000)]
cum, acc = [], 0.0
for i in range(len(vocab)):
    acc += 1.0 / (i + 1)
    cum.append(acc)
punct = [". ", ", ", " ", " ", " ", " ", " ", " "]
parts, size = [], 0
while size < 16 * 1048576:
    words = r.choices(vocab, cum_weights=cum, k=100000)
    seps = r.choices(punct, k=100000)
    s = "".join(w + p for w, p in zip(words, seps)).replace(". ", ".\n", 1500).encode()
    parts.append(s)
    size += len(s)
pool = b"".join(parts)
out = sys.stdout.buffer
written = 0
while written < total:
    buf = []
    n = 0
    while n < 1048576:
        ln = r.randint(64, 2048)
        off = r.randrange(0, len(pool) - ln)
        buf.append(pool[off:off + ln])
        n += ln
    b = b"".join(buf)[: total - written]
    out.write(b)
    written += len(b)
EOF
    mv "$1.tmp" "$1"
}
gen_tree_tar() { # file nfiles
    [[ -f $1 && -f $1.count ]] && return 0
    local html="" d list="$1.list"
    for d in "$HOME"/.rustup/toolchains/stable-*/share/doc/rust/html "$HOME"/.rustup/toolchains/*/share/doc/rust/html; do
        [[ -d $d ]] && { html=$d; break; }
    done
    : >"$list"
    local n=0
    if [[ -n $html ]]; then
        log "tree source: $html"
        # sed (not head) so that sort never sees SIGPIPE under pipefail
        (cd "$html" && find . -type f -print0 | LC_ALL=C sort -z | sed -z -n "1,${2}p" |
            sed -z "s|^\./|$html/|") >>"$list"
        n=$(tr -cd '\0' <"$list" | wc -c)
    fi
    if ((n < $2)); then
        for d in "$HOME"/.rustup/toolchains/*/lib/rustlib "$HOME"/.cargo/registry/src; do
            [[ -d $d ]] || continue
            log "tree source (extra): $d"
            find "$d" -type f -print0 | LC_ALL=C sort -z | sed -z -n "1,$(($2 - n))p" >>"$list"
            n=$(tr -cd '\0' <"$list" | wc -c)
            ((n >= $2)) && break
        done
    fi
    ((n >= $2)) || die "only $n files found for the tree (need $2)"
    log "creating $1 ($n files)"
    # paths relative to / (no "Removing leading /" warning); extracted trees are deep
    sed -z 's|^/||' "$list" | tar -C / --null -T - -cf "$1.tmp"
    echo "$n" >"$1.count"
    mv "$1.tmp" "$1"
    rm -f "$list"
}
has "$TESTS" seq && { gen_random "$RAND_IN" "$SIZE_MB"; gen_text "$TEXT_IN" "$SIZE_MB"; }
{ has "$TESTS" fio || has "$TESTS" append; } && gen_random "$FIO_IN" "$FIO_MB"
if has "$TESTS" tree; then
    gen_tree_tar "$TREE_TAR" "$TREE_FILES"
    NFILES=$(cat "$TREE_TAR.count")
fi

# ---------------------------------------------------------------- scratch, mounts, cleanup
mkdir -p "$SCRATCH"
[[ $(stat -f -c %T "$SCRATCH") != tmpfs ]] || die "$SCRATCH is on tmpfs; set BENCH_SCRATCH to a local-disk dir"
unmount_all_under() {
    local m
    while read -r m; do
        [[ -n $m ]] || continue
        log "unmounting stale $m"
        fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" || true
    done < <(findmnt -rn -o TARGET | awk -v p="$SCRATCH/" 'index($0, p) == 1' | sort -r)
}
unmount_all_under
rm -rf --one-file-system "$SCRATCH"
mkdir -p "$SCRATCH"/{bin,native,pt-src,pt-mnt,pvfs-data,pvfs-mnt}

PT_PID=""
PVFS_PID=""
SHRINK_PID=""
declare -A DIR=([native]="$SCRATCH/native" [passthrough]="$SCRATCH/pt-mnt" [pvfs]="$SCRATCH/pvfs-mnt")

is_mounted() { findmnt -rn -M "$1" >/dev/null 2>&1; }
alive() { # pid (a zombie child counts as gone)
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}
wait_gone() { # pid seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        alive "$1" || { wait "$1" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    return 1
}
cleanup() {
    local rc=$?
    set +e
    cd /
    [[ -n $SHRINK_PID ]] && { kill "$SHRINK_PID" 2>/dev/null; wait "$SHRINK_PID" 2>/dev/null; }
    for m in "$SCRATCH/pt-mnt" "$SCRATCH/pvfs-mnt"; do
        if is_mounted "$m"; then
            fusermount3 -u "$m" 2>/dev/null || { sleep 1; fusermount3 -u "$m" 2>/dev/null; } || fusermount3 -uz "$m"
        fi
    done
    if [[ -n $PT_PID ]] && ! wait_gone "$PT_PID" 5; then kill "$PT_PID" 2>/dev/null; wait_gone "$PT_PID" 5 || kill -9 "$PT_PID" 2>/dev/null; fi
    if [[ -n $PVFS_PID ]] && ! wait_gone "$PVFS_PID" 10; then
        log "pvfs daemon $PVFS_PID still alive after unmount; killing"
        kill "$PVFS_PID" 2>/dev/null; wait_gone "$PVFS_PID" 5 || kill -9 "$PVFS_PID" 2>/dev/null
    fi
    if ((rc != 0)); then
        local keep_logs
        keep_logs="$RESULTS_DIR/failed-$(date +%Y%m%d-%H%M%S)"
        mkdir -p "$keep_logs"
        cp "$SCRATCH"/*.log "$SCRATCH/pvfs-data/pvfs.log" "$keep_logs/" 2>/dev/null
        log "FAILED (exit $rc); logs copied to $keep_logs"
    fi
    if [[ $KEEP != 1 ]] && ! is_mounted "$SCRATCH/pt-mnt" && ! is_mounted "$SCRATCH/pvfs-mnt"; then
        rm -rf --one-file-system "$SCRATCH"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mount_passthrough() {
    # passthrough_hp holds an O_PATH fd for every inode the kernel knows and raises its
    # soft RLIMIT_NOFILE to the hard one. Try to raise the hard limit (needs
    # CAP_SYS_RESOURCE, which a sandbox may not grant); see also BENCH_TREE_SHRINK.
    # shellcheck disable=SC2086
    (ulimit -Hn "$(cat /proc/sys/fs/nr_open)" 2>/dev/null || true
     exec "$PT_BIN" --foreground $PT_OPTS "$SCRATCH/pt-src" "$SCRATCH/pt-mnt") >>"$SCRATCH/passthrough_hp.log" 2>&1 &
    PT_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        is_mounted "$SCRATCH/pt-mnt" && return 0
        kill -0 "$PT_PID" 2>/dev/null || { cat "$SCRATCH/passthrough_hp.log" >&2; die "passthrough_hp exited"; }
        sleep 0.1
    done
    die "passthrough_hp did not mount in 10 s"
}
mount_pvfs() {
    if [[ $PVFS != "$SCRATCH/bin/pvfs" ]]; then
        cp "$PVFS" "$PVFS_ADMIN" "$SCRATCH/bin/"   # snapshot: the build dir may be rebuilt meanwhile
        PVFS="$SCRATCH/bin/pvfs"
        PVFS_ADMIN="$SCRATCH/bin/pvfs-admin"
    fi
    # shellcheck disable=SC2086
    timeout 60 "$PVFS" mount "$SCRATCH/pvfs-mnt" --data "$SCRATCH/pvfs-data" --background $PVFS_MOUNT_ARGS ||
        { tail -n 30 "$SCRATCH/pvfs-data/pvfs.log" >&2 2>/dev/null; die "pvfs mount failed"; }
    is_mounted "$SCRATCH/pvfs-mnt" || die "pvfs mount returned but nothing is mounted"
    PVFS_PID=$("$PVFS_ADMIN" --data "$SCRATCH/pvfs-data" --json status |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("pid",""))') || PVFS_PID=""
}
unmount_fuse() { # fs
    local m=${DIR[$1]} pid t0
    [[ $1 == passthrough ]] && pid=$PT_PID || pid=$PVFS_PID
    t0=$(date +%s)
    until fusermount3 -u "$m" 2>/dev/null; do
        (($(date +%s) - t0 < 30)) || die "$1: fusermount3 -u $m still failing after 30 s"
        sleep 0.5
    done
    if [[ -n $pid ]]; then
        wait_gone "$pid" 120 || die "$1: daemon $pid still running 120 s after unmount"
    fi
    if [[ $1 == passthrough ]]; then PT_PID=""; else PVFS_PID=""; fi
}
# Make the next access cold: remount a FUSE filesystem (also empties the daemon's own
# caches) unless BENCH_REMOUNT_COLD=0, then drop the kernel's caches.
cold() { # fs
    if [[ $REMOUNT_COLD == 1 && $1 != native ]]; then
        unmount_fuse "$1"
        if [[ $1 == passthrough ]]; then mount_passthrough; else mount_pvfs; fi
    fi
    drop_caches
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
pvfs_stats() { timeout 60 "$PVFS_ADMIN" --data "$SCRATCH/pvfs-data" --json stats; }

has "$FS_LIST" passthrough && mount_passthrough
has "$FS_LIST" pvfs && mount_pvfs

# ---------------------------------------------------------------- measurement helpers
declare -A R=()      # R[metric|fs] = value
ROWS=()              # metric|unit|better
row() { ROWS+=("$1|$2|$3"); }
put() { R["$1|$2"]=$3; }
now() { date +%s.%N; }
fdiv() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.6f", a / b; else print "nan" }'; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.6f", b - a }'; }
T() { timeout -k 10 "$STEP_TIMEOUT" "$@"; }   # every step that touches a filesystem under test
warm() { cat "$1" >/dev/null; }

seq_mbps() { # bytes seconds
    awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / 1e6 / s }'
}
SIZE_B=$((SIZE_MB * 1048576))

test_seq() { # fs
    local fs=$1 d=${DIR[$1]} t
    warm "$RAND_IN"
    log "$fs: seq write random ${SIZE_MB} MiB"
    t=$(now); T dd if="$RAND_IN" of="$d/seq-random.bin" bs=1M conv=fsync status=none; t=$(since "$t")
    put write_random "$fs" "$(seq_mbps "$SIZE_B" "$t")"
    warm "$TEXT_IN"
    log "$fs: seq write text ${SIZE_MB} MiB"
    t=$(now); T dd if="$TEXT_IN" of="$d/seq-text.txt" bs=1M conv=fsync status=none; t=$(since "$t")
    put write_text "$fs" "$(seq_mbps "$SIZE_B" "$t")"
    if [[ $fs == pvfs ]]; then PVFS_STATS_SEQ=$(pvfs_stats || echo '{}'); fi
    log "$fs: seq read (cold, warm)"
    cold "$fs"
    t=$(now); T dd if="$d/seq-random.bin" of=/dev/null bs=1M status=none; t=$(since "$t")
    put read_cold "$fs" "$(seq_mbps "$SIZE_B" "$t")"
    t=$(now); T dd if="$d/seq-random.bin" of=/dev/null bs=1M status=none; t=$(since "$t")
    put read_warm "$fs" "$(seq_mbps "$SIZE_B" "$t")"
    cold "$fs"
    t=$(now); T dd if="$d/seq-text.txt" of=/dev/null bs=1M status=none; t=$(since "$t")
    put read_cold_text "$fs" "$(seq_mbps "$SIZE_B" "$t")"
    T cmp -s "$d/seq-text.txt" "$TEXT_IN" || die "$fs: text file read back differs from input"
    T rm -f "$d/seq-random.bin" "$d/seq-text.txt"
}

make_fio_file() { # fs
    local d=${DIR[$1]}
    [[ -f $d/rand.dat ]] && return 0
    warm "$FIO_IN"
    T dd if="$FIO_IN" of="$d/rand.dat" bs=1M conv=fsync status=none
}
test_fio() { # fs
    local fs=$1 d=${DIR[$1]} out
    make_fio_file "$fs"
    cold "$fs"
    log "$fs: fio 4k randread QD1 psync direct=$FIO_DIRECT, ${FIO_RUNTIME}s"
    out=$(T fio --name=randread --filename="$d/rand.dat" --rw=randread --bs=4k --ioengine=psync \
        --iodepth=1 --direct="$FIO_DIRECT" --invalidate=1 --size="${FIO_MB}M" --runtime="$FIO_RUNTIME" --time_based \
        --norandommap --randrepeat=0 --output-format=json)
    local parsed
    parsed=$(python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
r = j["jobs"][0]["read"]
p = r["clat_ns"]["percentile"]
print("%.0f %.1f %.1f" % (r["iops"], p["50.000000"] / 1e3, p["99.000000"] / 1e3))' <<<"$out")
    read -r iops p50 p99 <<<"$parsed"
    put fio_iops "$fs" "$iops"; put fio_p50 "$fs" "$p50"; put fio_p99 "$fs" "$p99"
}
test_append() { # fs
    local fs=$1 d=${DIR[$1]} parsed
    make_fio_file "$fs"
    log "$fs: append 4 KiB + fsync x $APPEND_ITERS"
    parsed=$(T python3 - "$d/rand.dat" "$APPEND_ITERS" <<'EOF'
import os, sys, time, math
path, n = sys.argv[1], int(sys.argv[2])
bufs = [os.urandom(4096) for _ in range(n)]
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
lat = []
for b in bufs:
    t = time.perf_counter()
    if os.write(fd, b) != 4096:
        raise SystemExit("short write")
    os.fsync(fd)
    lat.append(time.perf_counter() - t)
os.close(fd)
lat.sort()
pct = lambda p: lat[max(0, math.ceil(p / 100 * len(lat)) - 1)] * 1e3
print("%.3f %.3f %.3f" % (pct(50), pct(99), lat[-1] * 1e3))
EOF
)
    read -r p50 p99 mx <<<"$parsed"
    put append_p50 "$fs" "$p50"; put append_p99 "$fs" "$p99"; put append_max "$fs" "$mx"
    local want=$(((FIO_MB * 1048576) + APPEND_ITERS * 4096)) got
    got=$(stat -c %s "$d/rand.dat")
    [[ $got == "$want" ]] || die "$fs: size after append is $got, expected $want"
}
start_shrinker() {
    (set +e; while :; do echo 2 >/proc/sys/vm/drop_caches; sleep 0.5; done) &
    SHRINK_PID=$!
}
stop_shrinker() {
    [[ -n $SHRINK_PID ]] || return 0
    kill "$SHRINK_PID" 2>/dev/null || true
    wait "$SHRINK_PID" 2>/dev/null || true
    SHRINK_PID=""
}
test_tree() { # fs
    local fs=$1 d=${DIR[$1]} t
    if [[ $fs == passthrough && $SHRINK_NOTE ]]; then start_shrinker; fi
    warm "$TREE_TAR"
    mkdir "$d/tree"
    log "$fs: untar $NFILES files"
    t=$(now)
    T tar -xf "$TREE_TAR" -C "$d/tree" 2>"$SCRATCH/tar-$fs.log" || { head -n 20 "$SCRATCH/tar-$fs.log" >&2; die "$fs: tar -xf failed"; }
    t=$(since "$t")
    put untar_s "$fs" "$(printf %.2f "$t")"; put untar_fps "$fs" "$(printf %.0f "$(fdiv "$NFILES" "$t")")"
    local got
    got=$(T find "$d/tree" -type f | wc -l)
    [[ $got == "$NFILES" ]] || die "$fs: $got files after untar, expected $NFILES"
    cold "$fs"
    log "$fs: stat all (cold, warm)"
    t=$(now); T find "$d/tree" -printf '%s %T@\n' >/dev/null; t=$(since "$t")
    put stat_cold_s "$fs" "$(printf %.2f "$t")"; put stat_cold_fps "$fs" "$(printf %.0f "$(fdiv "$NFILES" "$t")")"
    t=$(now); T find "$d/tree" -printf '%s %T@\n' >/dev/null; t=$(since "$t")
    put stat_warm_s "$fs" "$(printf %.2f "$t")"; put stat_warm_fps "$fs" "$(printf %.0f "$(fdiv "$NFILES" "$t")")"
    log "$fs: rm -rf"
    local rc=0 left
    t=$(now); timeout -k 10 "$RM_TIMEOUT" rm -rf "$d/tree" || rc=$?; t=$(since "$t")
    if ((rc == 124 || rc == 137)); then
        left=$(T find "$d/tree" -type f 2>/dev/null | wc -l) || true
        log "$fs: rm -rf stopped after ${RM_TIMEOUT}s with $left of $NFILES files left"
        put rm_s "$fs" ">$RM_TIMEOUT"
        put rm_fps "$fs" "<$(printf %.0f "$(fdiv "$((NFILES - left))" "$t")")"
        NOTES+=("$fs: rm -rf stopped by BENCH_RM_TIMEOUT=${RM_TIMEOUT}s with $left of $NFILES files left; files/s is for the part removed")
    elif ((rc != 0)); then
        die "$fs: rm -rf failed (exit $rc)"
    else
        put rm_s "$fs" "$(printf %.2f "$t")"; put rm_fps "$fs" "$(printf %.0f "$(fdiv "$NFILES" "$t")")"
    fi
    stop_shrinker
}

# ---------------------------------------------------------------- run
SHRINK_NOTE=""
NOTES=()
if has "$TESTS" tree && has "$FS_LIST" passthrough; then
    nofile_hard=$(ulimit -Hn)
    if [[ $TREE_SHRINK == 1 ]] ||
        [[ $TREE_SHRINK == auto && $nofile_hard != unlimited && $nofile_hard -lt $((NFILES * 11 / 10)) ]]; then
        SHRINK_NOTE="passthrough_hp tree test ran with dentry/inode eviction every 0.5 s (open-file hard limit $nofile_hard < tree inodes; passthrough_hp keeps one fd per cached inode), so its 'warm' stat is not fully warm"
        log "NOTE: $SHRINK_NOTE"
    fi
fi
START=$(now)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
PVFS_STATS_SEQ="{}"
if has "$TESTS" seq; then
    row write_random "MB/s" up; row write_text "MB/s" up
    row read_cold "MB/s" up; row read_warm "MB/s" up; row read_cold_text "MB/s" up
    for fs in $FS_LIST; do test_seq "$fs"; done
fi
if has "$TESTS" fio; then
    row fio_iops "IOPS" up; row fio_p50 "us" down; row fio_p99 "us" down
    for fs in $FS_LIST; do test_fio "$fs"; done
fi
if has "$TESTS" append; then
    row append_p50 "ms" down; row append_p99 "ms" down; row append_max "ms" down
    for fs in $FS_LIST; do test_append "$fs"; done
fi
for fs in $FS_LIST; do rm -f "${DIR[$fs]}/rand.dat"; done
if has "$TESTS" tree; then
    row untar_s "s" down; row untar_fps "files/s" up
    row stat_cold_s "s" down; row stat_cold_fps "files/s" up
    row stat_warm_s "s" down; row stat_warm_fps "files/s" up
    row rm_s "s" down; row rm_fps "files/s" up
    for fs in $FS_LIST; do test_tree "$fs"; done
fi
PVFS_STATS_END="{}"
has "$FS_LIST" pvfs && PVFS_STATS_END=$(pvfs_stats || echo '{}')
ELAPSED=$(printf %.0f "$(since "$START")")
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
declare -A LABEL=(
    [write_random]="seq write ${SIZE_MB}MiB random, fsync"
    [write_text]="seq write ${SIZE_MB}MiB text, fsync"
    [read_cold]="seq read random, cold"
    [read_warm]="seq read random, warm (2nd read)"
    [read_cold_text]="seq read text, cold"
    [fio_iops]="fio 4k randread QD1 direct=$FIO_DIRECT"
    [fio_p50]="fio 4k randread p50"
    [fio_p99]="fio 4k randread p99"
    [append_p50]="append 4k+fsync p50 (x$APPEND_ITERS)"
    [append_p99]="append 4k+fsync p99"
    [append_max]="append 4k+fsync max"
    [untar_s]="untar ${NFILES:-?} files"
    [untar_fps]="untar"
    [stat_cold_s]="stat all (find -printf), cold"
    [stat_cold_fps]="stat all, cold"
    [stat_warm_s]="stat all, warm"
    [stat_warm_fps]="stat all, warm"
    [rm_s]="rm -rf tree"
    [rm_fps]="rm -rf tree"
)
ratio() { # a b (only plain numbers; ">300" etc. give "-")
    [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] || { echo "-"; return; }
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
}
git_rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo "?")
git_dirty=$(git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null | wc -l)
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS="$RESULTS_DIR/pvfs-bench-$STAMP.txt"
{
    echo "pvfs benchmark $(date -Is)   host $(hostname) $(nproc) cpus, kernel $(uname -r)"
    echo "pvfs: $PVFS_BIN_DIR/pvfs ($("$PVFS" --version 2>/dev/null || echo '?')), repo $git_rev$( ((git_dirty)) && echo " +$git_dirty modified files")"
    has "$FS_LIST" passthrough && echo "passthrough_hp: libfuse $(cat "$CACHE/bin/passthrough_hp.version" 2>/dev/null), options: $PT_OPTS"
    echo "native: $(findmnt -n -o SOURCE,FSTYPE -T "$SCRATCH" | tr -s ' ') at $SCRATCH"
    echo "sizes: seq ${SIZE_MB} MiB, fio ${FIO_MB} MiB ${FIO_RUNTIME}s psync QD1 direct=$FIO_DIRECT, append x$APPEND_ITERS, tree ${NFILES:-?} files"
    echo "cold = $( [[ $REMOUNT_COLD == 1 ]] && echo 'FUSE remount + ' )sync + drop_caches before the measurement"
    [[ -n $SHRINK_NOTE ]] && echo "note: $SHRINK_NOTE"
    for n in "${NOTES[@]}"; do echo "note: $n"; done
    echo "load average: start $LOAD_START, end $LOAD_END; total ${ELAPSED}s"
    echo
    fmt='%-38s %-8s %-6s %12s %12s %12s %9s %9s\n'
    printf "$fmt" metric unit better native passthrough pvfs pvfs/pt pvfs/nat
    printf "$fmt" "$(printf -- '-%.0s' {1..38})" -------- ------ ------------ ------------ ------------ --------- ---------
    for r in "${ROWS[@]}"; do
        IFS='|' read -r m unit better <<<"$r"
        arrow=$([[ $better == up ]] && echo higher || echo lower)
        n=${R["$m|native"]:-}; p=${R["$m|passthrough"]:-}; v=${R["$m|pvfs"]:-}
        printf "$fmt" "${LABEL[$m]}" "$unit" "$arrow" "${n:--}" "${p:--}" "${v:--}" \
            "$(ratio "$v" "$p")" "$(ratio "$v" "$n")"
    done
    echo
    echo "ratios are pvfs value / other value (so > 1 is good where higher is better, bad where lower is)."
    if has "$FS_LIST" pvfs; then
        echo "pvfs stats after the two seq writes: $PVFS_STATS_SEQ"
        echo "pvfs stats at the end:              $PVFS_STATS_END"
    fi
    echo
    echo "# raw (tsv): metric fs value"
    for k in "${!R[@]}"; do printf '%s\t%s\t%s\n' "${k%%|*}" "${k#*|}" "${R[$k]}"; done | sort
} | tee "$RESULTS"
echo
echo "results written to $RESULTS"
