"""`--workers N`: one transfer striped over N processes at each end, each
with its own UDP flow, within one rate budget.  Files come out byte for
byte as with one worker; `--workers 1` is the one-process transfer."""
import re
import sys

import pytest

from helpers import json_summaries, make_file, run_get, sha256, wanxfer

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
    granted, pids = worker_pids(server)
    assert granted == workers and len(set(pids)) == workers - 1
    assert server.proc.pid not in pids
    assert not re.search(r'Traceback|failed', server.log() + got.stderr)


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
