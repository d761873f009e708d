"""The admin port (9090): /ready, /live, /status, /metrics.

/metrics is berth's own series, then the engine's (vLLM's), then the app's own /metrics
(`--app-metrics-path`) re-exported as they are, so an autoscaler's custom[GAUGE] reads any app
through the one port the agent knows.

/ready is what load balancers and the agent ask: 200 only in READY (and while the spec's
readiness_check passes). /live is 200 unless the bootstrap FAILED, the child is gone, or the
spec's liveness_check fails. Both answer at once from the start, so a probe during a long
prepare gets an honest 503, not a refused connection.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from serving.engine import Engine
from serving.metrics import Metrics
from serving.state import BootState


log = logging.getLogger("berth.admin")


class AppMetrics:
    """The app's own Prometheus page, scraped at each scrape of ours.

    Off for good once the app answers 404, or answers with something that is not Prometheus
    text (an app that answers every path alike): re-exported, it would make our whole page
    unreadable to every scraper.
    """

    def __init__(self, app_port: int, path: str | None) -> None:
        self.path = path
        self.url = f"http://127.0.0.1:{app_port}{path}" if path else None
        self._session: aiohttp.ClientSession | None = None

    async def text(self) -> str:
        if self.url is None:
            return ""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        try:
            async with self._session.get(self.url) as response:
                if response.status == 404:
                    self.url = None  # the app serves no metrics: stop asking
                    return ""
                if response.status != 200:
                    return ""
                text = await response.text()
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, UnicodeDecodeError):
            return ""  # not up yet, or busy: this scrape goes without the app's series
        try:
            for _ in text_string_to_metric_families(text):
                pass
        except ValueError:
            log.warning("the app's %s is not Prometheus text; its series are not re-exported", self.path)
            self.url = None
            return ""
        return text

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def admin_app(state: BootState, metrics: Metrics, engine: Engine, app_port: int, app_metrics: AppMetrics) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        return _verdict(state.ready, state)

    async def live(_: web.Request) -> web.Response:
        return _verdict(state.alive, state)

    async def status(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(state.to_json_dict(), indent=2) + "\n", content_type="application/json")

    async def prometheus(_: web.Request) -> web.Response:
        body = metrics.render()
        for extra in (await engine.metrics_text(app_port), await app_metrics.text()):
            if extra:
                body += extra.encode() if extra.endswith("\n") else (extra + "\n").encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/live", live)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", prometheus)
    return app


def _verdict(ok: bool, state: BootState) -> web.Response:
    return web.Response(status=200 if ok else 503, text=f"{state.state.value}\n")


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
