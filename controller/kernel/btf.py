"""A map's key and value layout as the compiled program declared it, read
from the map's BTF in the kernel (libbpf through ctypes).

BCC gives every map BTF for its key and value types. A layout here is a
tuple of leaves (dotted name, offset, size), the shape layout.shape() makes
of a ctypes type: structs are opened (arrays of structs index by index),
scalars and arrays of scalars are leaves. So a running program of any
version can be compared with this version's mirror, and read by field name.
"""

import ctypes

from . import bpfsys

# BTF kinds (linux/btf.h) this reader follows
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_ENUM64 = 19
QUALIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT}


class BtfType(ctypes.Structure):
    """struct btf_type: what follows it depends on its kind."""

    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class BtfArray(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("index_type", ctypes.c_uint32), ("nelems", ctypes.c_uint32)]


class NoBtf(Exception):
    """The map carries no BTF (a loader that gave none): its layout is unknown."""


def _declare(lib):
    vp = ctypes.c_void_p
    for name, args, res in (("btf__load_from_kernel_by_id", [ctypes.c_uint32], vp),
                            ("btf__free", [vp], None),
                            ("btf__type_by_id", [vp, ctypes.c_uint32], ctypes.POINTER(BtfType)),
                            ("btf__name_by_offset", [vp, ctypes.c_uint32], ctypes.c_char_p),
                            ("btf__resolve_size", [vp, ctypes.c_uint32], ctypes.c_int64)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


_lib = None


def _libbpf():
    global _lib
    if _lib is None:
        _lib = _declare(bpfsys.lib())
    return _lib


def map_layout(fd):
    """(key leaves, value leaves) of the map open as fd, from its BTF."""
    info = bpfsys.map_info(fd)
    if not info.btf_id or not info.btf_value_type_id:
        raise NoBtf(f"map {info.name.decode()} has no BTF")
    lib = _libbpf()
    btf = lib.btf__load_from_kernel_by_id(info.btf_id)
    if not btf:
        raise NoBtf(f"cannot load BTF {info.btf_id} of map {info.name.decode()}")
    try:
        reader = _Reader(lib, btf)
        key = reader.leaves(info.btf_key_type_id) if info.btf_key_type_id else (("", 0, info.key_size),)
        return key, reader.leaves(info.btf_value_type_id)
    finally:
        lib.btf__free(btf)


class _Reader:
    def __init__(self, lib, btf):
        self.lib, self.btf = lib, btf

    def _type(self, type_id):
        """(kind, btf_type, pointer to what follows it), qualifiers and typedefs resolved."""
        while True:
            ptr = self.lib.btf__type_by_id(self.btf, type_id)
            if not ptr:
                raise NoBtf(f"BTF type {type_id} missing")
            kind = (ptr.contents.info >> 24) & 0x1F
            if kind not in QUALIFIERS:
                return kind, ptr.contents, ctypes.addressof(ptr.contents) + ctypes.sizeof(BtfType)
            type_id = ptr.contents.size_or_type

    def _size(self, type_id):
        size = self.lib.btf__resolve_size(self.btf, type_id)
        if size < 0:
            raise NoBtf(f"BTF type {type_id} has no size")
        return size

    def _name(self, offset):
        return (self.lib.btf__name_by_offset(self.btf, offset) or b"").decode()

    def leaves(self, type_id, prefix="", base=0):
        kind, btype, tail = self._type(type_id)
        if kind in (KIND_STRUCT, KIND_UNION):
            out = []
            bitfields = btype.info >> 31
            for i in range(btype.info & 0xFFFF):
                member = BtfMember.from_address(tail + i * ctypes.sizeof(BtfMember))
                bits = member.offset & 0xFFFFFF if bitfields else member.offset
                name = self._name(member.name_off)
                out += self.leaves(member.type, f"{prefix}{name}.", base + bits // 8)
            return tuple(out)
        if kind == KIND_ARRAY:
            array = BtfArray.from_address(tail)
            element_kind = self._type(array.type)[0]
            if element_kind in (KIND_STRUCT, KIND_UNION):
                step = self._size(array.type)
                return tuple(leaf for i in range(array.nelems)
                             for leaf in self.leaves(array.type, f"{prefix[:-1]}[{i}].", base + i * step))
        return ((prefix[:-1], base, self._size(type_id)),)
