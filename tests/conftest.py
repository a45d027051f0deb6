"""Fixtures that start the real programs: a `serve` process on a free port,
a pair of tunnel processes, the built-in link emulator in front of a port.
Each stops what it started, also when a start failed halfway.  What the
fixtures are built from, and what tests share besides, is in helpers.py.

Tests that start processes or open network sockets are marked `e2e`:
`pytest -m "not e2e" tests` runs the others, the unit tests, in seconds.
The benchmarks in tests/bench/ are run by hand, never collected."""

import pytest

import helpers
from helpers import wanxfer

collect_ignore = ['bench']


def pytest_configure(config):
    config.addinivalue_line('markers', 'e2e: starts processes or opens network sockets (loopback only); '
                                       'deselect with -m "not e2e" to run the unit tests alone')


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own default cache: `get` keeps what it received
    there, and one test's files must not make another's transfer local."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg-cache'))
    return tmp_path / 'xdg-cache' / 'wanxfer' / 'cache.db'


@pytest.fixture
def serve():
    """serve(paths, extra=(), secret=..., port=0, program=None) -> a running
    `serve` Process with its `port`."""
    started = []

    def start(paths, extra=(), secret=helpers.SECRET, port=0, **options):
        process = helpers.start_serve(paths, extra, secret, port, **options)
        started.append(process)
        return process
    yield start
    for process in started:
        process.stop()


@pytest.fixture
def tunnel_pair(tmp_path):
    """tunnel_pair(targets) -> (far, near) tunnel Processes on
    tmp_path/far.db and near.db; tunnel_pair.far(...) and .near(...) start
    one side.  See helpers.Tunnels."""
    tunnels = helpers.Tunnels(tmp_path)
    yield tunnels
    tunnels.stop_all()


@pytest.fixture
def link():
    """link(target_port, **conditions) -> a running LinkEmulator."""
    started = []

    def start(target_port, reverse=None, **conditions):
        conditions.setdefault('seed', 7)
        emulator = wanxfer.LinkEmulator('127.0.0.1', target_port, wanxfer.LinkConditions(**conditions),
                                        reverse_conditions=reverse).start()
        started.append(emulator)
        return emulator
    yield start
    for emulator in started:
        emulator.close()
