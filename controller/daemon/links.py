"""Interfaces that come and go: the controller's watch over the interfaces
its filter is attached to.

An XDP program, and a TC classifier (tcx or clsact: kernel/tc.py) just as
well, lives on one interface instance. When a veth is recreated, a
bond or VLAN rebuilt or a driver reloaded, the new interface of the same name
starts without a filter: an open host, unless someone attaches again. The
watcher listens to the kernel's link notifications (rtnetlink, parsed by
pyroute2) and, when an interface it watches reappears under the same name,
attaches the same loaded program to it at the same hook (same maps: grants,
bans and knocks in progress are kept). A rename, a move to another namespace and a filter that
someone else removed are reported, never silently left.

It never replaces a program it did not attach: on the same interface
instance, a missing filter means `xknock detach` (or an operator) took it
off, which the watcher reports and respects.
"""

import errno
import logging
import socket
import time
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from ..errors import XknockError
from ..kernel import datapath

log = logging.getLogger("xknock")

# A full look at every watched interface, in case a notification was lost
# (the socket's buffer overran) or never came (an XDP program swapped).
CHECK_EVERY_S = 1.0

# What the watcher reports, as the `event` of xknock_interface_events_total.
EVENTS = ("vanished", "reattached", "reattach_failed", "renamed", "filter_removed")


@dataclass
class Watched:
    ifname: str
    ifindex: int | None   # None while no interface of that name exists
    mode: str             # the XDP mode the filter was attached in
    gone_since: float | None = None
    given_up: bool = False  # the filter was taken off this instance by someone: leave it


class LinkWatcher:
    """Watches ifnames, which run the program `prog_fd` (id `prog_id`) in the
    given modes. poll() handles what happened since; call it often (the
    controller's loop does, every POLL_MS). on_event(ifname, event) is called
    for every event of EVENTS."""

    def __init__(self, ifnames, modes, prog_fd, prog_id, on_event=None, clock=time.monotonic):
        self.prog_fd, self.prog_id = prog_fd, prog_id
        self.on_event = on_event or (lambda ifname, event: None)
        self.clock = clock
        self.watched = {}
        for name in ifnames:
            self.watched[name] = Watched(name, datapath.interface_index(name), modes[name])
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK))
        self.marshal = MarshalRtnl()
        self.next_check = clock() + CHECK_EVERY_S

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    def poll(self):
        """Handle every notification waiting, then, once a second, look at each
        watched interface directly."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                log.warning("link notifications were lost (socket buffer full); checking every interface")
                self.next_check = 0
                continue
            for message in self.marshal.parse(data):
                self._message(message)
        if self.clock() >= self.next_check:
            self.next_check = self.clock() + CHECK_EVERY_S
            self.check()

    def _message(self, message):
        index, name = message["index"], message.get_attr("IFLA_IFNAME")
        if message["event"] == "RTM_DELLINK":
            for watched in self.watched.values():
                if watched.ifindex == index:
                    self._vanished(watched, f"{watched.ifname} was deleted or moved to another network namespace")
        elif message["event"] == "RTM_NEWLINK":
            for watched in self.watched.values():
                if watched.ifindex == index and name and name != watched.ifname:
                    self._renamed(watched, name)
                elif name == watched.ifname and watched.ifindex != index:
                    self._appeared(watched, index)

    def check(self):
        """Compare every watched name with what the kernel has now."""
        for watched in self.watched.values():
            try:
                index = datapath.interface_index(watched.ifname)
            except XknockError:
                if watched.ifindex is not None:
                    self._vanished(watched, f"{watched.ifname} is gone")
                continue
            except (NetlinkError, OSError) as err:
                log.debug("interface lookup failed", extra={"fields": {"iface": watched.ifname, "error": str(err)}})
                continue
            if index != watched.ifindex:
                if watched.ifindex is not None:
                    self._vanished(watched, f"{watched.ifname} was replaced by a new interface of that name")
                self._appeared(watched, index)
            elif not watched.given_up:
                self._still_ours(watched)

    def _vanished(self, watched, why):
        watched.ifindex, watched.gone_since = None, self.clock()
        log.error(f"{why}; the filter comes back if an interface of that name appears again",
                  extra={"fields": {"iface": watched.ifname, "event": "vanished"}})
        self.on_event(watched.ifname, "vanished")

    def _renamed(self, watched, new_name):
        # The filter stays on the renamed interface (programs belong to the
        # instance, not the name); the name itself is now unguarded.
        log.error(f"{watched.ifname} was renamed to {new_name}: the filter stays on {new_name}; a new "
                  f"{watched.ifname} will be filtered when it appears",
                  extra={"fields": {"iface": watched.ifname, "new_name": new_name, "event": "renamed"}})
        self.on_event(watched.ifname, "renamed")
        watched.ifindex, watched.gone_since = None, self.clock()

    def _appeared(self, watched, index):
        if watched.given_up:
            return
        watched.ifindex = index
        gap = self.clock() - watched.gone_since if watched.gone_since is not None else None
        watched.gone_since = None
        fields = {"iface": watched.ifname, "ifindex": index, "xdp_mode": watched.mode}
        if gap is not None:
            fields["gap_ms"] = round(gap * 1000)
        try:
            running = self._attachment(watched)
            if running.ifindex == index and running.prog_id == self.prog_id:
                # Renamed back, or moved back: the filter never left it.
                log.info(f"{watched.ifname} is back, with the filter", extra={"fields": fields})
                return
            if running.ifindex == index and running.prog_id:
                raise XknockError(f"program {running.prog_id} '{running.prog_name}' runs there")
            datapath.xdp_attach(index, self.prog_fd, watched.mode)
        except (XknockError, NetlinkError, OSError) as err:
            reason = str(err) if isinstance(err, XknockError) else datapath.netlink_reason(err)
            log.error(f"{watched.ifname} appeared again but attaching the filter failed: {reason}; "
                      f"it is NOT filtered: attach it with `{self._attach_command(watched)}`",
                      extra={"fields": {**fields, "event": "reattach_failed"}})
            self.on_event(watched.ifname, "reattach_failed")
            return
        log.warning(f"{watched.ifname} appeared again: the filter is attached to it, with its maps",
                    extra={"fields": {**fields, "event": "reattached"}})
        self.on_event(watched.ifname, "reattached")

    @staticmethod
    def _attachment(watched):
        # At the TC hook only xknock's program there counts: an XDP program of
        # another tool runs before it and is none of the watcher's business.
        hook = datapath.TC_MODE if watched.mode == datapath.TC_MODE else None
        return datapath.attachment(watched.ifname, hook=hook)

    @staticmethod
    def _attach_command(watched):
        hook = " --hook tc" if watched.mode == datapath.TC_MODE else ""
        return f"xknock attach {watched.ifname}{hook}"

    def _still_ours(self, watched):
        try:
            att = self._attachment(watched)
        except (XknockError, NetlinkError, OSError):
            return
        if att.ifindex == watched.ifindex and att.prog_id != self.prog_id:
            watched.given_up = True
            now = f"program {att.prog_id}" if att.prog_id else "nothing"
            log.error(f"the filter on {watched.ifname} was removed or replaced ({now} runs there now); "
                      "this controller leaves it so", extra={"fields": {"iface": watched.ifname,
                                                                         "event": "filter_removed"}})
            self.on_event(watched.ifname, "filter_removed")
