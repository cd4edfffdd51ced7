"""xdp-tools' xdp-filter, loaded from its packaged object with libbpf (ctypes),
as a reference point: a stateless port filter doing one array lookup per packet.

We use xdpfilt_alw_tcp.o ("allow" policy, TCP ports only): packets pass unless
they match a rule, and a rule "dst tcp port 22" drops them, the closest
stateless analogue of a guarded port. No pins are made (we clear the maps'
LIBBPF_PIN_BY_NAME paths), so a real xdp-filter on this host is not touched.
"""

import ctypes
import glob
import socket

from xknock.controller.kernel import bpfsys

OBJECT_GLOBS = ("/usr/lib/*/bpf/xdpfilt_alw_tcp.o", "/usr/lib/bpf/xdpfilt_alw_tcp.o")
PROGRAM = b"xdpfilt_alw_tcp"
# xdp-filter/common_kern_user.h
MAP_FLAG_DST = 1 << 1
MAP_FLAG_TCP = 1 << 2


class Unavailable(Exception):
    """xdp-filter cannot be loaded here; the message says why."""


def object_path():
    for pattern in OBJECT_GLOBS:
        found = glob.glob(pattern)
        if found:
            return found[0]
    raise Unavailable("xdpfilt_alw_tcp.o not found: apt-get install xdp-tools")


def _declare(lib):
    vp = ctypes.c_void_p
    for name, args, res in [
        ("bpf_object__open_file", [ctypes.c_char_p, vp], vp),
        ("bpf_object__load", [vp], ctypes.c_int),
        ("bpf_object__close", [vp], None),
        ("bpf_object__next_map", [vp, vp], vp),
        ("bpf_object__find_map_by_name", [vp, ctypes.c_char_p], vp),
        ("bpf_object__find_program_by_name", [vp, ctypes.c_char_p], vp),
        ("bpf_map__set_pin_path", [vp, ctypes.c_char_p], ctypes.c_int),
        ("bpf_map__name", [vp], ctypes.c_char_p),
        ("bpf_map__fd", [vp], ctypes.c_int),
        ("bpf_program__fd", [vp], ctypes.c_int),
        ("libbpf_get_error", [vp], ctypes.c_long),
    ]:
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res


class XdpFilter:
    def __init__(self):
        lib = bpfsys.lib()
        _declare(lib)
        self.lib = lib
        path = object_path()
        self.obj = lib.bpf_object__open_file(path.encode(), None)
        if not self.obj or lib.libbpf_get_error(self.obj):
            raise Unavailable(f"libbpf could not open {path}")
        self.map_names = []
        m = lib.bpf_object__next_map(self.obj, None)
        while m:
            self.map_names.append(lib.bpf_map__name(m).decode())
            lib.bpf_map__set_pin_path(m, None)   # no pins under /sys/fs/bpf
            m = lib.bpf_object__next_map(self.obj, m)
        ret = lib.bpf_object__load(self.obj)
        if ret:
            self.close()
            raise Unavailable(f"libbpf could not load {path}: error {ret}")
        prog = lib.bpf_object__find_program_by_name(self.obj, PROGRAM)
        if not prog:
            self.close()
            raise Unavailable(f"{path} has no program {PROGRAM.decode()}")
        self.fd = lib.bpf_program__fd(prog)
        self.ports_fd = lib.bpf_map__fd(lib.bpf_object__find_map_by_name(self.obj, b"filter_ports"))

    def drop_dst_tcp_port(self, port):
        """The rule `xdp-filter port PORT -m dst -p tcp`: the key is the port as
        it sits in the TCP header (network order), the value flags per CPU."""
        key = ctypes.c_uint32(socket.htons(port))
        values = (ctypes.c_uint64 * bpfsys.possible_cpus())(*[MAP_FLAG_DST | MAP_FLAG_TCP] * bpfsys.possible_cpus())
        bpfsys.map_update(self.ports_fd, key, values)

    def close(self):
        if self.obj:
            self.lib.bpf_object__close(self.obj)
            self.obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
