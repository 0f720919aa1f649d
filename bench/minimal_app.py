"""The ceiling of ``python -m bench.serve``: a raw ASGI app that only reads the body and answers 200.

``python -m bench.minimal_app`` serves it on 127.0.0.1 (a free port) with the very server ``cio-sync serve`` runs:
the uvicorn configuration and the signal handling of :mod:`cio_sync.serve` (httptools, the same keep-alive and
shutdown settings), so that the only difference between the two is the application. It prints the same
``listening on URL`` line and exits 0 on SIGTERM. No parsing, no authentication, no spool: what is left is the
server's own cost per request on this machine.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, cast

from cio_sync import serve
from cio_sync.asgi import Limits

_OK = b'{"success":true}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_OK)).encode())]


class MinimalApp:
    """Reads the whole body, answers ``{"success":true}``; nothing else. ``limits`` is what the server reads."""

    limits = Limits()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": _OK})


def main() -> int:
    def listening(url: str) -> None:
        print(f"minimal app: listening on {url}", flush=True)

    # cio_sync.serve's own server and signal handling: only the application differs from cio-sync serve.
    asyncio.run(serve._serve(cast(Any, MinimalApp()), "127.0.0.1", 0, listening))
    return 0


if __name__ == "__main__":
    sys.exit(main())
