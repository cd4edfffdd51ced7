"""bench/run's entry: `python -m bench [datapath|bpftool|controlplane|lists|flood|knockd|nft|spa|spa-verify|answers|cluster|cluster-resync|report|all]
[--quick] [--against=REV]` (REV: a git revision whose data path `datapath` times side by side on the same maps, bench/against.py;
`bpftool` attaches REV's build beside this one; `lists` runs REV's controller)."""

import sys

from . import answers, bpftool_run, cluster, controlplane, datapath, flood, fwknop, knockd, lists, nftingress, report, spa_verify

COMMANDS = ("datapath", "bpftool", "controlplane", "lists", "flood", "knockd", "nft", "spa", "spa-verify", "answers",
            "cluster", "cluster-resync", "report", "all")


def main(argv):
    quick = "--quick" in argv
    against = next((a.partition("=")[2] for a in argv if a.startswith("--against=")), None)
    which = [a for a in argv if not a.startswith("-")] or ["datapath"]
    if len(which) != 1 or which[0] not in COMMANDS:
        raise SystemExit(f"usage: bench/run [{'|'.join(COMMANDS)}] [--quick] [--against=REV]")
    which = which[0]
    if which in ("datapath", "all"):
        datapath.run_datapath(quick, against)
    if which in ("controlplane", "all"):
        controlplane.run_controlplane(quick)
    if which == "lists":   # top's and status's lists at 1M, the controller's memory; beside REV with --against
        lists.run_lists(quick, against)
    if which == "bpftool":   # the second harness: bpftool prog run on the attached program
        bpftool_run.run_bpftool(quick, against)
    if which == "flood":
        flood.run_flood(quick)
    if which == "answers":
        answers.run_answers(quick)
    if which == "cluster":   # three nodes and a real etcd: grant latency under churn, writes, resync
        cluster.run_cluster(quick)
    if which == "cluster-resync":   # the resync alone: received grants written in batches and one by one
        cluster.run_cluster(quick, resync_only=True)
    if which == "spa-verify":   # the verifier's cost per candidate, in process: no lab, no root
        print(fwknop.cost_markdown(fwknop.candidate_costs(0.5 if quick else 3.0)))
        print()   # and both protocols side by side: junk, forged, authentic
        print(spa_verify.markdown(spa_verify.verifications(0.3 if quick else 1.0)))
    if which == "report":
        report.run_report(quick, against)
    for name, bench in (("knockd", knockd), ("nft", nftingress), ("spa", fwknop)):
        if which == name:
            print(bench.markdown(bench.run(quick)))


if __name__ == "__main__":
    main(sys.argv[1:])
