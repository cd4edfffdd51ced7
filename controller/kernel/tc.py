"""The TC hook: the filter as a classifier at an interface's ingress, for
interfaces where XDP is not available or not allowed (bpf/xknock_hook.h
builds the same program as tc_knock).

tcx (BPF_TCX_INGRESS, Linux 6.6 and later) when the kernel has it, through
BPF_PROG_ATTACH (libbpf): an attachment, not a link, so that it stays when the
attaching process exits or execs (the controller's hand-over execs), as an
XDP program attached by netlink does, until BPF_PROG_DETACH of that very
program. tcx runs several programs in turn: others attached there are left
alone, ours is appended after them, and a replace takes our program's own
place atomically (BPF_F_REPLACE, refused if it is gone). Kernels without tcx
get a clsact qdisc and a direct-action bpf filter at a priority and handle of
our own (pyroute2); detach removes that filter and leaves the qdisc, which
other filters may use.
"""

import contextlib
import errno
import os
import struct

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import bpfsys

BPF_TCX_INGRESS = 46                # enum bpf_attach_type (Linux 6.6)
INGRESS_PARENT = 0xFFFFFFF2         # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS): clsact's ingress
FILTER_PRIO = 0xC0DE                # our clsact filter's priority and handle: detach finds it by them
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003
LOOPBACK = 1                        # every network namespace's lo
TCA_BPF_ID = 11                     # the program id of a bpf filter (pyroute2 0.9 does not decode it)

_tcx = None


def has_tcx():
    """Does this kernel have tcx? (An attach type it does not know is EINVAL.)"""
    global _tcx
    if _tcx is None:
        try:
            bpfsys.prog_query(LOOPBACK, BPF_TCX_INGRESS)
            _tcx = True
        except bpfsys.BpfError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _tcx = False
    return _tcx


@contextlib.contextmanager
def without_tcx():
    """For the length of the block, this process takes the kernel for one
    without tcx and attaches through clsact: how the suite runs the fallback
    on a kernel that has tcx. No command or setting reaches it."""
    global _tcx
    was = _tcx
    _tcx = False
    try:
        yield
    finally:
        _tcx = was


def programs(ifindex):
    """The ids of the programs at ifindex's TC ingress, in the order they run:
    tcx's, then clsact filters'."""
    found = bpfsys.prog_query(ifindex, BPF_TCX_INGRESS) if has_tcx() else []
    return found + [prog_id for _, prog_id in _clsact_filters(ifindex)]


def attach(ifindex, prog_fd, replace_fd=None):
    """Attach prog_fd at ifindex's ingress; with replace_fd, in that program's
    place. Raises OSError (tcx) or NetlinkError (clsact)."""
    if has_tcx():
        bpfsys.prog_attach(prog_fd, ifindex, BPF_TCX_INGRESS, replace_fd=replace_fd)
        return
    if replace_fd is not None:
        # Checked, then replaced: the kernel takes no expected program here.
        expected = bpfsys.prog_info(replace_fd).id
        if expected not in [prog_id for prio, prog_id in _clsact_filters(ifindex) if prio == FILTER_PRIO]:
            raise OSError(errno.ENOENT, f"program {expected} is no longer at the TC ingress of interface {ifindex}")
    with IPRoute() as ipr:
        with contextlib.suppress(NetlinkError):   # there already: ours or another tool's, shared
            ipr.tc("add", "clsact", ifindex)
        ipr.tc("replace-filter" if replace_fd is not None else "add-filter", "bpf", ifindex, FILTER_HANDLE,
               fd=prog_fd, name="tc_knock", parent=INGRESS_PARENT, prio=FILTER_PRIO, protocol=ETH_P_ALL,
               direct_action=True)


def detach(ifindex, prog_id):
    """Detach program prog_id from ifindex's ingress, and nothing else."""
    if has_tcx() and prog_id in bpfsys.prog_query(ifindex, BPF_TCX_INGRESS):
        fd = bpfsys.prog_fd_by_id(prog_id)
        try:
            bpfsys.prog_detach(fd, ifindex, BPF_TCX_INGRESS)
        finally:
            os.close(fd)
        return
    for prio, found in _clsact_filters(ifindex):
        if found == prog_id:
            with IPRoute() as ipr:
                ipr.tc("del-filter", "bpf", ifindex, FILTER_HANDLE, parent=INGRESS_PARENT, prio=prio,
                       protocol=ETH_P_ALL)
            return
    raise OSError(errno.ENOENT, f"program {prog_id} is not at the TC ingress of interface {ifindex}")


def _clsact_filters(ifindex):
    """[(priority, program id)] of the bpf filters at clsact's ingress."""
    with IPRoute() as ipr:
        try:
            messages = ipr.get_filters(index=ifindex, parent=INGRESS_PARENT)
        except NetlinkError as err:
            if err.code in (errno.EINVAL, errno.ENOENT):   # no clsact qdisc
                return []
            raise
    found = []
    for message in messages:
        options = message.get_attr("TCA_OPTIONS")
        if message.get_attr("TCA_KIND") != "bpf" or options is None:
            continue
        for _, attr in options["attrs"]:
            if isinstance(attr, dict) and attr["header"]["type"] == TCA_BPF_ID and attr["header"]["length"] == 8:
                found.append((message["info"] >> 16, struct.unpack_from("=I", attr.data, attr.offset + 4)[0]))
    return found
