"""Compiling, loading, attaching and finding the XDP program.

BCC compiles bpf/xknock.bpf.c. Its rewriter only turns `map.lookup()` into
BPF calls in the main file, so our headers are inlined into one text first,
with #line markers so that compiler errors still name the real file and line.

A running filter is found from its interface: netlink gives the program id
(the XDP program, or an xknock program at the TC ingress: kernel/tc.py), the
program's info gives its map ids. Pins under /sys/fs/bpf/xknock/ are made
from those ids whenever they are missing, so a new program re-adopts the maps
(BCC's pinned tables open an existing pin instead of creating a map).
"""

import contextlib
import errno
import os
import stat
import re
import socket
from dataclasses import dataclass
from importlib import resources

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from ..errors import LoadError, XknockError
from . import bpfsys, layout, libxdp, progcache, stamp, tc

# pyroute2 before 0.7.3 (Debian bookworm's python3-pyroute2 is 0.7.2) encodes
# IFLA_XDP_FLAGS as a big-endian u16, which the kernel refuses with ERANGE
# ("Numerical result out of range") for every attach. The kernel reads a
# native u32, as later pyroute2 encodes it: make the field that, whichever
# version is installed (scripts/prove-unit attaches with Debian's).
U32_FIELDS = [("value", "I")]
if ifinfmsg.xdp.xdp_flags.fields != U32_FIELDS:
    ifinfmsg.xdp.xdp_flags.fields = U32_FIELDS

PROG_NAME = "xdp_knock"
TC_PROG_NAME = "tc_knock"   # the same program built for TC (bpf/xknock_hook.h, kernel/tc.py)
TC_MODE = "tc"              # an Attachment's mode when the filter runs at TC ingress
BPFFS = "/sys/fs/bpf"
PIN_ROOT = BPFFS + "/xknock"

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
ATTACHED_MODES = {1: "native", 2: "generic", 3: "offload"}

_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$')


def bpf_source():
    """The program's C text with our own headers inlined."""
    base = resources.files("xknock.bpf")
    seen = set()

    def inline(name):
        path = base / name
        lines = [f'#line 1 "bpf/{name}"']
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = _INCLUDE.match(line)
            if not match:
                lines.append(line)
                continue
            header = match.group(1)
            if header not in seen:
                seen.add(header)
                lines.append(inline(header))
            lines.append(f'#line {number + 1} "bpf/{name}"')
        return "\n".join(lines)

    return inline("xknock.bpf.c")


def ensure_bpffs():
    """Mount bpffs at /sys/fs/bpf when it is not (ip netns exec gives each
    process a fresh /sys without it)."""
    if _is_bpffs(BPFFS):
        return
    import subprocess

    os.makedirs(BPFFS, exist_ok=True)
    # mode=0700: without it bpffs is 1777, and any user could make xknock/
    # first and plant links in it (issue 13.9).
    result = subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", BPFFS], capture_output=True, text=True)
    if result.returncode != 0 or not _is_bpffs(BPFFS):
        raise XknockError(f"cannot mount bpffs at {BPFFS}: {result.stderr.strip() or 'mount failed'}")


def make_private_dirs(directory, root=None):
    """Make directory and every parent below root (PIN_ROOT by default) as
    root's alone: each one a real directory (no link), owned by this user,
    writable by nobody else (fixed to 0700 if it is ours). Anything else
    raises XknockError: a stranger's directory there could hand us another
    filter's maps."""
    root = PIN_ROOT if root is None else root
    relative = os.path.relpath(directory, os.path.dirname(root))
    if relative.startswith("..") or not (relative + os.sep).startswith(os.path.basename(root) + os.sep):
        os.makedirs(directory, mode=0o700, exist_ok=True)   # a test's or benchmark's own place
        return
    path = os.path.dirname(root)
    for part in relative.split(os.sep):
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise XknockError(f"{path} is not a directory (a link?): remove it, xknock makes its own")
        if info.st_uid != os.geteuid():
            raise XknockError(f"{path} belongs to uid {info.st_uid}: remove it (and what is under it); "
                              "xknock makes its own")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, 0o700)


def _is_bpffs(path):
    try:
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == path and line.split()[2] == "bpf" for line in mounts)
    except OSError:
        return False


# The inodes the kernel gives its initial namespaces: the PID namespace's
# since Linux 3.8, the network namespace's in recent kernels (older ones number
# it as any other, from 0xF0000000 up, so this value is never another's).
PROC_PID_INIT_INO = 0xEFFFFFFC
PROC_NET_INIT_INO = 0xEFFFFFF9


def netns_id():
    """The inode of this process's network namespace, or None in the initial
    one. PID 1 is the host's init only in the initial PID namespace: in a
    container's (xknock its entrypoint, or under one) it shares the
    container's network namespace, which must not pass for the initial one,
    or two containers on the host's bpffs would share their pins. Where
    nothing can tell, the namespace is taken as not the initial one."""
    mine = os.stat("/proc/self/ns/net").st_ino
    if mine == PROC_NET_INIT_INO:
        return None
    try:
        if os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO:
            return mine
        initial = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return mine
    return None if mine == initial else mine


def pin_dir(ifnames):
    """Where the maps of a group of interfaces are pinned. Outside the initial
    network namespace the namespace's inode is part of the path, so that two
    namespaces with an `eth0` each never share maps."""
    group = "+".join(ifnames)
    ns = netns_id()
    return f"{PIN_ROOT}/{group}" if ns is None else f"{PIN_ROOT}/netns-{ns}/{group}"


# netns-<inode>/namespace-cookie-<cookie>: which namespace the pins under
# netns-<inode>/ are of. Longer than an interface name can be (15), so never
# taken for an interface group's directory.
NAMESPACE_MARK = "namespace-cookie-"
SO_NETNS_COOKIE = 71   # Linux 5.14; not in Python's socket module


def netns_cookie():
    """This network namespace's cookie, which (unlike its inode number) no
    other namespace is ever given while the system runs; None before 5.14."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return None


def claim_namespace_pins():
    """Make netns-<inode>/ this namespace's before anything in it is adopted,
    and return the group directories removed doing so. A namespace's inode
    number is given to the next namespace once it is gone, while pins outlive
    a namespace deleted with xknock attached: that next namespace would adopt
    their maps, grants and all, on an interface of the same name. So the
    directory carries a marker named after the namespace's cookie, and the
    pins under another cookie's marker, left by a namespace that is gone, are
    removed. Pins from before markers (none there) are taken as this
    namespace's: nothing can tell, and a running filter may be using them."""
    ns, cookie = netns_id(), netns_cookie()
    if ns is None or cookie is None:
        return []
    parent = f"{PIN_ROOT}/netns-{ns}"
    mine = f"{NAMESPACE_MARK}{cookie}"
    entries = os.listdir(parent) if os.path.isdir(parent) else []
    removed = []
    if mine not in entries and any(entry.startswith(NAMESPACE_MARK) for entry in entries):
        for entry in sorted(entries):
            path = os.path.join(parent, entry)
            if entry.startswith(NAMESPACE_MARK):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            elif os.path.isdir(path) and not os.path.islink(path):
                remove_pins(path)
                removed.append(entry)
    if mine not in entries:
        make_private_dirs(os.path.join(parent, mine))
    return removed


def pin_dirs_of_interface(ifname):
    """The pin directories in this network namespace of every group that
    holds ifname (eth0, eth0+eth1, ...), whether anything uses them or not."""
    parent = os.path.dirname(pin_dir([ifname]))
    if not os.path.isdir(parent):
        return []
    return [os.path.join(parent, entry) for entry in sorted(os.listdir(parent))
            if ifname in entry.split("+") and os.path.isdir(os.path.join(parent, entry))]


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    prog_id: int        # 0 when nothing is attached
    mode: str | None    # native, generic, offload
    prog_name: str | None
    dispatcher: int = 0  # libxdp's dispatcher the interface runs, when prog_id is one of its slots
    slot: int = 0        # that slot (the order in which the dispatcher calls it)


def interface_index(ifname):
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise XknockError(f"no such interface: {ifname} (see `ip link`)")
    return found[0]


def attachment(ifname, hook=None):
    """What program, if any, runs on ifname: its XDP program, or, when that
    is not xknock's, xknock's at its TC ingress (mode "tc"). hook "tc": only
    xknock's at the TC ingress (the programs of others there run beside it)."""
    index = interface_index(ifname)
    if hook == TC_MODE:
        return _tc_attachment(ifname, index)
    with IPRoute() as ipr:
        link = ipr.link("get", index=index)[0]
    xdp = link.get_attr("IFLA_XDP")
    prog_id, mode = 0, None
    if xdp is not None:
        prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
        attached = xdp.get_attr("IFLA_XDP_ATTACHED")
        mode = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}.get(attached, attached)
    name = None
    if prog_id:
        with prog_fd(prog_id) as fd:
            name = bpfsys.prog_info(fd).name.decode(errors="replace")
    if prog_id and libxdp.is_dispatcher(name):
        # Sharing the interface: the filter is one of the dispatcher's slots.
        ours = libxdp.component(prog_id, PROG_NAME)
        if ours:
            return Attachment(ifname, index, ours[1], mode, PROG_NAME, dispatcher=prog_id, slot=ours[0])
    found = Attachment(ifname, index, prog_id, mode if prog_id else None, name)
    if is_xknock(found):
        return found
    at_tc = _tc_attachment(ifname, index)
    return at_tc if at_tc.prog_id else found


def _tc_attachment(ifname, index):
    for prog_id in tc.programs(index):
        with contextlib.suppress(OSError), prog_fd(prog_id) as fd:
            if bpfsys.prog_info(fd).name.decode(errors="replace") == TC_PROG_NAME:
                return Attachment(ifname, index, prog_id, TC_MODE, TC_PROG_NAME)
    return Attachment(ifname, index, 0, None, None)


@contextlib.contextmanager
def prog_fd(prog_id):
    """An fd for a loaded program, closed on leaving."""
    fd = bpfsys.prog_fd_by_id(prog_id)
    try:
        yield fd
    finally:
        os.close(fd)


def is_xknock(att):
    return att.prog_id != 0 and att.prog_name in (PROG_NAME, TC_PROG_NAME)


def running_map_ids(prog_id):
    """Map name -> map id for the maps a running xknock program uses."""
    ids = {}
    with prog_fd(prog_id) as fd:
        for map_id in bpfsys.prog_map_ids(fd):
            map_fd = bpfsys.map_fd_by_id(map_id)
            try:
                ids[bpfsys.map_info(map_fd).name.decode()] = map_id
            finally:
                os.close(map_fd)
    return ids


def repin(prog_id, directory):
    """Pin the running program's maps where a new program will look for them,
    replacing pins that point elsewhere."""
    make_private_dirs(directory)
    for name, map_id in running_map_ids(prog_id).items():
        if name not in layout.MAPS:
            continue
        path = os.path.join(directory, name)
        if os.path.exists(path):
            fd = bpfsys.obj_get(path)
            try:
                if bpfsys.map_info(fd).id == map_id:
                    continue
            finally:
                os.close(fd)
            os.unlink(path)
        fd = bpfsys.map_fd_by_id(map_id)
        try:
            bpfsys.obj_pin(fd, path)
        finally:
            os.close(fd)


# An upgrade pins the new program's maps here, inside the pin directory,
# until the swap (bpffs refuses names with dots).
STAGING = "upgrade"


def pinned_names(directory):
    """The names pinned in directory, not its subdirectories (an empty set
    when there is none)."""
    if not os.path.isdir(directory):
        return set()
    return {name for name in os.listdir(directory) if not os.path.isdir(os.path.join(directory, name))}


def remove_pins(directory, keep=()):
    """Remove the pins in directory but those named in keep, and an upgrade's
    staging pins under it, then the directory (and netns-<ino>/) when nothing
    is left in it. Returns the names removed."""
    removed = [f"{STAGING}/{name}" for name in remove_pins(os.path.join(directory, STAGING))] \
        if STAGING not in keep and os.path.isdir(os.path.join(directory, STAGING)) else []
    for name in sorted(pinned_names(directory) - set(keep)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    with contextlib.suppress(OSError):
        os.rmdir(directory)
        parent = os.path.dirname(directory)
        left = os.listdir(parent)
        if os.path.basename(parent).startswith("netns-") and all(e.startswith(NAMESPACE_MARK) for e in left):
            for entry in left:   # netns-<ino>/ holds no group any more: its marker goes too
                os.rmdir(os.path.join(parent, entry))
        os.rmdir(parent)
    return removed


def move_pins(source, directory):
    """Pin the maps pinned in source in directory instead, replacing what is
    pinned there under the same names, and remove source. A move cut short
    leaves pins of both in directory: the next attach's repin() puts right
    those that point elsewhere."""
    make_private_dirs(directory)
    names = pinned_names(source)
    for name in sorted(names):
        fd = bpfsys.obj_get(os.path.join(source, name))
        try:
            target = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            bpfsys.obj_pin(fd, target)
        finally:
            os.close(fd)
    remove_pins(source)
    remove_pins(directory, keep=names)   # maps the new version no longer has


@dataclass
class Loaded:
    """A loaded program: compiled here (keep the BCC object alive while in
    use), or opened by id in a controller that never loads BCC (bpf None)."""

    bpf: object
    fd: int
    prog_id: int
    layout: int         # the layout stamp of its maps

    def map_fd(self, name):
        """An fd of the program's map `name` (its ring buffers too), valid while this is."""
        if self.bpf is not None:
            return self.bpf[name.encode()].map_fd
        fds = self.__dict__.setdefault("_map_fds", {})
        if name not in fds:
            ids = running_map_ids(self.prog_id)
            if name not in ids:
                raise XknockError(f"program {self.prog_id} has no map {name}: is it xknock's?")
            fds[name] = bpfsys.map_fd_by_id(ids[name])
        return fds[name]


def open_loaded(prog_id):
    """The running program prog_id as a Loaded, without BCC: what a controller
    needs of it (its fd, its maps by name)."""
    return open_loaded_fd(bpfsys.prog_fd_by_id(prog_id))


def compile_and_load(directory, cflags=(), test_clock=False, reuse=False, hook="xdp"):
    """Compile the program with its maps pinned in directory (existing pins are
    re-adopted) and load it, for the XDP hook or (hook "tc") as a TC
    classifier. With reuse, the XDP program a previous attach kept in
    directory for the same source, flags, BCC and kernel is re-used instead
    (kernel/progcache.py: no compiler, no BCC), and the one compiled is kept
    for the next; a TC program is compiled every time. Raises XknockError
    with what to do next."""
    ensure_bpffs()
    make_private_dirs(directory)
    check_pinned_layout(directory)
    flags = [*cflags, *(["-DXK_TEST_CLOCK"] if test_clock else []), *(["-DXK_TC"] if hook == TC_MODE else [])]
    source = bpf_source()
    reuse = reuse and hook != TC_MODE
    if reuse:
        wanted = progcache.key(source, flags)
        fd = progcache.find(directory, wanted, PROG_NAME)
        if fd is not None:
            return open_loaded_fd(fd)
    loaded = _compile(directory, source, flags, hook)
    if reuse:
        progcache.keep(directory, wanted, loaded.fd)
    return loaded


def open_loaded_fd(fd):
    """A Loaded of the program open as fd (kept: closed with the process)."""
    info = bpfsys.prog_info(fd)
    control = bpfsys.map_fd_by_id(running_map_ids(info.id)["control"])
    try:
        built = stamp.read(control)
    finally:
        os.close(control)
    return Loaded(None, fd, info.id, built)


def _compile(directory, source, flags, hook):
    """BCC's compile and load of source, its maps pinned in directory, stamped."""
    # bcc here, not at the top: importing it takes a while (it loads libbcc
    # and LLVM), and only attach compiles; status, grant, knock... never do.
    try:
        from bcc import BPF
    except ImportError as err:
        raise LoadError(
            "BCC's Python module is missing: install python3-bpfcc and use a venv made with "
            "--system-site-packages (scripts/setup does both)"
        ) from err
    name, kind = (TC_PROG_NAME, BPF.SCHED_CLS) if hook == TC_MODE else (PROG_NAME, BPF.XDP)
    try:
        bpf = BPF(text=source.encode(), cflags=[f'-DXK_PIN_DIR="{directory}"', *flags])
        fn = bpf.load_func(name.encode(), kind)
    except Exception as err:   # BCC raises bare Exception for every failure
        raise LoadError(_explain_bcc_failure(err, directory)) from err
    fds = {name: bpf[name.encode()].map_fd for name in layout.MAPS}
    built = stamp.of_maps(fds)
    if stamp.read(fds["control"]) != built:
        stamp.write(fds["control"], built)
    return Loaded(bpf, fn.fd, bpfsys.prog_info(fn.fd).id, built)


def check_pinned_layout(directory):
    """BCC re-adopts a pinned map by name whatever its layout; maps of another
    layout would then be misread. Refuse, saying what to do."""
    fds = stamp.open_pins(directory)
    try:
        if not fds or stamp.of_filter(fds) == layout.fingerprint():
            return
    finally:
        stamp.close_all(fds)
    raise XknockError(
        f"the maps pinned in {directory} have another layout than this version of xknock's: another "
        "version made them. If a filter runs with them, `xknock attach` carries its state over; if none "
        "does, `xknock detach IFACE` removes them")


def running_layout(prog_id):
    """The layout stamp of a running program's maps (stamp.of_filter)."""
    fds = {name: bpfsys.map_fd_by_id(map_id) for name, map_id in running_map_ids(prog_id).items()
           if name in layout.MAPS}
    try:
        return stamp.of_filter(fds)
    finally:
        stamp.close_all(fds)


def _kernel_headers_missing():
    """Where BCC looks for headers, none is there (it then fails to compile
    with a chdir error on stderr, not in its exception)."""
    build = f"/lib/modules/{os.uname().release}/build"
    return not (os.path.isdir(build) or os.environ.get("BCC_KERNEL_SOURCE")
                or os.path.exists("/sys/kernel/kheaders.tar.xz"))


def _explain_bcc_failure(err, directory):
    text = str(err)
    if "kernel headers" in text or _kernel_headers_missing():
        return ("BCC cannot find kernel headers: install linux-headers-$(uname -r), or run scripts/setup, "
                "which falls back to the distribution's headers")
    if "Failed to compile" in text:
        return f"compiling the XDP program failed: {text} (see the compiler output above)"
    if "pinned" in text.lower() or "Invalid argument" in text and "map" in text.lower():
        return (f"the maps pinned in {directory} do not fit this version of xknock: "
                f"run `xknock detach` (which removes them) and attach again")
    return f"loading the XDP program failed: {text}"


def xdp_attach(ifindex, prog_fd, mode, replace_fd=None):
    """Attach prog_fd in mode ('native' or 'generic', or 'tc': at the TC
    ingress, kernel/tc.py). With replace_fd the swap is atomic and fails if
    anything else was attached meanwhile."""
    if mode == TC_MODE:
        return tc.attach(ifindex, prog_fd, replace_fd=replace_fd)
    flags = MODE_FLAGS[mode]
    attrs = [("IFLA_XDP_FD", prog_fd)]
    if replace_fd is not None:
        flags |= XDP_FLAGS_REPLACE
        attrs.append(("IFLA_XDP_EXPECTED_FD", replace_fd))
    else:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    attrs.append(("IFLA_XDP_FLAGS", flags))
    with IPRoute() as ipr:
        ipr.link("set", index=ifindex, xdp={"attrs": attrs})


def xdp_detach(ifindex, mode):
    """Detach the XDP program, or in mode 'tc' xknock's at the TC ingress (only those)."""
    if mode == TC_MODE:
        for prog_id in tc.programs(ifindex):
            with prog_fd(prog_id) as fd:
                if bpfsys.prog_info(fd).name.decode(errors="replace") == TC_PROG_NAME:
                    tc.detach(ifindex, prog_id)
        return
    flags = MODE_FLAGS.get(mode, 0)
    with IPRoute() as ipr:
        ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})


def netlink_reason(err):
    """A short human reason for a NetlinkError from an XDP attach."""
    code = err.code if isinstance(err, NetlinkError) else getattr(err, "errno", 0)
    if code == errno.EOPNOTSUPP:
        return "the driver does not support this XDP mode"
    if code == errno.EBUSY or code == errno.EEXIST:
        return "another XDP program is attached (in this or another mode)"
    return os.strerror(code) if code else str(err)


def attached_filters():
    """Every interface of this network namespace that runs xknock, grouped by
    filter: [(control map id, [Attachment, ...])]."""
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    groups = {}
    for name in names:
        with contextlib.suppress(XknockError, NetlinkError, OSError):
            att = attachment(name)
            if is_xknock(att):
                control = running_map_ids(att.prog_id).get("control")
                groups.setdefault(control, []).append(att)
    return sorted(groups.items(), key=lambda item: item[1][0].ifname)
