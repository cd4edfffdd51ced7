"""The /metrics endpoint of `xknock attach --metrics-addr`: prometheus-client's
WSGI app over HTTP, or HTTPS with basic auth as --metrics-web-config says
(webconfig.py), one thread per connection."""

import logging
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry

from ..errors import XknockError
from .collector import ControllerInfo, XknockCollector
from .map_sampler import MapSampler

log = logging.getLogger("xknock.metrics")

class _Handler(WSGIRequestHandler):
    timeout = 10.0   # a client that sends nothing (or never finishes its TLS handshake) is dropped

    def log_message(self, format, *args):   # not one line per scrape
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        """A client that breaks off, or fails its TLS handshake: one debug
        line, not socketserver's traceback on stderr."""
        import sys

        log.debug("metrics request failed", extra={"fields": {"client": client_address[0],
                                                              "error": str(sys.exc_info()[1])}})


def serve(host, port, registry, web_config=None):
    """(server, thread): prometheus-client's WSGI app for registry on
    host:port in a thread, behind TLS and basic auth as web_config says.
    TLS handshakes happen in each connection's own thread, so a slow client
    holds up nobody."""
    from prometheus_client import make_wsgi_app

    from .webconfig import BasicAuth

    app = make_wsgi_app(registry)
    if web_config is not None and web_config.users:
        app = BasicAuth(app, web_config.users)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(_Server):
        address_family = family

    httpd = make_server(host, port, app, Server, handler_class=_Handler)
    if web_config is not None and web_config.tls is not None:
        httpd.socket = web_config.tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, name="xknock-metrics", daemon=True)
    thread.start()
    return httpd, thread


class MetricsServer:
    """The /metrics endpoint of `xknock attach --metrics-addr`.

    Binding happens on construction, so a bad or busy address fails before
    anything is attached; start() then serves one filter. The registry holds
    only xknock's collector and the process collector (process_*)."""

    def __init__(self, host, port, web_config=None):
        """web_config: a webconfig.WebConfig (TLS, basic auth), or None for plain HTTP."""
        from prometheus_client import ProcessCollector

        self.host, self.port = host, port
        self.web_config = web_config
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.sampler = None
        self.info = None
        try:
            self.httpd, self.thread = serve(host, port, self.registry, web_config)
        except OSError as err:
            reason = err.strerror or str(err)
            raise XknockError(f"--metrics-addr {host}:{port}: cannot listen there: {reason}") from None
        self.port = self.httpd.server_port

    def start(self, maps, ifaces, config, hooks=None):
        """hooks: the controller's hooks.HookRunner, for xknock_hooks_total."""
        self.info = ControllerInfo(config=config)
        self.info.record_reload(True, config)
        self.info.hooks = hooks
        self.sampler = MapSampler(lambda: maps).start()
        self.registry.register(XknockCollector(lambda: maps, ifaces, self.info, sampler=self.sampler))
        scheme = self.web_config.scheme if self.web_config else "http"
        fields = {"url": f"{scheme}://{self._hostport()}/metrics"}
        if self.web_config and self.web_config.users:
            fields["basic_auth_users"] = len(self.web_config.users)
        if self.web_config and self.web_config.tls and self.web_config.tls.verify_mode == ssl.CERT_REQUIRED:
            fields["client_certs"] = "required"
        log.info("serving metrics", extra={"fields": fields})
        return self

    def _hostport(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def record_reload(self, success, config=None):
        if self.info is not None:
            self.info.record_reload(success, config)

    def record_interface_event(self, device, event):
        if self.info is not None:
            self.info.record_interface_event(device, event)

    def close(self):
        if self.sampler is not None:
            self.sampler.stop()
        self.httpd.shutdown()
        self.httpd.server_close()
