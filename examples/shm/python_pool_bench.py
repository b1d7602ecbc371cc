#!/usr/bin/env python3
"""POSIX shared memory of an unmodified Python program, side by side in one run.

    examples/shm/python_pool_bench.py [--size-gib 4] [--workers 16] [--method spawn]
                                      [--configs shmem-4k,shmem-thp,msharefs] [--out DIR]

A parent creates a multiprocessing.shared_memory segment of SIZE, writes every 4 KiB
page, and starts a Pool of WORKERS (start method METHOD). Once every worker process is up
and idle, the parent reads /proc/meminfo; then every worker opens the segment by name,
maps it and reads one byte of every 4 KiB page (the faults and the wall time of that
open+map+touch are the worker's attach), and waits at a barrier while the parent reads
/proc/meminfo again: the PageTables delta is what the workers' mappings cost.

Configurations (one after the other, same program):
  shmem-4k   /dev/shm as it is (tmpfs, 4 KiB pages): the kernel's default;
  shmem-thp  /dev/shm remounted huge=always (2 MiB transparent huge pages): the best the
             kernel offers without msharefs; remounted back afterwards;
  msharefs   under LD_PRELOAD=libmshare_preload.so with MSHARE_MOUNT (an msharefs mount this
             script makes) and MSHARE_SHM_MIN: the segment is a hugetlb region, every worker
             maps it 1 GiB-aligned and links the shared page tables.

Needs root (the remount, the msharefs mount, the huge-page pool); holds
/run/msharefs/test-pool.lock (the lock msharefs's tests and benchmarks take) while it runs. Writes DIR/results.json
and DIR/results.md (default target/shm-bench) and prints the table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = 4096
GIB = 1 << 30

WORKER = r'''
import json, multiprocessing as mp, os, resource, sys, time
from multiprocessing import shared_memory

def init(b, r):
    global barrier, ready
    barrier, ready = b, r

def attach(args):
    name, = args
    ready.wait()          # all workers are up; the parent has read its baseline
    t0 = time.perf_counter()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    shm = shared_memory.SharedMemory(name=name)
    # One byte of every 4 KiB page, through a strided view: no allocation of our own, so
    # the faults counted are the segment's.
    total = sum(shm.buf[::4096])
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t1 = time.perf_counter()
    ok = total == 7 * (shm.size // 4096)
    addr = None
    with open("/proc/self/maps") as f:
        for line in f:
            if "/dev/shm/" + name[1:] in line or "/backing/hugetlb/" in line:
                addr = int(line.split("-")[0], 16)
    barrier.wait()        # hold the mapping while the parent reads PageTables
    barrier.wait()
    shm.close()
    return {"pid": os.getpid(), "faults": f1 - f0, "seconds": t1 - t0, "ok": ok,
            "addr": addr}

def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def main():
    size, n, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ctx = mp.get_context(method)
    shm = shared_memory.SharedMemory(create=True, size=size)
    buf = shm.buf
    for off in range(0, size, 4096):
        buf[off] = 7
    barrier, ready = ctx.Barrier(n + 1), ctx.Barrier(n + 1)
    with ctx.Pool(n, initializer=init, initargs=(barrier, ready)) as pool:
        res = pool.map_async(attach, [(shm.name,)] * n, 1)
        time.sleep(1.0)                   # workers started and idle
        base = meminfo("PageTables")
        ready.wait()
        barrier.wait()                    # every worker attached and touched
        held = meminfo("PageTables")
        barrier.wait()
        reports = res.get()
    del buf
    shm.close()
    shm.unlink()
    print(json.dumps({"pagetables_delta": held - base, "workers": reports}))

if __name__ == "__main__":
    main()
'''


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def remount_dev_shm(huge):
    sh("mount", "-o", "remount,huge=" + huge, "/dev/shm")


def dev_shm_huge():
    with open("/proc/mounts") as f:
        for line in f:
            p = line.split()
            if p[1] == "/dev/shm":
                for o in p[3].split(","):
                    if o.startswith("huge="):
                        return o[5:]
    return "never"


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0


def run_config(name, size, workers, method, env, script):
    out = subprocess.run([sys.executable, script, str(size), str(workers), method],
                         env=env, check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ws = r["workers"]
    gib = size / GIB
    res = {
        "config": name,
        "workers": len(ws),
        "processes": len({w["pid"] for w in ws}),
        "data_ok": all(w["ok"] for w in ws),
        "pagetables_delta": r["pagetables_delta"],
        "pt_per_attacher_per_gib": r["pagetables_delta"] / len(ws) / gib,
        "faults_per_attacher_per_gib": median([w["faults"] for w in ws]) / gib,
        "attach_touch_ms_median": median([w["seconds"] for w in ws]) * 1000,
        "gib_aligned": all(w["addr"] is not None and w["addr"] % GIB == 0 for w in ws),
        "stderr": out.stderr.strip()[-2000:],
    }
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--method", default="spawn", choices=["spawn", "forkserver", "fork"])
    ap.add_argument("--configs", default="shmem-4k,shmem-thp,msharefs")
    ap.add_argument("--out", default=os.path.join(REPO, "target", "shm-bench"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("python_pool_bench.py: run as root (remount of /dev/shm, msharefs mount)")
    size = a.size_gib * GIB
    configs = a.configs.split(",")
    # The lock msharefs's tests and benchmarks take while they change the huge-page pool.
    os.makedirs("/run/msharefs", exist_ok=True)
    lock = open("/run/msharefs/test-pool.lock", "a")
    import fcntl
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="msharefs-shm-bench-")
    script = os.path.join(work, "pool.py")
    with open(script, "w") as f:
        f.write(WORKER)
    msharefs = os.path.join(REPO, "target", "release", "msharefs")
    preload = os.path.join(REPO, "target", "release", "libmshare_preload.so")
    if not (os.path.exists(msharefs) and os.path.exists(preload)):
        sh("cargo", "build", "--release", "--workspace", cwd=REPO)
    mnt, state = os.path.join(work, "mnt"), os.path.join(work, "state")
    was = dev_shm_huge()
    results = []
    mounted = False
    try:
        for c in configs:
            env = dict(os.environ)
            if c == "shmem-thp":
                remount_dev_shm("always")
            if c == "msharefs":
                sh(msharefs, "mount", mnt, "--state-dir", state, "--backing", "hugetlb")
                mounted = True
                env.update(LD_PRELOAD=preload, MSHARE_MOUNT=mnt, MSHARE_SHM_MIN="64M")
            try:
                print(f"==> {c}: {a.workers} workers x {a.size_gib} GiB ({a.method})",
                      file=sys.stderr)
                results.append(run_config(c, size, a.workers, a.method, env, script))
            finally:
                if c == "shmem-thp":
                    remount_dev_shm(was)
                if c == "msharefs":
                    sh(msharefs, "umount", mnt, "--purge")
                    mounted = False
    finally:
        if mounted:
            subprocess.run([msharefs, "umount", mnt, "--purge"])
        if dev_shm_huge() != was:
            remount_dev_shm(was)
    base = {r["config"]: r for r in results}
    lines = [
        f"Python multiprocessing.shared_memory: {a.workers} workers ({a.method}) attach a "
        f"{a.size_gib} GiB segment by name and read every 4 KiB page; PageTables delta "
        "from /proc/meminfo while all hold it.",
        "",
        "| configuration | PageTables per attacher per GiB | faults per attacher per GiB "
        "| attach+touch (median) | 1 GiB-aligned | data |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['pt_per_attacher_per_gib']:,.0f} B "
            f"| {r['faults_per_attacher_per_gib']:,.1f} | {r['attach_touch_ms_median']:,.1f} ms "
            f"| {'yes' if r['gib_aligned'] else 'no'} | {'ok' if r['data_ok'] else 'WRONG'} |")
    if "msharefs" in base:
        m = base["msharefs"]
        lines.append("")
        for other in ("shmem-4k", "shmem-thp"):
            if other in base:
                o = base[other]
                pt = m["pagetables_delta"] / o["pagetables_delta"] if o["pagetables_delta"] else 0
                t = m["attach_touch_ms_median"] / o["attach_touch_ms_median"]
                lines.append(f"- msharefs / {other}: page tables {pt:.5f}, attach+touch time "
                             f"{t:.4f}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"size_gib": a.size_gib, "workers": a.workers, "method": a.method,
                   "results": results}, f, indent=1)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
