"""Keeps client/xknock-spa-pubkey.py's embedded copies of the wire modules
equal to controller/wire/: `python -m xknock_dev.standalone` rewrites them,
tests/unit/test_spa_pubkey_client.py fails while they differ."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(REPO, "client", "xknock-spa-pubkey.py")
MODULES = ("hpke", "spa_pubkey")
MARKER = "# --- embedded: controller/wire/hpke.py and controller/wire/spa_pubkey.py ---\n"
END = '\nif __name__ == "__main__":'


def module_source(name):
    with open(os.path.join(REPO, "controller", "wire", f"{name}.py")) as f:
        return f.read()


def embedded_block():
    parts = ["SOURCES = {}\n"]
    for name in MODULES:
        source = module_source(name)
        if "'''" in source:
            raise ValueError(f"controller/wire/{name}.py holds ''': it cannot be embedded as a raw string")
        parts.append(f"SOURCES[{name!r}] = r'''{source}'''\n")
    return "".join(parts)


def rendered(text):
    head, _, rest = text.partition(MARKER)
    _, _, tail = rest.partition(END)
    return head + MARKER + embedded_block() + END + tail


def main():
    with open(CLIENT) as f:
        text = f.read()
    new = rendered(text)
    if new != text:
        with open(CLIENT, "w") as f:
            f.write(new)
        print(f"rewrote {CLIENT}")


if __name__ == "__main__":
    sys.exit(main())
