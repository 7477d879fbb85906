"""A stand-in HTTP server on 127.0.0.1 for the device client's tests: serves in a background
thread from a handler class the test defines, gives its `url`, and shuts down on leaving `with`."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.shutdown()
        super().__exit__(*exc)
