"""The kernel side: libbpf calls, the ctypes mirror of the C structs, typed maps, the program's build, load, attach and pins. Imports nothing above it."""
