#!/usr/bin/env python3
"""How long does `get` take for a tree of mid-sized files across a long link?

Files too large to be batched on the control channel (over 256 KiB) each pay
their own round trips: the request, the digest, and for a delta the first
`need`. Builds one emulated link (harness.py: wanemu or netem), serves a tree of
--files random files of --size MiB from host a, and times `wanxfer.py get`
of the whole tree into a fresh directory (and a fresh cache) in host b, with
delta transfers on (the default) and with --no-delta. Every copy is checked
byte for byte.

    sudo python3 tests/bench/bench_tree.py                       # 30 files of 4 MiB, 3 runs
    sudo python3 tests/bench/bench_tree.py --files 100 --size 1 --runs 1

Needs root, ip(8), and cc (wanemu) or tc (netem); run nothing else meanwhile.
"""

import argparse
import filecmp
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import HOST_A  # noqa: E402

PORT = 46227
MODES = (("delta", []), ("--no-delta", ["--no-delta"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_options(ap, "--delay 60 --rate 1000 --queue 50")
    ap.add_argument("--files", type=int, default=30)
    ap.add_argument("--size", type=int, default=4, help="MiB per file (default 4)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    harness.require_root("bench_tree.py")
    link = harness.make_link(args)
    env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(16))
    results = {name: [] for name, _ in MODES}
    with tempfile.TemporaryDirectory(prefix="wanxfer-tree-") as work:
        tree = os.path.join(work, "served", "tree")
        os.makedirs(tree)
        for i in range(args.files):
            harness.random_file(os.path.join(tree, "f%03d.bin" % i), args.size << 20)
        with harness.link_with_serve(link, args.link, work, os.path.dirname(tree), env, PORT, args.wanxfer):
            for run in range(args.runs):
                for name, options in MODES:
                    dest = os.path.join(work, "dest")
                    cache = os.path.join(work, "get-%d-%s.db" % (run, name.strip("-")))
                    started = time.monotonic()
                    got = subprocess.run(
                        link.command("b", [sys.executable, args.wanxfer, "get", "%s:%d" % (HOST_A, PORT),
                                           "tree", "-o", dest, "-q", "--cache", cache] + options),
                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, universal_newlines=True)
                    wall = time.monotonic() - started
                    if got.returncode:
                        raise SystemExit("get failed: %s" % got.stderr[-2000:])
                    names = sorted(os.listdir(tree))
                    _same, differ, missing = filecmp.cmpfiles(tree, os.path.join(dest, "tree"), names,
                                                              shallow=False)
                    if differ or missing:
                        raise SystemExit("copies differ: %s" % (differ + missing))
                    shutil.rmtree(dest)
                    results[name].append(wall)
                    print("run %d  %-10s %.2f s (%.3f s per file)" % (run + 1, name, wall,
                                                                     wall / args.files), flush=True)
    print("\n%d files of %d MiB, link: %s; medians of %d runs" % (args.files, args.size, args.link,
                                                                  args.runs))
    for name, _options in MODES:
        wall = harness.median(results[name])
        print("%-10s %.2f s, %.3f s per file, %.0f Mbit/s" % (
            name, wall, wall / args.files, args.files * (args.size << 20) * 8 / wall / 1e6))
    harness.write_json(args.json, {"link": args.link, "backend": link.name, "files": args.files,
                                   "size_mib": args.size, "wall_seconds": results})


if __name__ == "__main__":
    main()
