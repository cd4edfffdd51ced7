"""The side-by-side report (`bench/run report [--quick]`): every benchmark in
one run (bench/answers.py's too), then one markdown file with PNG figures under
bench/results/report-<date>/ (with data.json, the numbers behind it), and
bench/results/latest-report.md pointing at the same figures. Versions of xknock and of every peer are in its head; its
ratios are only ever between numbers measured in this run."""

import datetime
import json
import os
import platform
import subprocess
import time

from xknock_dev import traffic
from xknock_dev.lab import lab

from . import answers, bpftool_run, common, controlplane, datapath, fwknop, knockd, nftingress, plots, sidebyside as sb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def versions():
    try:
        import bcc

        bcc_version = bcc.__version__
    except Exception:
        bcc_version = "not importable"
    head = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return [
        f"- machine: {os.cpu_count()} CPUs ({cpu}), shared with other work: compare ratios, not absolute numbers",
        f"- kernel: {platform.release()}",
        f"- xknock: commit {head.stdout.strip() or 'unknown'}",
        f"- knockd: {sb.package_version('knockd')} (Debian package)",
        f"- fwknop: fwknopd {sb.tool_version(['fwknopd', '-V'])}, package {sb.package_version('fwknop-server')}",
        f"- xdp-tools: {sb.package_version('xdp-tools')}",
        f"- nftables: {sb.tool_version(['nft', '-v'])}; iptables: {sb.tool_version(['iptables', '-V'])}"
        f" ({'nf_tables' if 'nf_tables' in subprocess.run(['iptables', '-V'], capture_output=True, text=True).stdout else 'legacy'})",
        f"- BCC: {bcc_version}; libpcap: {sb.package_version('libpcap0.8')}",
    ]


def generator_rate(quick):
    """The generator's own rate: unthrottled into a peer that drops (frames
    leave the generator's veth, nothing processes them further); median of runs."""
    runs, seconds = (1, 0.5) if quick else (3, 2.0)
    rates = []
    with lab("xkgen", ipv6=False) as net:
        for _ in range(runs):
            flood = traffic.lab_flood(net, ["tcp:7000"], seconds=seconds, path="drop").start()
            rates.append(flood.wait(60)["pps"])
    return common.median(rates), rates


def body(text):
    """A benchmark's own markdown without its title and machine lines."""
    lines = text.splitlines()
    skip = ("# ", "- kernel:", "- CPUs:", "- BCC:", "- Python:")
    return "\n".join(line for line in lines if not line.startswith(skip)).strip()


def headline(dp, kn, nf_cells, nf, fw, gen):
    lines = []
    d = kn["daemons"]
    x, k = d["xknock"], d["knockd"]
    if x["plain"]["median_ms"] and k["plain"]["median_ms"]:
        lines.append(f"- Knock to connect (same sender): xknock {x['plain']['median_ms']:.2f} ms median "
                     f"(p99 {x['plain']['p99_ms']:.2f}), knockd {k['plain']['median_ms']:.1f} ms "
                     f"(p99 {k['plain']['p99_ms']:.1f}): knockd takes {k['plain']['median_ms'] / x['plain']['median_ms']:.0f}x as long.")
    for name in kn["settings"]["floods"]:
        xr, kr = x["floods"][name], k["floods"][name]
        lines.append(f"- {name.capitalize()} flood at the generator's highest rate (xknock {xr['flood_pps']:,} pps, "
                     f"knockd {kr['flood_pps']:,} pps): legitimate knocks connected {xr['ok']}/{xr['tries']} with "
                     f"xknock, {kr['ok']}/{kr['tries']} with knockd.")
    xs, ks = knockd.sustained(x["steps"]), knockd.sustained(k["steps"])
    lines.append(f"- Highest knock-port junk rate with every knock still connecting: xknock "
                 f"{'none' if xs is None else format(xs['flood_pps'], ',') + ' pps' + (' (the maximum reached)' if xs['rate'] is None else '')}, "
                 f"knockd {'none' if ks is None else format(ks['flood_pps'], ',') + ' pps' + (' (the maximum reached)' if ks['rate'] is None else '')}.")
    if nf_cells:
        flood = nf["settings"]["floods"][0]
        xc, nc = nf_cells[(flood, "xknock")], nf_cells[(flood, "nft ingress")]
        lines.append(f"- Dropping a flood to the guarded port: xknock delivered {xc['max_pps'] / 1e6:.2f} Mpps through "
                     f"the server, nft on netdev ingress {nc['max_pps'] / 1e6:.2f} Mpps "
                     f"({xc['max_pps'] / nc['max_pps']:.2f}x); filter cost over an XDP_DROP floor "
                     f"{nftingress.fmt(xc['chain_ns_over_floor'])} ns vs {nftingress.fmt(nc['chain_ns_over_floor'])} ns per frame.")
    fd = fw["daemons"].get("fwknopd")
    if fd:
        q = fd["quiet"]
        worst = fd["floods"][-1] if fd["floods"] else None
        best = knockd.sustained(fd["floods"])
        lines.append(f"- SPA: fwknopd {q['median_ms'] or float('nan'):.1f} ms median from the SPA packet to a connection "
                     f"({q['ok']}/{q['tries']} ok)" + (f"; under a garbage-UDP flood of {worst['flood_pps']:,} pps "
                                                       f"{worst['ok']}/{worst['tries']}" if worst else "") +
                     f"; highest garbage rate with every SPA still connecting: "
                     f"{'none measured' if best is None else format(best['flood_pps'], ',') + ' pps'}"
                     ".")
    xd = fw["daemons"].get("xknock")
    if xd:
        q = xd["quiet"]
        worst = xd["floods"][-1] if xd["floods"] else None
        ratio = (f" ({fd['quiet']['median_ms'] / q['median_ms']:.0f}x faster than fwknopd)"
                 if fd and fd["quiet"]["median_ms"] and q["median_ms"] else "")
        lines.append(f"- SPA: xknock {q['median_ms'] or float('nan'):.1f} ms median from the same client's packet to a "
                     f"connection{ratio} ({q['ok']}/{q['tries']} ok), arrival to grant {q.get('grant_median_ms') or float('nan'):.2f} ms"
                     + (f"; under a garbage-UDP flood of {worst['flood_pps']:,} pps {worst['ok']}/{worst['tries']}"
                        if worst else "") + ".")
    elif fw["unavailable"].get("xknock"):
        lines.append(f"- SPA, xknock: {fw['unavailable']['xknock']}.")
    lines.append(f"- Traffic generator (XDP live frames, one process, into a dropping peer): {gen[0]:,.0f} pps.")
    return lines


def run_report(quick, against=None):
    """against: a git revision whose build the bpftool section times beside this one."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    started = time.monotonic()
    print("report: data path", flush=True)
    dp = datapath.run_datapath(quick)
    print("report: the attached program (bpftool prog run)", flush=True)
    bt = bpftool_run.run(quick, against)
    print("report: control plane", flush=True)
    cp_text = controlplane.run_controlplane(quick)
    print("report: traffic generator", flush=True)
    gen = generator_rate(quick)
    print("report: knockd", flush=True)
    kn = knockd.run(quick)
    print("report: nftables ingress", flush=True)
    nf = nftingress.run(quick)
    nf_cells = nftingress.summary(nf)
    print("report: fwknop", flush=True)
    fw = fwknop.run(quick)
    print("report: answers", flush=True)
    an = answers.run_answers(quick)

    directory = os.path.join(common.RESULTS_DIR, f"report-{stamp}")
    os.makedirs(directory, exist_ok=True)
    figures = {
        "datapath": plots.datapath_figures(dp, directory),
        "knockd": plots.knockd_figures(kn, directory),
        "nft": plots.nft_figures(nf, nf_cells, directory),
        "spa": plots.fwknop_figures(fw, directory),
    }
    took = time.monotonic() - started

    def text(prefix):
        def images(group):
            return [f"![{name[:-4]}]({prefix}{name})" for name in figures[group]] + [""]

        out = [f"# xknock side by side: knockd, fwknop, nftables, xdp-filter ({time.strftime('%Y-%m-%d %H:%M')})", "",
               *versions(),
               f"- run: `bench/run report{' --quick' if quick else ''}`, {took / 60:.0f} min"
               + (" — QUICK run, numbers are not meaningful" if quick else ""), "",
               "Every figure is a median over repeated runs or tries; every ratio compares numbers measured in this "
               "run, side by side.", "",
               "## Headline", "", *headline(dp, kn, nf_cells, nf, fw, gen), *answers.headline(an), "",
               "## Traffic generator", "",
               "XDP live frames (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, batches of 64, random IPv4 "
               "sources, correct checksums), one process, out of the lab attacker's veth into a peer that drops: "
               f"**{gen[0]:,.0f} pps** (median of {', '.join(f'{r:,}' for r in gen[1])}). Into a filter it is slower "
               "(the filter runs in the same chain on the same CPU): the rates each flood reached are in the tables.",
               "", "## Data path (BPF_PROG_TEST_RUN)", "", *images("datapath"),
               body(dp["text"]).replace("\n## ", "\n### "), "",
               "## Data path, the attached program (bpftool prog run)", "",
               body(bpftool_run.markdown(bt)).replace("\n## ", "\n### "), "",
               "## Control plane", "", body(cp_text), "",
               knockd.markdown(kn), *images("knockd"),
               nftingress.markdown(nf), *images("nft"),
               fwknop.markdown(fw), *images("spa"),
               answers.markdown(an, title=False)]
        return "\n".join(out) + "\n"

    with open(os.path.join(directory, "data.json"), "w") as f:
        json.dump({"datapath": {k: v for k, v in dp.items() if k != "text"}, "bpftool": bt, "knockd": kn,
                   "nft": {**nf, "rows": {" / ".join(k): v for k, v in nf["rows"].items()}},
                   "spa": fw, "generator_pps": gen, "answers": answers.json_data(an)}, f, indent=1, default=str)
    report_path = os.path.join(directory, "report.md")
    with open(report_path, "w") as f:
        f.write(text(""))
    with open(os.path.join(common.RESULTS_DIR, "latest-report.md"), "w") as f:
        f.write(text(f"report-{stamp}/"))
    print(text(""))
    print(f"written to {report_path} and {os.path.join(common.RESULTS_DIR, 'latest-report.md')}")
    return report_path
