"""An HTTP/1.1 service instance for the tests: python tests/http_instance.py PORT IDENT [MODE].

MODE: ok (default), fail[:CODE] (CODE, default 500, to everything but /count), slow:SECONDS (every
answer waits that long).  Routes:

* ``/who``: the instance's name, and what the mesh added (x-request-id, forwarded headers) in
  ``x-seen-*`` headers;
* ``POST /echo``: reads the body (Content-Length or chunked) and answers its length and sha256;
* ``/bytes/N``: N bytes of a fixed pattern, chunked;
* ``/count``: JSON of the requests it received, by method and path;
* ``/status/CODE``: answers CODE;
* ``/sleep/SECONDS``: its name, that many seconds late;
* an ``Upgrade: websocket`` request: 101, then every byte is echoed back (the mesh carries it as bytes).
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, IDENT = int(sys.argv[1]), sys.argv[2]
MODE = sys.argv[3] if len(sys.argv) > 3 else "ok"
SEEN: Counter[str] = Counter()
LOCK = threading.Lock()
PATTERN = bytes(range(256)) * 256


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # its head and body go out as two writes

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-instance", IDENT)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        with LOCK:
            SEEN[f"{self.command} {self.path}"] += 1
        self.path = self.path.split("?")[0]
        if self.path == "/count":
            self._body()
            self._send(200, json.dumps(SEEN).encode(), {"content-type": "application/json"})
            return
        if self.headers.get("upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("upgrade", "websocket")
            self.send_header("connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            conn: socket.socket = self.connection
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            self.close_connection = True
            return
        body = self._body()
        if MODE.startswith("slow:"):
            time.sleep(float(MODE[5:]))
        if MODE.startswith("fail"):
            self._send(int(MODE.partition(":")[2] or 500), b"failing on purpose\n")
            return
        if self.path == "/who":
            seen = {f"x-seen-{h}": self.headers.get(h, "-")
                    for h in ("x-request-id", "x-forwarded-for", "forwarded", "traceparent", "connection")}
            self._send(200, IDENT.encode(), seen)
        elif self.path == "/echo":
            self._send(200, f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())
        elif self.path.startswith("/bytes/"):
            n = int(self.path[7:])
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-instance", IDENT)
            self.end_headers()
            sent = 0
            while sent < n:
                part = PATTERN[: min(len(PATTERN), n - sent)]
                self.wfile.write(b"%x\r\n" % len(part) + part + b"\r\n")
                sent += len(part)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/bad204":  # a server bug: a body after a 204, which has none
            self._send(204, b"stray bytes\n")
        elif self.path.startswith("/sleep/"):  # this answer only, after that many seconds
            time.sleep(float(self.path[7:]))
            self._send(200, IDENT.encode())
        elif self.path.startswith("/status/"):
            code = int(self.path[8:])
            self._send(code, b"" if code in (204, 304) else b"as asked\n")
        else:
            self._send(404, b"no such path\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client (the agent) that resets a kept connection is no news
    allow_reuse_address = True
    request_queue_size = 256


Server(("127.0.0.1", PORT), Handler).serve_forever()
