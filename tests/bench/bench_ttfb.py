#!/usr/bin/env python3
"""How long does `get` wait for the first byte of file data?

Builds one emulated link (harness.py: wanemu or netem), runs `wanxfer.py serve` in
host a and, for each file, `wanxfer.py get --json` in host b, each a new
session into a fresh destination. Reports, per file, the summary's
`first_data_seconds` (from the start of the TCP connect to the first data
datagram) in seconds and in round trips of the link (twice --delay), and the
wall clock of the whole `get` command (Python start-up included).

    sudo python3 tests/bench/bench_ttfb.py                        # 3 runs per file
    sudo python3 tests/bench/bench_ttfb.py --link "--delay 150 --rate 100" --runs 5

The target is the handshake (TCP connect plus the authentication exchange: 2
round trips) plus one round trip: 3 round trips, and half of one for the data
to travel. Needs root, ip(8), and cc (wanemu) or tc (netem); run nothing else
meanwhile.
"""

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import HOST_A  # noqa: E402

PORT = 46226

# (name, size in bytes, extra get options)
FILES = [
    ("10 KB", 10 * 1000, []),
    ("4 MiB", 4 << 20, []),                     # large enough for a delta transfer
    ("4 MiB --no-delta", 4 << 20, ["--no-delta"]),
    ("64 MiB", 64 << 20, []),                   # striped over --workers auto
    ("64 MiB --workers 1", 64 << 20, ["--workers", "1"]),
    # Its cache used once before against the same server (a 1 KB file,
    # untimed): the client remembers the server's salt and stretches the
    # secret while it connects.
    ("10 KB, salt known", 10 * 1000, []),
]
WARM = {"10 KB, salt known"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_options(ap, "--delay 60 --rate 1000 --queue 50")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    harness.require_root("bench_ttfb.py")
    link = harness.make_link(args)
    try:
        rtt = 2 * harness.parse_link_options(args.link)["delay"] / 1000 or None
    except harness.BenchError:
        rtt = None
    env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(16))
    results = []
    with tempfile.TemporaryDirectory(prefix="wanxfer-ttfb-") as work:
        served = os.path.join(work, "served")
        os.mkdir(served)
        for index, (name, size, _options) in enumerate(FILES):
            harness.random_file(os.path.join(served, "f%d.bin" % index), size)
        harness.random_file(os.path.join(served, "warm.bin"), 1000)
        with harness.link_with_serve(link, args.link, work, served, env, PORT, args.wanxfer):
            for run in range(args.runs):
                for index, (name, size, options) in enumerate(FILES):
                    dest = os.path.join(work, "got-%d-%d.bin" % (run, index))
                    cache = os.path.join(work, "get-%d-%d.db" % (run, index))

                    def get(remote, dest):
                        return subprocess.run(
                            link.command("b", [sys.executable, args.wanxfer, "get", "%s:%d" % (HOST_A, PORT),
                                               remote, "-o", dest, "--json", "--cache", cache] + options),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
                    if name in WARM:
                        warm = get("warm.bin", dest + ".warm")
                        if warm.returncode:
                            raise SystemExit("get failed: %s" % warm.stderr[-2000:])
                        os.unlink(dest + ".warm")
                    started = time.monotonic()
                    got = get("f%d.bin" % index, dest)
                    wall = time.monotonic() - started
                    if got.returncode:
                        raise SystemExit("get failed: %s" % got.stderr[-2000:])
                    summary = json.loads(got.stdout.splitlines()[-1])
                    os.unlink(dest)
                    first = summary["first_data_seconds"]
                    results.append({"file": name, "run": run + 1, "first_data_seconds": first,
                                    "round_trips": round(first / rtt, 2) if rtt and first else None,
                                    "get_seconds": round(wall, 3)})
                    print("run %d  %-17s first data %.3f s (%s round trips), whole get %.2f s" % (
                        run + 1, name, first, results[-1]["round_trips"], wall), flush=True)
    print("\nmedians of %d runs, link: %s" % (args.runs, args.link))
    print("| file | first data s | round trips | whole get s |")
    print("|---|---|---|---|")
    for name, _size, _options in FILES:
        rows = [r for r in results if r["file"] == name]
        print("| %s | %.3f | %.2f | %.2f |" % (
            name, harness.median(r["first_data_seconds"] for r in rows),
            harness.median(r["round_trips"] for r in rows),
            harness.median(r["get_seconds"] for r in rows)))
    harness.write_json(args.json, results)


if __name__ == "__main__":
    main()
