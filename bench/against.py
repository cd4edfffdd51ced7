"""Another revision's data path side by side with this one, on the same maps.

`bench/run datapath --against REV` builds bpf/ as of the git revision REV with
the pin directory of this build's harness: BCC's pinned tables open the
existing pins, so both programs read the same policy, grants and knocks (the
maps the old program has), and every frame runs through both and the floor
in the same rounds. Maps whose layout changed in between cannot be shared:
the build fails and the section says so.
"""

import ctypes
import pathlib
import re
import subprocess
import tempfile

from xknock.controller.kernel import layout
from xknock.controller.policy import hints
from xknock_dev import testrun

_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$')


def revision_source(rev):
    """bpf/xknock.bpf.c of revision rev with its own headers inlined."""
    root = pathlib.Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="xknock-against-") as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "bpf"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        base = pathlib.Path(tmp) / "bpf"
        seen = set()

        def inline(name):
            lines = []
            for line in (base / name).read_text().splitlines():
                match = _INCLUDE.match(line)
                if not match:
                    lines.append(line)
                elif match.group(1) not in seen:
                    seen.add(match.group(1))
                    lines.append(inline(match.group(1)))
            return "\n".join(lines)

        return inline("xknock.bpf.c")


def fill_port_bits(bpf, h):
    """Revisions before port_flags classify ports by port_bits, a bit per
    (bank, transport, port) with an entry in `ports`: a map of their own
    here, written from the shared `ports` so that they see the same policy."""
    try:
        table = bpf[b"port_bits"]
    except KeyError:
        return
    words = {}
    for key, _ in h.maps.ports.items():
        index = (key.bank * layout.PORT_CLASSES + hints.PORT_CLASS[key.proto]) * layout.BITMAP_WORDS + (key.port >> 6)
        words[index] = words.get(index, 0) | 1 << (key.port & 63)
    for index, word in words.items():
        table[ctypes.c_uint32(index)] = ctypes.c_uint64(word)


class Revision:
    """The data path of rev loaded on the maps pinned by harness h."""

    def __init__(self, rev, h):
        from bcc import BPF

        self.rev = rev
        flags = [f'-DXK_PIN_DIR="{h.pin_dir}"', "-DXK_TEST_CLOCK", f"-DXK_FIRST_SLOTS={testrun.TEST_FIRST_SLOTS}",
                 f"-DXK_RECENT_SLOTS={testrun.TEST_RECENT_SLOTS}"]
        self.bpf = BPF(text=revision_source(rev).encode(), cflags=flags)
        self.fd = self.bpf.load_func(b"xdp_knock", BPF.XDP).fd
        fill_port_bits(self.bpf, h)

    def close(self):
        self.bpf.cleanup()
