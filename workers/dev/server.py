"""What every local sandbox server shares: a threaded HTTP server on a free loopback port."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Self


class LocalServer:
    """Give subclasses ``self.server``; they get ``url``, start/stop and ``with`` support."""

    server: ThreadingHTTPServer
    url_path: str = ""  # appended to the base URL (a sandbox's endpoint path)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{self.url_path}"

    def start(self) -> Self:
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
