"""The command line as a new user meets it: every command's --help, under
the oldest and newest supported Python, and every mistake on the command
line answered with one line `wanxfer: error: ...`, never a traceback."""

import glob
import os
import subprocess
import sys

import pytest

from helpers import WANXFER, wanxfer, wanxfer_env

# The commands a user is sent to first: each --help ends with examples.
MAIN_COMMANDS = ('serve', 'get', 'demo', 'tunnel', 'stats')
HELPER_COMMANDS = ('link-relay', 'tcp-send')    # demo runs them as processes: no help listing


def subcommands():
    """{name: parser} of every subcommand, as the program itself builds them."""
    _parser, commands = wanxfer.build_parser()
    return dict(commands.choices)


def pyenv_python(version):
    """The newest ~/.pyenv Python `version`.*, or None if there is none."""
    found = sorted(glob.glob(os.path.expanduser('~/.pyenv/versions/%s.*/bin/python' % version)),
                   key=lambda path: [int(part) if part.isdigit() else 0
                                     for part in path.split('/')[-3].split('.')])
    return found[-1] if found else None


INTERPRETERS = {'running': sys.executable, 'oldest': pyenv_python('3.8'),
                'newest': pyenv_python('3.13')}


@pytest.fixture(params=sorted(INTERPRETERS))
def python(request):
    path = INTERPRETERS[request.param]
    if path is None:
        pytest.skip('no %s supported Python on this machine' % request.param)
    return path


def test_every_main_command_is_found_by_discovery():
    assert set(MAIN_COMMANDS) <= set(subcommands())


@pytest.mark.e2e
@pytest.mark.parametrize('command', [None] + sorted(subcommands()))
def test_help_of_every_command_works(tmp_path, python, command):
    # argparse %-formats help strings: a path shown in one (the default
    # cache, from $XDG_CACHE_HOME) must not be taken for a format.
    env = dict(wanxfer_env(), XDG_CACHE_HOME=str(tmp_path / '100%(x)s%d%'))
    argv = [python, WANXFER] + ([command] if command else []) + ['--help']
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'Traceback' not in done.stdout + done.stderr
    assert done.stderr == ''
    assert done.stdout.startswith('usage: wanxfer' + (' ' + command if command else ''))
    if command is None or command in MAIN_COMMANDS:
        assert '\nexamples:\n' in done.stdout
        assert '\n  python3 wanxfer.py ' in done.stdout
    if command is None:
        for name in subcommands():
            assert (name in done.stdout) == (name not in HELPER_COMMANDS), name
    elif command in ('serve', 'get', 'tunnel', 'stats'):
        assert '100%(x)s%d%' in done.stdout.replace('\n', '').replace(' ', '')


# Mistakes on the command line, and what the one error line must name.
# {tmp} is a directory holding: missing (nothing), empty (an empty file),
# weak (a secret too short to use), afile (a file, so afile/... cannot be
# made), garbage (not a database).
BAD_INVOCATIONS = [
    (['frobnicate'], "invalid choice: 'frobnicate'"),
    (['--frobnicate'], 'unrecognized arguments: --frobnicate'),
    (['get'], 'the following arguments are required'),
    (['get', '127.0.0.1:1'], 'the following arguments are required: REMOTE'),
    (['get', '127.0.0.1:1', 'f', '--bogus'], 'unrecognized arguments: --bogus'),
    (['get', '127.0.0.1:1', 'f', '--rate', 'fast'], "invalid rate 'fast'"),
    (['get', '127.0.0.1:1', 'f', '--rate', '0'], "invalid rate '0'"),
    (['get', '127.0.0.1:1', 'f', '--rate=-5M'], "invalid rate '-5M'"),
    (['get', '127.0.0.1:1', 'f', '--rate', '-5M'], 'argument --rate: expected one argument'),
    (['get', '127.0.0.1:1', 'f', '--rate', 'inf'], "invalid rate 'inf'"),
    (['get', '127.0.0.1:1', 'f', '--rate', '1e400'], "invalid rate '1e400'"),
    (['get', '127.0.0.1:1', 'f', '--cache-size', 'huge'], "invalid size 'huge'"),
    (['get', '127.0.0.1:1', 'f', '--timeout', '0'], "invalid time '0'"),
    (['get', '127.0.0.1:1', 'f', '--timeout', 'nan'], "invalid time 'nan'"),
    (['get', '127.0.0.1:1', 'f', '--timeout', 'inf'], "invalid time 'inf'"),
    (['get', '127.0.0.1:notaport', 'f'], "invalid port in '127.0.0.1:notaport'"),
    (['get', '127.0.0.1:70000', 'f'], "invalid address '127.0.0.1:70000'"),
    (['get', ':5', 'f'], "invalid address ':5'"),
    (['get', '[::1', 'f'], "invalid address '[::1'"),
    (['get', '[::1]5', 'f'], "invalid address '[::1]5'"),
    (['get', '127.0.0.1:1', 'a', 'b', '-o', '{tmp}/empty'], 'is not a directory'),
    (['get', '127.0.0.1:1', 'f', '--secret-file', '{tmp}/missing'], 'cannot read secret file'),
    (['get', '127.0.0.1:1', 'f', '--secret-file', '{tmp}/empty'], 'is empty'),
    (['get', '127.0.0.1:1', 'f', '--secret-file', '{tmp}'], 'cannot read secret file'),
    (['serve', '--port', '0', '{tmp}/missing'], 'no such file or directory'),
    (['serve', '--port', '70000', '{tmp}'], "invalid port '70000'"),
    (['serve', '--port', '-1', '{tmp}'], "invalid port '-1'"),
    (['serve', '--port', 'x', '{tmp}'], "invalid port 'x'"),
    (['serve', '--port', '0', '--bind', '192.0.2.1', '{tmp}'], 'cannot listen on 192.0.2.1'),
    (['serve', '--port', '0', '--rate', 'fast', '{tmp}'], "invalid rate 'fast'"),
    (['serve', '--port', '0', '--secret-file', '{tmp}/missing', '{tmp}'], 'cannot read secret'),
    (['serve', '--port', '0', '--secret-file', '{tmp}/empty', '{tmp}'], 'is empty'),
    (['serve', '--port', '0', '--secret-file', '{tmp}/weak', '{tmp}'], 'secret'),
    (['tunnel'], 'give --listen'),
    (['tunnel', '--listen', '0', '--peer', '127.0.0.1:1'], 'give --listen'),
    (['tunnel', '--listen', '0'], '--listen takes --allow'),
    (['tunnel', '--listen', '0', '--allow', '127.0.0.1:5', '-L', '1:127.0.0.1:2'],
     '--listen takes --allow'),
    (['tunnel', '--peer', '127.0.0.1:1'], '--peer takes -L'),
    (['tunnel', '--peer', '127.0.0.1:1', '-L', '0:127.0.0.1:5', '--allow', '127.0.0.1:5'],
     '--peer takes -L'),
    (['tunnel', '--listen', '70000', '--allow', '127.0.0.1:5'], "invalid --listen '70000'"),
    (['tunnel', '--listen', '0', '--allow', 'nonsense'], "invalid --allow 'nonsense'"),
    (['tunnel', '--listen', '0', '--allow', '127.0.0.1:99999'], "'127.0.0.1:99999'"),
    (['tunnel', '--peer', 'nonsense', '-L', '0:127.0.0.1:5'], "invalid --peer 'nonsense'"),
    (['tunnel', '--peer', '127.0.0.1:1', '-L', 'garbage'], "invalid -L 'garbage'"),
    (['tunnel', '--peer', '127.0.0.1:1', '-L', '70000:127.0.0.1:5'], "'70000:127.0.0.1:5'"),
    (['tunnel', '--peer', '127.0.0.1:1', '-L', '0:127.0.0.1:5', '--cache-size', 'x'],
     "invalid size 'x'"),
    (['tunnel', '--peer', '127.0.0.1:1', '-L', '0:127.0.0.1:5', '--cache', '{tmp}/afile/c.db'],
     'cache {tmp}/afile/c.db'),
    (['tunnel', '--peer', '127.0.0.1:1', '-L', '0:127.0.0.1:5', '--secret-file', '{tmp}/weak'],
     'secret'),
    (['stats', '--cache', '{tmp}/missing'], 'no cache at'),
    (['stats', '--cache', '{tmp}/afile/c.db'], 'no cache at'),
    (['stats', '--cache', '{tmp}/empty'], 'no cache at'),
    (['stats', '--cache', '{tmp}'], 'cannot open cache'),
    (['stats', '--cache', '{tmp}/garbage'], 'cache'),
    (['emulate'], 'the following arguments are required: --to'),
    (['emulate', '--to', '127.0.0.1:x'], "invalid port in '127.0.0.1:x'"),
    (['emulate', '--to', '127.0.0.1:1', '--listen', '99999'], "invalid --listen '99999'"),
    (['emulate', '--to', '127.0.0.1:1', '--listen', 'abc'], "invalid --listen 'abc'"),
    (['emulate', '--to', '127.0.0.1:1', '--listen', '192.0.2.1:0'], 'cannot listen on'),
    (['emulate', '--to', '127.0.0.1:1', '--loss', '200'], 'invalid --loss 200'),
    (['emulate', '--to', '127.0.0.1:1', '--rtt=-5'], 'invalid --rtt -5'),
    (['emulate', '--to', '127.0.0.1:1', '--rtt', 'nan'], 'invalid --rtt nan'),
    (['emulate', '--to', '127.0.0.1:1', '--reorder', '101'], 'invalid --reorder 101'),
    (['emulate', '--to', '127.0.0.1:1', '--link-rate', 'fast'], "invalid rate 'fast'"),
    (['emulate', '--to', '127.0.0.1:1', '--mtu', '10'], 'mtu'),
    (['emulate', '--to', '127.0.0.1:1', '--queue', '0'], 'queue'),
    (['emulate', '--to', '127.0.0.1:1', '--burst', '0.5'], 'burst'),
    (['emulate', '--to', '127.0.0.1:1', '--seed', 'x'], 'argument --seed'),
    (['demo', '--size', 'huge'], "invalid size 'huge'"),
    (['demo', '--size', '0'], "invalid size '0'"),
    (['demo', '--size', '1e30'], 'free for the file and its copy'),
    (['demo', '--rtt', 'inf'], 'invalid --rtt inf'),
    (['demo', '--loss', '100'], 'nothing would arrive'),
    (['demo', '--loss=-1'], 'invalid --loss -1'),
]


@pytest.fixture
def bad_places(tmp_path):
    places = tmp_path / 'places'
    places.mkdir()
    (places / 'empty').write_bytes(b'')
    (places / 'weak').write_text('abc\n')
    (places / 'afile').write_text('not a directory')
    (places / 'garbage').write_bytes(b'not a database at all, ' * 100)
    return places


@pytest.mark.e2e
@pytest.mark.parametrize('argv, expected', BAD_INVOCATIONS,
                         ids=[' '.join(argv) for argv, _expected in BAD_INVOCATIONS])
def test_bad_invocations_get_one_error_line(bad_places, argv, expected):
    argv = [arg.replace('{tmp}', str(bad_places)) for arg in argv]
    done = subprocess.run([sys.executable, WANXFER] + argv, env=wanxfer_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert done.returncode in (1, 2), done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('wanxfer: error: '), done.stderr
    assert expected.replace('{tmp}', str(bad_places)) in lines[0]
    assert done.stdout == ''
