#!/usr/bin/env bash
# PostgreSQL's shared buffers on msharefs: pgbench in up to five configurations on the
# same data, with page-table costs measured while every client is connected.
#
#   examples/postgres/run.sh [--small] [--out DIR] [--keep]
#                            [--configs "off on shim sysv sysv-shim"]
#
# Configurations (one throw-away cluster, one data set, one server at a time):
#   off   huge_pages=off: PostgreSQL's shared memory is 4 KiB shmem pages;
#   on    huge_pages=on: PostgreSQL's own MAP_HUGETLB mapping (the script grows
#         vm.nr_hugepages by what `postgres -C shared_memory_size_in_huge_pages` asks for
#         and gives exactly that back);
#   shim  huge_pages=off under LD_PRELOAD=libmshare_preload.so with MSHARE_MOUNT and
#         MSHARE_ANON_MIN: the same mmap(MAP_SHARED|MAP_ANONYMOUS) lands on a hugetlb region
#         of msharefs, 1 GiB-aligned, and the backends share its page tables;
#   sysv  shared_memory_type=sysv: the main segment is a System V segment of 4 KiB pages
#         (PostgreSQL never asks for SHM_HUGETLB);
#   sysv-shim  shared_memory_type=sysv under the shim with MSHARE_MOUNT and MSHARE_SHM_MIN:
#         the System V segment's data is a hugetlb region of msharefs, 1 GiB-aligned.
#
# For each: the PageTables line of /proc/meminfo (delta against the reading just before the
# server started), the sum of VmPTE over all server processes, the number of client
# backends, the median client backend's minor faults (every fault it took, also on its
# private memory: an upper bound of those on shared memory), pgbench's initial connection
# time (forking and attaching all clients), its TPS and its failure count. Samples are taken every second while
# pgbench runs with all clients connected (see the report's header for how they are
# summarised). Results:
# DIR/results.json, DIR/results.md, DIR/samples-CONFIG.csv, DIR/pgbench-CONFIG.log,
# DIR/server-CONFIG.log (copied there at exit).
#
# Needs root (it installs PostgreSQL from Debian's packages if missing, mounts msharefs and
# changes vm.nr_hugepages), /dev/fuse and hugetlbfs. It holds /run/msharefs/test-pool.lock
# (the lock msharefs's tests and benchmarks take) for its whole run. Everything it starts (servers,
# pgbench, the msharefs mount, huge pages, the temporary directory) is stopped, given back
# or removed on exit, also on failure or Ctrl-C.
#
# Parameters (environment; --small changes the defaults to a CI-sized run):
#   CLIENTS=100          pgbench clients (= client backends), small: 8
#   SHARED_BUFFERS=2GB   small: 256MB
#   SCALE=150            pgbench scale (about 15 MB per unit; 150 fills 2 GB), small: 10
#   DURATION=60          seconds of pgbench per configuration, small: 10
#   JOBS=2               pgbench threads
#   MODE=select-only     pgbench built-in script: select-only or tpcb-like
#   MSHARE_ANON_MIN=64M  smallest anonymous shared mapping the shim places
#   MSHARE_SHM_MIN=64M   smallest System V or POSIX segment the shim places
#   PG_BIN               default: the newest /usr/lib/postgresql/*/bin
#   PG_USER=postgres     the user the server runs as
#   MSHAREFS_BIN, PRELOAD_SO   default: target/release/{msharefs,libmshare_preload.so},
#                        built with cargo when missing
#   OUT                  default: target/postgres-bench (or --out)

set -Eeuo pipefail

die() {
    printf 'run.sh: %s\n' "$*" >&2
    exit 1
}
say() {
    printf '\n==> %s\n' "$*" >&2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)

SMALL=0
KEEP=0
CONFIGS_ARG=""
OUT_ARG=""
while (($#)); do
    case "$1" in
    --small) SMALL=1 ;;
    --keep) KEEP=1 ;;
    --out)
        OUT_ARG=${2:?--out needs a directory}
        shift
        ;;
    --configs)
        CONFIGS_ARG=${2:?--configs needs a list}
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

if ((SMALL)); then
    CLIENTS=${CLIENTS:-8}
    SHARED_BUFFERS=${SHARED_BUFFERS:-256MB}
    SCALE=${SCALE:-10}
    DURATION=${DURATION:-10}
else
    CLIENTS=${CLIENTS:-100}
    SHARED_BUFFERS=${SHARED_BUFFERS:-2GB}
    SCALE=${SCALE:-150}
    DURATION=${DURATION:-60}
fi
JOBS=${JOBS:-2}
MODE=${MODE:-select-only}
MSHARE_ANON_MIN=${MSHARE_ANON_MIN:-64M}
MSHARE_SHM_MIN=${MSHARE_SHM_MIN:-64M}
PG_USER=${PG_USER:-postgres}
CONFIGS=${CONFIGS_ARG:-${CONFIGS:-off on shim sysv sysv-shim}}
OUT=${OUT_ARG:-${OUT:-$REPO/target/postgres-bench}}

case "$MODE" in
select-only | tpcb-like) ;;
*) die "MODE must be select-only or tpcb-like, not $MODE" ;;
esac
for c in $CONFIGS; do
    case "$c" in
    off | on | shim | sysv | sysv-shim) ;;
    *) die "unknown configuration $c (off, on, shim, sysv, sysv-shim)" ;;
    esac
done

((EUID == 0)) || die "run as root: it installs packages, mounts msharefs and changes vm.nr_hugepages"

# The machine-wide lock that msharefs's tests and benchmarks hold while they change the
# huge-page pool or need memory undisturbed: measuring page tables beside them would
# measure them too.
RUN_LOCK=/run/msharefs/test-pool.lock
mkdir -p "$(dirname "$RUN_LOCK")"
exec 8>>"$RUN_LOCK"
if ! flock -n 8; then
    echo "waiting for $RUN_LOCK (an msharefs test or benchmark is running)" >&2
    flock 8
fi

# ---- state that the cleanup undoes ----------------------------------------------------

WORK=""           # temporary directory: cluster, sockets, mount point, state directory
MNT=""            # msharefs mount point, while mounted
PG_RUNNING=0      # a server of ours may be running
PGBENCH_PID=""    # a pgbench of ours may be running
POOL_ADDED=0      # huge pages this script added to vm.nr_hugepages
POOL_LOCK=/run/msharefs/hugepages.lock

# Makes free 2 MiB blocks for huge pages: memory compaction (the page cache this script's
# own runs left behind can fragment free memory).
compact_memory() {
    sync
    echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
}

pool_change() { # pool_change DELTA: grow (+) or shrink (-) vm.nr_hugepages, under the lock
    local delta=$1
    mkdir -p "$(dirname "$POOL_LOCK")"
    (
        flock 9
        local now target got try
        now=$(cat /proc/sys/vm/nr_hugepages)
        target=$((now + delta))
        ((target >= 0)) || target=0
        for try in 1 2 3; do
            echo "$target" >/proc/sys/vm/nr_hugepages
            got=$(cat /proc/sys/vm/nr_hugepages)
            ((got < target && delta > 0)) || break
            echo "vm.nr_hugepages: asked for $target, got $got (try $try); compacting memory" >&2
            compact_memory
        done
        if ((got != target)); then
            # The kernel could not deliver: put back what it did add.
            echo "$now" >/proc/sys/vm/nr_hugepages
            echo "vm.nr_hugepages: asked for $target, got $got; restored $now" >&2
            exit 1
        fi
        echo "vm.nr_hugepages: $now -> $got" >&2
    ) 9>>"$POOL_LOCK"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM ERR
    set +e
    if [[ -n "$PGBENCH_PID" ]] && kill -0 "$PGBENCH_PID" 2>/dev/null; then
        kill "$PGBENCH_PID"
        wait "$PGBENCH_PID" 2>/dev/null
    fi
    if ((PG_RUNNING)) && [[ -n "$WORK" && -f "$WORK/data/postmaster.pid" ]]; then
        echo "cleanup: stopping the server" >&2
        runuser -u "$PG_USER" -- "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1
    fi
    if ((POOL_ADDED > 0)); then
        echo "cleanup: giving back $POOL_ADDED huge pages" >&2
        pool_change "-$POOL_ADDED" && POOL_ADDED=0
    fi
    if [[ -n "$MNT" ]]; then
        echo "cleanup: msharefs umount --purge $MNT" >&2
        "$MSHAREFS_BIN" umount "$MNT" --purge >/dev/null || echo "cleanup: umount failed" >&2
    fi
    if [[ -n "$WORK" && -d "$WORK/log" ]]; then
        cp "$WORK"/log/*.log "$OUT"/ 2>/dev/null
    fi
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if findmnt -rn -o TARGET | grep -q "^$WORK"; then
            echo "cleanup: something is still mounted under $WORK; leaving it" >&2
        elif ((KEEP)); then
            echo "cleanup: kept $WORK (--keep)" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    if ((rc != 0)); then
        echo "run.sh: FAILED (status $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- tools -------------------------------------------------------------------------------

newest_pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [[ -n "$d" && -x "$d/postgres" && -x "$d/pgbench" ]] && echo "$d"
}

say "PostgreSQL"
if [[ -z "${PG_BIN:-}" ]]; then
    if ! PG_BIN=$(newest_pg_bin); then
        echo "not installed: installing Debian's postgresql" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y --no-install-recommends postgresql
        PG_BIN=$(newest_pg_bin) || die "postgresql installed but no /usr/lib/postgresql/*/bin/postgres"
    fi
fi
[[ -x "$PG_BIN/postgres" && -x "$PG_BIN/pgbench" && -x "$PG_BIN/psql" ]] ||
    die "$PG_BIN lacks postgres, pgbench or psql"
id -u "$PG_USER" >/dev/null 2>&1 || die "no user $PG_USER (the postgresql package creates postgres)"
PG_VERSION=$("$PG_BIN/postgres" --version)
echo "$PG_VERSION ($PG_BIN), server user $PG_USER" >&2

say "msharefs"
MSHAREFS_BIN=${MSHAREFS_BIN:-$REPO/target/release/msharefs}
PRELOAD_SO=${PRELOAD_SO:-$REPO/target/release/libmshare_preload.so}
if [[ ! -x "$MSHAREFS_BIN" || ! -f "$PRELOAD_SO" ]]; then
    command -v cargo >/dev/null || die "no $MSHAREFS_BIN or $PRELOAD_SO, and no cargo to build them"
    (cd "$REPO" && cargo build --release -p msharefs -p mshare-preload)
fi
[[ -x "$MSHAREFS_BIN" && -f "$PRELOAD_SO" ]] || die "missing $MSHAREFS_BIN or $PRELOAD_SO"
echo "$MSHAREFS_BIN, $PRELOAD_SO" >&2

# ---- the cluster ---------------------------------------------------------------------

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd -P)
WORK=$(mktemp -d /tmp/msharefs-pg.XXXXXX)
chmod 755 "$WORK"
# The server user reads the shim from here (the repository may not be reachable for it).
install -m 0644 "$PRELOAD_SO" "$WORK/libmshare_preload.so"
mkdir "$WORK/data" "$WORK/sock" "$WORK/log"
chown "$PG_USER" "$WORK/data" "$WORK/sock" "$WORK/log"

as_pg() {
    runuser -u "$PG_USER" -- "$@"
}
psql_q() {
    "$PG_BIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$WORK/sock" -p 5432 -U "$PG_USER" -d bench "$@"
}

say "initdb in $WORK/data"
as_pg "$PG_BIN/initdb" -D "$WORK/data" -A trust -E UTF8 --no-sync >/dev/null
cat >>"$WORK/data/postgresql.conf" <<EOF

# --- examples/postgres/run.sh ---
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = 5432
max_connections = $((CLIENTS + 10))
shared_buffers = '$SHARED_BUFFERS'
# A throw-away benchmark cluster: no durability, no background noise.
fsync = off
synchronous_commit = off
full_page_writes = off
autovacuum = off
max_wal_size = '4GB'
logging_collector = off
EOF

# huge_pages goes on the command line, so postgresql.conf is the same for every run.
# SERVER_OPTS: further -c options of the configuration being run.
SERVER_OPTS=""
start_server() { # start_server LOGFILE HUGE_PAGES [env assignments...]
    local log=$1 huge=$2
    shift 2
    PG_RUNNING=1
    # 8>&-: the server must not inherit (and so hold) the run lock.
    as_pg env "$@" "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$log" -w -t 300 \
        -o "-c huge_pages=$huge $SERVER_OPTS" start >/dev/null 8>&- ||
        {
            tail -20 "$log" >&2
            die "the server did not start (log: $log)"
        }
}
stop_server() {
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast -w -t 300 stop >/dev/null
    PG_RUNNING=0
}
postmaster_pid() {
    head -1 "$WORK/data/postmaster.pid"
}

say "pgbench -i -s $SCALE (same data for every configuration)"
start_server "$WORK/log/server-init.log" off
as_pg "$PG_BIN/createdb" -h "$WORK/sock" -p 5432 bench
"$PG_BIN/pgbench" -i -q -s "$SCALE" -h "$WORK/sock" -p 5432 -U "$PG_USER" bench 2>&1 | tail -3 >&2
psql_q -c "CREATE EXTENSION IF NOT EXISTS pg_prewarm" >/dev/null
DATA_BYTES=$(psql_q -c "SELECT sum(pg_relation_size(c.oid)) FROM pg_class c WHERE c.relname LIKE 'pgbench_%'")
SHMEM_MB=$(psql_q -c "SHOW shared_memory_size" | tr -dc 0-9)
stop_server
echo "data: $((DATA_BYTES >> 20)) MiB in pgbench tables and indexes; shared memory ${SHMEM_MB} MB" >&2

# ---- one configuration -----------------------------------------------------------------

meminfo_kb() {
    awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo
}

server_pids() {
    local pm
    pm=$(postmaster_pid)
    echo "$pm"
    pgrep -P "$pm" || true
}

# One sample: epoch PageTables_kB sum_VmPTE_kB processes client_backends; with all clients
# connected, also each client backend's VmPTE (kB) into the file $1 and its minor faults
# into the file $2. A handful of processes per sample, so the sampler itself hardly
# disturbs the benchmark.
sample() {
    local pt pids=() pid status=() cmdlines=() backends=() sum_n clients
    pt=$(meminfo_kb PageTables)
    mapfile -t pids < <(server_pids)
    for pid in "${pids[@]}"; do
        status+=("/proc/$pid/status")
        cmdlines+=("/proc/$pid/cmdline")
    done
    sum_n=$(awk '$1 == "VmPTE:" { s += $2; n++ } END { print s + 0, n + 0 }' "${status[@]}" 2>/dev/null || true)
    mapfile -t backends < <(grep -alsF '[local]' "${cmdlines[@]}" 2>/dev/null || true)
    clients=${#backends[@]}
    if ((clients >= CLIENTS)); then
        # Each client backend's VmPTE, for the median in the report.
        awk '$1 == "VmPTE:" { print $2 }' "${backends[@]/%cmdline/status}" 2>/dev/null >"$1" || true
        # Field 10 of /proc/PID/stat, counted after the ')' that ends the command name.
        sed 's/.*) //' "${backends[@]/%cmdline/stat}" 2>/dev/null | awk '{ print $8 }' >"$2" || true
    fi
    echo "$(date +%s) $pt ${sum_n:-0 0} $clients"
}

# The largest mapping of a region backing in process $1: its main segment (dynamic shared
# memory segments may be on msharefs too).
largest_region_mapping() {
    local l range best="" size max=0
    while read -r l; do
        range=${l%% *}
        size=$((16#${range#*-} - 16#${range%-*}))
        if ((size > max)); then
            max=$size best=$l
        fi
    done < <(grep -E " rw-s .*$WORK/state/backing/hugetlb/[0-9]+$" "/proc/$1/maps" || true)
    echo "$best"
}

# ATTACHERS processes that attach the server's System V segment as an Oracle process would
# (shmat by id, under the server's environment), read every 4 KiB page, and hold it while
# PageTables is read; prints "pagetables_delta_bytes median_faults median_attach_touch_ms
# segment_bytes". Only for the sysv configurations: an anonymous mapping cannot be attached.
ATTACHERS=${ATTACHERS:-16}
ATTACH_PY='
import ctypes, os, resource, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
ds = (ctypes.c_char * 128)()
libc.shmctl(int(sys.argv[1]), 2, ds)           # IPC_STAT: shm_segsz at offset 48
size = int.from_bytes(bytes(ds[48:56]), "little")
array = ctypes.c_char * size
os.read(0, 1)                                  # all attachers started: go
t0 = time.perf_counter()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.shmat(int(sys.argv[1]), None, 0)
if p in (None, 2**64 - 1):
    sys.exit("shmat: errno %d" % ctypes.get_errno())
s = sum(memoryview(array.from_address(p)).cast("B")[::4096])
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t1 = time.perf_counter()
print(f1 - f0, (t1 - t0) * 1000, size, flush=True)
os.read(0, 1)                                  # hold until told (end of file)
'
attach_probe() { # attach_probe SHMID [env assignments...]
    local id=$1 i pids=() fifo before after
    shift
    fifo="$WORK/attach.fifo"
    rm -f "$fifo" "$WORK"/attach-*.out
    mkfifo "$fifo"
    chmod 0666 "$fifo"
    for ((i = 0; i < ATTACHERS; i++)); do
        as_pg env "$@" python3 -c "$ATTACH_PY" "$id" <"$fifo" >"$WORK/attach-$i.out" 8>&- &
        pids+=($!)
    done
    exec 9>"$fifo"
    sleep 2
    before=$(meminfo_kb PageTables)
    for ((i = 0; i < ATTACHERS; i++)); do printf 'g' >&9; done
    for ((i = 0; i < 200; i++)); do
        (($(cat "$WORK"/attach-*.out 2>/dev/null | wc -l) >= ATTACHERS)) && break
        sleep 0.5
    done
    after=$(meminfo_kb PageTables)
    exec 9>&-
    wait "${pids[@]}" || die "an attacher failed ($(cat "$WORK"/attach-*.out))"
    local mid=$(((ATTACHERS + 1) / 2)) faults ms size
    faults=$(cut -d' ' -f1 "$WORK"/attach-*.out | sort -n | sed -n "${mid}p")
    ms=$(cut -d' ' -f2 "$WORK"/attach-*.out | sort -n | sed -n "${mid}p")
    size=$(cut -d' ' -f3 "$WORK"/attach-0.out)
    echo "$(((after - before) * 1024)) $faults $ms $size"
}

# What the postmaster's shared memory is mapped as (the line of /proc/PID/maps), checked
# against what the configuration must give.
check_shared_mapping() { # check_shared_mapping CONFIG
    local cfg=$1 pm line start
    pm=$(postmaster_pid)
    case "$cfg" in
    off) line=$(grep -E ' rw-s .*/dev/zero \(deleted\)$' "/proc/$pm/maps" | sort -t' ' -k1 | tail -1 || true) ;;
    on) line=$(grep -E ' rw-s .*/anon_hugepage \(deleted\)$' "/proc/$pm/maps" || true) ;;
    shim) line=$(grep -E " rw-s .*$WORK/state/backing/hugetlb/[0-9]+ \(deleted\)$" "/proc/$pm/maps" || true) ;;
    sysv) line=$(grep -E ' rw-s .*/SYSV[0-9a-f]{8} \(deleted\)$' "/proc/$pm/maps" || true) ;;
    sysv-shim) line=$(largest_region_mapping "$pm") ;;
    esac
    [[ -n "$line" ]] || {
        grep ' rw-s ' "/proc/$pm/maps" >&2
        die "$cfg: the postmaster's shared memory is not where this configuration puts it"
    }
    if [[ "$cfg" == shim || "$cfg" == sysv-shim ]]; then
        start=$((16#${line%%-*}))
        ((start % (1 << 30) == 0)) || die "$cfg: region mapped at $line, not 1 GiB-aligned"
        if grep -q "libmshare_preload" "$WORK/log/server-$cfg.log"; then
            grep "libmshare_preload" "$WORK/log/server-$cfg.log" >&2
            die "$cfg: the shim fell back to ordinary shared memory"
        fi
    fi
    echo "$line"
}

declare -A R_PT R_PT_LO R_PT_HI R_BASE_SPREAD R_NSAMPLES R_VMPTE R_CLIENTS R_PROCS R_TPS R_FAILED R_TX \
    R_MAP R_PT_BEFORE R_MEDIAN_VMPTE R_MEDIAN_FAULTS R_CONNECT_MS R_ATT_PT R_ATT_FAULTS R_ATT_MS R_ATT_GIB

run_config() {
    local cfg=$1 env_args=() huge=off pages=0
    say "configuration $cfg"
    SERVER_OPTS=""
    case "$cfg" in
    off) ;;
    on)
        huge=on
        compact_memory
        pages=$(as_pg "$PG_BIN/postgres" -D "$WORK/data" -c huge_pages=on -C shared_memory_size_in_huge_pages)
        pool_change "+$pages"
        POOL_ADDED=$((POOL_ADDED + pages))
        ;;
    shim)
        # The daemon grows the pool itself when PostgreSQL's mapping becomes a region.
        compact_memory
        env_args=(LD_PRELOAD="$WORK/libmshare_preload.so" MSHARE_MOUNT="$MNT/pg"
            MSHARE_ANON_MIN="$MSHARE_ANON_MIN")
        ;;
    sysv) SERVER_OPTS="-c shared_memory_type=sysv" ;;
    sysv-shim)
        compact_memory
        SERVER_OPTS="-c shared_memory_type=sysv"
        env_args=(LD_PRELOAD="$WORK/libmshare_preload.so" MSHARE_MOUNT="$MNT/pg"
            MSHARE_SHM_MIN="$MSHARE_SHM_MIN")
        ;;
    esac
    # Let the previous server's memory go back before the baseline reading.
    sleep 2
    # Baseline: the median of five readings, a second apart (other programs on the machine
    # move PageTables too; the spread of these readings is reported as the noise).
    local before base=()
    for _ in 1 2 3 4 5; do
        base+=("$(meminfo_kb PageTables)")
        sleep 1
    done
    before=$(printf '%s\n' "${base[@]}" | sort -n | sed -n 3p)
    R_BASE_SPREAD[$cfg]=$(($(printf '%s\n' "${base[@]}" | sort -n | tail -1) - $(printf '%s\n' "${base[@]}" | sort -n | head -1)))
    start_server "$WORK/log/server-$cfg.log" "$huge" "${env_args[@]}"
    R_MAP[$cfg]=$(check_shared_mapping "$cfg")
    echo "shared memory: ${R_MAP[$cfg]}" >&2
    psql_q -c "SELECT sum(pg_prewarm(c.oid)) FROM pg_class c WHERE c.relname LIKE 'pgbench_%' AND c.relkind IN ('r','i')" >/dev/null

    local builtin=select-only
    [[ "$MODE" == tpcb-like ]] && builtin=tpcb-like
    "$PG_BIN/pgbench" -n -b "$builtin" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" -P 10 \
        -h "$WORK/sock" -p 5432 -U "$PG_USER" bench >"$OUT/pgbench-$cfg.log" 2>&1 8>&- &
    PGBENCH_PID=$!
    local samples="$OUT/samples-$cfg.csv" s
    rm -f "$OUT/backend-vmpte-$cfg.txt" "$OUT/backend-faults-$cfg.txt"
    echo "epoch,pagetables_kb,sum_vmpte_kb,server_processes,client_backends" >"$samples"
    while kill -0 "$PGBENCH_PID" 2>/dev/null; do
        s=$(sample "$OUT/backend-vmpte-$cfg.txt" "$OUT/backend-faults-$cfg.txt")
        echo "${s// /,}" >>"$samples"
        sleep 1
    done
    local rc=0
    wait "$PGBENCH_PID" || rc=$?
    PGBENCH_PID=""
    ((rc == 0)) || {
        tail -20 "$OUT/pgbench-$cfg.log" >&2
        die "$cfg: pgbench exited with status $rc"
    }
    # The samples of the second half of the run with every client connected (by then each
    # backend has touched the whole buffer pool: VmPTE has stopped growing): PageTables as
    # their median, with the lowest and highest reading; VmPTE as the highest sum.
    local rows pts pt_med pt_lo pt_hi last
    rows=$(awk -F, -v c="$CLIENTS" 'NR > 1 && $5 >= c' "$samples" |
        awk '{ r[NR] = $0 } END { for (i = int(NR / 2) + 1; i <= NR; i++) print r[i] }')
    [[ -n "$rows" ]] || die "$cfg: no sample saw all $CLIENTS clients connected ($samples)"
    pts=$(cut -d, -f2 <<<"$rows" | sort -n)
    R_NSAMPLES[$cfg]=$(wc -l <<<"$pts")
    pt_med=$(sed -n "$(((R_NSAMPLES[$cfg] + 1) / 2))p" <<<"$pts")
    pt_lo=$(head -1 <<<"$pts")
    pt_hi=$(tail -1 <<<"$pts")
    R_VMPTE[$cfg]=$(cut -d, -f3 <<<"$rows" | sort -n | tail -1)
    last=$(tail -1 <<<"$rows")
    IFS=, read -r _ _ _ R_PROCS[$cfg] R_CLIENTS[$cfg] <<<"$last"
    R_PT_BEFORE[$cfg]=$before
    R_PT[$cfg]=$((pt_med - before))
    R_PT_LO[$cfg]=$((pt_lo - before))
    R_PT_HI[$cfg]=$((pt_hi - before))
    R_MEDIAN_VMPTE[$cfg]=$(sort -n "$OUT/backend-vmpte-$cfg.txt" 2>/dev/null |
        awk '{ a[NR] = $1 } END { print (NR ? a[int((NR + 1) / 2)] : 0) + 0 }')
    R_MEDIAN_FAULTS[$cfg]=$(sort -n "$OUT/backend-faults-$cfg.txt" 2>/dev/null |
        awk '{ a[NR] = $1 } END { print (NR ? a[int((NR + 1) / 2)] : 0) + 0 }')
    R_CONNECT_MS[$cfg]=$(sed -n 's/^initial connection time = \([0-9.]*\) ms.*/\1/p' "$OUT/pgbench-$cfg.log" | tail -1)
    R_CONNECT_MS[$cfg]=${R_CONNECT_MS[$cfg]:-0}
    R_TPS[$cfg]=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$OUT/pgbench-$cfg.log" | tail -1)
    R_TX[$cfg]=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$OUT/pgbench-$cfg.log")
    R_FAILED[$cfg]=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$OUT/pgbench-$cfg.log")
    R_FAILED[$cfg]=${R_FAILED[$cfg]:-0}
    [[ -n "${R_TPS[$cfg]}" && -n "${R_TX[$cfg]}" ]] || die "$cfg: cannot read pgbench's summary"
    ((R_FAILED[$cfg] == 0)) || die "$cfg: pgbench reports ${R_FAILED[$cfg]} failed transactions"
    if grep -qE '^(pgbench: error|FATAL|ERROR)' "$OUT/pgbench-$cfg.log"; then
        die "$cfg: pgbench reported errors (see $OUT/pgbench-$cfg.log)"
    fi
    if [[ "$cfg" == sysv || "$cfg" == sysv-shim ]]; then
        local shmid
        shmid=$(sed -n 7p "$WORK/data/postmaster.pid" | awk '{ print $2 }')
        read -r R_ATT_PT[$cfg] R_ATT_FAULTS[$cfg] R_ATT_MS[$cfg] R_ATT_GIB[$cfg] \
            < <(attach_probe "$shmid" "${env_args[@]}")
        echo "$cfg: $ATTACHERS attachers of segment $shmid: PageTables +${R_ATT_PT[$cfg]} B, median ${R_ATT_FAULTS[$cfg]} faults, ${R_ATT_MS[$cfg]} ms" >&2
    fi
    stop_server
    if [[ "$cfg" == on ]]; then
        pool_change "-$pages"
        POOL_ADDED=$((POOL_ADDED - pages))
    fi
    printf '%s: PageTables +%s kB (%s..%s), sum VmPTE %s kB (%s processes, %s client backends), median backend VmPTE %s kB, %s tps, %s transactions, 0 failed\n' \
        "$cfg" "${R_PT[$cfg]}" "${R_PT_LO[$cfg]}" "${R_PT_HI[$cfg]}" "${R_VMPTE[$cfg]}" "${R_PROCS[$cfg]}" "${R_CLIENTS[$cfg]}" \
        "${R_MEDIAN_VMPTE[$cfg]}" "${R_TPS[$cfg]}" "${R_TX[$cfg]}" >&2
}

if [[ " $CONFIGS " == *" shim "* || " $CONFIGS " == *" sysv-shim "* ]]; then
    say "mounting msharefs"
    mkdir "$WORK/mnt"
    "$MSHAREFS_BIN" mount "$WORK/mnt" --state-dir "$WORK/state" --backing hugetlb >&2 8>&-
    MNT="$WORK/mnt"
    mkdir "$MNT/pg"
    chown "$PG_USER" "$MNT/pg"
fi

for cfg in $CONFIGS; do
    run_config "$cfg"
done

# ---- report ----------------------------------------------------------------------------

say "report in $OUT"
ratio() { # ratio A B: A / B with three significant decimals, or "n/a"
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.4f", a / b; else print "n/a" }'
}
HOST_MEM_KB=$(meminfo_kb MemTotal)
{
    echo "{"
    echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
    echo "  \"kernel\": \"$(uname -r)\","
    echo "  \"cpus\": $(nproc),"
    echo "  \"mem_total_kb\": $HOST_MEM_KB,"
    echo "  \"postgres\": \"$PG_VERSION\","
    echo "  \"params\": {\"clients\": $CLIENTS, \"jobs\": $JOBS, \"shared_buffers\": \"$SHARED_BUFFERS\", \"shared_memory_mb\": $SHMEM_MB, \"scale\": $SCALE, \"data_bytes\": $DATA_BYTES, \"duration_s\": $DURATION, \"mode\": \"$MODE\", \"mshare_anon_min\": \"$MSHARE_ANON_MIN\", \"small\": $([[ $SMALL == 1 ]] && echo true || echo false)},"
    echo "  \"configs\": {"
    first=1
    for cfg in $CONFIGS; do
        ((first)) || echo ","
        first=0
        printf '    "%s": {"pagetables_before_kb": %s, "pagetables_baseline_spread_kb": %s, "pagetables_delta_kb": %s, "pagetables_delta_min_kb": %s, "pagetables_delta_max_kb": %s, "samples": %s, "sum_vmpte_kb": %s, "median_backend_vmpte_kb": %s, "median_backend_minor_faults": %s, "initial_connection_ms": %s, "server_processes": %s, "client_backends": %s, "tps": %s, "transactions": %s, "failed_transactions": %s, "shared_mapping": "%s"}' \
            "$cfg" "${R_PT_BEFORE[$cfg]}" "${R_BASE_SPREAD[$cfg]}" "${R_PT[$cfg]}" "${R_PT_LO[$cfg]}" "${R_PT_HI[$cfg]}" "${R_NSAMPLES[$cfg]}" \
            "${R_VMPTE[$cfg]}" "${R_MEDIAN_VMPTE[$cfg]}" "${R_MEDIAN_FAULTS[$cfg]}" "${R_CONNECT_MS[$cfg]}" "${R_PROCS[$cfg]}" \
            "${R_CLIENTS[$cfg]}" "${R_TPS[$cfg]}" "${R_TX[$cfg]}" "${R_FAILED[$cfg]}" \
            "$(echo "${R_MAP[$cfg]}" | tr -s ' ' | sed 's/"/\\"/g')"
    done
    echo ""
    echo "  },"
    echo "  \"ratios\": {"
    sep=""
    for pair in shim:off shim:on sysv-shim:sysv sysv-shim:on; do
        ours=${pair%%:*} other=${pair#*:}
        if [[ -n "${R_PT[$ours]:-}" && -n "${R_PT[$other]:-}" ]]; then
            printf '%s    "%s_over_%s": {"pagetables_delta": %s, "sum_vmpte": %s, "median_backend_minor_faults": %s}' \
                "$sep" "${ours//-/_}" "$other" \
                "$(ratio "${R_PT[$ours]}" "${R_PT[$other]}")" "$(ratio "${R_VMPTE[$ours]}" "${R_VMPTE[$other]}")" \
                "$(ratio "${R_MEDIAN_FAULTS[$ours]}" "${R_MEDIAN_FAULTS[$other]}")"
            sep=$',\n'
        fi
    done
    echo ""
    echo "  }"
    echo "}"
} >"$OUT/results.json"

{
    echo "# PostgreSQL on msharefs: pgbench, $(wc -w <<<"$CONFIGS") configurations"
    echo
    echo "$PG_VERSION; Linux $(uname -r); $(nproc) CPUs; $((HOST_MEM_KB >> 20)) GiB."
    echo "pgbench $MODE, $CLIENTS clients, $JOBS threads, ${DURATION} s, scale $SCALE ($((DATA_BYTES >> 20)) MiB of tables and indexes, prewarmed);"
    echo "shared_buffers $SHARED_BUFFERS (shared memory $SHMEM_MB MB)."
    echo "PageTables delta: /proc/meminfo PageTables, median of the 1-second samples in the second half of the run"
    echo "(all clients connected), minus the median of 5 readings before the server started; in brackets the"
    echo "lowest and highest sample, and the spread of the 5 baseline readings (other programs on the machine)."
    echo "Sum of VmPTE: all server processes, highest sample. Shared PMD pages count once in PageTables but in"
    echo "the VmPTE of every process that uses them. Backend faults: the median client backend's minor faults"
    echo "(all of them, also on private memory), per GiB of shared memory. Connect: pgbench's initial connection time."
    echo
    echo "| configuration | PageTables delta [min..max; baseline spread] | sum of VmPTE | median backend VmPTE | backend faults per GiB | connect | processes (client backends) | TPS | failed |"
    echo "|---|---:|---:|---:|---:|---:|---|---:|---:|"
    for cfg in $CONFIGS; do
        case "$cfg" in
        off) name="huge_pages=off (4 KiB pages)" ;;
        on) name="huge_pages=on (PostgreSQL's own huge pages)" ;;
        shim) name="huge_pages=off + msharefs shim" ;;
        sysv) name="shared_memory_type=sysv (4 KiB pages)" ;;
        sysv-shim) name="shared_memory_type=sysv + msharefs shim" ;;
        esac
        printf '| %s | %s kB [%s..%s; %s] | %s kB | %s kB | %s | %s ms | %s (%s) | %s | %s |\n' "$name" "${R_PT[$cfg]}" \
            "${R_PT_LO[$cfg]}" "${R_PT_HI[$cfg]}" "${R_BASE_SPREAD[$cfg]}" "${R_VMPTE[$cfg]}" \
            "${R_MEDIAN_VMPTE[$cfg]}" "$(awk -v f="${R_MEDIAN_FAULTS[$cfg]}" -v m="$SHMEM_MB" 'BEGIN { printf "%.0f", f / (m / 1024) }')" \
            "${R_CONNECT_MS[$cfg]}" "${R_PROCS[$cfg]}" "${R_CLIENTS[$cfg]}" "${R_TPS[$cfg]}" "${R_FAILED[$cfg]}"
    done
    echo
    for pair in shim:off shim:on sysv-shim:sysv sysv-shim:on; do
        ours=${pair%%:*} other=${pair#*:}
        if [[ -n "${R_PT[$ours]:-}" && -n "${R_PT[$other]:-}" ]]; then
            echo "- $ours / $other: PageTables delta $(ratio "${R_PT[$ours]}" "${R_PT[$other]}"), sum of VmPTE $(ratio "${R_VMPTE[$ours]}" "${R_VMPTE[$other]}"), backend faults $(ratio "${R_MEDIAN_FAULTS[$ours]}" "${R_MEDIAN_FAULTS[$other]}")"
        fi
    done
    if [[ -n "${R_ATT_PT[sysv]:-}${R_ATT_PT[sysv-shim]:-}" ]]; then
        echo
        echo "$ATTACHERS further processes attach the running server's System V segment (shmat by id, as an"
        echo "Oracle process would; under the server's environment), read every 4 KiB page, and hold it while"
        echo "PageTables is read (delta against the reading before they attach):"
        echo
        echo "| configuration | page tables per attacher per GiB | faults per attacher per GiB | attach+touch (median) |"
        echo "|---|---:|---:|---:|"
        for cfg in sysv sysv-shim; do
            [[ -n "${R_ATT_PT[$cfg]:-}" ]] || continue
            awk -v c="$cfg" -v pt="${R_ATT_PT[$cfg]}" -v f="${R_ATT_FAULTS[$cfg]}" -v ms="${R_ATT_MS[$cfg]}" \
                -v g="${R_ATT_GIB[$cfg]}" -v n="$ATTACHERS" \
                'BEGIN { g /= 2^30; printf "| %s | %.0f B | %.1f | %.1f ms |\n", c, pt / n / g, f / g, ms }'
        done
        if [[ -n "${R_ATT_PT[sysv]:-}" && -n "${R_ATT_PT[sysv-shim]:-}" ]]; then
            echo
            echo "- sysv-shim / sysv attachers: page tables $(ratio "${R_ATT_PT[sysv-shim]}" "${R_ATT_PT[sysv]}"), faults $(ratio "${R_ATT_FAULTS[sysv-shim]}" "${R_ATT_FAULTS[sysv]}"), attach+touch time $(ratio "${R_ATT_MS[sysv-shim]}" "${R_ATT_MS[sysv]}")"
        fi
    fi
    echo
    echo "Shared memory mappings (postmaster's /proc/PID/maps):"
    echo
    for cfg in $CONFIGS; do
        echo "- $cfg: \`$(echo "${R_MAP[$cfg]}" | tr -s ' ')\`"
    done
} >"$OUT/results.md"

cat "$OUT/results.md"
