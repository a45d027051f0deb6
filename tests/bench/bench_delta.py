#!/usr/bin/env python3
"""Delta-transfer benchmark (issue 5): wanxfer `get` across an emulated WAN
link, files the receiver has partly seen before, against rsync over ssh.

Each step runs on a fresh link (`wan up`, the step, `wan down`), so the
emulator's counters give the bytes host a put on the link for that step
alone (data, signatures, handshakes: everything).  The receiver's cache
(`get --cache`) lives on disk and carries over from step to step, as it
would between an operator's nightly runs; the server is restarted for each
step, so every signature is computed afresh (the worst case).

Steps, in order, for each run:
  zeros         1 GiB of zeros, never seen before
  tar-plain     the backup tar, `get --no-delta` (what a first transfer costs without delta)
  tar-first     the backup tar, first time with delta (empty cache)
  tar-append    the tar after `tar rf` of one file; the receiver deleted its copy first
  sql-plain     the SQL dump, `get --no-delta` (no compression either)
  sql-first     the SQL dump, first time (compressed while the link, not the CPU, is the limit)
  sql-edited    the dump after 200 scattered edits; the old copy is at the destination
  rsync-tar-append / rsync-sql-edited
                rsync over ssh (bbr) of the same updates with the old copy in place
                (rsync cannot use a deleted copy: its tar-append case has the copy kept)

Corpus (built once under --work): harness.py's, as tests/bench/bench_tunnel.py uses.

Example (root, nothing else running):
  python3 tests/bench/bench_delta.py --runs 3 --json /tmp/delta.json
  python3 tests/bench/bench_delta.py --link "--delay 60 --rate 1000 --queue 50 --loss 1" --runs 1
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import HOST_A, SSH_PORT, BenchError, log  # noqa: E402

LINK = '--delay 60 --rate 1000 --queue 50 --loss 1'
PORT = 46224
STEPS = ('zeros', 'tar-plain', 'tar-first', 'tar-append', 'sql-plain', 'sql-first', 'sql-edited',
         'rsync-tar-append', 'rsync-sql-edited')


class Corpus:
    """The files, built once: served versions live under `versions`; the
    served directory holds one name per kind, swapped between versions."""

    def __init__(self, work, sql_size):
        self.dir = os.path.join(work, 'corpus')
        os.makedirs(self.dir, exist_ok=True)
        self.zeros = self._build('zeros.bin', lambda p: harness.make_file(p, 1 << 30, 'zeros'))
        tar1, tar2 = os.path.join(self.dir, 'backup-1.tar'), os.path.join(self.dir, 'backup-2.tar')
        if not (os.path.exists(tar1) and os.path.exists(tar2)):
            log('building the backup tar')
            harness.make_tar(tar1, tar2)
        self.tar = (tar1, tar2)
        sql1 = self._build('dump-1.sql', lambda p: harness.generate_sql(p, sql_size))
        sql2 = self._build('dump-2.sql', lambda p: harness.edit_sql(sql1, p))
        self.sql = (sql1, sql2)

    def _build(self, name, make):
        path = os.path.join(self.dir, name)
        if not os.path.exists(path):
            log('building %s' % name)
            make(path + '.part')
            os.replace(path + '.part', path)
        return path


class DeltaBench:
    def __init__(self, args, procs, work):
        self.a, self.p, self.work = args, procs, work
        self.link = procs.link
        self.served = os.path.join(work, 'served')
        self.ssh = None
        # One secret for the whole benchmark: data kept from a server is
        # reused only for the same origin, which includes the secret.
        self.secret = secrets.token_hex(16)

    def serve_version(self, name, source):
        """Put `source` in the served directory under `name` (a new file, new identity)."""
        os.makedirs(self.served, exist_ok=True)
        target = os.path.join(self.served, name)
        shutil.copyfile(source, target + '.tmp')
        os.replace(target + '.tmp', target)
        return target

    def step_wanxfer(self, run_dir, step, remote, dest, extra=()):
        env = dict(os.environ, WANXFER_SECRET=self.secret, PYTHONUNBUFFERED='1')
        server = self.p.spawn('a', [sys.executable, self.a.wanxfer, 'serve', self.served, '--bind', HOST_A,
                                    '--port', str(PORT)],
                              os.path.join(run_dir, 'serve-%s.out' % step),
                              os.path.join(run_dir, 'serve-%s.err' % step), env)
        try:
            self.p.wait_listening(server, PORT, 'tcp', 20, os.path.join(run_dir, 'serve-%s.err' % step))
            result = self.p.run_timed('b', [sys.executable, self.a.wanxfer, 'get', '%s:%d' % (HOST_A, PORT),
                                            remote, '-o', dest, '--json', '-q',
                                            '--cache', os.path.join(run_dir, '..', 'cache.db')]
                                      + list(extra),
                                      os.path.join(run_dir, 'get-%s.out' % step),
                                      os.path.join(run_dir, 'get-%s.err' % step), 600, env)
        finally:
            _rc, server_cpu = self.p.stop(server)
        if result['rc'] != 0:
            with open(os.path.join(run_dir, 'get-%s.err' % step)) as f:
                raise BenchError('get failed: %s' % f.read()[-400:])
        with open(os.path.join(run_dir, 'get-%s.out' % step)) as f:
            summary = json.loads(f.read().strip().splitlines()[-1])
        return {'wall_s': result['wall'], 'cpu_receiver_s': result['cpu'],
                'cpu_sender_s': server_cpu, 'summary': {k: summary.get(k) for k in (
                    'delta', 'local_bytes', 'zero_bytes', 'wire_bytes', 'signature_bytes',
                    'sent_bytes', 'saving_percent', 'duration_seconds')}}

    def step_rsync(self, run_dir, source, dest):
        if self.ssh is None:
            self.ssh = harness.setup_sshd(self.work)
        for host in ('a', 'b'):
            subprocess.run(self.link.command(host, ['sysctl', '-qw', 'net.ipv4.tcp_congestion_control=bbr']),
                           check=True)
        sshd = self.p.spawn('a', ['/usr/sbin/sshd', '-D', '-e', '-f', os.path.join(self.ssh, 'sshd_config')],
                            os.path.join(run_dir, 'sshd.log'), os.path.join(run_dir, 'sshd.log'))
        try:
            self.p.wait_listening(sshd, SSH_PORT, 'tcp', 10, os.path.join(run_dir, 'sshd.log'))
            ssh = harness.ssh_command(self.ssh)
            result = self.p.run_timed('b', ['rsync', '-e', ssh, '--inplace', 'root@%s:%s' % (HOST_A, source),
                                            dest], os.path.join(run_dir, 'rsync.out'),
                                      os.path.join(run_dir, 'rsync.err'), 900)
        finally:
            self.p.stop(sshd)
        if result['rc'] != 0:
            raise BenchError('rsync failed (rc %s)' % result['rc'])
        return {'wall_s': result['wall'], 'cpu_receiver_s': result['cpu']}

    def one_step(self, step, run_dir, corpus):
        """Set up the files the step starts from, run it on a fresh link; its record."""
        recv = os.path.join(run_dir, 'recv')
        os.makedirs(recv, exist_ok=True)
        if step == 'zeros':
            self.serve_version('zeros.bin', corpus.zeros)
            remote, dest, expect, extra = 'zeros.bin', os.path.join(recv, 'zeros.bin'), corpus.zeros, ()
        elif step in ('tar-plain', 'tar-first'):
            self.serve_version('backup.tar', corpus.tar[0])
            dest = os.path.join(recv, step + '.tar')
            remote, expect = 'backup.tar', corpus.tar[0]
            extra = ('--no-delta',) if step == 'tar-plain' else ()
        elif step == 'tar-append':
            self.serve_version('backup.tar', corpus.tar[1])
            dest = os.path.join(recv, 'tar-first.tar')
            os.unlink(dest)                     # the operator deleted the copy; the cache kept it
            remote, expect, extra = 'backup.tar', corpus.tar[1], ()
        elif step in ('sql-plain', 'sql-first'):
            self.serve_version('dump.sql', corpus.sql[0])
            dest = os.path.join(recv, 'dump.sql' if step == 'sql-first' else 'plain.sql')
            remote, expect = 'dump.sql', corpus.sql[0]
            extra = ('--no-delta',) if step == 'sql-plain' else ()
        elif step == 'sql-edited':
            self.serve_version('dump.sql', corpus.sql[1])
            remote, dest, expect, extra = 'dump.sql', os.path.join(recv, 'dump.sql'), corpus.sql[1], ()
        elif step.startswith('rsync-'):
            old, new = corpus.tar if 'tar' in step else corpus.sql
            dest = os.path.join(recv, 'rsync-' + os.path.basename(new))
            shutil.copyfile(old, dest)
            source = self.serve_version(os.path.basename(new), new)
            expect = new
        record = {'step': step}
        os.sync()       # the copies above must not be written back during the step
        self.link.up(self.a.link)
        try:
            if step.startswith('rsync-'):
                record.update(self.step_rsync(run_dir, source, dest))
            else:
                record.update(self.step_wanxfer(run_dir, step, remote, dest, extra))
        finally:
            counters = self.link.down()
        if 'ab' not in counters or counters.get('disturbed'):
            raise BenchError('no link counters (was the link disturbed?)')
        record['wire_bytes'] = counters['ab']['bytes_in']     # 0.1 MB resolution
        record['counters'] = counters
        record['file_bytes'] = os.path.getsize(expect)
        if harness.wanxfer.file_sha256(dest) != harness.wanxfer.file_sha256(expect):
            raise BenchError('%s: received file differs' % step)
        record['wire_ratio'] = record['wire_bytes'] / record['file_bytes']
        if step.startswith('rsync-'):
            os.unlink(dest)
        return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=3)
    harness.add_common_options(parser, LINK)
    parser.add_argument('--work', default='/var/tmp/wanxfer-delta-bench')
    parser.add_argument('--sql-size', type=harness.size_arg, default=300 << 20)
    parser.add_argument('--steps', default=','.join(STEPS))
    args = parser.parse_args(argv)
    harness.require_root('bench_delta.py')
    link = harness.make_link(args)
    os.makedirs(args.work, exist_ok=True)
    corpus = Corpus(args.work, args.sql_size)
    procs = harness.Procs(link)
    bench = DeltaBench(args, procs, args.work)
    records = []
    try:
        for run in range(args.runs):
            run_dir = os.path.join(args.work, 'runs', 'run-%d' % run)
            shutil.rmtree(os.path.dirname(run_dir) + '/run-%d' % run, ignore_errors=True)
            shutil.rmtree(os.path.join(args.work, 'runs', 'cache.db.files'), ignore_errors=True)
            for suffix in ('', '-wal', '-shm'):
                try:
                    os.unlink(os.path.join(args.work, 'runs', 'cache.db' + suffix))
                except FileNotFoundError:
                    pass
            os.makedirs(run_dir)
            for step in args.steps.split(','):
                try:
                    record = bench.one_step(step, run_dir, corpus)
                except BenchError as e:
                    record = {'step': step, 'error': str(e)}
                record['run'] = run
                records.append(record)
                log('run %d %-18s %s' % (run, step, json.dumps(
                    {k: record.get(k) for k in ('wall_s', 'wire_bytes', 'file_bytes', 'wire_ratio',
                                                'error')})))
    finally:
        procs.kill_all()
        if link.is_up:
            link.down()
    print('\n| step | file | wall s (median) | wire bytes (median) | wire / file |')
    print('|---|---|---|---|---|')
    for step in args.steps.split(','):
        ok = [r for r in records if r['step'] == step and 'error' not in r]
        if not ok:
            print('| %s | error | | | |' % step)
            continue
        wall = harness.median(r['wall_s'] for r in ok)
        wire = harness.median(r['wire_bytes'] for r in ok)
        print('| %s | %.1f MB | %.2f | %.2f MB | %.4f%% |' % (
            step, ok[0]['file_bytes'] / 1e6, wall, wire / 1e6, 100.0 * wire / ok[0]['file_bytes']))
    harness.write_json(args.json, records)
    return 0


if __name__ == '__main__':
    sys.exit(main())
