#!/usr/bin/env python3
"""Workers benchmark: one file from `serve --workers N` to `get --workers N`
on 127.0.0.1 (no link emulator, no root), for each N asked.  Reports for
each run the goodput, the CPU seconds per GB of each end (its processes
together), and how the work was shared: each worker's share of the
packets (what each receiving worker's flow carried) and of the CPU at
each end (the coordinator is worker 0; also counted from the workers'
fork, which leaves out the coordinator's start: the interpreter and the
handshake, a cost per command), and each process's CPU on its main
thread and on its other threads (the digest's, the file writer's).
On a machine of two cores, wall time cannot show scaling; the shares and
the CPU per GB against N=1 can.

    python3 tests/bench/bench_workers.py [--size 256M] [--workers 1,2,3] [--runs 1] [--no-delta]
                                         [--rate 400M] [--json out.json]

With --rate (get --rate) the transfer is paced below what the cores can
do, as across a link: the processes then do not queue for the two cores.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import wanxfer  # noqa: E402
from helpers import start_serve  # noqa: E402

SECRET = 'bench-workers-secret'


def own_cpu(pid, tid=None):
    """User and system CPU seconds of one live process alone, or of its
    thread `tid` (None if gone)."""
    try:
        with open('/proc/%d/stat' % pid if tid is None else '/proc/%d/task/%d/stat' % (pid, tid)) as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(')') + 2:].split()
    return (int(fields[11]) + int(fields[12])) / harness.CLK_TCK


def thread_cpu(pid):
    """{thread id: CPU seconds} of a live process's threads ({} if gone)."""
    try:
        tids = [int(t) for t in os.listdir('/proc/%d/task' % pid)]
    except OSError:
        return {}
    cpu = {}
    for tid in tids:
        seconds = own_cpu(pid, tid)
        if seconds is not None:
            cpu[tid] = seconds
    return cpu


class Sampler:
    """Polls /proc every `interval` s for the CPU of each process of both
    ends, by role, keeping the last figure each showed (a process's last
    interval before it exits is missed: figures are a little low)."""

    def __init__(self, serve_pid, interval=0.02):
        self.serve_pid, self.interval = serve_pid, interval
        self.get_pid = None
        self.cpu = {}                   # (end, pid) -> CPU seconds
        self.roles = {}                 # (end, pid) -> 'coordinator' or 'worker'
        self.threads = {}               # (end, pid) -> {thread id: CPU seconds}
        self.at_fork = {}               # end -> its coordinator's CPU seconds when a worker was first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _note(self, end, pid, role):
        cpu = own_cpu(pid)
        if cpu is not None:
            self.cpu[(end, pid)] = cpu
            self.roles[(end, pid)] = role
            # Threads that end (a file's digest, writer) are gone from /proc: keep what each showed last.
            self.threads.setdefault((end, pid), {}).update(thread_cpu(pid))

    def _run(self):
        while not self._stop.wait(self.interval):     # a deadline-free poll of /proc, not a sync
            for session in harness.proc_children(self.serve_pid):
                self._note('server', session, 'coordinator')
                self._workers('server', session)
            if self.get_pid is not None:
                self._note('client', self.get_pid, 'coordinator')
                self._workers('client', self.get_pid)

    def _workers(self, end, coordinator):
        workers = harness.proc_children(coordinator)
        if workers and end not in self.at_fork and (end, coordinator) in self.cpu:
            # What came before (the interpreter's start, the handshake) is
            # a cost per command, not per GB: shares_from_fork() leaves it out.
            self.at_fork[end] = self.cpu[(end, coordinator)]
        for worker in workers:
            self._note(end, worker, 'worker')

    def stop(self):
        self._stop.set()
        self._thread.join()

    def shares(self, end):
        """[CPU seconds of the coordinator, then of each worker] at `end`."""
        mine = sorted(((0 if self.roles[key] == 'coordinator' else 1, key[1]), cpu)
                      for key, cpu in self.cpu.items() if key[0] == end)
        return [cpu for _key, cpu in mine]

    def shares_from_fork(self, end):
        """shares(), the coordinator's CPU counted from its workers' fork."""
        cpu = self.shares(end)
        if cpu:
            cpu[0] -= self.at_fork.get(end, 0.0)
        return cpu

    def main_thread_shares(self, end):
        """[CPU seconds of each process's main thread, of its other threads
        (the digest's, the file writer's, the listener's)] at `end`, in the
        order of shares(): what the coordinator does on threads of its own."""
        mine = sorted(((0 if self.roles[key] == 'coordinator' else 1, key[1]), key)
                      for key in self.cpu if key[0] == end)
        split = []
        for _order, key in mine:
            threads = self.threads.get(key, {})
            main = threads.get(key[1], 0.0)
            split.append([round(main, 2), round(sum(threads.values()) - main, 2)])
        return split


def one_run(source, size, workdir, workers, run, get_args=()):
    cache = os.path.join(workdir, 'cache-%d-%d.db' % (workers, run))     # fresh at both ends
    server = start_serve([source], ['--cache', cache + '.serve', '--workers', str(workers)],
                         secret=SECRET)
    dest = os.path.join(workdir, 'received.bin')
    out, err = os.path.join(workdir, 'get.out'), os.path.join(workdir, 'get.err')
    procs = harness.Procs()
    sampler = Sampler(server.proc.pid)
    try:
        server_cpu = harness.proc_cpu(server.proc.pid)
        started = threading.Event()

        def watch():
            while not started.wait(0.005):      # polling for the pid, with the run as deadline
                live = list(procs.live)
                if live:
                    sampler.get_pid = live[0]
                    return
        threading.Thread(target=watch, daemon=True).start()
        got = procs.run_timed(
            None, [sys.executable, harness.WANXFER, 'get', '127.0.0.1:%d' % server.port,
                   os.path.basename(source), '-o', dest, '-q', '--json', '--cache', cache,
                   '--workers', str(workers)] + list(get_args),
            out, err, 3600, dict(os.environ, WANXFER_SECRET=SECRET))
        started.set()
        server_cpu = harness.settled_cpu(server.proc.pid) - server_cpu
    finally:
        sampler.stop()
        server.stop()
    if got['rc'] != 0:
        raise SystemExit('get failed%s' % harness.tail(err))
    with open(out) as f:
        summary = json.loads(f.read().splitlines()[-1])
    ok = wanxfer.file_sha256(dest) == wanxfer.file_sha256(source)
    os.unlink(dest)
    packets = summary.get('worker_packets') or [summary['packets_received']]
    gb = size / 1e9
    return {'workers': summary.get('workers', 1), 'goodput_mbps': size * 8 / got['wall'] / 1e6,
            'wall_seconds': got['wall'], 'server_cpu_s_per_gb': server_cpu / gb,
            'client_cpu_s_per_gb': got['cpu'] / gb, 'packet_shares': share_of(packets),
            'server_cpu_shares': share_of(sampler.shares('server')),
            'client_cpu_shares': share_of(sampler.shares('client')),
            'server_cpu_shares_from_fork': share_of(sampler.shares_from_fork('server')),
            'client_cpu_shares_from_fork': share_of(sampler.shares_from_fork('client')),
            'before_fork_cpu': {end: round(cpu, 2) for end, cpu in sampler.at_fork.items()},
            'server_cpu_threads': sampler.main_thread_shares('server'),
            'client_cpu_threads': sampler.main_thread_shares('client'), 'verified': ok}


def share_of(values):
    total = float(sum(values))
    return [round(v / total, 3) if total else 0.0 for v in values]


def uptime():
    try:
        return subprocess.run(['uptime'], stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    except OSError:
        return ''


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=harness.size_arg, default='256M',
                        help='file size: 256M, 1G (default 256M)')
    parser.add_argument('--workers', default='1,2', metavar='N,N,...',
                        help='worker counts to run, each at both ends (default 1,2)')
    parser.add_argument('--runs', type=int, default=1)
    parser.add_argument('--json', metavar='FILE')
    parser.add_argument('--no-delta', action='store_true',
                        help='get --no-delta (no signature at the server, no local assembly at the client)')
    parser.add_argument('--rate', metavar='RATE', help='get --rate RATE (bits/s, e.g. 400M)')
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(',')]
    workdir = tempfile.mkdtemp(prefix='wanxfer-workers-')
    results = {'uptime_before': uptime(), 'page_reporting': harness.warn_page_reporting(), 'runs': {}}
    print(results['uptime_before'], flush=True)
    try:
        source = harness.random_file(os.path.join(workdir, 'source.bin'), args.size)
        # Round by round, each count once a round: where the machine hands
        # freed memory back to its host (harness.page_reporting), a later
        # transfer of one invocation costs the receiving end more whatever
        # the count, so counts run one after another would measure the order.
        for workers in counts:
            results['runs'][workers] = []
        for i in range(args.runs):
            for workers in counts:
                runs = results['runs'][workers]
                run = one_run(source, args.size, workdir, workers, i,
                              (['--no-delta'] if args.no_delta else []) +
                              (['--rate', args.rate] if args.rate else []))
                runs.append(run)
                print('[--workers %d run %d] %.0f Mbit/s, CPU s/GB server %.2f client %.2f; shares: '
                      'packets %s, CPU server %s, client %s (from the fork: %s, %s; CPU s before '
                      'it %s); CPU s [main thread, others] per process, server %s, client %s; '
                      'verified %s'
                      % (workers, i + 1, run['goodput_mbps'], run['server_cpu_s_per_gb'],
                         run['client_cpu_s_per_gb'], run['packet_shares'], run['server_cpu_shares'],
                         run['client_cpu_shares'], run['server_cpu_shares_from_fork'],
                         run['client_cpu_shares_from_fork'], run['before_fork_cpu'],
                         run['server_cpu_threads'], run['client_cpu_threads'], run['verified']),
                      flush=True)
        results['uptime_after'] = uptime()
        print(results['uptime_after'])
        base = results['runs'].get(1)
        print('\n| --workers | runs | goodput Mbit/s | CPU s/GB server | client | both, of N=1 '
              '| packet shares | CPU shares server | client | from the fork: server | client |')
        print('|---|---|---|---|---|---|---|---|---|---|---|')
        for workers, runs in results['runs'].items():
            median = {key: harness.median(r[key] for r in runs)
                      for key in ('goodput_mbps', 'server_cpu_s_per_gb', 'client_cpu_s_per_gb')}
            relative = ''
            if base:
                # Each round's ratio, then their median: rounds drift (see above),
                # a round's own runs hardly.
                ratios = sorted((r['server_cpu_s_per_gb'] + r['client_cpu_s_per_gb']) /
                                (b['server_cpu_s_per_gb'] + b['client_cpu_s_per_gb'])
                                for r, b in zip(runs, base))
                relative = '%.2f (%s)' % (harness.median(ratios), ', '.join('%.2f' % x for x in ratios))
            shares = {key: [round(harness.median(r[key][i] for r in runs), 3)
                            for i in range(len(runs[0][key]))]
                      for key in ('packet_shares', 'server_cpu_shares', 'client_cpu_shares',
                                  'server_cpu_shares_from_fork', 'client_cpu_shares_from_fork')}
            print('| %d | %d | %.0f | %.2f | %.2f | %s | %s | %s | %s | %s | %s |' % (
                workers, len(runs), median['goodput_mbps'], median['server_cpu_s_per_gb'],
                median['client_cpu_s_per_gb'], relative, shares['packet_shares'],
                shares['server_cpu_shares'], shares['client_cpu_shares'],
                shares['server_cpu_shares_from_fork'], shares['client_cpu_shares_from_fork']))
        harness.write_json(args.json, results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
