"""Bans: listed, lifted and swept by the controller.

The data path bans a source after too many failed knocks ([ban] in the config)
and removes a ban it finds over; the controller lifts bans on request
(`xknock unban`) and sweeps the ones over that nobody touched again."""

import ipaddress
from dataclasses import dataclass

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
    removed = 0
    with map_lock(maps):
        for raw in [bytes(k) for k in maps.bans.keys()]:
            key = layout.Addr.from_buffer_copy(raw)
            ban = maps.bans.lookup(key)
            if ban is not None and ban.until_ns <= now and maps.bans.delete(key):
                removed += 1
        maps.count_by_controller(layout.Reason.BAN_REMOVED, removed)
    return removed
