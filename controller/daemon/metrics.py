"""Prometheus metrics of a running filter, read from the kernel at scrape time.

XknockCollector is a prometheus-client custom collector: every scrape builds
its metric families afresh from the filter's maps. The data path counts in
per-CPU maps; a scrape sums them (FilterMaps.counters_by_reason, one lookup per
reason) and never touches a packet. Nothing in a scrape walks a map that grows
with traffic (progress, grants, allow, deny): a scrape costs the same with
every map full.

What can only be known by walking those maps (how full they are, how many
knocks are in progress) is counted by MapSampler, a background thread, every
SAMPLE_EVERY_S seconds within a time budget per map. A scrape reports the
last sample and its age (xknock_map_sample_age_seconds).

One job per module; this one names their public parts in one place:
  map_sampler.py    counting map entries, the background sampler
  collector.py      XknockCollector, ControllerInfo, the metric tables
  metrics_server.py the HTTP(S) endpoint, MetricsServer
  metrics_addr.py   --metrics-addr parsed

docs/metrics.md lists every metric; docs/runbook.md says what to do when the
alerts in dashboards/alerts.yml fire.
"""

from .collector import (  # noqa: F401  (re-exported)
    ANSWERS, HOOK_RESULTS, KNOCK_EVENTS, KNOCK_RESULTS, SIMPLE_COUNTERS, SPA_CANDIDATES, SPA_VERDICTS, ControllerInfo,
    XknockCollector, package_version, running_filter,
)
from .map_sampler import (  # noqa: F401
    SAMPLE_BUDGET_S, SAMPLE_EVERY_S, SAMPLED_MAPS, MapSampler, Sample, count_entries,
)
from .metrics_addr import DEFAULT_PORT, parse_addr  # noqa: F401
from .metrics_server import MetricsServer, serve  # noqa: F401
