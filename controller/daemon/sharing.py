"""The filter as one slot of libxdp's dispatcher: `xknock attach --priority N`.

The interface then runs libxdp's dispatcher, which calls its programs in the
order of their priorities (lowest first): a packet one of them passes goes on
to the next, any other verdict is final (kernel/libxdp.py). attach joins the
dispatcher, or makes one; attaching again joins the new program and only then
takes the old one's slot out (each step one atomic swap of the dispatcher, so
the interface never runs without a filter: for a moment both run, and a
packet must pass both); detach takes our slot out and leaves the others.
"""

import logging

from ..errors import XknockError
from ..kernel import bpfsys, datapath, libxdp

log = logging.getLogger("xknock")


def wanted(current, priority):
    """Does this attach go through libxdp's dispatcher? With --priority, or
    when the filter already runs in one (attaching again keeps it there)."""
    return priority is not None or any(att.dispatcher for att in current.values())


def check(current, priority):
    """Refuse, before anything is compiled, what cannot share an interface."""
    if priority is not None and not 0 <= priority <= libxdp.MAX_PRIORITY:
        raise XknockError(f"--priority {priority}: libxdp's priorities run from 0 (first) to {libxdp.MAX_PRIORITY}")
    if not libxdp.bpffs_outlives_process():
        raise XknockError(
            f"{datapath.BPFFS} is a bpffs of this process's own (`ip netns exec`?): libxdp pins the dispatcher's "
            "slots there and they would go, and the filter with them, when this process ends. Run from the "
            "host's mount namespace (`nsenter --net=/run/netns/NAME xknock attach ...`)")
    for att in current.values():
        if not att.prog_id or att.dispatcher:
            continue
        if datapath.is_xknock(att):
            raise XknockError(f"{att.ifname} runs xknock on its own, not in libxdp's dispatcher: "
                              f"`xknock detach {att.ifname}` first, or attach again without --priority")
        if not libxdp.is_dispatcher(att.prog_name):
            raise XknockError(
                f"{att.ifname} runs XDP program {att.prog_id} '{att.prog_name}' on its own, not in libxdp's "
                f"dispatcher, which --priority joins: load it through libxdp (xdp-loader, xdp-filter) so that "
                f"`xdp-loader status {att.ifname}` lists it with a priority, or replace it (--replace, "
                "without --priority)")


def component_of(loaded):
    """The program BCC loaded, loaded once more as a slot libxdp can link:
    the same instructions and maps, so the Loaded returned (its fd and id
    the slot's) shares every map with it."""
    insns = loaded.bpf.dump_func(datapath.PROG_NAME.encode())
    fd = libxdp.load_component(loaded.fd, insns, datapath.PROG_NAME)
    return datapath.Loaded(loaded.bpf, fd, bpfsys.prog_info(fd).id, loaded.layout)


def attach_one(att, prog_fd, priority, xdp_mode):
    """Join prog_fd to att's interface; returns (mode, the slot it will
    replace or None). The old slot keeps running until leave_replaced()."""
    if priority is None:
        priority = libxdp.run_priority(att.dispatcher, att.slot) if att.dispatcher else None
        priority = libxdp.DEFAULT_PRIORITY if priority is None else priority
    mode = att.mode if att.prog_id else (None if xdp_mode == "auto" else xdp_mode)
    libxdp.join(att.ifindex, prog_fd, priority, mode)
    now = datapath.attachment(att.ifname)
    if not now.dispatcher:   # libxdp may fall back to attaching alone: not what was asked
        raise XknockError(f"libxdp did not put the filter in a dispatcher on {att.ifname}")
    log.info(f"joined libxdp's dispatcher on {att.ifname} at priority {priority}",
             extra={"fields": {"event": "dispatcher_joined", "iface": att.ifname, "priority": priority,
                               "dispatcher": now.dispatcher}})
    return now.mode, att.prog_id if att.dispatcher else None


def leave_replaced(current, replaced):
    """Once every interface runs the new slot: take the old slots out."""
    for name, old_id in replaced.items():
        att = current[name]
        try:
            libxdp.leave(att.ifindex, old_id, att.mode)
        except XknockError as err:
            log.warning(f"{name}: the old filter's slot {old_id} stays in libxdp's dispatcher beside the new one "
                        f"({err}): remove it with `xdp-loader unload {name} --id {old_id}`",
                        extra={"fields": {"event": "dispatcher_old_slot_kept", "iface": name}})


def roll_back_one(att, new_prog_id):
    """Take a failed attach's new slot out of att's interface (the old one never left)."""
    libxdp.leave(att.ifindex, new_prog_id, None)
