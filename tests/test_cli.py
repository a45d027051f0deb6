"""The command line as a new user meets it: every command's --help, under
the oldest and newest supported Python, and every mistake on the command
line answered with one line `wanxfer: error: ...`, never a traceback."""

import glob
import os
import subprocess
import sys

import pytest

from conftest import WANXFER, wanxfer, wanxfer_env

# The commands a user is sent to first: each --help ends with examples.
MAIN_COMMANDS = ('serve', 'get', 'demo', 'tunnel', 'stats')


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
            assert name in done.stdout
    elif command in ('serve', 'get', 'tunnel', 'stats'):
        assert '100%(x)s%d%' in done.stdout.replace('\n', '').replace(' ', '')
