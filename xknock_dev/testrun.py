"""Running the real program on crafted frames with BPF_PROG_TEST_RUN.

Used by the tests and the benchmarks. A Harness loads the program (by default
built with XK_TEST_CLOCK, so that time is whatever the caller sets), pins its
maps in a private directory and removes them again on close.
"""

import ctypes
import os
import shutil
import uuid

from xknock.controller.kernel import bpfsys, datapath, layout
from xknock.controller.kernel.maps import FilterMaps
from xknock.controller.kernel.ring import Ring
from xknock.controller.policy import policy
from xknock.controller.state import grants

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICT_NAMES = {XDP_ABORTED: "ABORTED", XDP_DROP: "DROP", XDP_PASS: "PASS", XDP_TX: "TX", XDP_REDIRECT: "REDIRECT"}

# A TC build's verdicts (bpf/xknock_hook.h) as the XDP ones they stand for, so
# that one table of cases serves both builds: TC_ACT_UNSPEC (-1, read back as
# an unsigned word), TC_ACT_SHOT, TC_ACT_REDIRECT (the answer sent back).
TC_VERDICTS = {0xFFFFFFFF: XDP_PASS, 2: XDP_DROP, 7: XDP_TX}


# A build whose maps have another layout (bpf/xknock_structs.h): grants with
# two fields of the same size swapped, as another version of xknock might.
OTHER_LAYOUT = "-DXK_TEST_OTHER_LAYOUT"

# The first-step filter and strict mode's slots are cleared between test
# cases; small ones clear fast.
TEST_FIRST_SLOTS = 1 << 16
TEST_RECENT_SLOTS = 1 << 12


class Harness:
    """hook "tc": the TC build (SCHED_CLS), its verdicts read as XDP's."""

    def __init__(self, test_clock=True, cflags=(), pin_dir=None, hook="xdp"):
        self.hook = hook
        if not any(flag.startswith("-DXK_FIRST_SLOTS=") for flag in cflags):
            cflags = [*cflags, f"-DXK_FIRST_SLOTS={TEST_FIRST_SLOTS}"]
        if not any(flag.startswith("-DXK_RECENT_SLOTS=") for flag in cflags):
            cflags = [*cflags, f"-DXK_RECENT_SLOTS={TEST_RECENT_SLOTS}"]
        self.pin_dir = pin_dir or f"{datapath.PIN_ROOT}/test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.loaded = datapath.compile_and_load(self.pin_dir, cflags=cflags, test_clock=test_clock, hook=hook)
            self.maps = FilterMaps.from_prog(self.loaded.prog_id, self.loaded.layout)
            grants.rebuild_granted(self.maps)   # as attach does: the tests run the granted bytes' path
        except BaseException:
            datapath.remove_pins(self.pin_dir)   # a failed start leaves nothing behind
            raise
        self.now_ns = 1_000_000_000_000   # far from zero: no underflow near the start

    @property
    def fd(self):
        return self.loaded.fd

    def close(self):
        self.maps.close()
        datapath.remove_pins(self.pin_dir)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        self.loaded.bpf.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_clock(self, now_ns):
        """The program's clock (test-clock builds only)."""
        went_back = now_ns < self.now_ns
        self.now_ns = now_ns
        control = self.maps.control.lookup(ctypes.c_uint32(0))
        control.test_now_ns = now_ns
        self.maps.control.update(ctypes.c_uint32(0), control)
        if went_back:
            # Copies of grants and list entries (bpf/xknock_hints.h) rely on
            # a clock that never goes back; this one can: none taken before counts after.
            for word in (layout.EPOCH_GRANTS_CONTROLLER, layout.EPOCH_LISTS):
                self.maps.advance_epoch(word)

    def advance(self, seconds):
        self.set_clock(self.now_ns + int(seconds * 1e9))

    def apply(self, config):
        return policy.apply_policy(self.maps, config)

    def verdict(self, retval):
        """The program's return value as an XDP verdict (a TC build's translated)."""
        if self.hook == datapath.TC_MODE:
            return TC_VERDICTS.get(retval, f"TC action {retval}")
        return retval

    def run(self, frame, repeat=1):
        """The verdict (XDP_PASS, XDP_DROP...) for one frame."""
        retval, _, _ = bpfsys.test_run(self.fd, bytes(frame), repeat=repeat)
        return self.verdict(retval)

    def run_out(self, frame, data_out_size=4096):
        """(verdict, the frame as the program left it) of one run."""
        retval, _, out = bpfsys.test_run(self.fd, bytes(frame), data_out_size=data_out_size)
        return self.verdict(retval), out

    def timed(self, frame, repeat):
        """(verdict, mean ns per run) over repeat runs in the kernel."""
        retval, duration, _ = bpfsys.test_run(self.fd, bytes(frame), repeat=repeat)
        return self.verdict(retval), duration

    def counters(self):
        return self.maps.counters_by_reason()

    def reset_state(self):
        """Forget knocks, grants and counters (clean state per case)."""
        for m in (self.maps.progress, self.maps.grants, self.maps.failures, self.maps.bans, self.maps.spa_known):
            for raw in [bytes(k) for k in m.keys()]:
                m.delete(m.key_type.from_buffer_copy(raw))
        for reason in range(layout.COUNTERS):
            self.maps.counters.zero(reason)
        self.drain_events()
        self.drain_events(b"spa_events")
        self.loaded.bpf[b"spa_rate"].clear()
        self.loaded.bpf[b"spa_cpu_rate"].clear()
        self.loaded.bpf[b"icmp_peers"].clear()
        self.loaded.bpf[b"icmp_host"].clear()
        for name, value_type in (("firsts", ctypes.c_uint64), ("recent", layout.Recent)):
            array = getattr(self.maps, name)
            slots = array.max_entries
            bpfsys.map_update_batch(array.fd, (ctypes.c_uint32 * slots)(*range(slots)), (value_type * slots)(), slots)
        self.trust_knocking()
        for key in list(self.maps.seqstats.keys()):
            self.maps.seqstats.update(key, [layout.SeqStats()] * self.maps.seqstats.cpus)

    def trust_knocking(self, since_ns=1):
        """Empty strict mode's `knocking` words (bpf/xknock_strict.h), begun
        at since_ns: 1 (the default) has them trusted from the first packet,
        so that every case runs the words' path; 0 as a new program finds them."""
        fd = self.loaded.bpf[b"knocking"].map_fd
        slots = layout.KNOCKING_SLOTS + 1
        words = (ctypes.c_uint64 * slots)()
        words[layout.KNOCKING_SINCE] = since_ns
        bpfsys.map_update_batch(fd, (ctypes.c_uint32 * slots)(*range(slots)), words, slots)

    def drain_events(self, ring=b"events"):
        """Read and drop whatever a ring buffer holds, so that one case's
        events never fill it for the next (nobody else reads it here)."""
        self.read_ring(ring, lambda data, size: None)

    def spa_candidates(self):
        """[(source ip, port, payload)] the program queued for the controller since the last call."""
        from xknock.controller.kernel.maps import from_addr

        found = []

        def take(data, size):
            event = ctypes.cast(data, ctypes.POINTER(layout.SpaEvent)).contents
            payload = ctypes.string_at(data + layout.SpaEvent.payload.offset, event.len)
            assert size == layout.SpaEvent.payload.offset + event.len, "a record is cut to its payload"
            found.append((from_addr(event.src), event.port, payload))

        self.read_ring(b"spa_events", take)
        return found

    def read_ring(self, name, handle):
        """Consume ring buffer `name` with libbpf, handle(data, size) for each record."""
        ring = Ring(self.loaded.bpf[name].map_fd, handle, budget=1 << 30)
        try:
            ring.poll(0)
        finally:
            ring.close()

    def grants(self):
        """{(source ip, proto name, port): layout.Grant} of everything in the map."""
        from xknock.controller.kernel.maps import from_addr

        return {
            (from_addr(k.src), layout.PROTO_NAMES.get(k.proto, k.proto), k.port): v
            for k, v in self.maps.grants.items()
        }
