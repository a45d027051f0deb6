"""`serve` runs each client's session in a process of its own (Linux): four
clients are four processes, a session that crashes takes no other down, and
no session outlives its `serve`."""
import os
import signal
import sys

import pytest

from helpers import (Process, get_command, make_file, patched_serve, run_get, sha256, start_serve,
                     wait_for)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not sys.platform.startswith('linux'),
                                 reason='sessions are processes on Linux only')]

SIZE = 3 << 20          # above SMALL_FILE: a fetch with a data phase, not a batched read


def session_pids(server):
    """The pids of `server`'s child processes (its sessions)."""
    pid = server.proc.pid
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


def slow_get(port, remote, dest):
    """A `get` capped at 8 Mbit/s: a 3 MiB file takes about 3 s."""
    return Process(get_command(port, remote, '-o', dest, '--rate', '8M', '-q')[2:])


def test_four_clients_run_in_four_processes(tmp_path, serve):
    source = make_file(tmp_path / 'f', SIZE)
    server = serve([source])
    gets = [slow_get(server.port, 'f', tmp_path / ('out%d' % i)) for i in range(4)]
    try:
        wait_for(lambda: len(session_pids(server)) == 4, timeout=30, what='four session processes')
    finally:
        for get in gets:
            assert get.proc.wait(60) == 0, get.log()
    for i in range(4):
        assert sha256(tmp_path / ('out%d' % i)) == sha256(source)
    wait_for(lambda: not session_pids(server), what='the sessions to end')


CRASH_ON_FETCH = """
import os
fetch = wanxfer.ServerSession.do_fetch
def do_fetch(self, message):
    if str(message.get('path', '')).startswith('crash'):
        os.abort()                      # a session that dies as hard as a process can
    return fetch(self, message)
wanxfer.ServerSession.do_fetch = do_fetch
"""


def test_a_session_that_crashes_takes_no_other_down(tmp_path, serve):
    good = make_file(tmp_path / 'good', SIZE, seed=1)
    make_file(tmp_path / 'crash', SIZE, seed=2)
    server = patched_serve(serve, [tmp_path / 'good', tmp_path / 'crash'], CRASH_ON_FETCH)
    steady = slow_get(server.port, 'good', tmp_path / 'steady')
    wait_for(lambda: len(session_pids(server)) == 1, what='the first session')
    crashed = run_get(server.port, 'crash', '-o', tmp_path / 'crashed')
    assert crashed.returncode != 0 and not (tmp_path / 'crashed').exists()
    assert len(crashed.stderr.strip().splitlines()) == 1, crashed.stderr
    assert steady.proc.wait(60) == 0, steady.log()
    assert sha256(tmp_path / 'steady') == sha256(good)
    server.wait_for(r'session process \d+ ended by signal %d' % signal.SIGABRT)
    again = run_get(server.port, 'good', '-o', tmp_path / 'again')
    assert again.returncode == 0, again.stderr
    assert sha256(tmp_path / 'again') == sha256(good)


def test_no_session_outlives_its_serve(tmp_path):
    # Killed outright, `serve` leaves no session behind, and none holds its
    # port: a new `serve` can listen there at once.
    source = make_file(tmp_path / 'f', SIZE)
    server = start_serve([source])
    try:
        get = slow_get(server.port, 'f', tmp_path / 'out')
        wait_for(lambda: len(session_pids(server)) == 1, what='a session process')
        (pid,) = session_pids(server)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        wait_for(lambda: not alive(pid), what='the session process to end')
        assert get.proc.wait(60) != 0
        assert not (tmp_path / 'out').exists()
        again = start_serve([source], port=server.port)
        again.stop()
    finally:
        server.stop()
