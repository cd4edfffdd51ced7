"""The cache of loaded programs (controller/kernel/progcache.py): an attach
with the same source, flags, BCC and kernel re-uses the program kept beside
the maps; anything else compiles; a pin that is not what its name says is
never trusted. On real programs in a pin directory of the test's own."""

import os
import tempfile

import pytest

from xknock.controller.kernel import bpfsys, datapath, progcache


@pytest.fixture(scope="module")
def kept():
    """A pin directory where compile_and_load(reuse=True) kept a program;
    (directory, its Loaded). Everything is removed after the module."""
    directory = tempfile.mkdtemp(prefix="test-progcache-", dir=datapath.BPFFS)
    loaded = None
    try:
        loaded = datapath.compile_and_load(directory, test_clock=True, reuse=True)
        yield directory, loaded
    finally:
        if loaded is not None:
            loaded.bpf.cleanup()
        datapath.remove_pins(directory)
        if os.path.isdir(directory):
            os.rmdir(directory)


def _reload(directory, **kw):
    """compile_and_load(reuse=True) again: (Loaded, compiled?)."""
    loaded = datapath.compile_and_load(directory, test_clock=True, reuse=True, **kw)
    return loaded, loaded.bpf is not None


def _close(loaded):
    if loaded.bpf is not None:
        loaded.bpf.cleanup()
    else:
        os.close(loaded.fd)


def _wanted(**kw):
    return progcache.key(datapath.bpf_source(), ["-DXK_TEST_CLOCK"], **kw)


def test_the_program_is_kept_under_its_key_and_tag(kept):
    directory, loaded = kept
    tag = bytes(bpfsys.prog_info(loaded.fd).tag).hex()
    assert progcache.cached(directory) == [f"{progcache.PREFIX}{_wanted()}-{tag}"]


def test_a_second_attach_re_uses_it_without_compiling(kept):
    directory, loaded = kept
    again, compiled = _reload(directory)
    try:
        assert not compiled
        assert again.prog_id == loaded.prog_id and again.layout == loaded.layout
    finally:
        _close(again)


@pytest.mark.parametrize("change", ["flag", "source"])
def test_another_flag_or_source_compiles_and_replaces_the_kept_one(kept, monkeypatch, change):
    directory, loaded = kept
    before = progcache.cached(directory)
    if change == "flag":
        other, compiled = _reload(directory, cflags=["-DXK_TEST_UNUSED_FLAG=1"])
    else:
        source = datapath.bpf_source()
        monkeypatch.setattr(datapath, "bpf_source", lambda: source + "\n/* the next version */\n")
        other, compiled = _reload(directory)
    try:
        assert compiled and other.prog_id != loaded.prog_id
        assert len(progcache.cached(directory)) == 1 and progcache.cached(directory) != before
    finally:
        _close(other)
        monkeypatch.undo()
        progcache.keep(directory, _wanted(), loaded.fd)    # the module's own program kept again


def test_the_key_covers_bcc_and_the_kernel(monkeypatch):
    assert _wanted(bcc="__version__ = '0.26.0'") != _wanted(bcc="__version__ = '0.30.0'")
    assert progcache.bcc_version() is not None    # this machine's BCC, read without importing it
    here = os.uname()
    other = os.uname_result(("Linux", here.nodename, "7.0.0-next", here.version, here.machine))
    key_here = _wanted()
    monkeypatch.setattr(os, "uname", lambda: other)
    assert _wanted() != key_here


def _trivial_xdp():
    """A program of type XDP named xdp_knock that is not ours (no maps)."""
    from bcc import BPF

    bpf = BPF(text=b"int xdp_knock(struct xdp_md *ctx) { return XDP_PASS; }")
    return bpf, bpf.load_func(b"xdp_knock", BPF.XDP).fd


def _plant(directory, fd, name):
    path = os.path.join(directory, name)
    if os.path.exists(path):
        os.unlink(path)
    bpfsys.obj_pin(fd, path)
    return path


@pytest.mark.parametrize("planted", ["a map", "another program, our tag", "another program, its own tag",
                                     "open to others"])
def test_a_pin_that_is_not_what_its_name_says_is_refused_and_removed(kept, planted, caplog):
    directory, loaded = kept
    [name] = progcache.cached(directory)
    prefix = name.rsplit("-", 1)[0]
    bpf = None
    try:
        if planted == "a map":
            fd = bpfsys.obj_get(os.path.join(directory, "control"))
            path = _plant(directory, fd, name)
            os.close(fd)
            why = "not a program"
        elif planted.startswith("another program"):
            bpf, fd = _trivial_xdp()
            if planted.endswith("our tag"):
                path = _plant(directory, fd, name)
                why = "is not the one its name records"
            else:
                os.unlink(os.path.join(directory, name))
                path = _plant(directory, fd, f"{prefix}-{bytes(bpfsys.prog_info(fd).tag).hex()}")
                why = "its maps are not the maps pinned beside it"
        else:
            path = os.path.join(directory, name)
            os.chmod(path, 0o644)
            why = "not a pin of ours alone"
        assert progcache.find(directory, _wanted(), datapath.PROG_NAME) is None
        assert why in caplog.text
        assert not os.path.exists(path)
    finally:
        if bpf is not None:
            bpf.cleanup()
        for other in progcache.cached(directory):
            os.unlink(os.path.join(directory, other))
        progcache.keep(directory, _wanted(), loaded.fd)     # the real one back for the next case
    assert progcache.find(directory, _wanted(), datapath.PROG_NAME) is not None


def test_no_cache_without_reuse(kept):
    """The test harness and tools that need BCC's object compile every time."""
    directory, loaded = kept
    other = datapath.compile_and_load(directory, test_clock=True)
    try:
        assert other.bpf is not None and other.prog_id != loaded.prog_id
    finally:
        other.bpf.cleanup()
    assert progcache.find(directory, _wanted(), datapath.PROG_NAME) is not None
