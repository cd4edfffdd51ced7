"""The generated files packaging/ ships are current: a man page per command
(with its examples) and the bash, zsh and fish completion scripts, as
`python -m xknock_dev.packaging` makes them from the code."""

import os

import pytest
from xknock_dev import packaging

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:click_man")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("packaging")
    return (root / "man", packaging.man_pages(root / "man")), \
        (root / "completion", packaging.completion_scripts(root / "completion"))


def test_the_man_pages_are_current(generated):
    (where, names), _ = generated
    assert sorted(os.listdir(packaging.MAN_DIR)) == names, \
        "packaging/man is not what the commands are: run python -m xknock_dev.packaging"
    for name in names:
        assert packaging.comparable(os.path.join(packaging.MAN_DIR, name)) == packaging.comparable(where / name), \
            f"packaging/man/{name} is stale: run python -m xknock_dev.packaging"


def test_every_command_has_a_man_page_with_its_examples(generated):
    (where, names), _ = generated
    assert {"xknock.1", "xknock-attach.1", "xknock-ban.1", "xknock-import-fwknop.1"} <= set(names)
    attach = (where / "xknock-attach.1").read_text()
    assert "\\-\\-cut\\-sessions" in attach and ".SH EXAMPLES" in attach
    assert "xknock attach eth0 \\-c lab.toml \\-\\-once" in attach


def test_the_completion_scripts_are_current(generated):
    _, (where, names) = generated
    assert sorted(os.listdir(packaging.COMPLETION_DIR)) == names
    for name in names:
        assert packaging.comparable(os.path.join(packaging.COMPLETION_DIR, name)) == \
            packaging.comparable(where / name), f"packaging/completion/{name} is stale: run python -m xknock_dev.packaging"
    assert "complete -o nosort -F" in (where / "xknock").read_text()
    assert "#compdef xknock" in (where / "_xknock").read_text()
