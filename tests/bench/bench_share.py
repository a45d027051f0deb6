#!/usr/bin/env python3
"""Does wanxfer leave a TCP flow its fair share of a link they share?

Each run builds a fresh emulated link with ../shared/wanemu/wan, starts a long
iperf3 TCP flow from host a to host b (`-C cubic` or `-C bbr`), lets it run
alone for a while, then runs `wanxfer.py get` of a random file across the
same link in the same direction (serve in a, get in b). From iperf3's
one-second intervals it reports the TCP flow's rate alone and while wanxfer
ran beside it, and wanxfer's goodput (file bits / wall clock of `get`).
A fair sharer leaves TCP at least about half of the link.

    sudo python3 tests/bench_share.py                       # cubic and bbr, 3 runs each
    sudo python3 tests/bench_share.py --cc cubic --runs 1 --link "--delay 60 --rate 200"
    sudo python3 tests/bench_share.py --wanxfer-first       # TCP joins a running transfer

The default link is thin (200 Mbit/s) so that the two cores of this machine,
shared by both ends of both flows and the emulator, are not what decides the
shares. Needs root, ip(8), cc and iperf3; run nothing else meanwhile.
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

here = os.path.dirname(os.path.abspath(__file__))
HOST_A, HOST_B = "198.18.0.1", "198.18.0.2"
PORT, IPERF_PORT = 46225, 5202


def parse_with_common_options(ap):
    """Add the options every wanemu benchmark here takes, parse, and check
    for root."""
    ap.add_argument("--wanxfer", default=os.path.join(os.path.dirname(here), "wanxfer.py"))
    ap.add_argument("--wan", default=os.environ.get("WANEMU", "/work/shared/wanemu/wan"))
    ap.add_argument("--json", metavar="FILE", help="write every run as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    return args


def wan(args, *argv, **kw):
    return subprocess.run([args.wan] + list(argv), **kw)


def spawn(args, host, argv, out, env=None):
    with open(out, "wb") as f:
        return subprocess.Popen([args.wan, host] + argv, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def wait_listening(args, host, port, deadline_s=20.0):
    """Poll (with a deadline) until something listens on TCP `port` in `host`."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        out = wan(args, host, "ss", "-Hltn", "sport = :%d" % port,
                  stdout=subprocess.PIPE, text=True).stdout
        if out.strip():
            return
        time.sleep(0.1)
    raise SystemExit("nothing listens on %s port %d" % (host, port))


@contextlib.contextmanager
def link_with_serve(args, work, served, env, port=PORT):
    """A fresh link (`args.link`) with `wanxfer serve SERVED` listening in
    host a; yields the list of children, every one of which (and any the
    caller adds) is stopped, and the link taken down, at the end."""
    wan(args, "up", *args.link.split(), check=True, stdout=subprocess.DEVNULL)
    procs = []
    try:
        procs.append(spawn(args, "a", [sys.executable, args.wanxfer, "serve", served, "--bind", HOST_A,
                                       "--port", str(port), "--cache", os.path.join(work, "s.db")],
                           os.path.join(work, "serve.out"), env))
        wait_listening(args, "a", port)
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 15)
                except ProcessLookupError:
                    pass
                p.wait()
        wan(args, "down", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def shared_link(args, work, source, env):
    """link_with_serve(), and an iperf3 server listening in host b."""
    with link_with_serve(args, work, source, env) as procs:
        procs.append(spawn(args, "b", ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                           os.path.join(work, "iperf-server.out")))
        wait_listening(args, "b", IPERF_PORT)
        yield procs


def one_run_wanxfer_first(args, cc, work, source, size):
    """`get` starts alone; TCP joins after args.alone seconds for args.join_time."""
    env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    with shared_link(args, work, source, env) as procs:
        dest = os.path.join(work, "recv.bin")
        t0 = time.monotonic()
        get = spawn(args, "b", [sys.executable, args.wanxfer, "get", "%s:%d" % (HOST_A, PORT),
                                os.path.basename(source), "-o", dest, "-q", "--no-delta"],
                    os.path.join(work, "get.out"), env)
        procs.append(get)
        time.sleep(args.alone)          # a benchmark, not a test: wanxfer runs alone first
        iperf = subprocess.run([args.wan, "a", "iperf3", "-c", HOST_B, "-p", str(IPERF_PORT), "-C", cc,
                                "-t", str(args.join_time), "-i", "1", "--json"],
                               stdout=subprocess.PIPE, text=True)
        still_running = get.poll() is None
        get.wait()
        t1 = time.monotonic()
        if get.returncode:
            raise SystemExit("get failed: see %s" % os.path.join(work, "get.out"))
        os.unlink(dest)
        report = json.loads(iperf.stdout)
    rates = [i["sum"]["bits_per_second"] / 1e6 for i in report["intervals"] if i["sum"]["start"] >= 3]
    return {
        "cc": cc, "order": "wanxfer-first",
        "tcp_beside_mbps": round(statistics.mean(rates), 1) if rates else None,
        "wanxfer_mbps": round(size * 8 / (t1 - t0) / 1e6, 1),
        "wanxfer_seconds": round(t1 - t0, 2),
        "wanxfer_outlasted_tcp": still_running,
    }


def one_run(args, cc, work, source, size):
    env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    with shared_link(args, work, source, env) as procs:
        duration = args.alone + args.tcp_time
        iperf_out = os.path.join(work, "iperf.json")
        iperf = spawn(args, "a", ["iperf3", "-c", HOST_B, "-p", str(IPERF_PORT), "-C", cc,
                                  "-t", str(duration), "-i", "1", "--json"], iperf_out)
        procs.append(iperf)
        t_iperf = time.monotonic()
        time.sleep(args.alone)          # a benchmark, not a test: TCP runs alone first
        dest = os.path.join(work, "recv.bin")
        t0 = time.monotonic()
        got = wan(args, "b", sys.executable, args.wanxfer, "get", "%s:%d" % (HOST_A, PORT),
                  os.path.basename(source), "-o", dest, "-q", "--json", "--no-delta",
                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t1 = time.monotonic()
        if got.returncode:
            raise SystemExit("get failed: %s" % got.stdout[-2000:])
        os.unlink(dest)
        iperf.wait(timeout=duration + 30)
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
    ap.add_argument("--link", default="--delay 60 --rate 200 --queue 50",
                    help="wan up options (default: %(default)s)")
    ap.add_argument("--cc", default="cubic,bbr", help="TCP congestion controls to share with")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="file size in MiB (default 256)")
    ap.add_argument("--alone", type=float, default=8.0, help="seconds TCP runs alone first")
    ap.add_argument("--tcp-time", type=int, default=40, help="seconds TCP runs after that")
    ap.add_argument("--wanxfer-first", action="store_true",
                    help="start get first and let TCP join it for --join-time seconds")
    ap.add_argument("--join-time", type=int, default=15, help="seconds TCP runs beside get")
    args = parse_with_common_options(ap)
    size = args.size << 20
    results = []
    with tempfile.TemporaryDirectory(prefix="wanxfer-share-") as work:
        source = os.path.join(work, "file.bin")
        with open(source, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1 << 20))
        for cc in args.cc.split(","):
            for i in range(args.runs):
                if args.wanxfer_first:
                    r = one_run_wanxfer_first(args, cc, work, source, size)
                    results.append(r)
                    print("%-5s run %d: TCP joining wanxfer %s Mbit/s (from its 3rd second); wanxfer %s "
                          "Mbit/s over its whole run (%s s)%s" % (
                              cc, i + 1, r["tcp_beside_mbps"], r["wanxfer_mbps"], r["wanxfer_seconds"],
                              "" if r["wanxfer_outlasted_tcp"] else ", ended before TCP did"),
                          flush=True)
                    continue
                r = one_run(args, cc, work, source, size)
                results.append(r)
                print("%-5s run %d: TCP alone %s Mbit/s, beside wanxfer %s Mbit/s; wanxfer %s Mbit/s "
                      "(%s s)" % (cc, i + 1, r["tcp_alone_mbps"], r["tcp_beside_mbps"],
                                  r["wanxfer_mbps"], r["wanxfer_seconds"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"link": args.link, "runs": results}, f, indent=1)
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
