#!/usr/bin/env python3
"""Times each step of an attach to a sized hugetlb region of a mounted msharefs, as a
process makes it: open, fstat, fstatfs, the GET_INFO ioctl and the attach-socket round
trip (the request datagram with the reply socket and the region descriptor, the reply
with the backing), then close.

    python3 bench/attach_steps.py /mnt/msharefs/REGION [N]

N iterations in this process (warm: the second and later ones) print the medians. For
fresh processes, run it N times with N=1 and take the medians of the lines. Root is not
needed, only read-write access to the region. Numbers in docs/BENCHMARKS.md ("After the
attach work").
"""
import array
import fcntl
import os
import socket
import statistics
import sys
import time

GET_INFO = 0x80A07810  # _IOR('x', 0x10, struct mshare_region_info), 160 bytes
INFO_LEN = 160
SOCKET_PATH_OFFSET = 48  # offsetof(struct mshare_region_info, socket_path)
REPLY_LEN = 168  # struct msharefs_attach_reply


def main():
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    steps = {k: [] for k in ("open", "fstat", "fstatfs", "ioctl", "socket", "close")}
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fd = os.open(path, os.O_RDWR)
        t1 = time.perf_counter_ns()
        os.fstat(fd)
        t2 = time.perf_counter_ns()
        os.fstatvfs(fd)
        t3 = time.perf_counter_ns()
        info = bytearray(INFO_LEN)
        fcntl.ioctl(fd, GET_INFO, info)
        t4 = time.perf_counter_ns()
        raw = bytes(info[SOCKET_PATH_OFFSET:])
        sock_path = raw[: raw.index(b"\0")].decode()
        t5 = time.perf_counter_ns()
        c, theirs = socket.socketpair()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # (socket.send_fds ignores its address argument in Python 3.11.)
            rights = array.array("i", [theirs.fileno(), fd])
            s.sendmsg([b"w"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, sock_path)
        theirs.close()
        msg, fds, _, _ = socket.recv_fds(c, REPLY_LEN, 1)
        t6 = time.perf_counter_ns()
        if len(msg) < 4 or int.from_bytes(msg[:4], sys.byteorder) != 0 or not fds:
            sys.exit(f"attach socket refused: {msg[:4].hex()}")
        c.close()
        for f in fds:
            os.close(f)
        os.close(fd)
        t7 = time.perf_counter_ns()
        for k, ns in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5, t7 - t6)):
            steps[k].append(ns / 1000)
    print(" ".join(f"{k}={statistics.median(v):.1f}us" for k, v in steps.items()))


if __name__ == "__main__":
    main()
