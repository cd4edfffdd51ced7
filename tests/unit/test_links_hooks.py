"""The link watcher (controller/daemon/links.py) at the TC hook, without a
kernel: the interface's programs are a fake. At the TC hook only xknock's
own classifier counts, so a new instance of a watched name that already runs
another tool's XDP program still gets the filter at its TC ingress (the XDP
program runs before it and is left alone). At the XDP hook that program is
in the way, and the watcher says so rather than replacing it."""

import pytest

from xknock.controller.daemon import links

datapath = links.datapath
PROG_ID, FOREIGN_XDP, OLD_INDEX, NEW_INDEX = 41, 99, 3, 7


class FakeInterface:
    """One interface of the watched name, as datapath.attachment() sees it."""

    def __init__(self, index):
        self.index, self.xdp, self.tc, self.attached = index, 0, 0, []

    def attachment(self, ifname, hook=None):
        # As the real one: without a hook, the XDP program, unless xknock's
        # classifier runs at TC; with hook "tc", xknock's classifier or nothing.
        at_tc = datapath.Attachment(ifname, self.index, self.tc, datapath.TC_MODE if self.tc else None,
                                    datapath.TC_PROG_NAME if self.tc else None)
        if hook == datapath.TC_MODE or self.tc or not self.xdp:
            return at_tc
        return datapath.Attachment(ifname, self.index, self.xdp, "native", "ddos_filter")

    def xdp_attach(self, ifindex, prog_fd, mode, replace_fd=None):
        self.attached.append((ifindex, mode))
        if mode == datapath.TC_MODE:
            self.tc = PROG_ID


@pytest.fixture
def interface(monkeypatch):
    fake = FakeInterface(OLD_INDEX)
    monkeypatch.setattr(datapath, "interface_index", lambda name: fake.index)
    monkeypatch.setattr(datapath, "attachment", fake.attachment)
    monkeypatch.setattr(datapath, "xdp_attach", fake.xdp_attach)
    return fake


def watcher_of(mode, events):
    watcher = links.LinkWatcher(["eth0"], {"eth0": mode}, prog_fd=5, prog_id=PROG_ID,
                                on_event=lambda ifname, event: events.append(event))
    watcher.close()   # the fake is told what happens; no notification is read
    return watcher


def test_a_new_instance_running_another_xdp_program_gets_the_filter_at_tc(interface):
    events = []
    watcher = watcher_of(datapath.TC_MODE, events)
    interface.index, interface.xdp = NEW_INDEX, FOREIGN_XDP   # recreated, with a tool's XDP program on it
    watcher.check()
    assert interface.attached == [(NEW_INDEX, datapath.TC_MODE)]
    assert events == ["vanished", "reattached"]
    watcher.check()   # and the next look finds it still ours: nothing reported
    assert events == ["vanished", "reattached"]


def test_at_the_xdp_hook_another_program_there_is_reported_not_replaced(interface):
    events = []
    watcher = watcher_of("native", events)
    interface.index, interface.xdp = NEW_INDEX, FOREIGN_XDP
    watcher.check()
    assert interface.attached == []
    assert events == ["vanished", "reattach_failed"]
