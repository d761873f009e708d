"""`berth boot`'s phases: prepare -> launch -> started -> warmup -> READY -> drain -> exit.

The proxy and admin ports are bound first, so probes get an honest 503 during a long
prepare. Every phase is a coroutine raced against SIGTERM and the child's death: a stop in
any phase cancels the work at once, stops the child and exits; the child dying in any phase
ends the bootstrap with the child's exit code and its last output in the error.

Exit codes: 0 after a clean stop (also when the child ended on the SIGTERM the drain sent
it); 3 when berth's own prepare failed (spec, storage, pip); 1 when the child never became
ready or its warmup failed; otherwise the child's own code, 128+N when signal N that berth
did not send ended it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, TypeVar

from bootstrap import probes, warmup
from bootstrap.child import Child, OrphanReaper, become_subreaper, describe_exit
from bootstrap.prepare import DEFAULT_CACHE_DIR, PrepareContext, PrepareError, prepare
from bootstrap.spec import Probe, ServiceSpec
from serving.admin import AppMetrics, admin_app, start_admin
from serving.engine import Engine
from serving import timeouts
from serving.metrics import Metrics
from serving.express import SCANS
from serving.proxy import ProxyConfig, start_proxy, upstream_pool
from serving.state import BootState, State

log = logging.getLogger("berth.boot")

EXIT_OK, EXIT_FAILED, EXIT_PREPARE = 0, 1, 3
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
T = TypeVar("T")


@dataclass
class BootConfig:
    engine: Engine
    spec: ServiceSpec | None = None
    app_port: int = 8000
    proxy: ProxyConfig | None = None  # None: --no-proxy
    proxy_port: int = 8080
    admin_port: int = 9090
    app_metrics_path: str | None = "/metrics"  # the app's own page, re-exported on the admin port; None: off
    host: str = "0.0.0.0"
    warmup_file: Path | None = None
    warmup_policy: str = "fail"
    drain_delay: float = 5.0
    grace: float = 30.0
    stop_timeout: float = 10.0
    startup_timeout: float = 600.0
    probe_interval: float = 0.05
    cache_dir: Path = DEFAULT_CACHE_DIR
    status_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def child_stop_timeout(self) -> float:
        return child_stop_timeout(self.stop_timeout, self.grace)


def child_stop_timeout(stop_timeout: float, grace: float) -> float:
    """The child's share of the grace period: at most half of it, so that a short grace
    (10 s, say) still leaves time to drain rather than going straight to stopping the child."""
    return min(stop_timeout, grace / 2)


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


class ChildExited(Exception):
    def __init__(self, returncode: int) -> None:
        self.returncode = returncode


class StartupFailed(Exception):
    """The child never passed its startup checks, or its warmup failed."""


class Boot:
    def __init__(self, config: BootConfig) -> None:
        self.config = config
        self.state = BootState(config.status_file)
        self.metrics = Metrics(self.state)
        self.child: Child | None = None
        self.reaper = OrphanReaper()
        self._stop = asyncio.Event()
        self._stop_signal: str | None = None
        self._background: list[asyncio.Task] = []
        self._closers: list = []
        self._keep: set[int] = set()  # pids whose exit status is ours to collect, not the orphan reaper's

    # --- the whole run ------------------------------------------------------------------

    async def run(self) -> int:
        become_subreaper()
        self._install_signals()
        try:
            await self._bind()
        except OSError as exc:
            code = self._fail(EXIT_FAILED, f"cannot bind the admin or proxy port: {exc.strerror or exc}")
            self.state.finish(code)
            return code
        self._background += [
            asyncio.ensure_future(self.metrics.sample_average()),
            asyncio.ensure_future(self.reaper.run(self._keep)),
        ]
        try:
            code = await self._lifecycle()
        finally:
            await self._close()
        self.state.finish(code)
        # The last line of the log says why: a runtime that knows only the log's tail (Docker) shows it.
        why = self.state.failure_reason if code else ""
        log.info("exit code %d%s", code, f": {why}" if why else "")
        return code

    async def _lifecycle(self) -> int:
        started = time.monotonic()
        try:
            await self._phase("prepare", State.PREPARING, self._prepare())
            self._launch()
            await self._phase("launch", State.LAUNCHING, self._wait_started())
            await self._phase("warmup", State.WARMING, self._warm())
            self.state.record_phase("startup", time.monotonic() - started)
            self.state.set(State.READY)
            self._watch_checks()
            await self._until(self._stop.wait())
        except Stopped:
            return await self._stop_early()
        except ChildExited as exc:
            return self._child_died(exc.returncode)
        except PrepareError as exc:
            return self._fail(EXIT_PREPARE, f"prepare failed: {exc}")
        except (StartupFailed, warmup.WarmupError) as exc:
            await self._stop_child()
            return self._fail(EXIT_FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in berth: still stop the child and say so
            log.exception("berth boot failed")
            await self._stop_child()
            return self._fail(EXIT_FAILED, f"berth boot failed: {type(exc).__name__}: {exc}")
        return await self._drain()

    # --- phases -------------------------------------------------------------------------

    async def _phase(self, name: str, state: State, work: Awaitable[None]) -> None:
        self.state.set(state)
        began = time.monotonic()
        await self._until(work)
        seconds = time.monotonic() - began
        self.state.record_phase(name, seconds)
        self.metrics.record_phase(name, seconds)

    async def _prepare(self) -> None:
        if self.config.spec is None:
            return
        context = PrepareContext(
            spec=self.config.spec, cache_dir=self.config.cache_dir, env=self.config.env, report=self.state.record_prepare_step
        )
        try:
            await prepare(context)
        except PrepareError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of berth's own preparation exits 3
            raise PrepareError(f"{type(exc).__name__}: {exc}") from exc

    def _launch(self) -> None:
        self.state.set(State.LAUNCHING)
        held = probes.port_in_use(self.config.app_port)
        if held is not None:
            raise StartupFailed(held)
        launch = self.config.engine.launch(self.config.app_port)
        self.child = Child.start(launch.argv, {**self.config.env, **launch.env})
        self.state.child_pid = self.child.pid
        self._keep.add(self.child.pid)

    async def _wait_started(self) -> None:
        container = self.config.spec.container if self.config.spec else None
        gates: list[Probe | None] = [container.startup_check, container.readiness_check] if container else []
        gates = [probe for probe in gates if probe is not None] or [None]
        timeout = self.config.startup_timeout
        try:
            async with timeouts.timeout(timeout):
                for probe in gates:
                    if probe is not None and probe.initial_delay_seconds:
                        await asyncio.sleep(probe.initial_delay_seconds)
                    check = self._on_port_or_fail(probes.check_for(probe, self.config.app_port, child_pid=self.child.pid))
                    successes = probe.success_threshold if probe else 1
                    await probes.ProbeLoop(check, self.config.probe_interval, successes).until_passing()
        except TimeoutError:
            advice = self._port_advice()
            raise StartupFailed(f"the child did not pass its startup check within {timeout:g} s (--startup-timeout)"
                                + (f" ({advice})" if advice else "")) from None

    def _port_advice(self) -> str:
        """For an instance given its own port (not the spec's): what a command that ignores PORT does."""
        spec = self.config.spec
        if spec is None or self.config.app_port == spec.container.port:
            return ""
        return (f"this instance's port is {self.config.app_port}, given to the command as PORT; a command that binds the "
                f"spec's port {spec.container.port} instead cannot run a second instance on this host")

    def _on_port_or_fail(self, check: probes.Check) -> probes.Check:
        """`check`, failing the start at once when the child listens on the spec's port instead
        of its own: it took the port another instance needs, and would never pass."""
        advice = self._port_advice()
        if not advice:
            return check
        spec_port, child_pid = self.config.spec.container.port, self.child.pid
        looked = 0.0

        async def on_port() -> str | None:
            nonlocal looked
            reason = await check()
            if reason is not None and time.monotonic() - looked >= 1.0:  # /proc scans once a second, not every probe
                looked = time.monotonic()
                if probes.child_listens(spec_port, child_pid):
                    raise StartupFailed(f"the child listens on port {spec_port}, not on its PORT {self.config.app_port} ({advice})")
            return reason

        return on_port

    async def _warm(self) -> None:
        try:
            requests = await self._warmup_requests()
            if requests:
                self.state.warmup = await warmup.replay(requests, f"http://127.0.0.1:{self.config.app_port}")
        except warmup.WarmupError as exc:
            if self.config.warmup_policy == "fail":
                raise
            self.state.last_error = str(exc)
            log.warning("%s (ignored: --warmup-policy ignore)", exc)

    async def _warmup_requests(self) -> list[warmup.WarmupRequest]:
        if self.config.warmup_file is not None:
            return warmup.load_file(self.config.warmup_file)
        profile = await self.config.engine.sized_warmup_profile(self.config.app_port)
        return warmup.parse_lines(profile, f"{self.config.engine.name} warmup profile", builtin=True) if profile else []

    def _watch_checks(self) -> None:
        container = self.config.spec.container if self.config.spec else None
        if container is None:
            return
        for probe, attribute in ((container.readiness_check, "ready_check_passing"), (container.liveness_check, "live")):
            if probe is None:
                continue

            def on_verdict(ok: bool, reason: str | None, attribute: str = attribute) -> None:
                if getattr(self.state, attribute) != ok:
                    log.warning("%s check %s%s", attribute.split("_")[0], "passes" if ok else "fails: ", reason or "")
                    setattr(self.state, attribute, ok)

            check = probes.check_for(probe, self.config.app_port, child_pid=self.child.pid)
            loop = probes.ProbeLoop(check, probe.period_seconds, probe.success_threshold, probe.failure_threshold)
            self._background.append(asyncio.ensure_future(loop.watch(on_verdict)))

    # --- stopping -----------------------------------------------------------------------

    async def _drain(self) -> int:
        """Quiet period (still serving), then refuse new requests and let in-flight ones end."""
        assert self.child is not None
        began = time.monotonic()
        grace = self.config.grace
        stop_timeout = self.config.child_stop_timeout
        serving_until = began + max(0.0, grace - stop_timeout)
        self.state.set(State.DRAINING)
        log.info("draining on %s: /ready is 503; serving for a %.1f s quiet period, then in-flight requests get up to %.1f s",
                 self._stop_signal, self.config.drain_delay, max(0.0, grace - stop_timeout - self.config.drain_delay))
        try:
            await self._until_child(asyncio.sleep(min(self.config.drain_delay, serving_until - time.monotonic())))
            self.state.refusing = True
            await self._until_child(self._wait_quiet(serving_until))
        except ChildExited as exc:
            return self._child_died(exc.returncode)
        if self.state.inflight.count:
            log.warning("grace period over with %d request(s) still in flight", self.state.inflight.count)
        self.state.record_phase("drain", time.monotonic() - began)
        code = self._exit_code(await self.child.stop(stop_timeout))
        self.state.set(State.STOPPED)
        return code

    async def _wait_quiet(self, deadline: float) -> None:
        if self.config.proxy is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.state.inflight.wait_idle(), max(0.0, deadline - time.monotonic()))
            return
        # --no-proxy: only the engine can tell what is in flight (the generic one cannot).
        while time.monotonic() < deadline:
            load = await self.config.engine.load(self.config.app_port)
            if load is None or not load.busy:
                return
            await asyncio.sleep(0.2)

    async def _stop_early(self) -> int:
        log.info("%s during %s: stopping now", self._stop_signal, self.state.state.value)
        code = EXIT_OK
        if self.child is not None:
            code = self._exit_code(await self.child.stop(self.config.child_stop_timeout))
        self.state.set(State.STOPPED)
        return code

    async def _stop_child(self) -> None:
        if self.child is not None:
            await self.child.stop(self.config.child_stop_timeout)

    def _child_died(self, returncode: int) -> int:
        assert self.child is not None
        self.child.send_group_quietly(signal.SIGKILL)  # what it left behind in its group
        self.child.join_output()
        phase = self.state.state.value
        tail = self.child.tail.text()
        message = f"the child {describe_exit(returncode)} during {phase}"
        advice = self._port_advice()
        if advice and phase == State.LAUNCHING.value:
            message += f" ({advice})"
        return self._fail(self._exit_code(returncode), message + (f"\nits last output:\n{tail}" if tail else ""))

    def _fail(self, code: int, message: str) -> int:
        log.error("%s", message)
        self.state.set(State.FAILED, error=message)
        return code

    def _exit_code(self, returncode: int) -> int:
        """The child's code, as a shell reports it; 0 when it ended on our own SIGTERM."""
        assert self.child is not None
        ours = signal.SIGTERM in self.child.signalled_by_us
        if ours and returncode in (-signal.SIGTERM, 128 + signal.SIGTERM):
            return EXIT_OK
        return 128 - returncode if returncode < 0 else returncode

    # --- racing work against SIGTERM and the child's death ------------------------------

    async def _until(self, work: Awaitable[T]) -> T:
        """Run `work`; cancel it and raise Stopped or ChildExited if either comes first."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        waiting = {task, stop} | ({self.child.exited} if self.child else set())
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self._stop.is_set():
            raise Stopped()
        assert self.child is not None
        raise ChildExited(self.child.exited.result())

    async def _until_child(self, work: Awaitable[None]) -> None:
        assert self.child is not None
        task = asyncio.ensure_future(work)
        await asyncio.wait({task, self.child.exited}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ChildExited(self.child.exited.result())

    # --- signals and servers ------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, self._forward, sig)

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.info("%s again: already stopping", signal.Signals(sig).name)
            return
        self._stop_signal = signal.Signals(sig).name
        self._stop.set()

    def _forward(self, sig: int) -> None:
        if self.child is not None:
            log.info("forwarding %s to the child", signal.Signals(sig).name)
            self.child.send(sig)

    async def _bind(self) -> None:
        config = self.config
        app_metrics = AppMetrics(config.app_port, config.app_metrics_path)
        runner = await start_admin(admin_app(self.state, self.metrics, config.engine, config.app_port, app_metrics),
                                   config.host, config.admin_port)
        self._closers += [runner.cleanup, app_metrics.close]
        if config.proxy is not None:
            pool = upstream_pool(config.proxy)
            server, listener = await start_proxy(self.state, config.proxy, self.metrics, pool, config.host, config.proxy_port)

            async def close_proxy() -> None:
                listener.close()
                await server.shutdown(1.0)
                await pool.close()

            self._closers.insert(0, close_proxy)
        log.info(
            "admin on :%d%s; the child's port is %d",
            config.admin_port, f", proxy on :{config.proxy_port} (express lane scans in {SCANS})" if config.proxy else " (no proxy)",
            config.app_port,
        )

    async def _close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()
        if self.child is not None:
            self.child.release_watchdog()
