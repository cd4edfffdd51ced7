"""Which folder of tests/ a test file belongs in, read from its source.

    python -m xknock_dev.classify_tests            # FILE  FOLDER  why, for every test file
    python -m xknock_dev.classify_tests --check    # the files not in their folder; exit 1 if any
    python -m xknock_dev.classify_tests --move     # git mv each of those into its folder

The rule, first match wins (docs/architecture.md, Tests):
  e2e     the file builds network namespaces or starts real peers: it calls
          lab(), served_lab(), Lab(), FloodLab(), in_netns(), Foreground() or EtcdCluster
  kernel  the file needs root or the running kernel, without namespaces: it
          asks for the `harness` or `xk` fixture, imports xknock_dev.testrun,
          bcc or a kernel wrapper that makes system calls (bpfsys, datapath,
          maps, batch, ring, btf, lock, firsts), or changes users or owners
          (setpriv, runuser, os.chown, geteuid); or it is in NEEDS_ROOT below
          (files that run the product or the benchmarks as root, found by
          running them as nobody)
  unit    everything else: no root, no BPF, no namespaces. tests/kernel's
          test_unit_tests_run_unprivileged proves it by running tests/unit
          as user nobody.
Helper modules (no test_ prefix) live in tests/helpers/.
"""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
FOLDERS = ("unit", "kernel", "e2e")

E2E = re.compile(r"\b(lab|served_lab|Lab|FloodLab|in_netns|Foreground|EtcdCluster(\.\w+)?)\(")
KERNEL = [
    (re.compile(r"def \w+\([^)]*\b(harness|xk)\b"), "asks for the harness"),
    (re.compile(r"^\s*(from|import) (xknock_dev\.testrun|bcc)\b", re.M), "imports the BPF harness or BCC"),
    (re.compile(r"^\s*from xknock\.controller\.kernel(\.\w+)? import .*\b(bpfsys|datapath|maps|batch|ring|btf|lock|firsts)\b"
                r"|^\s*from xknock\.controller\.kernel\.(bpfsys|datapath|maps|batch|ring|btf|lock|firsts) import", re.M),
     "makes BPF system calls"),
    (re.compile(r"\b(setpriv|runuser|os\.chown|geteuid)\b"), "changes users or owners"),
]

# Found by running each file as user nobody: they fail there for reasons no
# pattern above reads.
NEEDS_ROOT = {
    "test_bench_smoke.py": "runs the benchmarks (BPF)",
    "test_build.py": "fails as user nobody",
    "test_cli_refusals.py": "fails as user nobody",
    "test_metrics_web.py": "fails as user nobody",
    "test_vagrant.py": "fails as user nobody",
    "test_debian.py": "debootstrap, chroot and dpkg --root need root",
}


def classify(source, name=""):
    """(folder, why) of a test file's source."""
    if name in NEEDS_ROOT:
        return "kernel", NEEDS_ROOT[name]
    found = E2E.search(source)
    if found:
        return "e2e", f"calls {found.group(0)}"
    for pattern, why in KERNEL:
        if pattern.search(source):
            return "kernel", why
    return "unit", "no root, BPF or namespaces"


def test_files():
    """{path relative to tests/: source} of every test file under tests/."""
    files = {}
    for dirpath, _, names in os.walk(TESTS):
        for name in sorted(names):
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    files[os.path.relpath(path, TESTS)] = f.read()
    return files


def misplaced():
    """[(path, folder it belongs in, why)] of the files not in their folder."""
    wrong = []
    for path, source in sorted(test_files().items()):
        folder, why = classify(source, os.path.basename(path))
        if os.path.dirname(path) != folder:
            wrong.append((path, folder, why))
    return wrong


def main(argv):
    if "--check" in argv or "--move" in argv:
        wrong = misplaced()
        for path, folder, why in wrong:
            target = os.path.join("tests", folder, os.path.basename(path))
            print(f"tests/{path} -> {target}  ({why})")
            if "--move" in argv:
                os.makedirs(os.path.join(REPO, "tests", folder), exist_ok=True)
                subprocess.run(["git", "mv", os.path.join("tests", path), target], cwd=REPO, check=True)
        return 1 if wrong and "--check" in argv else 0
    for path, source in sorted(test_files().items()):
        folder, why = classify(source, os.path.basename(path))
        print(f"{path:40} {folder:7} {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
