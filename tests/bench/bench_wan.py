#!/usr/bin/env python3
"""WAN benchmark for wanxfer against iperf3 (TCP cubic / bbr), rsync over ssh and Tsunami UDP.

Every run builds a fresh emulated link (two network namespaces, wan-a 198.18.0.1
and wan-b 198.18.0.2, joined by the userspace emulator wanemu through
../shared/wanemu/wan, or with --backend netem by tc netem on a veth pair: see
harness.py), moves data from host a to host b, and tears the link down again,
reading the link's counters to learn how many bytes host a put on it.

Tools ("rows"):
  wanxfer            `wanxfer.py serve FILE` in a, `wanxfer.py get` in b (wall clock
                     of the whole get command, sha256 of the result checked)
  wanxfer-noenc      the same with --no-encrypt passed to both ends
  iperf3-cubic/-bbr  iperf3 memory-to-memory, data a -> b (`-R` from b), goodput
                     from iperf3's --json (bytes received / test seconds)
  rsync-ssh(-CC)     rsync over ssh of the same file from a to b; sshd is run
                     inside wan-a with throwaway keys in the work dir
  tsunami            Tsunami UDP (built from its public source, see --tsunami-dir):
                     tsunamid in a, in b the client's `set rate RATE` (the link's
                     --rate), `connect`, `get FILE`, `quit`; goodput from the wall
                     clock of the whole client command, and its own "Final file
                     rate" in the "own Mbit/s" column (converted: Tsunami's "Mbit"
                     is 2^20 bits); sha256 of the result checked

Metrics (medians over --runs):
  goodput Mbit/s   file bits / wall seconds (1 Mbit = 1e6 bits)
  ratio            goodput / link rate (--rate of the scenario)
  wire/file        bytes host a put on the link (emulator's a->b "in") / bytes delivered
  CPU s/GB         user+system CPU seconds of each end per 1e9 delivered bytes; the
                   sender is the serving process (and, for sshd, its reaped children),
                   the receiver the client process and its reaped children
  other load       cores busy during the transfer with anything but the two ends and
                   the emulator (from /proc/stat): other work on the machine; results
                   with more than ~0.2 are suspect on a 2-core machine
For iperf3 the goodput is iperf3's own (bytes received / test seconds) and wire/file
is estimated from the emulator's a->b counters, as a timed test keeps sending past
its measured window: link bytes in / (link bytes out - 52 header bytes per packet).

`wan` keeps one link per machine: a `wan up`/`wan down` by anyone else during a run
kills our emulator; such runs are detected and reported as errors ("disturbed").

Needs: root (network namespaces), ip(8), a C compiler `cc` (wanemu is built on first
use) or tc (netem), python3 (standard library only); iperf3, rsync, ssh/sshd for the peers
(apt-get install -y iperf3 openssh-server rsync); for Tsunami its two programs, built
from cheetahmobile/tsunami-udp with `make -f Makefile_standalone` in client/ and server/.
Only 2 CPU cores here: the emulator itself burns CPU at high rates, so run nothing else
meanwhile.

Examples:
  sudo python3 tests/bench/bench_wan.py --scenario S1 --runs 1 --size 256M
  sudo python3 tests/bench/bench_wan.py --no-wanxfer --peers iperf3,rsync --json peers.json
  sudo python3 tests/bench/bench_wan.py --link "--delay 30 --rate 300 --loss 0.1" --peers none
  sudo python3 tests/bench/bench_wan.py --scenario S1 --peers tsunami --no-wanxfer --tsunami-dir ~/tsunami-udp
"""

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import (HOST_A, SSH_PORT, BenchError, Window, log, median, proc_children, proc_cpu, settled_cpu,  # noqa: E402
                     tail)

WANXFER_PORT = 46224
IPERF_PORT = 5201
TSUNAMI_PORT = 51038        # Tsunami's own default: TCP at the server, UDP at the client

SCENARIOS = {
    "S1": "--delay 60 --rate 1000 --queue 50",
    "S2": "--delay 60 --rate 1000 --queue 50 --loss 1",
    "S3": "--delay 100 --rate 500 --queue 50 --loss 2 --burst 5",
    "S4": "--delay 150 --rate 100 --queue 100 --loss 0.5",
}


def fmt_size(n):
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return "%d%s" % (n // mult, unit)
    return str(n)


# ------------------------------------------------------------------------- Tsunami
# Tsunami UDP is not packaged: it is built by hand from its source and found
# here, either in the source tree (client/tsunami, server/tsunamid, where
# `make -f Makefile_standalone` leaves them) or side by side in one folder.

TSUNAMI_BUILD = ("build Tsunami UDP from its public source (cheetahmobile/tsunami-udp): "
                 "`make -f Makefile_standalone` in client/ and in server/, then give the "
                 "source folder as --tsunami-dir or $TSUNAMI_DIR")

# Its client's summary after a get; "Mbit" there is 2^20 bits (it divides
# by 1024*1024), so its rates are converted before they sit beside ours.
TSUNAMI_MBIT = 1 << 20
TSUNAMI_SUMMARY = re.compile(r"^(Transfer duration|Final file rate|Transfer mode)\s*:\s*(.*?)\s*$", re.M)


def find_tsunami(folder):
    """(client, server) programs of a Tsunami build in `folder`, or None."""
    if not folder:
        return None
    for client, server in ((("client", "tsunami"), ("server", "tsunamid")), (("tsunami",), ("tsunamid",))):
        paths = (os.path.join(folder, *client), os.path.join(folder, *server))
        if all(os.path.isfile(p) and os.access(p, os.X_OK) for p in paths):
            return paths
    return None


def tsunami_summary(text):
    """From the Tsunami client's output, its summary of the one get:
    {duration_s, file_rate_mbps (1e6 bits), file_rate_printed (its own
    unit)}.  BenchError if there is none (the get failed) or it says data
    was lost."""
    found = dict(TSUNAMI_SUMMARY.findall(text))
    try:
        duration = float(found["Transfer duration"].split()[0])
        printed = float(found["Final file rate"].split()[0])
    except (KeyError, IndexError, ValueError):
        raise BenchError("no transfer summary from the tsunami client")
    if found.get("Transfer mode") != "lossless":
        raise BenchError("tsunami transfer mode: %s" % found.get("Transfer mode"))
    return {"duration_s": duration, "file_rate_printed": printed,
            "file_rate_mbps": printed * TSUNAMI_MBIT / 1e6}


# --------------------------------------------------------------------------- tools

class Bench:
    def __init__(self, args, procs, workdir):
        self.a = args
        self.p = procs
        self.link = procs.link
        self.work = workdir
        self.src = None
        self.src_sha = None
        self.ssh_dir = None

    # setup ------------------------------------------------------------------

    def make_source(self):
        size = self.a.size
        path = os.path.join(self.work, "src-%s.bin" % fmt_size(size))
        if not (os.path.isfile(path) and os.path.getsize(path) == size):
            log("generating %s of random data in %s" % (fmt_size(size), path))
            tmp = path + ".part"
            with open(tmp, "wb") as f:
                left = size
                while left:
                    n = min(left, 4 << 20)
                    f.write(os.urandom(n))
                    left -= n
            os.replace(tmp, path)
        self.src = path
        self.src_sha = harness.wanxfer.file_sha256(path)

    def setup_ssh(self):
        self.ssh_dir = harness.setup_sshd(self.work)

    # helpers ----------------------------------------------------------------

    def rundir(self, tag):
        d = os.path.join(self.work, "runs", tag)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    def timeout_for(self, opts):
        if self.a.timeout:
            return self.a.timeout
        rate = harness.link_rate(opts) or 1000.0
        return max(300.0, 4 * self.a.size * 8 / (rate * 1e6) + 60)

    def verify(self, path):
        if not os.path.isfile(path):
            raise BenchError("no received file at %s" % path)
        size = os.path.getsize(path)
        if size != self.a.size:
            raise BenchError("received %d bytes, expected %d" % (size, self.a.size))
        if harness.wanxfer.file_sha256(path) != self.src_sha:
            raise BenchError("sha256 mismatch")

    # wanxfer ----------------------------------------------------------------

    def run_wanxfer(self, tag, opts, plain):
        d = self.rundir(tag)
        env = dict(os.environ, WANXFER_SECRET=secrets.token_hex(24), PYTHONUNBUFFERED="1")
        flags = ["--no-encrypt"] if plain else []
        port = self.a.port
        py = self.a.python
        # Fresh caches at both ends for every run: the receiver must not find
        # the previous run's copy, nor the server its remembered signature.
        caches = lambda name: ["--cache", os.path.join(d, name)]  # noqa: E731
        srv = self.p.spawn("a", [py, self.a.wanxfer, "serve", self.src, "--bind", HOST_A,
                                 "--port", str(port)] + caches("serve-cache.db") + flags
                           + shlex.split(self.a.serve_args),
                           os.path.join(d, "serve.out"), os.path.join(d, "serve.err"), env)
        try:
            self.p.wait_listening(srv, port, "tcp", self.a.ready_timeout, os.path.join(d, "serve.err"))
            srv_cpu0 = proc_cpu(srv.pid)
            win = Window(self.link, srv.pid)
            dest = os.path.join(d, "recv", os.path.basename(self.src))
            os.makedirs(os.path.dirname(dest))
            remote = self.a.remote or os.path.basename(self.src)
            r = self.p.run_timed("b", [py, self.a.wanxfer, "get", "%s:%d" % (HOST_A, port), remote,
                                       "-o", dest, "--json", "-q"] + caches("get-cache.db") + flags
                                 + shlex.split(self.a.get_args),
                                 os.path.join(d, "get.out"), os.path.join(d, "get.err"),
                                 self.timeout_for(opts), env)
            host = win.close(settled_cpu(srv.pid), r["cpu"])
        finally:
            rc_s, srv_cpu = self.p.stop(srv)
        reports = []
        with open(os.path.join(d, "get.out"), errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        o = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(o, dict):
                        reports.append(o)
        res = {"wall_s": r["wall"], "cpu_receiver_s": r["cpu"], "cpu_sender_s": srv_cpu,
               "cpu_sender_startup_s": srv_cpu0, "rc": r["rc"], "server_rc": rc_s, "host_cpu": host,
               "tool_report": reports[-1] if reports else None}
        if r["timed_out"]:
            res.update(status="timeout", delivered_bytes=dir_bytes(os.path.dirname(dest)),
                       error="get timed out after %.0f s" % r["wall"])
            return res
        if r["rc"] != 0:
            raise BenchError("get exited %s%s" % (r["rc"], tail(os.path.join(d, "get.err"))))
        got = dest
        if os.path.isdir(dest):  # -o taken as a directory
            got = os.path.join(dest, os.path.basename(remote))
        if not os.path.isfile(got) and reports:
            for k in ("path", "dest", "output", "local", "file"):
                v = reports[-1].get(k)
                if isinstance(v, str) and os.path.isfile(v):
                    got = v
                    break
        self.verify(got)
        res.update(status="ok", delivered_bytes=self.a.size)
        return res

    # iperf3 -----------------------------------------------------------------

    def run_iperf3(self, tag, opts, cc):
        d = self.rundir(tag)
        srv = self.p.spawn("a", ["iperf3", "-s", "-1", "-B", HOST_A, "-p", str(IPERF_PORT)],
                           os.path.join(d, "server.out"), os.path.join(d, "server.out"))
        got = None
        try:
            self.p.wait_listening(srv, IPERF_PORT, "tcp", 10, os.path.join(d, "server.out"))
            amount = ["-n", str(self.a.iperf_bytes)] if self.a.iperf_bytes else \
                ["-t", str(self.a.iperf_time)]
            tmo = self.timeout_for(opts) if self.a.iperf_bytes else self.a.iperf_time + 60
            win = Window(self.link, srv.pid)
            r = self.p.run_timed("b", ["iperf3", "-c", HOST_A, "-p", str(IPERF_PORT), "-R",
                                       "-C", cc, "--json"] + amount,
                                 os.path.join(d, "client.json"), os.path.join(d, "client.err"),
                                 tmo)
            host = win.close(proc_cpu(srv.pid), r["cpu"])
            # iperf3 -s -1 lingers after the test; give it a moment, then stop it
            got = self.p.reap(srv, 2.0)
        finally:
            if got is None:
                got = self.p.stop(srv)
        srv_cpu = got[1]
        if r["timed_out"]:
            raise BenchError("iperf3 client timed out")
        try:
            with open(os.path.join(d, "client.json")) as f:
                j = json.load(f)
        except ValueError as e:
            raise BenchError("iperf3 output not JSON: %s%s" % (e, tail(os.path.join(d, "client.err"))))
        if j.get("error"):
            raise BenchError("iperf3: %s" % j["error"])
        rcv = j["end"]["sum_received"]
        snt = j["end"].get("sum_sent", {})
        return {"status": "ok", "wall_s": rcv["seconds"], "delivered_bytes": rcv["bytes"],
                "goodput_mbps_tool": rcv["bits_per_second"] / 1e6,
                "retransmits": snt.get("retransmits"),
                "sender_cc": j["end"].get("sender_tcp_congestion"),
                "cpu_sender_s": srv_cpu, "cpu_receiver_s": r["cpu"], "rc": r["rc"],
                "host_cpu": host}

    # rsync over ssh ---------------------------------------------------------

    def run_rsync(self, tag, opts, cc):
        d = self.rundir(tag)
        sd = self.ssh_dir
        if cc:  # congestion control of the ssh connection (per namespace)
            for h in ("a", "b"):
                subprocess.run(self.link.command(h, ["sysctl", "-qw",
                                                     "net.ipv4.tcp_congestion_control=%s" % cc]), check=True)
        sshd = self.p.spawn("a", ["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(sd, "sshd_config")],
                            os.path.join(d, "sshd.log"), os.path.join(d, "sshd.log"))
        try:
            self.p.wait_listening(sshd, SSH_PORT, "tcp", 10, os.path.join(d, "sshd.log"))
            cpu0 = proc_cpu(sshd.pid) or 0.0
            win = Window(self.link, sshd.pid)
            ssh = harness.ssh_command(sd, self.a.ssh_opts)
            recv = os.path.join(d, "recv")
            os.makedirs(recv)
            r = self.p.run_timed("b", ["rsync", "-e", ssh] + shlex.split(self.a.rsync_args)
                                 + ["root@%s:%s" % (HOST_A, self.src), recv + "/"],
                                 os.path.join(d, "rsync.out"), os.path.join(d, "rsync.err"),
                                 self.timeout_for(opts))
            # sender CPU = what sshd reaped from its per-connection children
            deadline = time.monotonic() + 10
            while proc_children(sshd.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            cpu1 = proc_cpu(sshd.pid)
            host = win.close(cpu1, r["cpu"])
        finally:
            self.p.stop(sshd)
        res = {"wall_s": r["wall"], "cpu_receiver_s": r["cpu"],
               "cpu_sender_s": (cpu1 - cpu0) if cpu1 is not None else None, "rc": r["rc"],
               "host_cpu": host}
        if r["timed_out"]:
            res.update(status="timeout", delivered_bytes=dir_bytes(recv),
                       error="rsync timed out after %.0f s" % r["wall"])
            return res
        if r["rc"] != 0:
            raise BenchError("rsync exited %s%s" % (r["rc"], tail(os.path.join(d, "rsync.err"))))
        self.verify(os.path.join(recv, os.path.basename(self.src)))
        res.update(status="ok", delivered_bytes=self.a.size)
        return res

    # Tsunami UDP --------------------------------------------------------------

    def run_tsunami(self, tag, opts):
        d = self.rundir(tag)
        client, server = self.a.tsunami
        rate = harness.link_rate(opts)
        if not rate:
            raise BenchError("tsunami needs the link's --rate for its `set rate`")
        srv = self.p.spawn("a", [server, "--port=%d" % TSUNAMI_PORT],
                           os.path.join(d, "server.log"), os.path.join(d, "server.log"))
        # The client keeps the remote name's last part, in its working folder.
        recv = os.path.join(d, "recv")
        os.makedirs(recv)
        try:
            try:
                self.p.wait_listening(srv, TSUNAMI_PORT, "tcp", 10, os.path.join(d, "server.log"))
                cpu0 = proc_cpu(srv.pid) or 0.0
                win = Window(self.link, srv.pid)
                r = self.p.run_timed("b", [client, "set", "rate", "%dM" % round(rate),
                                           "set", "port", str(TSUNAMI_PORT), "connect", HOST_A,
                                           "get", self.src, "quit"],
                                     os.path.join(d, "client.out"), os.path.join(d, "client.err"),
                                     self.timeout_for(opts), cwd=recv)
                # The client's quit closes the connection; the server's child
                # for it then ends and is reaped, its CPU in the server's (a
                # killed client leaves it sending: no use waiting for it).
                cpu1 = proc_cpu(srv.pid) if r["timed_out"] else settled_cpu(srv.pid)
                host = win.close(cpu1, r["cpu"])
            finally:
                self.p.stop(srv)
            if r["timed_out"]:
                raise BenchError("tsunami client timed out after %.0f s" % r["wall"])
            # Its quit exits 1 even after a good transfer: the summary and the
            # file tell instead.
            with open(os.path.join(d, "client.out"), errors="replace") as f:
                try:
                    own = tsunami_summary(f.read())
                except BenchError as e:
                    raise BenchError("%s%s" % (e, tail(os.path.join(d, "client.err"))))
            self.verify(os.path.join(recv, os.path.basename(self.src)))
        finally:
            if not self.a.keep_files:
                shutil.rmtree(recv, ignore_errors=True)
        return {"status": "ok", "wall_s": r["wall"], "delivered_bytes": self.a.size,
                "goodput_mbps_own": own["file_rate_mbps"], "tool_report": own,
                "cpu_sender_s": (cpu1 - cpu0) if cpu1 is not None else None,
                "cpu_receiver_s": r["cpu"], "rc": r["rc"], "host_cpu": host}

    # one run ----------------------------------------------------------------

    def one(self, scen, opts, run_no, tool):
        tag = "%s-%s-%d" % (scen, tool, run_no)
        link_opts = opts
        if not self.a.fixed_seed and "--seed" not in shlex.split(opts):
            link_opts = "--seed %d %s" % (run_no, opts)  # first: applies to both directions
        rec = {"scenario": scen, "link": opts, "link_run": link_opts, "run": run_no, "tool": tool}
        try:
            self.link.up(link_opts)
            if tool == "wanxfer":
                res = self.run_wanxfer(tag, opts, plain=False)
            elif tool == "wanxfer-noenc":
                res = self.run_wanxfer(tag, opts, plain=True)
            elif tool.startswith("iperf3-"):
                res = self.run_iperf3(tag, opts, tool.split("-", 1)[1])
            elif tool.startswith("rsync-ssh"):
                res = self.run_rsync(tag, opts, tool.split("-", 2)[2] if tool.count("-") == 2 else None)
            elif tool == "tsunami":
                res = self.run_tsunami(tag, opts)
            else:
                raise BenchError("unknown tool %s" % tool)
        except BenchError as e:
            res = {"status": "error", "error": str(e)}
        finally:
            counters = self.link.down()
        if counters.get("disturbed") and res.get("status") != "error":
            res = dict(res, status="error", error="link disturbed: someone else ran `wan up`/`wan down` "
                                                  "during the run (the wan link is one per machine)")
        elif counters.get("disturbed"):
            res["error"] += " (and the link was disturbed by another `wan up`/`wan down`)"
        rec.update(res)
        rec["link_counters"] = counters
        rec["other_load_cores"] = (res.get("host_cpu") or {}).get("other_cores")
        derive(rec, harness.link_rate(opts))
        if rec["status"] == "ok" and not self.a.keep_files:
            shutil.rmtree(os.path.join(self.work, "runs", tag, "recv"), ignore_errors=True)
        return rec


def dir_bytes(d):
    n = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                n += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return n


def derive(rec, rate):
    b = rec.get("delivered_bytes")
    w = rec.get("wall_s")
    ok = rec.get("status") in ("ok", "timeout") and b and w
    rec["goodput_mbps"] = b * 8 / w / 1e6 if ok else None
    if rec.get("goodput_mbps_tool") is not None:  # iperf3's own figure
        rec["goodput_mbps"] = rec["goodput_mbps_tool"]
    rec["ratio"] = rec["goodput_mbps"] / rate if rec["goodput_mbps"] and rate else None
    ab = rec.get("link_counters", {}).get("ab", {})
    wire = ab.get("bytes_in")
    rec["wire_bytes"] = wire
    rec["wire_per_file"] = wire / b if (wire and b and rec.get("status") == "ok") else None
    if rec.get("tool", "").startswith("iperf3") and rec["wire_per_file"] and ab.get("bytes_out"):
        # A timed iperf3 test keeps sending after its measured window (in flight, send
        # buffer), so link bytes / received bytes overstates the overhead. Estimate it
        # instead as bytes put on the link / TCP payload delivered to b, the payload
        # being delivered bytes less 52 header bytes (IP 20 + TCP 20 + timestamps 12)
        # per packet: exact but for spurious retransmissions.
        rec["wire_per_file_measured"] = rec["wire_per_file"]
        payload = ab["bytes_out"] - 52 * ab["pkts_out"]
        rec["wire_per_file"] = wire / payload if payload > 0 else None
    for end in ("sender", "receiver"):
        c = rec.get("cpu_%s_s" % end) if rec.get("status") == "ok" else None  # killed: partial
        rec["cpu_%s_s_per_gb" % end] = c / (b / 1e9) if (c is not None and b) else None


def summarize(records):
    rows = []
    keys = []
    for r in records:
        k = (r["scenario"], r["tool"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in records if (r["scenario"], r["tool"]) == k]
        good = [r for r in rs if r["status"] in ("ok", "timeout")]
        row = {"scenario": k[0], "tool": k[1], "link": rs[0]["link"], "runs": len(rs),
               "ok": sum(r["status"] == "ok" for r in rs),
               "timeouts": sum(r["status"] == "timeout" for r in rs),
               "errors": [r.get("error") for r in rs if r["status"] == "error"]}
        for m in ("goodput_mbps", "goodput_mbps_own", "ratio", "wire_per_file", "cpu_sender_s_per_gb",
                  "cpu_receiver_s_per_gb", "wall_s", "other_load_cores"):
            row[m] = median([r.get(m) for r in good])
        rows.append(row)
    return rows


def fnum(x, fmt):
    return "-" if x is None else fmt % x


def markdown(rows):
    # A tool that times itself (Tsunami) gets its own figure beside ours.
    own = any(r.get("goodput_mbps_own") is not None for r in rows)
    out = ["| scenario | tool | runs | goodput Mbit/s | %sratio to link | wire/file | "
           "CPU s/GB sender | CPU s/GB receiver | other load (cores) |" % ("own Mbit/s | " if own else ""),
           "|---|---|---|---|---|---|---|---|---|" + ("---|" if own else "")]
    for r in rows:
        runs = "%d" % r["ok"] if r["ok"] == r["runs"] else "%d/%d ok" % (r["ok"], r["runs"])
        if r["timeouts"]:
            runs += ", %d timeout (goodput >=)" % r["timeouts"]
        if r["errors"]:
            runs += ", %d FAILED" % len(r["errors"])
        out.append("| %s | %s | %s | %s | %s%s | %s | %s | %s | %s |" % (
            r["scenario"], r["tool"], runs, fnum(r["goodput_mbps"], "%.1f"),
            (fnum(r.get("goodput_mbps_own"), "%.1f") + " | ") if own else "", fnum(r["ratio"], "%.3f"),
            fnum(r["wire_per_file"], "%.3f"),
            fnum(r["cpu_sender_s_per_gb"], "%.2f"), fnum(r["cpu_receiver_s_per_gb"], "%.2f"),
            fnum(r["other_load_cores"], "%.2f")))
    return "\n".join(out)


# ---------------------------------------------------------------------------- main

def build_parser():
    ap = argparse.ArgumentParser(
        prog="bench_wan.py", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\nScenarios:\n" + "\n".join(
            "  %s  %s" % kv for kv in SCENARIOS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", metavar="S",
                    help="S1..S4 (repeatable, or comma-separated); default all four, "
                         "unless --link is given")
    ap.add_argument("--link", action="append", metavar="OPTS",
                    help='custom link, wanemu options, e.g. --link "--delay 60 --rate 1000" '
                         "(repeatable; named L1, L2, ...)")
    ap.add_argument("--runs", type=int, default=3, help="runs per tool and scenario (median; default 3)")
    ap.add_argument("--size", type=harness.size_arg, default=1 << 30,
                    help="file size, e.g. 1G (default), 256M")
    ap.add_argument("--peers", default="iperf3,rsync",
                    help="comma list of iperf3 (= iperf3-cubic,iperf3-bbr), iperf3-cubic, "
                         "iperf3-bbr, rsync, tsunami, or none (default iperf3,rsync)")
    ap.add_argument("--tsunami-dir", default=os.environ.get("TSUNAMI_DIR"), metavar="DIR",
                    help="Tsunami UDP's source folder after `make -f Makefile_standalone` in "
                         "client/ and server/, or a folder holding tsunami and tsunamid "
                         "(default $TSUNAMI_DIR)")
    ap.add_argument("--no-wanxfer", action="store_true", help="run the peers only")
    ap.add_argument("--no-plain", action="store_true", help="skip the wanxfer --no-encrypt row")
    ap.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")
    ap.add_argument("--wanxfer", default=harness.WANXFER,
                    help="path of wanxfer.py (default: this checkout's)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for wanxfer.py")
    ap.add_argument("--port", type=int, default=WANXFER_PORT, help="wanxfer port (default 46224)")
    ap.add_argument("--remote", help="REMOTE name passed to get (default: the file's basename)")
    ap.add_argument("--serve-args", default="", help="extra arguments for wanxfer serve")
    ap.add_argument("--get-args", default="", help="extra arguments for wanxfer get")
    ap.add_argument("--ready-timeout", type=float, default=30.0,
                    help="seconds to wait for serve to listen on TCP PORT (default 30)")
    ap.add_argument("--iperf-time", type=int, default=20, help="iperf3 -t seconds (default 20)")
    ap.add_argument("--iperf-bytes", type=harness.size_arg,
                    help="use iperf3 -n BYTES instead of -t (slow on lossy links with cubic)")
    ap.add_argument("--rsync-cc", default="bbr",
                    help="TCP congestion control(s) for rsync's ssh connection, comma list, or "
                         "'default' to leave the namespaces' default (default bbr)")
    ap.add_argument("--rsync-runs", type=int, help="runs for rsync (default --runs)")
    ap.add_argument("--rsync-args", default="", help="extra rsync arguments")
    ap.add_argument("--ssh-opts", default="", help="extra ssh options, e.g. '-c aes128-gcm@openssh.com'")
    ap.add_argument("--timeout", type=float,
                    help="seconds per transfer (default max(300, 4x ideal time at link rate + 60)); "
                         "a transfer cut short counts as a timeout, its goodput a lower bound "
                         "from the bytes received so far")
    ap.add_argument("--fixed-seed", action="store_true",
                    help="do not pass --seed RUN to wanemu (by default run i uses --seed i, "
                         "the same for every tool)")
    ap.add_argument("--workdir", help="work directory (default: a new temp dir, removed at the end); "
                                      "a source file of the right size there is reused")
    ap.add_argument("--keep-files", action="store_true", help="keep received files")
    harness.add_link_options(ap)
    ap.set_defaults(tsunami=None)   # (client, server) programs, once found
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    harness.require_root("bench_wan.py")
    link = harness.make_link(args)
    page_reporting = harness.warn_page_reporting()

    scen = []
    for s in args.scenario or ([] if args.link else list(SCENARIOS)):
        for x in s.split(","):
            x = x.strip().upper()
            if x not in SCENARIOS:
                sys.exit("unknown scenario %s (have %s)" % (x, ", ".join(SCENARIOS)))
            scen.append((x, SCENARIOS[x]))
    for i, l in enumerate(args.link or [], 1):
        scen.append(("L%d" % i, l))

    tools = []
    if not args.no_wanxfer:
        if not os.path.isfile(args.wanxfer):
            sys.exit("wanxfer not found at %s (use --wanxfer or --no-wanxfer)" % args.wanxfer)
        tools.append("wanxfer")
        if not args.no_plain:
            tools.append("wanxfer-noenc")
    rsync_ccs = [c.strip() for c in args.rsync_cc.split(",") if c.strip()]
    for p in [x.strip() for x in args.peers.split(",") if x.strip()]:
        if p == "none":
            continue
        if p == "iperf3":
            tools += ["iperf3-cubic", "iperf3-bbr"]
        elif p.startswith("iperf3-"):
            tools.append(p)
        elif p == "rsync":
            tools += ["rsync-ssh" if c == "default" else "rsync-ssh-" + c for c in rsync_ccs]
        elif p == "tsunami":
            tools.append("tsunami")
        else:
            sys.exit("unknown peer %s" % p)
    need = {"iperf3": any(t.startswith("iperf3") for t in tools),
            "rsync": any(t.startswith("rsync") for t in tools)}
    missing = [b for b, n in (("iperf3", need["iperf3"]), ("rsync", need["rsync"]),
                              ("ssh", need["rsync"]), ("/usr/sbin/sshd", need["rsync"]),
                              ("ssh-keygen", need["rsync"])) if n and not shutil.which(b)]
    if missing:
        sys.exit("missing %s (apt-get install -y iperf3 openssh-server rsync)" % ", ".join(missing))
    if "tsunami" in tools:
        args.tsunami = find_tsunami(args.tsunami_dir)
        if not args.tsunami:
            sys.exit("no Tsunami UDP programs in %s: %s" % (args.tsunami_dir or "(no --tsunami-dir)",
                                                             TSUNAMI_BUILD))
    if not tools:
        sys.exit("nothing to run")

    own_work = not args.workdir
    work = args.workdir or tempfile.mkdtemp(prefix="wanxfer-bench-")
    os.makedirs(work, exist_ok=True)
    procs = harness.Procs(link)
    bench = Bench(args, procs, work)
    records = []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (&)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    interrupted = False
    try:
        if any(t.startswith(("wanxfer", "rsync", "tsunami")) for t in tools):
            bench.make_source()
        if need["rsync"]:
            bench.setup_ssh()
        for name, opts in scen:
            for run in range(1, args.runs + 1):
                for tool in tools:
                    if tool.startswith("rsync") and args.rsync_runs is not None \
                            and run > args.rsync_runs:
                        continue
                    rec = bench.one(name, opts, run, tool)
                    records.append(rec)
                    if rec["status"] == "error":
                        log("[%s run %d] %-14s FAILED: %s" % (name, run, tool, rec["error"]))
                    else:
                        log("[%s run %d] %-14s %s%8.1f Mbit/s%s  ratio %s  wire/file %s  "
                            "cpu s/GB snd %s rcv %s  (%.1f s)%s" % (
                                name, run, tool, ">=" if rec["status"] == "timeout" else "",
                                rec["goodput_mbps"] or 0,
                                (" (own %.1f)" % rec["goodput_mbps_own"])
                                if rec.get("goodput_mbps_own") is not None else "",
                                fnum(rec["ratio"], "%.3f"),
                                fnum(rec["wire_per_file"], "%.3f"),
                                fnum(rec["cpu_sender_s_per_gb"], "%.2f"),
                                fnum(rec["cpu_receiver_s_per_gb"], "%.2f"), rec["wall_s"] or 0,
                                ("  [other load %.2f cores]" % rec["other_load_cores"])
                                if (rec["other_load_cores"] or 0) > 0.2 else ""))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        procs.kill_all()
        if link.is_up:
            link.down()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)

    rows = summarize(records)
    print(markdown(rows))
    if args.json:
        meta = {"size": args.size, "runs": args.runs, "tools": tools,
                "scenarios": dict(scen), "iperf": ("-n %d" % args.iperf_bytes) if args.iperf_bytes
                else "-t %d" % args.iperf_time, "rsync_cc": args.rsync_cc,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "uname": " ".join(os.uname()),
                "cpus": os.cpu_count(), "interrupted": interrupted, "backend": link.name,
                "tsunami": args.tsunami, "page_reporting": page_reporting}
        harness.write_json(args.json, {"meta": meta, "summary": rows, "runs": records})
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
