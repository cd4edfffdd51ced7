"""The kernel side: libbpf calls, the ctypes mirror of the C structs, typed maps, the program's build, load, attach and pins. Imports nothing above it."""

from .pyroute2_parts import lazy_package

# Before any module of ours imports a piece of pyroute2 (see pyroute2_parts.py).
lazy_package()
