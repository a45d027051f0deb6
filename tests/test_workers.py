"""`--workers N`: one transfer striped over N processes at each end, each
with its own UDP flow, within one rate budget.  Files come out byte for
byte as with one worker; `--workers 1` is the one-process transfer."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from helpers import (Process, get_command, json_summaries, make_file, partial_blocks,
                     patched_serve, run_get, sha256, wait_for, wanxfer, wanxfer_env)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not sys.platform.startswith('linux'),
                                 reason='workers are forked processes, on Linux only')]

# Enough stripes that three workers share the file (STRIPES_PER_WORKER each).
SIZE = 3 * wanxfer.STRIPES_PER_WORKER * wanxfer.STRIPE_BYTES + 12345


def worker_pids(server, count=1):
    """The pids the server logged for a session's workers."""
    match = server.wait_for(r'(\d+) workers \(pids ([\d ]+)\)', count=count)
    return int(match.group(1)), [int(p) for p in match.group(2).split()]


@pytest.mark.parametrize('workers', [2, 3])
def test_a_large_file_striped_over_workers_is_byte_identical(tmp_path, serve, workers):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=workers)
    server = serve([source], extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    got = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', workers)
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == workers
    # Each worker's own flow carried its share: packets counted on its socket.
    assert len(summary['worker_packets']) == workers
    assert all(count > 0 for count in summary['worker_packets']), summary['worker_packets']
    assert sum(summary['worker_packets']) == summary['packets_received']
    # The coordinator (the control channel, the rate control) and worker 1
    # (the whole file's digest) are dealt fewer stripes than the others: in
    # a round; of a file of 12 stripes a delta's deal gives worker 0 as many
    # as worker 2 (5 each, 35 and 43 of a round's 96), worker 1 fewer.  A
    # block sent again may land at another worker and count there: 5% room
    # (round robin, which this tells apart, gives worker 1 as many as 2).
    if workers == 3:
        packets = summary['worker_packets']
        assert packets[0] <= 1.05 * packets[2] and packets[1] < packets[2], packets
    granted, pids = worker_pids(server)
    assert granted == workers and len(set(pids)) == workers - 1
    assert server.proc.pid not in pids
    assert not re.search(r'Traceback|failed', server.log() + got.stderr)


@pytest.mark.parametrize('delta', [False, True])
def test_the_whole_file_digest_is_read_by_worker_1_at_both_ends(tmp_path, serve, delta):
    """Striped, the digest's read of the whole file (at the server a
    delta's signature, which gives the digest too) is worker 1's at each
    end, not the coordinator's: from three workers on, the coordinator's
    own work was more than a process's share of its end.  Unstriped, the
    coordinator reads as with one worker."""
    source = make_file(tmp_path / 'big.bin', SIZE, seed=21)
    small = make_file(tmp_path / 'small.bin', wanxfer.STRIPE_BYTES, seed=22)
    server = serve([source, small], extra=['--workers', '3'])
    options = [] if delta else ['--no-delta']
    got = run_get(server.port, 'big.bin', '-o', tmp_path / 'out.bin', '--json', '--workers', 3,
                  *options)
    assert got.returncode == 0, got.stderr
    assert sha256(tmp_path / 'out.bin') == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == 3 and summary['digest_worker'] == 1
    assert (summary['delta'] != 'off') == delta
    server.wait_for(r'sent big\.bin .*; digest read by worker 1')
    got = run_get(server.port, 'small.bin', '-o', tmp_path / 'small.out', '--json', '--workers', 3,
                  *options)
    assert got.returncode == 0, got.stderr
    (summary,) = json_summaries(got)
    assert summary['workers'] == 1 and summary['digest_worker'] == 0
    server.wait_for(r'sent small\.bin \(\d+ bytes\) in .*retransmitted$')


def test_a_striped_deltas_signature_is_hashed_by_every_worker_as_one_worker_hashes_it(tmp_path, serve):
    """A striped delta's signature (a SHA-256 per 64 KiB unit) is hashed by
    every sending worker, each the units of its own stripes, so that
    worker 1, which also reads the whole file's digest, is not over its
    share; put together by the coordinator it is byte for byte the one
    one process computes (as the server's cache database keeps it)."""
    source = make_file(tmp_path / 'big.bin', SIZE, seed=23)
    cache = tmp_path / 'serve-cache.db'
    server = serve([source], extra=['--workers', '3', '--cache', str(cache)])
    got = run_get(server.port, 'big.bin', '-o', tmp_path / 'out.bin', '--json', '--workers', 3)
    assert got.returncode == 0, got.stderr
    assert sha256(tmp_path / 'out.bin') == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == 3 and summary['delta'] != 'off'
    server.wait_for(r'sent big\.bin .*; digest read by worker 1, signature hashed by workers 0-2$')
    one_worker = [[offset, wanxfer.encode_spans(spans)]
                  for offset, spans in wanxfer.file_signature(str(source), 'fixed')]

    def stored():
        db = sqlite3.connect(str(cache))
        try:
            return [(digest, json.loads(pieces))
                    for digest, pieces in db.execute('SELECT sha256, pieces FROM signatures')]
        finally:
            db.close()
    assert wait_for(stored, what='the signature saved') == [(sha256(source), one_worker)]


def test_one_worker_asks_for_none(tmp_path, serve):
    """--workers 1: no `workers` request, no forked worker, one flow."""
    source = make_file(tmp_path / 'big.bin', SIZE, seed=1)
    server = serve([source], extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    got = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', '1')
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == 1 and summary['worker_packets'] == [summary['packets_received']]
    server.wait_for(r'sent big.bin')
    assert 'workers' not in server.log()


def test_the_server_grants_no_more_than_its_maximum(tmp_path, serve):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=2)
    server = serve([source], extra=['--workers', '2'])
    dest = tmp_path / 'out.bin'
    got = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', '3')
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == 2
    assert worker_pids(server)[0] == 2


def test_workers_option_is_checked():
    for bad in ('0', '65', 'many'):
        completed = run_get(1, 'x', '--workers', bad)
        assert completed.returncode == 2 and '--workers' in completed.stderr


# --- trees, resume, delta: as with one worker -----------------------------------

def children(pid):
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().split(') ')[-1][:1] != 'Z'
    except FileNotFoundError:
        return False


@pytest.mark.parametrize('workers', [1, 2, 3])
def test_a_tree_with_workers_is_byte_identical(tmp_path, serve, workers):
    tree = tmp_path / 'tree'
    (tree / 'sub').mkdir(parents=True)
    files = {'big.bin': SIZE, 'sub/medium.bin': 3 << 20, 'sub/small.txt': 1000, 'tiny': 0}
    for seed, (name, size) in enumerate(sorted(files.items())):
        make_file(tree / name, size, seed=seed + 10 * workers)
    server = serve([tree], extra=['--workers', '3'])
    out = tmp_path / 'out'
    got = run_get(server.port, '.', '-o', out, '--json', '--workers', workers)
    assert got.returncode == 0, got.stderr
    for name in files:
        assert sha256(out / name) == sha256(tree / name), name
    summaries = {s['remote']: s for s in json_summaries(got)}
    assert summaries['big.bin']['workers'] == workers
    assert summaries['sub/medium.bin']['workers'] == 1     # too few stripes to share


@pytest.mark.parametrize('get_workers', ['3', 'auto'])
def test_a_transfer_with_nothing_to_stripe_forks_no_worker(tmp_path, serve, get_workers):
    """Workers were forked at the start of every session that asked for
    them, even one of small files only: now only at the first file with
    stripes enough for two, at either end."""
    tree = tmp_path / 'tree'
    (tree / 'sub').mkdir(parents=True)
    files = {'sub/medium.bin': 2 * wanxfer.STRIPE_BYTES, 'small.txt': 1000, 'tiny': 0}
    for seed, (name, size) in enumerate(sorted(files.items())):
        make_file(tree / name, size, seed=seed)
    # Slow enough (about 2 s) that workers forked at the start are seen
    # (capped by the server: a cap on `get` makes `auto` ask for one).
    server = serve([tree], extra=['--workers', '3', '--rate', '16M'])
    out = tmp_path / 'out'
    got = Process(get_command(server.port, '.', '-o', out, '-q', '--workers', get_workers)[2:])
    forked = set()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:      # to its end: every child it had is seen
            forked.update(children(got.proc.pid))
            try:
                got.proc.wait(0.01)
                break
            except subprocess.TimeoutExpired:
                pass
        assert got.proc.wait(1) == 0, got.log()
    finally:
        got.stop()
    assert not forked
    for name in files:
        assert sha256(out / name) == sha256(tree / name), name
    server.wait_for(r'sent sub/medium.bin')
    assert 'workers (pids' not in server.log()


@pytest.mark.parametrize('first_workers, then_workers', [(2, 3), (3, 1), (1, 2)])
def test_a_killed_get_resumes_with_other_workers(tmp_path, serve, first_workers, then_workers):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=first_workers)
    server = serve([source], extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    state = tmp_path / '.out.bin.wxstate'
    first = Process(get_command(server.port, 'big.bin', '-o', dest, '--rate', '24M',
                                '--workers', first_workers)[2:])
    try:
        wait_for(lambda: partial_blocks(state) > 50, timeout=60, what='a saved partial state')
        workers = children(first.proc.pid)
        assert len(workers) == first_workers - 1
    finally:
        first.stop(signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in workers), what='its workers to end with it')
    assert not dest.exists()
    held = partial_blocks(state)
    done = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', then_workers)
    assert done.returncode == 0, done.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(done)
    assert summary['workers'] == then_workers
    assert summary['resumed_bytes'] >= held * summary['block_bytes'] - summary['block_bytes']
    assert summary['received_bytes'] <= SIZE - summary['resumed_bytes']
    assert not state.exists()


@pytest.mark.parametrize('workers', [1, 2, 3])
def test_a_delta_with_workers_is_byte_identical(tmp_path, serve, workers):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=5)
    server = serve([source], extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    first = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', 3)
    assert first.returncode == 0, first.stderr
    # Changed in the middle and at the end: most of it is found locally.
    with open(source, 'r+b') as f:
        f.seek(SIZE // 2)
        f.write(b'changed' * 1000)
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(100000))
    got = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', workers)
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['delta'] != 'off' and summary['local_bytes'] > SIZE * 0.9
    assert summary['workers'] == workers
    assert summary['received_bytes'] < SIZE * 0.1


# --- a worker that dies ------------------------------------------------------------

def test_a_killed_client_worker_fails_the_get_cleanly_and_a_rerun_resumes(tmp_path, serve):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=7)
    server = serve([source], extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    state = tmp_path / '.out.bin.wxstate'
    first = Process(get_command(server.port, 'big.bin', '-o', dest, '--rate', '24M', '-q',
                                '--workers', '3')[2:])
    try:
        wait_for(lambda: partial_blocks(state) > 50, timeout=60, what='a saved partial state')
        workers = children(first.proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert first.proc.wait(60) == 1
    finally:
        first.stop()
    lines = first.log().splitlines()
    assert len(lines) == 1 and lines[0].startswith('wanxfer: error: worker process'), lines
    assert 'resume' in lines[0]
    wait_for(lambda: not any(alive(pid) for pid in workers), what='the other worker to end')
    assert partial_blocks(state) > 0 and not dest.exists()
    done = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', '3')
    assert done.returncode == 0, done.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(done)
    assert summary['resumed_bytes'] > 0


def test_a_killed_server_worker_fails_the_get_cleanly_and_a_rerun_resumes(tmp_path, serve):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=8)
    server = serve([source], extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    state = tmp_path / '.out.bin.wxstate'
    first = Process(get_command(server.port, 'big.bin', '-o', dest, '--rate', '24M', '-q',
                                '--workers', '3')[2:])
    try:
        _count, pids = worker_pids(server)
        wait_for(lambda: partial_blocks(state) > 50, timeout=60, what='a saved partial state')
        os.kill(pids[1], signal.SIGKILL)
        assert first.proc.wait(60) == 1
    finally:
        first.stop()
    lines = first.log().splitlines()
    assert len(lines) == 1 and lines[0].startswith('wanxfer: error:') and 'worker' in lines[0], lines
    server.wait_for(r'dropped: worker process 2')
    wait_for(lambda: not any(alive(pid) for pid in pids), what='the session\'s other worker to end')
    assert 'Traceback' not in server.log()
    done = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', '3')
    assert done.returncode == 0, done.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(done)
    assert summary['resumed_bytes'] > 0


def test_a_server_from_before_workers_is_fetched_from_as_before(tmp_path, serve):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=9)
    server = patched_serve(serve, [source], 'del wanxfer.ServerSession.do_workers')
    dest = tmp_path / 'out.bin'
    got = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', '3')
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == 1 and 'error' not in got.stderr and 'warning' not in got.stderr


def assert_dealt_round_robin(summary):
    """Each worker took about a third of the blocks, as round robin deals
    them (a weighted deal of three gives worker 1 about an eighth).  Not
    exact: a block sent again may land at another worker and count there."""
    packets = summary['worker_packets']
    assert all(abs(count / sum(packets) - 1 / 3) < 0.05 for count in packets), packets


def striped_over_three(tmp_path, serve, seed, patch):
    """`get --workers 3` of a large file from a `serve --workers 3` changed
    by `patch` (see patched_serve): byte-identical and striped over all
    three; the summary."""
    source = make_file(tmp_path / 'big.bin', SIZE, seed=seed)
    server = patched_serve(serve, [source], '\n'.join(patch), extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    got = run_get(server.port, 'big.bin', '-o', dest, '--json', '--workers', '3')
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == 3, server.log()
    return summary


def test_a_server_that_forks_its_workers_at_once_is_fetched_from(tmp_path, serve):
    """A server from before `lazy` answers `workers` without it and never
    says `fork`: the client forks its workers at once, as it used to."""
    summary = striped_over_three(tmp_path, serve, 11, [
        'asked = wanxfer.ServerSession.do_workers',
        'def do_workers(self, message):',
        '    return asked(self, {"op": "workers", "count": message["count"]})',
        'wanxfer.ServerSession.do_workers = do_workers'])
    # Nor did it take a weighted deal: round robin.
    assert_dealt_round_robin(summary)


def test_a_client_from_before_weighted_deals_gets_stripes_round_robin(tmp_path, serve):
    """A client that asks for workers without `lazy` and `cycle` forks at
    once and is dealt stripes round robin, its HELLOs kept by the server
    until its own workers are forked."""
    source = make_file(tmp_path / 'big.bin', SIZE, seed=12)
    server = serve([source], extra=['--workers', '3'])
    program = '\n'.join([
        'import sys',
        'sys.path.insert(0, %r)' % os.path.dirname(wanxfer.__file__),
        'import wanxfer',
        'said = wanxfer.Conversation.send',
        'def send(self, message):',
        '    if message.get("op") == "workers":',
        '        message = {"op": "workers", "count": message["count"]}',
        '    return said(self, message)',
        'wanxfer.Conversation.send = send',
        'sys.exit(wanxfer.main(sys.argv[1:]))'])
    dest = tmp_path / 'out.bin'
    got = subprocess.run([sys.executable, '-c', program] + get_command(
        server.port, 'big.bin', '-o', dest, '--json', '--workers', '3')[2:],
        env=wanxfer_env(), capture_output=True, text=True, timeout=90)
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == 3
    assert_dealt_round_robin(summary)
    assert 'Traceback' not in server.log()


def test_a_session_that_dies_takes_its_workers_with_it(tmp_path, serve):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=10)
    server = serve([source], extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    first = Process(get_command(server.port, 'big.bin', '-o', dest, '--rate', '24M', '-q',
                                '--workers', '3')[2:])
    try:
        _count, pids = worker_pids(server)
        wait_for(lambda: partial_blocks(tmp_path / '.out.bin.wxstate') > 50, timeout=60,
                 what='a saved partial state')
        (session,) = children(server.proc.pid)
        os.kill(session, signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in pids), what='the session\'s workers to end')
        assert first.proc.wait(60) == 1
    finally:
        first.stop()
    assert len(first.log().splitlines()) == 1, first.log()


def test_later_files_of_a_tree_go_as_fast_as_the_first(tmp_path, serve):
    # A worker's share complete, it acknowledged nothing more: its sender
    # saw packets in flight and silence, and halved the one rate every
    # half second until the file ended; the next file started from there
    # (24, 5.6 and 2.8 Mbit/s for three files, once).
    tree = tmp_path / 'tree'
    tree.mkdir()
    for name in 'abc':
        make_file(tree / name, SIZE, seed=ord(name))
    server = serve([tree], extra=['--workers', '2'])
    out = tmp_path / 'out'
    got = run_get(server.port, '.', '-o', out, '--json', '--workers', '2', '--no-delta', timeout=200)
    assert got.returncode == 0, got.stderr
    summaries = {s['remote']: s for s in json_summaries(got)}
    for name in 'abc':
        assert sha256(out / name) == sha256(tree / name)
        assert summaries[name]['workers'] == 2
    first = summaries['a']['file_rate_mbps']
    assert min(summaries[name]['file_rate_mbps'] for name in 'bc') > 0.5 * first, summaries


def test_the_first_request_forks_the_workers_without_waiting_to_be_told(tmp_path, serve):
    """A single new file is asked for with the session's first request,
    its size unknown: the client forks its workers with it, so their flows
    open beside the request, not a round trip after the server's `fork`.
    Here the server never says `fork` (and forks its own at the file):
    the file is still striped over all three."""
    summary = striped_over_three(tmp_path, serve, 13, [
        'made = wanxfer.SendingTeam.__init__',
        'def init(self, *args, **kwargs):',
        '    made(self, *args, **kwargs)',
        '    self.lazy = False',
        'wanxfer.SendingTeam.__init__ = init'])
    assert all(summary['worker_packets']), summary


# Automatic --workers: a file is striped only while the path may need more
# than one worker.  Across S4 (100 Mbit/s) two workers cost both ends
# 1.2-1.3 x one's CPU per GB and moved nothing faster.  The count is
# decided at each file's `start`; the first file of a session goes before
# the path is measured, later ones by what the rate control measured.

def patched_get(port, patch, *args):
    """`get` from a wanxfer whose module was changed by `patch` first."""
    program = '\n'.join([
        'import sys',
        'sys.path.insert(0, %r)' % os.path.dirname(wanxfer.__file__),
        'import wanxfer',
        patch,
        'sys.exit(wanxfer.main(sys.argv[1:]))'])
    return subprocess.run([sys.executable, '-c', program] + get_command(port, *args)[2:],
                          env=wanxfer_env(), capture_output=True, text=True, timeout=120)


def get_with_cores(port, cores, *args):
    """`get` on a machine of `cores` usable cores (so that `--workers auto`
    asks for as many, on any machine)."""
    return patched_get(port, 'wanxfer.usable_cores = lambda: %d' % cores, *args)


def large_files(tmp_path, names='ab'):
    tree = tmp_path / 'tree'
    tree.mkdir()
    for name in names:
        make_file(tree / name, SIZE, seed=ord(name))
    return tree


@pytest.mark.parametrize('get_workers', ['auto', '2'])
def test_automatic_workers_stripe_no_later_file_on_a_path_one_worker_carries(tmp_path, serve,
                                                                           get_workers):
    # Loopback is fast: this server takes any path it has news of for one
    # that one worker carries (when the rate control's startup ends on
    # loopback depends on the load; the rule itself has model tests in
    # test_ratecontrol.py).  The first file goes before any news.
    tree = large_files(tmp_path)
    server = patched_serve(serve, [tree], 'wanxfer.one_worker_enough = lambda rate: rate.peak_delivery > 0',
                           extra=['--workers', '2'])
    out = tmp_path / 'out'
    got = get_with_cores(server.port, 2, '.', '-o', out, '--json', '--workers', get_workers,
                         '--no-delta')
    assert got.returncode == 0, got.stderr
    summaries = {s['remote']: s for s in json_summaries(got)}
    for name in 'ab':
        assert sha256(out / name) == sha256(tree / name)
    assert summaries['a']['workers'] == 2
    # Asked for explicitly, two workers it is, whatever the path.
    assert summaries['b']['workers'] == (1 if get_workers == 'auto' else 2), summaries


def test_automatic_workers_stripe_nothing_under_a_slow_cap(tmp_path, serve):
    # The server's cap is known before the first file: one worker carries it.
    tree = large_files(tmp_path)
    server = serve([tree], extra=['--workers', '2', '--rate', '200M'])
    out = tmp_path / 'out'
    got = get_with_cores(server.port, 2, '.', '-o', out, '--json', '--no-delta')
    assert got.returncode == 0, got.stderr
    for name in 'ab':
        assert sha256(out / name) == sha256(tree / name)
    assert [s['workers'] for s in json_summaries(got)] == [1, 1]


def test_automatic_workers_stripe_a_fast_path_as_before(tmp_path, serve):
    tree = large_files(tmp_path)
    server = serve([tree], extra=['--workers', '2'])
    out = tmp_path / 'out'
    got = get_with_cores(server.port, 2, '.', '-o', out, '--json', '--no-delta')
    assert got.returncode == 0, got.stderr
    assert [s['workers'] for s in json_summaries(got)] == [2, 2], json_summaries(got)


# Across a long path each of k flows is acknowledged every k intervals
# (wanxfer.stretched_feedback), and the sending coordinator passes the
# merged news on an interval at a time.  Loopback's round trip is short:
# both ends here stretch at any round trip.
STRETCHED = 'wanxfer.stretched_feedback = lambda rtt, flows: flows > 1'


@pytest.mark.parametrize('workers', [2, 3])
def test_flows_acknowledged_every_k_intervals_give_byte_identical_files(tmp_path, serve, workers):
    source = make_file(tmp_path / 'big.bin', SIZE, seed=20 + workers)
    server = patched_serve(serve, [source], STRETCHED, extra=['--workers', '3'])
    dest = tmp_path / 'out.bin'
    got = patched_get(server.port, STRETCHED, 'big.bin', '-o', dest, '--json', '--workers', workers)
    assert got.returncode == 0, got.stderr
    assert sha256(dest) == sha256(source)
    (summary,) = json_summaries(got)
    assert summary['workers'] == workers and all(summary['worker_packets']), summary
    assert not re.search(r'Traceback|failed', server.log() + got.stderr)
