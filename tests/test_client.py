"""The receiving end's pieces without a network: listings parsed into
records where they arrive, the plan of a get's destinations, and an
IncomingFile asking for a file and taking one sent whole, driven with
stand-ins for the session's channels."""

import base64
import hashlib
import os
import types

import pytest

from helpers import wanxfer


# ---------------------------------------------------------------------------
# Listings
# ---------------------------------------------------------------------------
# Each listing page becomes records once, where it arrives.

def page(files, dirs=(), name='d', kind='dir', more=False):
    message = {'op': 'listing', 'kind': kind, 'name': name, 'dirs': list(dirs),
               'files': [{'path': path, 'size': size, 'mtime_ns': 7, 'mode': 0o640}
                         for path, size in files]}
    if more:
        message['more'] = True
    return message


def test_listing_pages_join_into_one_listing_of_immutable_entry_records():
    first = page([('a', 5)], dirs=['s'], more=True)
    pages = iter([page([('s/b', 6)], more=True), page([], dirs=['t'])])
    listing = wanxfer.Listing.from_pages(first, lambda: next(pages))
    first['files'][0]['size'] = 99              # the message is not kept: parsed once
    assert listing == wanxfer.Listing('dir', 'd', [wanxfer.ListingEntry('a', 5, 7, 0o640),
                                                   wanxfer.ListingEntry('s/b', 6, 7, 0o640)],
                                      ['s', 't'])
    entry = listing.files[0]
    assert (entry.path, entry.size, entry.mtime_ns, entry.mode) == ('a', 5, 7, 0o640)
    with pytest.raises(AttributeError):
        entry.size = 1
    assert not hasattr(entry, '__dict__')       # a small record, not a dict per file


def test_a_page_of_another_listing_is_refused():
    others = iter([page([('b', 1)], name='other')])
    with pytest.raises(wanxfer.ProtocolError, match='a page of another listing'):
        wanxfer.Listing.from_pages(page([('a', 1)], more=True), lambda: next(others))


def test_a_listing_of_the_served_root_has_an_empty_name():
    root = page([('a', 1)])
    del root['name']
    assert wanxfer.Listing.from_pages(root, None).name == ''


# ---------------------------------------------------------------------------
# Planning a get
# ---------------------------------------------------------------------------
# Where each file of the listed REMOTEs goes, what directories that takes.

def listing(kind, name, files=(), dirs=()):
    return wanxfer.Listing(kind, name, [wanxfer.ListingEntry(path, size, 7, 0o644)
                                        for path, size in files], list(dirs))


def test_a_single_file_goes_to_a_new_name_without_making_directories(tmp_path):
    dest = str(tmp_path / 'copy.bin')
    result = listing('file', 'f.bin', [('f.bin', 10)])
    plan = wanxfer.plan_downloads(['sub/f.bin'], dest, [result])
    assert plan == wanxfer.DownloadPlan([wanxfer.Download('sub/f.bin', dest, result.files[0])],
                                        [], [], [(dest, [dest])])


def test_a_single_file_into_an_existing_directory_takes_its_name(tmp_path):
    result = listing('file', 'f.bin', [('f.bin', 10)])
    plan = wanxfer.plan_downloads(['sub/f.bin'], str(tmp_path), [result])
    target = os.path.join(str(tmp_path), 'f.bin')
    assert plan.downloads == [wanxfer.Download('sub/f.bin', target, result.files[0])]
    assert plan.dirs == [str(tmp_path)] and plan.trees == [(target, [target])]


def test_a_directory_is_planned_below_the_destination_with_every_directory_it_needs(tmp_path):
    dest = str(tmp_path / 'out')
    result = listing('dir', 'd', [('x', 1), ('s/y', 2), ('s/t/z', 3)], ['s', 'e'])
    plan = wanxfer.plan_downloads(['top/d/'], dest, [result])
    top = os.path.join(dest, 'd')
    assert [(d.remote, d.dest, d.entry.size) for d in plan.downloads] == [
        ('top/d/x', os.path.join(top, 'x'), 1),
        ('top/d/s/y', os.path.join(top, 's', 'y'), 2),
        ('top/d/s/t/z', os.path.join(top, 's', 't', 'z'), 3)]
    assert plan.dirs[:2] == [dest, top]
    assert set(plan.dirs) == {dest, top, os.path.join(top, 's'), os.path.join(top, 'e'),
                              os.path.join(top, 's', 't')}
    assert plan.trees == [(top, [d.dest for d in plan.downloads])]


def test_the_served_root_goes_into_the_destination_itself(tmp_path):
    dest = str(tmp_path / 'out')
    plan = wanxfer.plan_downloads([''], dest, [listing('dir', '', [('a', 1)])])
    assert [(d.remote, d.dest) for d in plan.downloads] == [('a', os.path.join(dest, 'a'))]
    assert plan.trees == [(dest, [os.path.join(dest, 'a')])]


def test_refused_remotes_are_errors_and_alone_make_no_directory(tmp_path):
    refused = wanxfer.RemoteError('nope: no such file')
    plan = wanxfer.plan_downloads(['nope'], str(tmp_path / 'out'), [refused])
    assert plan == wanxfer.DownloadPlan([], [], [refused], [])
    plan = wanxfer.plan_downloads(['nope', 'f'], str(tmp_path / 'out'),
                                  [refused, listing('file', 'f', [('f', 1)])])
    assert plan.errors == [refused] and [d.remote for d in plan.downloads] == ['f']


@pytest.mark.parametrize('name,path', [('d', '../x'), ('d', '/etc/x'), ('..', 'x'),
                                       ('d', 'a/../../x'), ('d', '.')])
def test_a_path_the_server_sent_that_leaves_the_destination_is_refused(tmp_path, name, path):
    with pytest.raises(wanxfer.ProtocolError, match='unsafe path'):
        wanxfer.plan_downloads(['d'], str(tmp_path), [listing('dir', name, [(path, 1)])])


# ---------------------------------------------------------------------------
# One file coming in
# ---------------------------------------------------------------------------
# An IncomingFile given stand-ins for the session: it needs no Client.

class Conversation(wanxfer.Conversation):
    """A Conversation whose channel is a list of answers and a list of requests."""

    def __init__(self, answers=()):
        super().__init__(types.SimpleNamespace(send=self.sent_append, recv=self.next_answer),
                         timeout=5)
        self.sent = []
        self.answers = list(answers)

    def sent_append(self, message):
        self.sent.append(message)

    def next_answer(self):
        return self.answers.pop(0)


def incoming_file(tmp_path, size, conversation=None, name='f'):
    data = types.SimpleNamespace(sealer_in=types.SimpleNamespace(encrypt=True, cipher="aes-256-ctr"))
    entry = wanxfer.ListingEntry(name, size, 1700000000 * 10 ** 9, 0o600)
    return wanxfer.IncomingFile(name, str(tmp_path / name), entry, conversation or Conversation(),
                                data, wanxfer.TransferEvents(), rtt=0.01)


def test_an_incoming_file_asks_for_what_its_partial_copy_lacks(tmp_path):
    incoming = incoming_file(tmp_path, 10000)
    incoming.ask(lambda largest_mtu: 1000, max_rate=None)
    (fetch,) = incoming.conversation.sent
    assert fetch == {'op': 'fetch', 'path': 'f', 'size': 10000, 'mtime_ns': 1700000000 * 10 ** 9,
                     'max_rate': None, 'block_size': 1000, 'delta': False, 'compress': False,
                     'lead': False, 'need': [(0, 10)], 'early_digest': True}
    # Half of it written and recorded: the next run asks for the rest only.
    incoming.partial.write(0, bytes(4000))
    incoming.bitmap[0] = 0b1111
    incoming.partial.save_state(incoming.bitmap)
    incoming.partial.close()
    again = incoming_file(tmp_path, 10000)
    again.ask(lambda largest_mtu: 1000, max_rate=None)
    assert again.conversation.sent[0]['need'] == [(4, 10)]
    assert again.partial.resumed_blocks == 4
    again.withdraw()                            # kept for a run to come: it holds data
    assert wanxfer.PartialFile.left_at(str(tmp_path / 'f'))


def test_an_incoming_file_asked_for_and_never_answered_leaves_nothing(tmp_path):
    incoming = incoming_file(tmp_path, 10000, Conversation([{'op': 'error', 'message': 'gone'}]))
    incoming.ask(lambda largest_mtu: 1000, max_rate=None)
    with pytest.raises(wanxfer.RemoteError, match='gone'):
        incoming.answer()
    assert os.listdir(str(tmp_path)) == []


def test_an_incoming_file_skips_late_signature_pieces_only_as_many_as_allowed(tmp_path):
    piece = {'op': 'signature', 'file': 3, 'offset': 0, 'spans': ''}
    start = {'op': 'start', 'file': 4, 'first_seq': 0}
    conversation = Conversation([piece, piece, start])
    conversation.expect_strays(3, 2)
    incoming = incoming_file(tmp_path, 10000, conversation)
    incoming.ask(lambda largest_mtu: 1000, max_rate=None)
    incoming.answer()
    assert incoming.start == start
    conversation.answers = [piece]
    incoming = incoming_file(tmp_path, 10000, conversation, name='g')
    incoming.ask(lambda largest_mtu: 1000, max_rate=None)
    with pytest.raises(wanxfer.ProtocolError, match='signature piece no fetch can use'):
        incoming.answer()


def test_a_small_file_sent_whole_is_checked_before_it_takes_its_name(tmp_path):
    data = b'small file content'
    content = {'op': 'content', 'path': 'f', 'encoding': 'raw',
               'data': base64.b64encode(data).decode(), 'sha256': hashlib.sha256(data).hexdigest()}
    summary = incoming_file(tmp_path, len(data)).write_whole(content, 0.5)
    assert (tmp_path / 'f').read_bytes() == data
    assert (tmp_path / 'f').stat().st_mode & 0o777 == 0o600
    assert (summary['file_bytes'], summary['sha256'], summary['encrypted']) == (
        len(data), content['sha256'], True)
    forged = dict(content, sha256=hashlib.sha256(b'other').hexdigest())
    with pytest.raises(wanxfer.TransferError, match='does not match its digest'):
        incoming_file(tmp_path, len(data), name='g').write_whole(forged, 0.5)
    assert sorted(os.listdir(str(tmp_path))) == ['f']
