"""Bans: listed, written, lifted and swept by the controller.

The data path bans a source after too many failed knocks ([ban] in the config)
and removes a ban it finds over; the controller bans a source on request
(`xknock ban`), lifts bans (`xknock unban`) and sweeps the ones over that
nobody touched again."""

import ctypes
import ipaddress
from dataclasses import dataclass

from ..config import BAN_SCOPES
from ..errors import XknockError
from ..kernel import layout
from ..kernel.clock import monotonic_ns
from ..kernel.lock import map_lock
from ..kernel.maps import from_addr, to_addr


@dataclass
class BanView:
    source: object
    left_s: float      # how much longer the ban lasts
    since_s: float     # how long ago it started


def list_bans(maps, now=None):
    now = monotonic_ns() if now is None else now
    views = [
        BanView(from_addr(key), max(0, ban.until_ns - now) / 1e9, max(0, now - ban.since_ns) / 1e9)
        for key, ban in maps.bans.items()
        if ban.until_ns > now
    ]
    return sorted(views, key=lambda b: str(b.source))


def ban(maps, source, for_ns, now=None):
    """Ban source for for_ns from now, as the data path bans after failed
    knocks (on the ports the live [ban] scope says). A ban already there is
    lengthened or shortened to end then. Returns whether source was banned
    already. XknockError when the live policy has no [ban]: the data path
    would ignore the entry."""
    settings = maps.settings.lookup(ctypes.c_uint32(maps.active_bank()))
    if settings is None or not settings.flags & layout.SET_BANS:
        raise XknockError("the live policy has no [ban]: the filter reads no bans, so this one would do nothing; "
                          "add a [ban] table to the config and reload it (docs/configuration.md, [ban])")
    now = monotonic_ns() if now is None else now
    key = to_addr(ipaddress.ip_address(source))
    with map_lock(maps):
        old = maps.bans.lookup(key)
        already = old is not None and old.until_ns > now
        maps.bans.update(key, layout.Ban(until_ns=now + for_ns, since_ns=old.since_ns if already else now))
        if not already:
            # an entry over but still there was counted issued once: the sweep counts it removed
            maps.count_by_controller(layout.Reason.BAN_OPERATOR, 1 if old is None else 0)
    return already


def ban_scope(maps):
    """The live [ban] scope, as the config names it ("all", "knock")."""
    settings = maps.settings.lookup(ctypes.c_uint32(maps.active_bank()))
    names = {number: name for name, number in BAN_SCOPES.items()}
    return names.get(settings.ban_scope if settings is not None else layout.BAN_EVERYWHERE, "all")


def unban(maps, source):
    """Lift the ban of source and forget its failures. Returns whether it was banned."""
    key = to_addr(ipaddress.ip_address(source))
    with map_lock(maps):
        maps.failures.delete(key)
        removed = maps.bans.delete(key)
        maps.count_by_controller(layout.Reason.BAN_REMOVED, int(removed))
    return removed


def expire_bans(maps, now=None):
    """Delete bans that are over. Returns how many."""
    now = monotonic_ns() if now is None else now
    over = [key for key, ban in maps.bans.items() if ban.until_ns <= now]
    removed = 0
    with map_lock(maps):
        for key in over:
            ban = maps.bans.lookup(key)     # again: the data path may have banned the source anew
            if ban is not None and ban.until_ns <= now and maps.bans.delete(key):
                removed += 1
        maps.count_by_controller(layout.Reason.BAN_REMOVED, removed)
    return removed


class FullBansWatch:
    """A full bans map, noticed from the counters: the data path counts every
    ban it could not write (BAN_FAILED) and changes nothing else, so nobody is
    unbanned for it. check() says so once per episode (until a ban is written
    again) and sweeps the bans that ended at once: spoofed sources never come
    back to remove theirs, and their room is what new bans need."""

    def __init__(self, maps):
        self.maps = maps
        self.failed = maps.counters.total(layout.Reason.BAN_FAILED)
        self.issued = maps.counters.total(layout.Reason.BAN_ISSUED)
        self.full = False

    def check(self, now=None):
        """A warning to log when bans began to fail since the last check
        (once per episode), else None."""
        failed = self.maps.counters.total(layout.Reason.BAN_FAILED)
        issued = self.maps.counters.total(layout.Reason.BAN_ISSUED)
        refused, written = failed - self.failed, issued - self.issued
        self.failed, self.issued = failed, issued
        if not refused:
            if written:
                self.full = False   # a ban was written: there is room again
            return None
        if self.full:
            return None
        self.full = True
        swept = expire_bans(self.maps, now)
        return (f"the bans map is full ({self.maps.bans.max_entries} entries): {refused} ban(s) could not be written "
                f"and those sources are not banned (nobody was unbanned for them); {swept} ended ban(s) swept to make "
                "room. Whoever knows a first step can fill it from spoofed sources (docs/threat-model.md); "
                "shorten [ban] for, or build with a larger XK_BAN_ENTRIES")
