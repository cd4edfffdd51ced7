"""Attaching, re-adopting and detaching a filter, and finding a running one.

The attached program is the truth about what runs: every function here starts
from the interface, so it works from any mount namespace and after pins are
gone. Attaching validates the config and writes the policy into the new
program's maps before the program sees a packet; attaching again replaces the
program atomically and keeps every grant and knock in progress.
"""

import contextlib
import logging
import os
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from ..errors import LoadError, XknockError
from ..kernel import bpfsys, datapath, layout, libxdp
from ..kernel.maps import FilterMaps
from ..policy import policy
from ..state import carry, grants
from . import sharing

log = logging.getLogger("xknock")

XDP_MODES = ("auto", "native", "generic")
HOOKS = ("xdp", "tc")   # tc: the same program as a TC classifier (kernel/tc.py), where XDP cannot run


def require_root():
    if os.geteuid() != 0:
        raise XknockError("must run as root: xknock loads XDP programs and opens BPF maps")


@dataclass
class Attached:
    """The outcome of attach(): keep `loaded` alive while the controller runs."""

    loaded: datapath.Loaded
    maps: FilterMaps
    pin_dir: str
    modes: dict          # ifname -> native/generic
    replaced: dict       # ifname -> old program id, where one was replaced


def attach(ifnames, config, xdp_mode="auto", force=False, before_attach=None, cflags=(), hook=None,
           priority=None):
    """Attach one filter, sharing one set of maps, to every interface in
    ifnames: all of them or, when one fails, none (each is put back as it was).
    hook: "xdp" or "tc"; None keeps the hook of the filter running there
    (xdp where none runs).
    before_attach(maps) runs once the policy is written and before any
    interface is touched; raising there attaches nothing. cflags: extra
    compiler flags, such as -DXK_PROGRESS_ENTRIES=... (benchmarks); the CLI
    passes none. priority: join libxdp's dispatcher at that priority
    (daemon/sharing.py); a filter already in one stays there either way."""
    require_root()
    if xdp_mode not in XDP_MODES:
        raise XknockError(f"--xdp-mode must be one of {', '.join(XDP_MODES)}")
    repeated = sorted({name for name in ifnames if ifnames.count(name) > 1})
    if repeated:
        raise XknockError(f"{', '.join(repeated)} named twice")
    current = {name: datapath.attachment(name) for name in ifnames}
    hook, xdp_mode, current = _choose_hook(hook, xdp_mode, current)
    share = sharing.wanted(current, priority)
    if share:
        sharing.check(current, priority)
    foreign = [a for a in current.values() if a.prog_id and not datapath.is_xknock(a) and not share]
    if foreign and not force:
        names = ", ".join(f"{a.ifname} (program {a.prog_id} '{a.prog_name}')" for a in foreign)
        join = " (or --priority N to join libxdp's dispatcher)" if any(
            a.prog_name == "xdp_dispatcher" for a in foreign) else ""
        raise XknockError(f"another XDP program is attached to {names}: detach it, or pass --replace to replace "
                          f"it{join}")
    for att in current.values():
        if att.prog_id and xdp_mode != "auto" and att.mode != xdp_mode:
            raise XknockError(
                f"{att.ifname} runs a program in {att.mode} mode; detach it before attaching in {xdp_mode} mode"
            )
    ours = {a.ifname: a for a in current.values() if datapath.is_xknock(a)}
    adopted_from = _single_filter(ours)

    directory = datapath.pin_dir(sorted(ifnames))
    datapath.ensure_bpffs()
    stale = datapath.claim_namespace_pins()
    if stale:
        log.warning(f"removed the pins of {', '.join(stale)} left in {os.path.dirname(directory)} by a network "
                    "namespace that is gone (the kernel gave its number to this one): their grants, bans and "
                    "knocks were never this namespace's")
    steps = _Steps(ifnames, current, config, xdp_mode, before_attach, cflags, share, priority)
    if adopted_from and datapath.running_layout(adopted_from) != layout.fingerprint():
        attached = _upgrade(steps, adopted_from, directory)
    else:
        attached = steps.run(directory, adopt=adopted_from)
    if share:
        sharing.leave_replaced(current, attached.replaced)
    # Once this program is the only writer: grants another version's program
    # wrote up to the swap are in the map, and the scan finds them.
    grants.rebuild_granted(attached.maps)
    return attached


def _choose_hook(hook, xdp_mode, current):
    """(hook, mode to attach in, what runs at that hook): re-attaching keeps
    the hook that runs, a change of hook is refused (detach first)."""
    if hook not in (None, *HOOKS):
        raise XknockError(f"--hook must be one of {', '.join(HOOKS)}")
    running = {a.ifname: "tc" if a.mode == datapath.TC_MODE else "xdp"
               for a in current.values() if datapath.is_xknock(a)}
    hook = hook or next(iter(running.values()), "xdp")
    for name, was in sorted(running.items()):
        if was != hook:
            raise XknockError(f"{name} runs xknock at the {was} hook; detach it before attaching at the {hook} hook")
    if hook == "xdp":
        return hook, xdp_mode, current
    if xdp_mode != "auto":
        raise XknockError(f"--xdp-mode {xdp_mode} is for the xdp hook and this filter is at the tc hook: "
                          "leave --xdp-mode out")
    return hook, datapath.TC_MODE, {name: datapath.attachment(name, hook=datapath.TC_MODE) for name in current}


@dataclass
class _Steps:
    """Load, write the policy, check, swap: what every attach does, with
    every pin it made removed and every interface put back when one fails."""

    ifnames: list
    current: dict
    config: object
    xdp_mode: str
    before_attach: object
    cflags: tuple
    share: bool = False     # through libxdp's dispatcher (daemon/sharing.py)
    priority: int | None = None

    def run(self, directory, adopt=None, carry_in=None):
        """adopt: the program id whose maps the new program re-adopts (same
        layout); carry_in(maps): fills the new maps before anything is checked
        or attached (an upgrade)."""
        pinned_before = datapath.pinned_names(directory)
        maps, done = None, []
        try:
            if adopt:
                datapath.repin(adopt, directory)
            hook = "tc" if self.xdp_mode == datapath.TC_MODE else "xdp"
            loaded = datapath.compile_and_load(directory, cflags=self.cflags, reuse=True, hook=hook)
            if self.share:
                loaded = sharing.component_of(loaded)
            maps = FilterMaps.from_prog(loaded.prog_id, loaded.layout)
            modes, replaced = {}, {}
            policy.apply_policy(maps, self.config)
            if carry_in:
                carry_in(maps)
            if self.before_attach:
                self.before_attach(maps)
            for name in self.ifnames:
                if self.share:
                    modes[name], replaced_id = sharing.attach_one(self.current[name], loaded.fd, self.priority,
                                                                  self.xdp_mode)
                else:
                    modes[name], replaced_id = _attach_one(self.current[name], loaded.fd, self.xdp_mode)
                done.append(name)
                if replaced_id:
                    replaced[name] = replaced_id
        except BaseException:
            if done:
                _roll_back(done, self.current, loaded)
            if maps:
                maps.close()
            # A refused attach leaves no pin of its own behind (firsts alone is 16 MiB).
            datapath.remove_pins(directory, keep=pinned_before)
            raise
        return Attached(loaded, maps, directory, modes, replaced)


def _upgrade(steps, old_prog_id, directory):
    """Replace a filter whose maps have another layout: the new program gets
    maps of its own (pinned aside until the swap), the old filter's state is
    carried into them (state/carry.py), then the program is swapped
    atomically. Until the swap the old filter runs untouched, and any failure
    leaves it so; after it, what the old program wrote meanwhile is carried
    too, its counts added, and the new maps take the old pins' place."""
    staging = os.path.join(directory, datapath.STAGING)
    datapath.remove_pins(staging)   # a killed upgrade's
    with carry.OldFilter(old_prog_id) as old:
        carried = {}

        def carry_in(maps):
            # Locked from the first copy to the last (not while compiling): a
            # revoke meanwhile would be lost, a grant would wait.
            old.lock()
            carried.update(old.carry_keyed(maps))

        attached = steps.run(staging, carry_in=carry_in)
        late = {}   # the swap is done: from here on a failure is a warning, never a rollback
        try:
            late = old.carry_keyed(attached.maps, only_missing=True)
            old.add_counts(attached.maps)
        except (XknockError, OSError) as err:
            log.warning(f"after the upgrade's swap, carrying what the old program wrote meanwhile failed: {err}")
    log.info("carried the old filter's state into maps of the new layout: " +
             ", ".join(f"{name} {carried[name] + late.get(name, 0)}" for name in carry.KEYED) +
             "; knocks in progress start again")
    try:
        datapath.move_pins(staging, directory)
        attached.pin_dir = directory
    except (XknockError, OSError) as err:
        attached.pin_dir = staging
        log.warning(f"the new maps stay pinned in {staging}: moving them to {directory} failed: {err}")
    return attached


def _roll_back(done, current, loaded):
    """Put interfaces attached by a failed attach() back as they were."""
    new_fd = loaded.fd
    for name in done:
        before = current[name]
        try:
            if before.dispatcher or datapath.attachment(name).dispatcher:
                sharing.roll_back_one(before, loaded.prog_id)
            elif before.prog_id:
                with datapath.prog_fd(before.prog_id) as old_fd:
                    datapath.xdp_attach(before.ifindex, old_fd, before.mode, replace_fd=new_fd)
            else:
                datapath.xdp_detach(before.ifindex, datapath.attachment(name).mode)
        except (NetlinkError, OSError, XknockError) as err:
            log.error(f"could not restore {name} after a failed attach: {err}; check it with `xknock status`")


def _single_filter(ours):
    """The program id to re-adopt maps from, refusing to merge two filters."""
    by_control = {}
    for att in ours.values():
        maps_ids = datapath.running_map_ids(att.prog_id)
        by_control.setdefault(maps_ids.get("control"), att)
    if len(by_control) > 1:
        names = ", ".join(a.ifname for a in ours.values())
        raise XknockError(
            f"{names} run separate xknock filters with their own maps; attach them one group at a time, "
            "or detach them first to share one set of maps"
        )
    return next(iter(by_control.values())).prog_id if by_control else None


def _attach_one(att, prog_fd, xdp_mode):
    """Attach to one interface; returns (mode, replaced program id or None)."""
    if att.prog_id:
        mode = att.mode
        with datapath.prog_fd(att.prog_id) as old_fd:
            try:
                datapath.xdp_attach(att.ifindex, prog_fd, mode, replace_fd=old_fd)
            except (NetlinkError, OSError) as err:
                raise LoadError(f"replacing the program on {att.ifname} failed: {datapath.netlink_reason(err)}")
        return mode, att.prog_id
    tried = ["native", "generic"] if xdp_mode == "auto" else [xdp_mode]
    reasons = []
    for mode in tried:
        try:
            datapath.xdp_attach(att.ifindex, prog_fd, mode)
            return mode, None
        except (NetlinkError, OSError) as err:
            reasons.append(f"{mode}: {datapath.netlink_reason(err)}")
    raise LoadError(f"attaching to {att.ifname} failed ({'; '.join(reasons)})")


def adopt(ifnames, prog_id, pin_dir, modes):
    """The Attached of a filter this command attached before it handed over
    to a process of its own without BCC (cli/attach.py): prog_id must still
    run on every interface of ifnames."""
    require_root()
    for name in ifnames:
        att = datapath.attachment(name)
        if att.prog_id != prog_id:
            now = f"program {att.prog_id}" if att.prog_id else "nothing"
            raise XknockError(f"the filter attached to {name} a moment ago (program {prog_id}) is gone, {now} "
                              "runs there: attach again")
    loaded = datapath.open_loaded(prog_id)
    return Attached(loaded, FilterMaps.from_prog(prog_id, loaded.layout), pin_dir, dict(modes), {})


def running_xknock(ifname):
    """The Attachment of the xknock filter on ifname, or an error saying what runs there."""
    att = datapath.attachment(ifname)
    if not att.prog_id:
        raise XknockError(f"no XDP program on {ifname}: attach one with `xknock attach {ifname}`")
    if not datapath.is_xknock(att):
        raise XknockError(f"{ifname} runs XDP program {att.prog_id} '{att.prog_name}', not xknock: not touching it")
    return att


def open_filter(ifname):
    """The maps of the xknock filter running on ifname."""
    require_root()
    return FilterMaps.from_prog(running_xknock(ifname).prog_id)


@dataclass
class Detached:
    """The outcome of detach(): the program detached (None when there was
    none) and the leftover pin directories removed, {directory: [names]}."""

    attachment: datapath.Attachment | None
    leftover_pins: dict


def detach(ifname):
    """Detach xknock from ifname; remove its pins when no other interface of
    this namespace still uses its maps. With no program on ifname, remove the
    pins a filter of ifname left behind (a refused or killed attach, a
    program removed with `ip link`), which nothing else can remove."""
    require_root()
    att = datapath.attachment(ifname)
    if not att.prog_id:
        removed = remove_leftover_pins(ifname)
        if not removed:
            raise XknockError(f"no XDP program on {ifname} and no pins left by one: nothing to detach")
        return Detached(None, removed)
    _detach_program(running_xknock(ifname))
    return Detached(att, {})


def remove_leftover_pins(ifname):
    """Remove the pin directories of ifname's groups (eth0, eth0+eth1...) in
    this namespace whose maps no attached filter uses: {directory: [names]}."""
    used = {control for control, _ in datapath.attached_filters()}
    removed = {}
    for directory in datapath.pin_dirs_of_interface(ifname):
        if _pinned_control_id(directory) in used:
            continue
        names = datapath.remove_pins(directory)
        if names:
            removed[directory] = names
    return removed


def _pinned_control_id(directory):
    """The id of the control map pinned in directory, or None."""
    with contextlib.suppress(OSError):
        fd = bpfsys.obj_get(os.path.join(directory, "control"))
        try:
            return bpfsys.map_info(fd).id
        finally:
            os.close(fd)
    return None


def _detach_program(att):
    """Detach att's program; remove its pins unless another interface uses its maps."""
    control = datapath.running_map_ids(att.prog_id).get("control")
    try:
        if att.dispatcher:
            libxdp.leave(att.ifindex, att.prog_id, att.mode)   # the dispatcher's other programs stay
        else:
            datapath.xdp_detach(att.ifindex, att.mode)
    except (NetlinkError, OSError) as err:
        raise XknockError(f"detaching from {att.ifname} failed: {datapath.netlink_reason(err)}")
    still_used = any(control == cid for cid, _ in datapath.attached_filters())
    if not still_used:
        for directory in _pin_dirs_of(control):
            datapath.remove_pins(directory)


def _pin_dirs_of(control_map_id):
    """Pin directories (in this mount namespace) whose control map is this one."""
    found = []
    if not os.path.isdir(datapath.PIN_ROOT):
        return found
    candidates = []
    for entry in os.listdir(datapath.PIN_ROOT):
        path = os.path.join(datapath.PIN_ROOT, entry)
        if entry.startswith("netns-") and os.path.isdir(path):
            candidates += [os.path.join(path, sub) for sub in os.listdir(path)]
        else:
            candidates.append(path)
    return [directory for directory in candidates if _pinned_control_id(directory) == control_map_id]
