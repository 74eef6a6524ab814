"""A small HTTP proxy in front of the S3 server that injects the faults of a real store.

Every request is forwarded as it came (headers, body; the SigV4 signature stays valid,
the Host header is kept). ``plan(n)`` returns the fault for the n-th request (0-based):
``None`` (forward), ``"slowdown"`` (503 SlowDown, S3's throttling answer), ``"500"``
(500 InternalError), ``"reset"`` (the connection is closed with no answer), ``"deny"``
(403 AccessDenied). ``plan`` can be replaced while the proxy runs.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FaultProxy", "fault_proxy"]

_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "500": (500, "InternalError", "We encountered an internal error."),
           "deny": (403, "AccessDenied", "Access Denied")}


class FaultProxy:
    def __init__(self, upstream: str):
        host, port = upstream.split("://", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.plan: Callable[[str, str, int], str | None] = lambda method, path, n: None
        self.count = 0
        self.injected: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _next(self, method: str, path: str) -> str | None:
        with self._lock:
            n, self.count = self.count, self.count + 1
            fault = self.plan(method, path, n)
            if fault:
                self.injected[fault] = self.injected.get(fault, 0) + 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                body = self._body()
                fault = proxy._next(self.command, self.path)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in _ERRORS:
                    status, code, text = _ERRORS[fault]
                    self._send(status, {"Content-Type": "application/xml"},
                               f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}"
                               f"</Code><Message>{text}</Message></Error>".encode())
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("transfer-encoding", "expect",
                                                    "content-length")}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = {k: v for k, v in resp.getheaders()
                               if k.lower() not in ("transfer-encoding", "content-length",
                                                    "connection")}
                    self._send(resp.status, headers, data, head=self.command == "HEAD",
                               length=resp.getheader("Content-Length"))
                finally:
                    conn.close()

            def _body(self) -> bytes:
                """The request body; a chunked one (the AWS C++ SDK's uploads) de-chunked."""
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers, up to a blank line
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def _send(self, status: int, headers: dict[str, Any], data: bytes, *,
                      head: bool = False, length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", length if head and length else
                                 str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream)
    threading.Thread(target=proxy.server.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()
