"""pyroute2's modules imported one by one, without its package's __init__.

`import pyroute2.netlink.exceptions` runs pyroute2/__init__.py first, and
that imports every protocol pyroute2 has (NDB, IPDB, conntrack, nl80211,
WireGuard, Plan 9...): some 21 MiB of a controller that needs rtnetlink only.
lazy_package() puts the package into sys.modules unexecuted, so importing a
submodule loads that submodule and what it imports (about 15 MiB), and the
first use of a name of the package itself (`from pyroute2 import NetNS`,
`pyroute2.__version__`) runs its __init__ then, once: code that wants the
whole package still gets it.
"""

import importlib
import importlib.util
import sys

PACKAGE = "pyroute2"


def lazy_package():
    """Install the unexecuted package, unless pyroute2 is imported already (or missing)."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)

    def __getattr__(name):
        try:   # a submodule (`from pyroute2 import config`, as pyroute2's own modules write): just that
            return importlib.import_module(f"{PACKAGE}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{PACKAGE}.{name}":
                raise
        del package.__getattr__   # a name of the package itself: run its __init__ now, once
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__
    sys.modules[PACKAGE] = package
