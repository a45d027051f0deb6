"""Fixtures that start the real programs: a `serve` process on a free port,
the built-in link emulator in front of it, and `get` run as a user would."""

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WANXFER = os.path.join(ROOT, 'wanxfer.py')
sys.path.insert(0, ROOT)

import wanxfer  # noqa: E402

SECRET = 'test-secret-please-ignore'


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own default cache: `get` keeps what it received
    there, and one test's files must not make another's transfer local."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg-cache'))
    return tmp_path / 'xdg-cache' / 'wanxfer' / 'cache.db'


def wanxfer_env(secret=SECRET):
    env = dict(os.environ)
    env.pop('WANXFER_SECRET', None)
    if secret is not None:
        env['WANXFER_SECRET'] = secret
    return env


def wait_for(predicate, timeout=20.0, interval=0.02, what='condition'):
    """Poll `predicate` until it is true, failing the test at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)   # polling with a deadline, not synchronisation by sleep
    pytest.fail('timed out waiting for %s' % what)


class ServeProcess:
    """A `wanxfer.py serve` child on a free port; a thread collects its stderr
    so the pipe never fills and the log can be read at any time."""

    def __init__(self, paths, extra=(), secret=SECRET, port=0, program=(sys.executable, WANXFER)):
        self.args = list(program) + ['serve', '--bind', '127.0.0.1',
                     '--port', str(port)] + list(extra) + [str(p) for p in paths]
        self.lines = []
        self._listening = threading.Event()
        self.proc = subprocess.Popen(self.args, env=wanxfer_env(secret), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(15):
            self.stop()
            pytest.fail('serve did not start: %s' % self.log())
        line = next(l for l in self.lines if 'listening on' in l)
        self.port = int(line.split('listening on ')[1].split()[0].rsplit(':', 1)[1])

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if 'listening on' in line:
                self._listening.set()
        self._listening.set()

    def log(self):
        return ''.join(self.lines)

    def stop(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        self.proc.stderr.close()


@pytest.fixture
def serve():
    """serve(paths, extra=(), secret=...) -> a running ServeProcess."""
    started = []

    def start(paths, extra=(), secret=SECRET, port=0, **options):
        process = ServeProcess(paths, extra, secret, port, **options)
        started.append(process)
        return process
    yield start
    for process in started:
        process.stop()


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


def get_command(port, *args):
    return [sys.executable, WANXFER, 'get', '127.0.0.1:%d' % port] + [str(a) for a in args]


def run_get(port, *args, secret=SECRET, timeout=90):
    """Run `get` to completion; returns the CompletedProcess (text)."""
    return subprocess.run(get_command(port, *args), env=wanxfer_env(secret), capture_output=True,
                          text=True, timeout=timeout)


def json_summaries(completed):
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith('{')]


def sha256(path):
    return wanxfer.file_sha256(str(path))


def make_file(path, size, seed=0):
    """A file of `size` incompressible bytes, the same for the same seed."""
    rng = __import__('random').Random(seed)
    with open(path, 'wb') as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.getrandbits(8 * n).to_bytes(n, 'little') if n else b'')
            left -= n
    return path
