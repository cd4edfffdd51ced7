"""The controller's loop: events to the log, SIGHUP reloads, grant and ban
sweeping, a full bans map logged once, hooks (daemon/hooks.py) run for grants
opened and closed and for bans.

The controller is never on the packet path. When it stops (SIGINT, SIGTERM,
or killed) the filter stays attached and enforcing; a later `xknock attach`
re-adopts the maps and loses nothing.
"""

import logging
import signal
import sys
import time

from ..config import ConfigError, config_hash, load_config
from ..config.cluster_config import reload_refusal
from ..errors import XknockError
from ..kernel import layout
from ..policy import answers, policy, totp
from ..spa.spa import SpaReceiver
from ..state import bans, controller_record, grants
from . import build
from .hooks import HookDispatcher
from .sdnotify import Notifier

log = logging.getLogger("xknock")

SWEEP_EVERY_S = 10.0
BAN_CHECK_EVERY_S = 1.0   # how soon a full bans map is logged (bans.FullBansWatch)
POLL_MS = 200


class Signals:
    """SIGTERM and SIGINT ask to stop, SIGHUP to reload. Installed before the
    filter is attached, so that a signal arriving meanwhile is honoured once
    the controller runs instead of killing it half-way."""

    def __init__(self):
        self.stop = False
        self.reload = False

    def install(self):
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reload", True))
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stop", True))
        return self


class Controller:
    def __init__(self, attached, ifnames, config_path, config, events=None, metrics=None, signals=None, hooks=None,
                 spa=None, links=None, cluster=None):
        self.attached = attached
        self.cluster = cluster   # a cluster.node.ClusterNode with [cluster], else None
        self.links = links     # a links.LinkWatcher: interfaces that go and come back
        self.spa = spa         # a spa.SpaReceiver while the config has [spa], else None
        self.ifnames = ifnames
        self.config_path = config_path
        self.config = config
        self.events = events
        self.metrics = metrics   # a metrics.MetricsServer, or None
        self.signals = signals or Signals().install()
        # on_open / on_close / on_ban (daemon/hooks.py): fed by the events and the sweep.
        self.hooks = hooks if hooks is not None else HookDispatcher(attached.maps, config, ifnames)
        if events is not None:
            events.hooks = self.hooks
            events.observers.append(self._observe)
        # Time-based sequences: which windows are live, and which were spent.
        self.rotation = totp.Rotation(config)
        self.next_rotation_ns = self.rotation.next_change_ns() if self.rotation.active else None
        self.rotate_now = False
        # The host's answer settings (sysctls, and protocols probed on loopback),
        # read at reload, at the first rotation after attach, and kept for the
        # rotations in between: a rotation changes knock ports, not the host.
        self.host = None
        self.full_bans = bans.FullBansWatch(attached.maps)
        # Who serves this filter, for `xknock reload` and `status` (state/controller_record.py).
        self.record = controller_record.Record(attached.maps.control.id, ifnames, config_path, build.version())
        self.notifier = None
        self.last_reload = None

    def reload(self):
        """Validate the file, then switch policy; a bad file changes nothing.
        The result is recorded for `xknock reload` and told to systemd."""
        started_ns = time.monotonic_ns()
        ok, message, warnings = self._reload()
        self.last_reload = controller_record.reload_result(ok, started_ns, message, warnings)
        self._publish()
        return ok

    def _reload(self):
        """(ok, what went wrong, the new config's warnings)."""
        try:
            config = load_config(self.config_path)
        except ConfigError as err:
            log.error("reload refused: the running policy is unchanged", extra={"fields": {"errors": str(err)}})
            return False, str(err), []
        for warning in config.warnings:
            log.warning(warning)
        refusal = reload_refusal(self.config.cluster, config.cluster)
        if refusal:
            log.error("reload refused: the running policy is unchanged", extra={"fields": {"errors": refusal}})
            return False, refusal, config.warnings
        try:
            replay_cache = self._prepare_spa(config)   # a cache we cannot trust refuses the reload
        except (XknockError, OSError) as err:
            log.error("reload failed: the running policy is unchanged", extra={"fields": {"error": str(err)}})
            return False, str(err), config.warnings
        try:
            rotation = totp.Rotation(config)
            rotation.spent = self.rotation.spent
            host = answers.read_host()
            policy.apply_policy(self.attached.maps, rotation.concrete(), host=host)
        except (XknockError, OSError) as err:
            if self.spa:
                self.spa.abandon(replay_cache)
            log.error("reload failed: the running policy is unchanged", extra={"fields": {"error": str(err)}})
            return False, str(err), config.warnings
        if self.spa:   # only now: a refused reload leaves SPA as it was
            self.spa.switch(config.spa, replay_cache)
        if self.cluster is not None:   # the replay claims' lease follows max_age
            self.cluster.spa_max_age_ns = config.spa.max_age_ns if config.spa is not None else None
        self.config = config
        self.rotation = rotation
        self.host = host
        self.next_rotation_ns = rotation.next_change_ns() if rotation.active else None
        if self.events:
            self.events.refresh_names()
        self.hooks.set_config(config)
        log.info("reloaded", extra={"fields": {"config": self.config_path, "sequences": len(config.sequences)}})
        return True, "", config.warnings

    def status_line(self):
        """systemd's STATUS=: the mode, and the last reload's result."""
        where = ",".join(self.ifnames)
        if self.config.mode == "monitor":
            line = f"monitor on {where}: counting, refusing nothing"
        else:
            line = f"enforce on {where}"
        line += f", {len(self.config.sequences)} sequence(s), config {config_hash(self.config)}"
        last = self.last_reload
        if last is not None:
            at = time.strftime("%H:%M:%S", time.localtime(last["at"]))
            line += (f"; last reload ok at {at}" if last["ok"]
                     else f"; last reload at {at} REFUSED, the running policy is unchanged")
        return line

    def _publish(self):
        """The record for the CLI and STATUS= for systemd, after a start or reload."""
        try:
            self.record.publish(self.config, config_hash(self.config), self.last_reload)
        except (XknockError, OSError) as err:   # /run/xknock not ours, or full: the filter runs all the same
            log.error("writing the controller record failed: `xknock reload` and `status` will not find this "
                      "controller", extra={"fields": {"event": "controller_record_failed", "error": str(err)}})
        if self.notifier:
            self.notifier.status(self.status_line())

    def _observe(self, record):
        if record.type != layout.Event.GRANTED:
            return
        try:
            spent = self.rotation.spend(record.seq_uid)
        except XknockError as err:   # spent in memory all the same
            log.error("recording a spent time-based window failed: a restart would bring it back",
                      extra={"fields": {"error": str(err)}})
            spent = True
        if spent:
            self.rotate_now = True   # that window's knock is used: take it out of the maps

    def rotate(self):
        """Writes the live windows of the time-based sequences (same policy otherwise)."""
        self.rotate_now = False
        try:
            if self.host is None:
                self.host = answers.read_host()
            policy.apply_policy(self.attached.maps, self.rotation.concrete(), host=self.host)
        except (XknockError, OSError) as err:
            log.error("rotating time-based sequences failed; retrying", extra={"fields": {"error": str(err)}})
            self.rotate_now = True
            return
        self.next_rotation_ns = self.rotation.next_change_ns()
        if self.events:
            self.events.refresh_names()

    def _prepare_spa(self, config):
        """The replay cache the new [spa] needs (SpaReceiver.prepare), with a
        receiver to hand it to once the policy is live."""
        if config.spa is None:
            return None
        if self.spa is None:   # [spa] added: a receiver that judges nothing until switched
            self.spa = SpaReceiver(self.attached.loaded, self.attached.maps, None)
            if self.cluster is not None:   # its digests claimed across nodes, its grants published
                self.cluster.serve_spa(self.spa)
            self.spa.start()
        return self.spa.prepare(config.spa)

    def run(self, notifier=None):
        notifier = notifier or Notifier()
        self._publish()
        notifier.ready(self.status_line())
        self.notifier = notifier
        log.info("controller running", extra={"fields": {"event": "controller_running", "iface": ",".join(self.ifnames),
                                                          "bcc": "bcc" in sys.modules}})
        next_sweep = time.monotonic() + SWEEP_EVERY_S
        next_ban_check = time.monotonic() + BAN_CHECK_EVERY_S
        if self.spa:
            self.spa.start()   # SPA candidates are judged on the receiver's thread, never in this loop
        try:
            while not self.signals.stop:
                notifier.watchdog()
                if self.events:
                    self.events.poll(POLL_MS)   # a bounded number of events, then the rest of the loop
                else:
                    time.sleep(POLL_MS / 1000)
                self.hooks.run_arrivals()   # on_open of grants other nodes made (cluster hooks = "every_node")
                if self.links:
                    self.links.poll()
                if self.rotation.active and (self.rotate_now or time.time_ns() >= self.next_rotation_ns):
                    self.rotate()
                if self.signals.reload:
                    self.signals.reload = False
                    ok = self.reload()
                    if self.metrics:
                        self.metrics.record_reload(ok, self.config)
                if time.monotonic() >= next_ban_check:
                    next_ban_check = time.monotonic() + BAN_CHECK_EVERY_S
                    warning = self.full_bans.check()
                    if warning:
                        log.warning(warning)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_EVERY_S
                    swept = grants.expire_grants(self.attached.maps)
                    bans.expire_bans(self.attached.maps)
                    if swept:
                        log.debug("expired grants removed", extra={"fields": {"count": swept}})
                    try:   # on_close for grants gone since: swept now, or revoked by `xknock revoke`
                        self.hooks.sweep()
                    except OSError as err:
                        log.error("hook sweep failed", extra={"fields": {"error": str(err)}})
        finally:
            self.record.remove()
            notifier.stopping()
            if self.spa:
                self.spa.stop()   # counts what it judged
            if self.links:
                self.links.close()
            self.hooks.close()   # lets running hooks end; each is killed at its timeout at the latest
            if self.metrics:
                self.metrics.close()
            log.info(
                "controller stopped; the filter stays attached and enforcing",
                extra={"fields": {"iface": ",".join(self.ifnames)}},
            )
