"""The bare Python proxy: the gateway's stack without admission, the floor for every ratio.

Raw ASGI on uvicorn + uvloop + httptools (the same uvicorn settings, server protocol and GC
settings as `gateway serve`: its request-head deadline and disconnect notice, `settle_heap`),
the same upstream client seam (`create_upstream_client`) and the same streaming forwarder
(`forward`), and the same request-header hygiene (`upstream_request_headers`, `upstream_url`).
What it leaves out is exactly what the gateway adds: API-key lookup, routing, the admission
call, limit headers, metrics and the access log.

    python bench/bare_proxy.py --listen 127.0.0.1:8100 --upstream http://127.0.0.1:8000 \
        [--client aiohttp|httpx] [--workers N]

With `--workers N` the parent binds the socket and forks N workers that share it, like
`gateway serve --workers N`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import uvicorn

from gateway.asgi import Receive, Scope, Send
from gateway.config.model import Identity, Upstream
from gateway.edge import edge_protocol
from gateway.gc_tuning import settle_heap
from gateway.proxy.forwarder import forward
from gateway.proxy.headers import HeaderPolicy, upstream_request_headers, upstream_url
from gateway.proxy.upstream import UpstreamClient, create_upstream_client
from gateway.responses import send_error

MAX_BODY = 10 * 1024 * 1024


class BareProxy:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.client: UpstreamClient = create_upstream_client(upstream)
        self.policy = HeaderPolicy.from_config(upstream, Identity())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        url = upstream_url(self.upstream.url, scope.get("raw_path") or scope["path"].encode(), scope["query_string"])
        if url is None:
            await send_error(send, 400, "bad_request", "The request target cannot be forwarded.")
            return
        peer = scope.get("client")
        headers = upstream_request_headers(
            self.policy, scope["headers"], key_id="-", plan="-",
            forwarded_for=peer[0] if peer else "", forwarded_proto=scope.get("scheme", "http"),
        )
        await forward(
            scope, receive, send,
            client=self.client, url=url, headers=headers, extra_response_headers=[],
            max_body=MAX_BODY, timeout=self.upstream.timeout,
        )


def _server(app: BareProxy) -> uvicorn.Server:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        lifespan="off",
        loop="uvloop",
        http=edge_protocol(lambda: 30.0),  # default head limits, as the gateway's
        proxy_headers=False,
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        timeout_keep_alive=75,  # the gateway's client_keep_alive default
    )
    return uvicorn.Server(config)


def _run_worker(sock: socket.socket, upstream: Upstream) -> None:
    import uvloop

    app = BareProxy(upstream)

    async def main() -> None:
        settle_heap()  # the gateway worker's GC settings (gateway/gc_tuning.py)
        try:
            await _server(app).serve([sock])
        finally:
            await app.client.aclose()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-connections", type=int, default=512)
    args = parser.parse_args(argv)

    upstream = Upstream(url=args.upstream.rstrip("/"), client=args.client, max_connections=args.max_connections)
    host, _, port = args.listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)
    if args.workers <= 1:
        _run_worker(sock, upstream)
        return 0

    children: list[int] = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _run_worker(sock, upstream)
            os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
