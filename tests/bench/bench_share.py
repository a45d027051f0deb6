#!/usr/bin/env python3
"""Does wanxfer leave a TCP flow its fair share of a link they share?

Each run builds a fresh emulated link (harness.py: wanemu or netem), starts a long
iperf3 TCP flow from host a to host b (`-C cubic` or `-C bbr`), lets it run
alone for a while, then runs `wanxfer.py get` of a random file across the
same link in the same direction (serve in a, get in b). From iperf3's
one-second intervals it reports the TCP flow's rate alone and while wanxfer
ran beside it, and wanxfer's goodput (file bits / wall clock of `get`).
A fair sharer leaves TCP at least about half of the link.

    sudo python3 tests/bench/bench_share.py                       # cubic and bbr, 3 runs each
    sudo python3 tests/bench/bench_share.py --cc cubic --runs 1 --link "--delay 60 --rate 200"
    sudo python3 tests/bench/bench_share.py --wanxfer-first       # TCP joins a running transfer

The default link is thin (200 Mbit/s) so that the two cores of this machine,
shared by both ends of both flows and the emulator, are not what decides the
shares. Needs root, ip(8), cc (wanemu) or tc (netem), and iperf3; run
nothing else meanwhile.
"""

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import HOST_A, HOST_B  # noqa: E402

PORT, IPERF_PORT = 46225, 5202


@contextlib.contextmanager
def shared_link(link, args, work, source, env):
    """harness.link_with_serve(), and an iperf3 server listening in host b."""
    with harness.link_with_serve(link, args.link, work, source, env, PORT, args.wanxfer) as procs:
        iperf = procs.spawn("b", ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                            os.path.join(work, "iperf-server.out"), os.path.join(work, "iperf-server.out"))
        procs.wait_listening(iperf, IPERF_PORT, log_path=os.path.join(work, "iperf-server.out"))
        yield procs


def one_run_wanxfer_first(link, args, cc, work, source, size):
    """`get` starts alone; TCP joins after args.alone seconds for args.join_time."""
    env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    with shared_link(link, args, work, source, env) as procs:
        dest = os.path.join(work, "recv.bin")
        t0 = time.monotonic()
        get = procs.spawn("b", [sys.executable, args.wanxfer, "get", "%s:%d" % (HOST_A, PORT),
                                os.path.basename(source), "-o", dest, "-q", "--no-delta"] + args.get_args.split(),
                          os.path.join(work, "get.out"), os.path.join(work, "get.out"), env)
        time.sleep(args.alone)          # a benchmark, not a test: wanxfer runs alone first
        iperf = subprocess.run(link.command("a", ["iperf3", "-c", HOST_B, "-p", str(IPERF_PORT),
                                                        "-C", cc, "-t", str(args.join_time), "-i", "1",
                                                        "--json"]),
                               stdout=subprocess.PIPE, universal_newlines=True)
        still_running = get.poll() is None
        status, _cpu = procs.reap(get)
        t1 = time.monotonic()
        if status:
            raise SystemExit("get failed: see %s" % os.path.join(work, "get.out"))
        os.unlink(dest)
        report = json.loads(iperf.stdout)
    rates = [i["sum"]["bits_per_second"] / 1e6 for i in report["intervals"] if i["sum"]["start"] >= 3]
    return {
        "cc": cc, "order": "wanxfer-first",
        "tcp_beside_mbps": round(statistics.mean(rates), 1) if rates else None,
        "tcp_each_second": [round(i["sum"]["bits_per_second"] / 1e6) for i in report["intervals"]],
        "wanxfer_mbps": round(size * 8 / (t1 - t0) / 1e6, 1),
        "wanxfer_seconds": round(t1 - t0, 2),
        "wanxfer_outlasted_tcp": still_running,
    }


def one_run(link, args, cc, work, source, size):
    env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    with shared_link(link, args, work, source, env) as procs:
        duration = args.alone + args.tcp_time
        iperf_out = os.path.join(work, "iperf.json")
        iperf = procs.spawn("a", ["iperf3", "-c", HOST_B, "-p", str(IPERF_PORT), "-C", cc,
                                  "-t", str(duration), "-i", "1", "--json"], iperf_out, iperf_out)
        t_iperf = time.monotonic()
        time.sleep(args.alone)          # a benchmark, not a test: TCP runs alone first
        dest = os.path.join(work, "recv.bin")
        t0 = time.monotonic()
        got = subprocess.run(link.command("b", [sys.executable, args.wanxfer, "get",
                                                      "%s:%d" % (HOST_A, PORT), os.path.basename(source),
                                                      "-o", dest, "-q", "--json", "--no-delta"]
                                                     + args.get_args.split()),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True)
        t1 = time.monotonic()
        if got.returncode:
            raise SystemExit("get failed: %s" % got.stdout[-2000:])
        os.unlink(dest)
        procs.reap(iperf, duration + 30)
        with open(iperf_out) as f:
            report = json.load(f)
    start, end = t0 - t_iperf, t1 - t_iperf
    alone, beside = [], []
    for interval in report["intervals"]:
        s = interval["sum"]
        a, b = s["start"], s["end"]
        rate = s["bits_per_second"] / 1e6
        if 2 <= a and b <= args.alone:          # the first seconds are TCP's ramp
            alone.append(rate)
        elif start + 1 <= a and b <= end:       # while both ran (a second of margin)
            beside.append(rate)
    return {
        "cc": cc,
        "tcp_alone_mbps": round(statistics.mean(alone), 1) if alone else None,
        "tcp_beside_mbps": round(statistics.mean(beside), 1) if beside else None,
        "wanxfer_mbps": round(size * 8 / (t1 - t0) / 1e6, 1),
        "wanxfer_seconds": round(t1 - t0, 2),
        "overlap_intervals": len(beside),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_options(ap, "--delay 60 --rate 200 --queue 50")
    ap.add_argument("--cc", default="cubic,bbr", help="TCP congestion controls to share with")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, help="file size in MiB (default 256; 1024 with --wanxfer-first, so that "
                    "`get` outlasts TCP)")
    ap.add_argument("--alone", type=float, default=8.0, help="seconds TCP runs alone first")
    ap.add_argument("--tcp-time", type=int, default=40, help="seconds TCP runs after that")
    ap.add_argument("--wanxfer-first", action="store_true",
                    help="start get first and let TCP join it for --join-time seconds")
    ap.add_argument("--join-time", type=int, default=15, help="seconds TCP runs beside get")
    ap.add_argument("--get-args", default="", help="extra arguments for wanxfer get, e.g. '--workers 1'")
    args = ap.parse_args()
    harness.require_root("bench_share.py")
    link = harness.make_link(args)
    size = (args.size or (1024 if args.wanxfer_first else 256)) << 20
    results = []
    with tempfile.TemporaryDirectory(prefix="wanxfer-share-") as work:
        source = os.path.join(work, "file.bin")
        harness.random_file(source, size)
        for cc in args.cc.split(","):
            for i in range(args.runs):
                if args.wanxfer_first:
                    r = one_run_wanxfer_first(link, args, cc, work, source, size)
                    results.append(r)
                    print("%-5s run %d: TCP joining wanxfer %s Mbit/s (from its 3rd second); wanxfer %s "
                          "Mbit/s over its whole run (%s s)%s" % (
                              cc, i + 1, r["tcp_beside_mbps"], r["wanxfer_mbps"], r["wanxfer_seconds"],
                              "" if r["wanxfer_outlasted_tcp"] else ", ended before TCP did"),
                          flush=True)
                    print("      TCP each second: %s" % " ".join(map(str, r["tcp_each_second"])), flush=True)
                    continue
                r = one_run(link, args, cc, work, source, size)
                results.append(r)
                print("%-5s run %d: TCP alone %s Mbit/s, beside wanxfer %s Mbit/s; wanxfer %s Mbit/s "
                      "(%s s)" % (cc, i + 1, r["tcp_alone_mbps"], r["tcp_beside_mbps"],
                                  r["wanxfer_mbps"], r["wanxfer_seconds"]), flush=True)
    harness.write_json(args.json, {"link": args.link, "backend": link.name, "runs": results})
    if args.wanxfer_first:
        for cc in args.cc.split(","):
            rows = [r for r in results if r["cc"] == cc]
            print("%s joining wanxfer: TCP median %.1f Mbit/s, wanxfer median %.1f over its run" % (
                cc, statistics.median([r["tcp_beside_mbps"] or 0 for r in rows]),
                statistics.median([r["wanxfer_mbps"] for r in rows])))
        return
    print("\nlink: %s; medians of %d runs" % (args.link, args.runs))
    print("| TCP | TCP alone | TCP beside wanxfer | wanxfer beside TCP |")
    print("|---|---|---|---|")
    for cc in args.cc.split(","):
        rows = [r for r in results if r["cc"] == cc]
        med = lambda key: statistics.median([r[key] for r in rows if r[key] is not None] or [0])  # noqa: E731
        print("| %s | %.1f | %.1f | %.1f |" % (cc, med("tcp_alone_mbps"), med("tcp_beside_mbps"),
                                               med("wanxfer_mbps")))


if __name__ == "__main__":
    main()
