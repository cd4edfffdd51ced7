"""The report's figures: PNGs drawn with Debian's matplotlib (Agg backend, no
display) from the data the benchmarks return. Each function writes one file
into a directory and returns its name, or None when its data is missing."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"xknock": "#1f77b4", "floor": "#999999", "knockd": "#d62728", "fwknopd": "#ff7f0e",
          "nft": "#2ca02c", "xdp-filter": "#9467bd"}


def _save(fig, directory, name):
    fig.tight_layout()
    fig.savefig(os.path.join(directory, name), dpi=100)
    plt.close(fig)
    return name


def _scaling(directory, name, title, xlabel, points, series, log_x=True):
    """points: [(x, {label: ns})]; series: [(label, color, style)]."""
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [x for x, _ in points]
    for label, color, style in series:
        ax.plot(xs, [values[label] for _, values in points], style, color=color, label=label, marker="o")
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ns per packet (BPF_PROG_TEST_RUN)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, directory, name)


def datapath_figures(dp, directory):
    names = []
    progress = [(size, {"guarded drop": drop["xknock"][1], "knock repeated": knock["xknock"][1],
                        "floor (XDP_DROP)": drop["floor"][1]})
                for size, drop, knock, _, _ in dp["progress"]]
    names.append(_scaling(directory, "scaling-sources.png", "xknock: tracked sources", "sources in the progress map",
                          progress, [("guarded drop", COLORS["xknock"], "-"), ("knock repeated", COLORS["xknock"], "--"),
                                     ("floor (XDP_DROP)", COLORS["floor"], ":")]))
    allow = [(size, {"allow-list pass": a["xknock"][1], "guarded drop": d["xknock"][1], "floor (XDP_DROP)": a["floor"][1]})
             for size, a, d, _ in dp["allow"]]
    names.append(_scaling(directory, "scaling-allow.png", "xknock: allow-list entries", "allow-list entries", allow,
                          [("allow-list pass", COLORS["xknock"], "-"), ("guarded drop", COLORS["xknock"], "--"),
                           ("floor (XDP_DROP)", COLORS["floor"], ":")]))
    seqs = [(count, {"guarded drop": c["guarded drop"]["xknock"][1], "unguarded pass": c["unguarded pass"]["xknock"][1],
                     "knock repeated": c["knock repeated"]["xknock"][1], "floor (XDP_DROP)": c["guarded drop"]["floor"][1]})
            for count, c in dp["sequences"]]
    names.append(_scaling(directory, "scaling-sequences.png", "xknock: sequences configured", "sequences", seqs,
                          [("guarded drop", COLORS["xknock"], "-"), ("unguarded pass", COLORS["xknock"], "-."),
                           ("knock repeated", COLORS["xknock"], "--"), ("floor (XDP_DROP)", COLORS["floor"], ":")]))
    names.append(paths_figure(dp, directory))
    return [n for n in names if n]


def paths_figure(dp, directory):
    rows = dp["paths"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    labels = [row for row, _, _ in rows]
    programs = [p for p in ("xknock", "xdp-filter", "floor") if p in rows[0][1]]
    width = 0.8 / len(programs)
    for i, program in enumerate(programs):
        ax.barh([y + i * width for y in range(len(rows))], [got[program][1] for _, got, _ in rows], height=width,
                color=COLORS[program], label=program if program != "floor" else "floor (XDP_DROP)")
    ax.set_yticks([y + width * (len(programs) - 1) / 2 for y in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ns per packet (BPF_PROG_TEST_RUN)")
    ax.set_title("Data paths with the example policy")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, directory, "paths.png")


def latency_figure(directory, name, title, samples):
    """samples: {label: [ms]}; a box plot on a log axis."""
    samples = {k: v for k, v in samples.items() if v}
    if not samples:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.boxplot(list(samples.values()), vert=False, whis=(1, 99), showfliers=True)
    ax.set_yticks(range(1, len(samples) + 1))
    ax.set_yticklabels(list(samples), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms from the last knock to a completed TCP handshake (whiskers: p1-p99)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, directory, name)


def knockd_figures(kn, directory):
    names = []
    d = kn["daemons"]
    samples = {}
    for key, label in (("plain", "plain sender"), ("real", "real client")):
        for daemon in ("xknock", "knockd"):
            if daemon in d:
                samples[f"{daemon}, {label}"] = d[daemon][key]["times_ms"]
    names.append(latency_figure(directory, "knockd-latency.png", "Knock to connect: xknock and knockd", samples))

    floods = kn["settings"]["floods"]
    if floods and all(daemon in d for daemon in ("xknock", "knockd")):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        width = 0.38
        for i, daemon in enumerate(("xknock", "knockd")):
            rows = [d[daemon]["floods"][f] for f in floods]
            ax1.bar([x + i * width for x in range(len(floods))], [r["ok"] / r["tries"] * 100 for r in rows], width,
                    color=COLORS[daemon], label=daemon)
            cpu = [(r.get("daemon_cpu_s", 0) + r.get("xdp_cpu_s", 0)) / r["wall_s"] for r in rows]
            ax2.bar([x + i * width for x in range(len(floods))], cpu, width, color=COLORS[daemon], label=daemon)
        for ax in (ax1, ax2):
            ax.set_xticks([x + width / 2 for x in range(len(floods))])
            ax.set_xticklabels([f"{f}\n(max rate)" for f in floods], fontsize=8)
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        ax1.set_ylabel("legitimate knocks that connected, %")
        ax1.set_ylim(0, 105)
        ax2.set_ylabel("CPUs: daemon process + XDP program")
        fig.suptitle("Under a flood: success and CPU")
        names.append(_save(fig, directory, "knockd-flood.png"))

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for daemon in ("xknock", "knockd"):
        if daemon in d and d[daemon]["steps"]:
            rows = d[daemon]["steps"]
            ax.plot([r["flood_pps"] for r in rows], [r["ok"] / r["tries"] * 100 for r in rows], "-o",
                    color=COLORS[daemon], label=daemon)
    ax.set_xscale("log")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("knock-port flood, frames per second (achieved)")
    ax.set_ylabel("legitimate knocks that connected, %")
    ax.set_title("Stepping up the junk rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    names.append(_save(fig, directory, "knockd-steps.png"))
    return [n for n in names if n]


def nft_figures(nf, cells, directory):
    floods = nf["settings"]["floods"]
    if not floods:
        return []
    variants = list(nf["rows"][(floods[0], "max")])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(floods)
    for i, flood in enumerate(floods):
        ax.barh([y + i * width for y in range(len(variants))], [cells[(flood, v)]["max_pps"] / 1e6 for v in variants],
                height=width, label=flood)
    ax.set_yticks([y + width * (len(floods) - 1) / 2 for y in range(len(variants))])
    ax.set_yticklabels(variants, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("Mpps delivered into the server's receive ring (unthrottled flood)")
    ax.set_title("XDP (xknock) and nftables netdev ingress, same job")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return [_save(fig, directory, "nft-ingress.png")]


def fwknop_figures(fw, directory):
    samples = {name: d["quiet"]["times_ms"] for name, d in fw["daemons"].items()}
    name = latency_figure(directory, "spa-latency.png", "SPA packet to connect", samples)
    return [name] if name else []
