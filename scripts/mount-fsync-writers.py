#!/usr/bin/env python3
"""N processes, each rewriting 4 KiB of its own file in a directory and fsyncing it, K times;
prints the fsyncs per second of all of them together. Used to measure how a famsd mount's
syncs of different files overlap:

    famsd format --heap /var/tmp/s.heap --size 16M --max-size 1G
    famsd mount /var/tmp/s.heap /mnt/fams
    scripts/mount-fsync-writers.py /mnt/fams 8 200
    famsd umount /mnt/fams
"""
import os, sys, time, multiprocessing as mp
MP = sys.argv[1]; N = int(sys.argv[2]); K = int(sys.argv[3])
def worker(i, q):
    path = os.path.join(MP, f"w{i}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"\0" * 4096, 0); os.fsync(fd)
    q.get()  # start together
    t = time.perf_counter()
    for k in range(K):
        os.pwrite(fd, (k % 251).to_bytes(1, "little") * 4096, 0)
        os.fsync(fd)
    q.put(time.perf_counter() - t)
    os.close(fd)
if __name__ == "__main__":
    qs = [mp.Queue() for _ in range(N)]
    ps = [mp.Process(target=worker, args=(i, qs[i])) for i in range(N)]
    for p in ps: p.start()
    time.sleep(0.5)
    t = time.perf_counter()
    for q in qs: q.put(1)
    secs = [q.get() for q in qs]
    wall = time.perf_counter() - t
    for p in ps: p.join()
    print(f"{N} writers x {K} fsyncs of 4 KiB: {N*K/wall:.0f} fsyncs/s in all, {wall*1e3:.0f} ms")
