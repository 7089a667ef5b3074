"""Demo upstream for the compose stack: answers every request with a JSON echo of what it received.

It shows what the gateway forwards: the path after strip_prefix, the identity headers it set
(X-Auth-Subject, X-Auth-Scopes), the X-Forwarded-* headers, and that no Authorization header arrives.
Standard library only, so it runs on a plain python:3.11-slim image.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_ECHO_BODY = 64 * 1024


class EchoHandler(BaseHTTPRequestHandler):
    server_version = "echo/1"
    protocol_version = "HTTP/1.1"

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = {
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body_bytes": len(body),
            "body": body[:MAX_ECHO_BODY].decode("utf-8", "replace"),
        }
        data = json.dumps(payload, indent=2, sort_keys=True).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class names it so
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def main() -> None:
    port = int(os.environ.get("PORT", "8000"))
    server = ThreadingHTTPServer(("0.0.0.0", port), EchoHandler)  # noqa: S104 - a container listens on all addresses
    # Exit promptly on `docker compose stop` (SIGTERM) instead of waiting for the kill timeout.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"echo upstream listening on :{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
