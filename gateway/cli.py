"""`oel gateway`: run the recording gateway in front of the model server."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

log = logging.getLogger(__name__)


@click.command("gateway")
@click.option("--host", help="Listen address (default OEL_GATEWAY__HOST, 127.0.0.1).")
@click.option("--port", type=int, help="Listen port (default OEL_GATEWAY__PORT, 8090).")
@click.pass_context
def gateway(ctx: click.Context, host: str | None, port: int | None) -> None:
    """An OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) that forwards every call
    to the model server (OEL_GATEWAY__UPSTREAM_URL, default OEL_MODEL__VLLM_URL) and records it as a step
    of an episode on oel.trajectories, so an existing agent learns by pointing its base URL here.

    Name the namespace with the X-OEL-Namespace header or the model `oel/<namespace>` (which also answers
    with the namespace's current promoted version); the episode with X-OEL-Episode-Id (else each call
    starts one, returned in that response header). Feedback and the outcome go to
    POST /v1/oel/episodes/<id>/feedback and /end; an episode idle for OEL_GATEWAY__IDLE_END_S ends by
    itself. Metrics at /metrics on the same port. docs/gateway.md has the details and examples.
    """
    from oel.cli_context import settings_of

    s = settings_of(ctx)
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:
        s = s.model_copy(update={"gateway": s.gateway.model_copy(update=overrides)})
    asyncio.run(serve(s))


async def serve(settings, ready: asyncio.Event | None = None) -> None:
    """Run the gateway until SIGTERM or SIGINT; on the way out every open episode is ended and flushed."""
    import httpx
    from aiohttp import web

    from gateway.app import Gateway
    from gateway.models import ModelResolver
    from oel.model.vllm_backend import VLLMBackend
    from oel.store import S3Store
    from producers.recorder import Recorder

    g = settings.gateway
    upstream_url = (g.upstream_url or settings.model.vllm_url).rstrip("/")
    store = S3Store(settings.s3)
    backend = VLLMBackend(upstream_url)
    recorder = Recorder(settings)
    resolver = ModelResolver(settings, store, backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    timeout = httpx.Timeout(g.upstream_timeout_s, connect=10.0)
    try:
        async with httpx.AsyncClient(base_url=upstream_url, timeout=timeout) as upstream:
            runner = web.AppRunner(Gateway(settings, recorder, resolver, upstream).app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, g.host, g.port).start()
            log.info("gateway on http://%s:%d, answering from %s", g.host, g.port, upstream_url)
            click.echo(f"oel gateway: http://{g.host}:{g.port}/v1 -> {upstream_url}", err=True)
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("gateway stopping: ending open episodes")
            await runner.cleanup()
    finally:
        resolver.close()
        recorder.close(raise_on_loss=False)
        backend.close()
