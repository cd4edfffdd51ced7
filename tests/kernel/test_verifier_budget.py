"""The verifier's budget: the production program must verify in under half of
the kernel's 1M-instruction limit, so that features have room (issue 16). The
counts are printed: a jump shows in every run's output."""

import os
import tempfile

from xknock.controller.kernel import bpfsys, datapath

LIMIT = 1_000_000


def _verified(test_clock):
    directory = tempfile.mkdtemp(prefix="test-verifier-", dir=datapath.BPFFS)
    try:
        loaded = datapath.compile_and_load(directory, test_clock=test_clock)
        try:
            return bpfsys.prog_info(loaded.fd).verified_insns
        finally:
            loaded.bpf.cleanup()
    finally:
        datapath.remove_pins(directory)
        if os.path.isdir(directory):
            os.rmdir(directory)


def test_the_program_verifies_in_under_half_the_limit(capsys):
    production, with_test_clock = _verified(False), _verified(True)
    with capsys.disabled():
        print(f"\n  verified instructions: {production:,} production, {with_test_clock:,} with the test clock "
              f"(limit {LIMIT:,})")
    assert 0 < production < LIMIT // 2, production
    assert with_test_clock < LIMIT, with_test_clock
