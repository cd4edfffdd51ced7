"""What the benchmarks share: medians, interleaved rounds, the machine, results files."""

import datetime
import os
import platform
import statistics
import sys

# Tests point this elsewhere, so that a smoke run never overwrites the published numbers.
RESULTS_DIR = os.environ.get("XKNOCK_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median(values):
    return statistics.median(values)


def interleaved(variants, rounds, measure):
    """Run measure(variant) for every variant in turn (A B C A B C ...), rounds
    times; returns {name: [result per round]}. Interleaving spreads the noise of
    a shared machine over all variants alike."""
    results = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, variant in variants:
            results[name].append(measure(variant))
    return results


def machine():
    """Lines describing where the numbers come from."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import bcc

        bcc_version = bcc.__version__
    except Exception:
        bcc_version = "not importable"
    return [
        f"- kernel: {platform.release()}",
        f"- CPUs: {os.cpu_count()} ({cpu})",
        f"- BCC: {bcc_version}",
        f"- Python: {sys.version.split()[0]}",
    ]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(kind, text):
    """bench/results/<kind>-<date>.md and latest-<kind>.md; returns the dated path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    dated = os.path.join(RESULTS_DIR, f"{kind}-{stamp}.md")
    for path in (dated, os.path.join(RESULTS_DIR, f"latest-{kind}.md")):
        with open(path, "w") as f:
            f.write(text)
    return dated


def vmrss_kib(pid):
    """A process's resident memory (VmRSS in /proc/PID/status), KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"bench: no VmRSS in /proc/{pid}/status")


def ratio(value, reference):
    return f"{value / reference:.2f}x" if reference else "-"


def prog_run_time(prog_id):
    """(run_time_ns, run_cnt) of a loaded program: the kernel's BPF stats,
    counted while bpf_enable_stats(BPF_STATS_RUN_TIME) is on."""
    from xknock.controller.kernel import bpfsys

    fd = bpfsys.prog_fd_by_id(prog_id)
    try:
        info = bpfsys.prog_info(fd)
        return info.run_time_ns, info.run_cnt
    finally:
        os.close(fd)


def wait_out_knocking_words(prog_fd, step_timeout_s):
    """Until the longest step timeout has passed since a new program's first
    packet, strict mode reads `recent` slots beside its `knocking` words
    (bpf/xknock_strict.h): its first packet (a SYN to an unused port from a
    source that is not knocking), then that wait, so that what is measured
    after is the program as it runs from then on."""
    import time

    from xknock.controller.kernel import bpfsys
    from xknock_dev.packets import tcp

    bpfsys.test_run(prog_fd, bytes(tcp("192.0.2.250", 80)))
    time.sleep(step_timeout_s + 0.2)
