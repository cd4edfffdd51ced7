"""`xknock top`'s and `xknock status`'s lists with the maps full (1,000,000
sources in the progress map, the grants map at capacity), this tree beside
another revision's (`bench/run lists --against=REV`), in one run: the maps are
filled once, in this process, and each tree times the same maps from a process
of its own (the library's functions on the program's id), in interleaved rounds.
Also the resident memory and imports of each tree's CLI and controller."""

import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

from . import common
from .controlplane import Namespace, ScrapeSizes, controller_rss_kib, fill_grants
from .datapath import EXAMPLE_CONFIG, example_harness, fill_progress
from .serving import serving_rss_kib

REPO = pathlib.Path(__file__).resolve().parent.parent

# Run by each tree's interpreter: {what: seconds} of one round on the filter prog_id.
TIMED = """
import json, sys, time
from xknock.cli.top import LISTED
from xknock.controller.kernel.maps import FilterMaps
from xknock.controller.state import grants
from xknock.controller.state.status import filter_status
prog_id, now = int(sys.argv[1]), int(sys.argv[2])


def top_lists(maps):   # what cli/top.py's walk() reads, at the harness's clock
    if hasattr(grants, "first_live_grants"):
        listed = grants.first_live_grants(maps, LISTED, now=now)
    else:
        listed = [g for g in grants.list_grants(maps, now=now) if g.alive][:LISTED]
    return listed, grants.knocks_in_progress(maps, limit=LISTED, now=now)


took = {}
with FilterMaps.from_prog(prog_id) as maps:
    for what, fn in (("`xknock top` lists (cli/top.py walk)", lambda: top_lists(maps)),
                     ("`xknock status` (state/status.py filter_status)", lambda: filter_status(maps, [], now=now)),
                     ("list_grants (every grant, sorted)", lambda: grants.list_grants(maps, now=now)),
                     ("knocks_in_progress", lambda: grants.knocks_in_progress(maps, limit=LISTED, now=now))):
        started = time.perf_counter()
        fn()
        took[what] = time.perf_counter() - started
print(json.dumps(took))
"""

# {what: KiB} of VmRSS: the CLI's import (as --help pays it), and what the
# controller imports once attach has handed over (no BCC).
MEMORY = """
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
found = {"python alone": rss()}
import xknock.cli.main
found["import xknock.cli.main (--help, completion)"] = rss()
xknock.cli.main.main.get_command(None, "attach")
from xknock.controller.daemon import daemon, events, hooks, links, metrics, webconfig
from xknock.controller.spa import spa
from xknock.cli import cluster
found["+ the controller's imports (attach, loop, events, hooks, metrics, SPA, links)"] = rss()
found["modules loaded"] = len(sys.modules)
print(json.dumps(found))
"""


def revision_tree(rev, into):
    """A tree importable as the package xknock (controller, cli, bpf) of revision rev."""
    package = pathlib.Path(into) / "xknock"
    package.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "controller", "cli", "bpf"],
                             check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive.stdout, check=True)
    (package / "__init__.py").write_text("")   # a regular package on PYTHONPATH wins over the editable install
    return str(into)


def tree_environ(tree):
    """os.environ in which the venv's python imports tree's xknock (None: this one's)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if tree:
        env["PYTHONPATH"] = tree
    return env


def run_in(tree, code, *args):
    env = tree_environ(tree)
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"bench: {tree or 'this tree'}: {done.stderr.strip()}")
    return json.loads(done.stdout.splitlines()[-1])


class _tree_env:
    """os.environ's PYTHONPATH naming tree (None: this one) while the block runs:
    the `xknock` commands of controlplane.Namespace inherit it."""

    def __init__(self, tree):
        self.tree = tree

    def __enter__(self):
        self.saved = os.environ.pop("PYTHONPATH", None)
        if self.tree:
            os.environ["PYTHONPATH"] = self.tree

    def __exit__(self, *exc):
        os.environ.pop("PYTHONPATH", None)
        if self.saved is not None:
            os.environ["PYTHONPATH"] = self.saved


def controller_costs(trees, rounds, config):
    """{tree name: {what: value}}: `xknock attach --once` with the kept program
    (after a first attach compiled it), interleaved; then the foreground
    controller's VmRSS (KiB) after its hand-over and a metrics scrape."""
    found = {name: {"attach": []} for name, _ in trees}
    with Namespace() as ns:
        for name, tree in trees:
            with _tree_env(tree):
                ns.xknock("attach", ns.iface, "-c", config, "--once")   # compiles; the program is kept
                ns.xknock("detach", ns.iface)
        for _ in range(rounds):
            for name, tree in trees:
                with _tree_env(tree):
                    ns.xknock("attach", ns.iface, "-c", config, "--once")   # warm-up of the kept program's attach
                    found[name]["attach"].append(ns.xknock("attach", ns.iface, "-c", config, "--once"))
                    ns.xknock("detach", ns.iface)
        for name, tree in trees:
            with _tree_env(tree):
                found[name]["rss"] = controller_rss_kib(ns, config)
    return found


def run_lists(quick, against):
    sizes = ScrapeSizes(quick)
    rounds = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="xkbench-lists-") as tmp:
        trees = [("this tree", None)]
        if against:
            trees.append((against, revision_tree(against, tmp)))
        memory = {name: run_in(tree, MEMORY) for name, tree in trees}
        config = os.path.join(tmp, "example.toml")
        with open(config, "w") as f:
            f.write(EXAMPLE_CONFIG)
        os.chmod(config, 0o600)
        costs = controller_costs(trees, rounds, config)
        serving = {}
        for name, tree in trees:
            with _tree_env(tree):
                serving[name] = serving_rss_kib()
        rng = random.Random(11)
        with example_harness(cflags=sizes.cflags) as h:
            from xknock.controller.kernel.maps import live_sequences

            uid = next(seq.uid for seq in live_sequences(h.maps).values() if seq.name == b"ssh")
            started = time.monotonic()
            fill_progress(h, sizes.progress, uid, h.now_ns // 1000, rng)
            granted = fill_grants(h, sizes.grants or h.maps.grants.max_entries, h.now_ns, rng)
            fill_s = time.monotonic() - started
            runs = common.interleaved(trees, rounds, lambda tree: run_in(tree, TIMED, h.loaded.prog_id, h.now_ns))
    rows = []
    names = [name for name, _ in trees]
    for what in runs[names[0]][0]:
        medians = {name: common.median([r[what] for r in runs[name]]) for name in names}
        cells = [f"{medians[name] * 1000:.0f} ms" for name in names]
        if against:
            cells.append(common.ratio(medians[names[0]], medians[names[1]]))
        rows.append((what, *cells))
    for what in memory[names[0]]:
        if what == "modules loaded":
            cells = [str(memory[name][what]) for name in names]
        else:
            cells = [f"{memory[name][what] / 1024:.1f} MiB" for name in names]
        if against:
            cells.append(common.ratio(memory[names[0]][what], memory[names[1]][what]))
        rows.append((what, *cells))
    attach = {name: common.median(costs[name]["attach"]) for name in names}
    rss = {name: costs[name]["rss"] for name in names}
    rows.append(("`xknock attach --once`, the kept program (no compile), whole process",
                 *[f"{attach[name]:.2f} s" for name in names], *([common.ratio(attach[names[0]], attach[names[1]])] if against else [])))
    rows.append(("foreground controller VmRSS, handed over, after a metrics scrape",
                 *[f"{rss[name] / 1024:.1f} MiB" for name in names], *([common.ratio(rss[names[0]], rss[names[1]])] if against else [])))
    for i, (what, _) in enumerate(serving[names[0]]):
        kib = {name: serving[name][i][1] for name in names}
        rows.append((f"serving controller VmRSS: {what}", *[f"{kib[name] / 1024:.1f} MiB" for name in names],
                     *([common.ratio(kib[names[0]], kib[names[1]])] if against else [])))
    header = ["what", *names] + (["this / " + against] if against else [])
    text = "\n".join([
        f"# xknock lists and controller memory ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        *common.machine(),
        f"- load average at the end: %.1f %.1f %.1f" % os.getloadavg(),
        f"- {sizes.progress:,} progress entries and {granted:,} grants, written in {fill_s:.1f} s with "
        f"bpf_map_update_batch; each list: median of {rounds} interleaved rounds, a process per tree and round"
        + (" — QUICK run, numbers are not meaningful" if quick else ""),
        "- memory: VmRSS of a fresh interpreter of each tree after its imports (no BCC); the controller's on a veth in "
        "a fresh netns (bench/controlplane.py controller_rss_kib: the example config, --metrics-addr, one scrape)",
        "- serving: the foreground controller in a lab (bench/serving.py: a sequence with an on_open hook, [spa], "
        "--metrics-addr), VmRSS after each of a knock from `xknock knock`, an SPA packet from `xknock spa`, a scrape",
        f"- attach: wall time of the whole `xknock attach --once` process, median of {rounds} interleaved rounds",
        "",
        common.markdown_table(header, rows),
        "",
    ])
    print(text)
    print(f"written to {common.write_results('lists', text)}")
    return text
