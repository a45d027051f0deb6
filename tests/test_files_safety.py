"""What `get` writes is safe in a destination other users can write to:
no setuid or setgid bits from the server, no writing through links planted
at the names it uses, and a --cache that is not a cache is left alone."""

import os
import stat
import subprocess

import pytest

from conftest import (get_command, json_summaries, make_file, run_get, sha256, wait_for, wanxfer,
                      wanxfer_env)

MiB = 1024 * 1024


def mode_of(path):
    return stat.S_IMODE(os.lstat(str(path)).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason='only root can serve a setuid file it does not own')
def test_setuid_setgid_and_sticky_bits_never_reach_a_received_file(tmp_path, serve):
    src = tmp_path / 'src' / 'tree'
    src.mkdir(parents=True)
    modes = {'small-suid': (1000, 0o4755), 'small-all': (2000, 0o6777),
             'big-suid': (600 * 1024, 0o4755), 'big-sgid': (2 * MiB, 0o2775),
             'big-sticky': (300 * 1024, 0o1644)}
    for name, (size, mode) in modes.items():
        make_file(src / name, size, seed=size)
        os.chmod(str(src / name), mode)
    server = serve([src.parent])
    dest = tmp_path / 'dest'
    # A tree: small files in batches on the control channel, large ones by UDP.
    done = run_get(server.port, 'tree', '-o', dest)
    assert done.returncode == 0, done.stderr
    for name, (_size, mode) in modes.items():
        assert sha256(dest / 'tree' / name) == sha256(src / name)
        assert mode_of(dest / 'tree' / name) == mode & 0o777, name
    # A single new file, asked for before it is listed.
    done = run_get(server.port, 'tree/big-suid', '-o', tmp_path / 'single')
    assert done.returncode == 0, done.stderr
    assert mode_of(tmp_path / 'single') == 0o755
    # An update built from the copy already here (a delta, assembled locally).
    with open(str(src / 'big-sgid'), 'ab') as f:
        f.write(b'appended')
    done = run_get(server.port, 'tree/big-sgid', '-o', dest / 'tree' / 'big-sgid', '--json')
    assert done.returncode == 0, done.stderr
    (summary,) = json_summaries(done)
    assert summary['local_bytes'] > 0
    assert sha256(dest / 'tree' / 'big-sgid') == sha256(src / 'big-sgid')
    assert mode_of(dest / 'tree' / 'big-sgid') == 0o775


@pytest.mark.parametrize('size', [3 * MiB, 5000], ids=['by-udp', 'small-batch'])
def test_links_planted_at_the_names_get_writes_are_replaced_not_followed(tmp_path, serve, size):
    src = tmp_path / 'src' / 'tree'
    src.mkdir(parents=True)
    data = make_file(src / 'f', size)
    make_file(src / 'g', size, seed=1)          # two files: small ones then go in a batch
    server = serve([src.parent])
    dest = tmp_path / 'dest'
    (dest / 'tree').mkdir(parents=True)
    here = dest / 'tree'
    victims = {}
    for name in ('partial', 'state', 'state-tmp', 'final', 'hard'):
        victims[name] = tmp_path / ('victim-' + name)
        victims[name].write_bytes(b'precious ' + name.encode())
    os.symlink(str(victims['partial']), str(here / '.f.wxpart'))
    os.symlink(str(victims['state']), str(here / '.f.wxstate'))
    os.symlink(str(victims['state-tmp']), str(here / '.f.wxstate.tmp'))
    os.symlink(str(victims['final']), str(here / 'f'))
    os.link(str(victims['hard']), str(here / '.g.wxpart'))      # another name of the same file
    done = run_get(server.port, 'tree', '-o', dest)
    assert done.returncode == 0, done.stderr
    for name, victim in victims.items():
        assert victim.read_bytes() == b'precious ' + name.encode(), name
    for name in ('f', 'g'):
        assert stat.S_ISREG(os.lstat(str(here / name)).st_mode)
        assert sha256(here / name) == sha256(src / name)
    assert sha256(here / 'f') == sha256(data)
    assert not os.path.lexists(str(here / '.f.wxpart')) and not os.path.lexists(str(here / '.f.wxstate'))


def recorded_blocks(state_path):
    found = wanxfer.PartialFile.recorded(str(state_path))
    return 0 if found is None else sum(bin(b).count('1') for b in found[1])


def test_a_partial_copy_elsewhere_is_not_resumed_through_a_link(tmp_path, serve):
    # Links at the names get uses to a partial copy of the same file that
    # an earlier get of this user left in another directory: were they
    # opened (no O_NOFOLLOW), the transfer would resume into that copy and
    # rename the link to the final name.
    src = tmp_path / 'src'
    src.mkdir()
    data = make_file(src / 'f', 4 * MiB)
    server = serve([src], extra=['--rate', '8M'])
    elsewhere, dest = tmp_path / 'elsewhere', tmp_path / 'dest'
    elsewhere.mkdir()
    dest.mkdir()
    first = subprocess.Popen(get_command(server.port, 'f', '-o', elsewhere / 'f'), env=wanxfer_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: recorded_blocks(elsewhere / '.f.wxstate') > 0, what='a saved partial state')
    assert first.poll() is None                 # killed with part of the file written
    first.kill()
    first.wait()
    left = {name: (elsewhere / name).read_bytes() for name in ('.f.wxpart', '.f.wxstate')}
    for name in left:
        os.symlink(str(elsewhere / name), str(dest / name))
    done = run_get(server.port, 'f', '-o', dest / 'f', '--json')
    assert done.returncode == 0, done.stderr
    assert stat.S_ISREG(os.lstat(str(dest / 'f')).st_mode)
    assert sha256(dest / 'f') == sha256(data)
    assert json_summaries(done)[0]['resumed_bytes'] == 0
    for name, content in left.items():
        assert (elsewhere / name).read_bytes() == content, name
    assert not os.path.lexists(str(dest / '.f.wxpart')) and not os.path.lexists(str(dest / '.f.wxstate'))


def test_a_link_where_a_directory_of_the_tree_goes_is_refused(tmp_path, serve):
    src = tmp_path / 'src' / 'tree'
    (src / 'sub').mkdir(parents=True)
    make_file(src / 'sub' / 'f', 1000)
    server = serve([src.parent])
    dest = tmp_path / 'dest'
    (dest / 'tree').mkdir(parents=True)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    os.symlink(str(elsewhere), str(dest / 'tree' / 'sub'))
    done = run_get(server.port, 'tree', '-o', dest)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        'wanxfer: error: %s is a symbolic link; get does not write through links: remove it or '
        'fetch into another directory' % (dest / 'tree' / 'sub')]
    assert os.listdir(str(elsewhere)) == []


def test_a_cache_option_naming_some_other_file_leaves_it_untouched(tmp_path, serve):
    data = make_file(tmp_path / 'f', 2 * MiB)
    server = serve([data])
    notes = tmp_path / 'notes.txt'
    notes.write_bytes(b'not a cache, a shopping list\n' * 300)
    done = run_get(server.port, 'f', '-o', tmp_path / 'out', '--cache', notes, '--json')
    assert done.returncode == 0, done.stderr
    assert sha256(tmp_path / 'out') == sha256(data)
    assert notes.read_bytes() == b'not a cache, a shopping list\n' * 300
    assert sorted(os.listdir(str(tmp_path))) == ['f', 'notes.txt', 'out']
    (warning,) = done.stderr.strip().splitlines()
    assert '%s is not a wanxfer cache' % notes in warning and 'choose another --cache' in warning


def test_a_partial_file_that_is_not_ours_alone_is_not_resumed(tmp_path):
    dest = str(tmp_path / 'out')
    partial = wanxfer.PartialFile(dest, 'r', 40000, 0, 1000)
    partial.open()
    partial.write(0, b'x' * 20000)
    bitmap = bytearray(5)
    wanxfer.set_bits(bitmap, 0, 20)
    partial.save_state(bitmap)
    partial.close()
    # Some other user's file at that name (or one with another link) is not
    # written into: it is replaced by a new file of ours.
    os.chown(partial.data_path, 12345, 12345)
    again = wanxfer.PartialFile(dest, 'r', 40000, 0, 1000)
    assert again.open() == bytearray(5) and again.resumed_blocks == 0
    info = os.fstat(again.fd)
    assert (info.st_uid, info.st_size, info.st_nlink) == (os.geteuid(), 40000, 1)
    again.close()


def test_a_torn_state_record_falls_back_to_the_one_before(tmp_path):
    dest = str(tmp_path / 'out')
    partial = wanxfer.PartialFile(dest, 'r', 40000, 0, 1000)
    partial.open()
    partial.write(0, b'x' * 40000)
    first, second = bytearray(5), bytearray(5)
    wanxfer.set_bits(first, 0, 8)
    wanxfer.set_bits(second, 0, 40)
    partial.save_state(first)
    partial.save_state(second)
    partial.close()
    assert wanxfer.PartialFile.recorded(partial.state_path)[1] == second
    # The newest record is the second save's, in the first slot: spoil it.
    with open(partial.state_path, 'r+b') as f:
        f.seek(wanxfer.PartialFile.STATE_SLOT.size + 3)
        f.write(b'\xff')
    again = wanxfer.PartialFile(dest, 'r', 40000, 0, 1000)
    assert again.open() == first and again.resumed_blocks == 8
    again.close()
