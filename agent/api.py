"""The agent's HTTP API (FastAPI): services, logs, events, node, metrics. OpenAPI at /docs.

Every route needs `Authorization: Bearer <token>` (the token in `<state-dir>/token`) except
`GET /healthz` and the API's own documentation (/docs, /openapi.json), which hold no data.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiohttp
import psutil
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import logs as logs_stream
from agent.state import disk_full, disk_full_message
from agent.supervisor import Conflict, Supervisor
from bootstrap.group import parse_group
from bootstrap.spec import ParsedSpec, SpecError, SpecIssue, parse_spec


def create_app(supervisor: Supervisor, token: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await supervisor.start()
        yield
        await supervisor.close()

    app = FastAPI(title="berth agent", description="Runs EAS-style services on this node.", lifespan=lifespan)

    def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>' with the token "
                                     "from the agent's state directory (<state-dir>/token)",
                                headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.exception_handler(SpecError)
    async def spec_error(request: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse(status_code=422, content={
            "detail": [{"path": issue.path, "message": issue.message} for issue in exc.issues],
            "warnings": [{"path": issue.path, "message": issue.message} for issue in exc.warnings],
        })

    def service_or_404(name: str):
        svc = supervisor.services.get(name)
        if svc is None:
            raise HTTPException(404, f"no service named {name!r} on this node (`berth ls` lists them)")
        return svc

    @app.get("/healthz", include_in_schema=True)
    async def healthz() -> dict:
        return {"status": "ok", "runtime": supervisor.runtime.name}

    async def spec_body(request: Request) -> bytes:
        """The request body, refused with 413 past max_spec_bytes before more of it is read or stored."""
        limit = supervisor.config.max_spec_bytes
        too_large = HTTPException(413, f"the spec is larger than this agent accepts ({limit} bytes, "
                                       "`berth agent --max-spec-bytes`); large data belongs in storage, not in the spec")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def parsed_body(request: Request) -> ParsedSpec:
        # A thread: validating a 1 MiB spec takes about 0.25 s on this machine, which would stall every other request.
        return await asyncio.to_thread(parse_spec, await spec_body(request), source="request body")

    @app.post("/v1/services", dependencies=auth, status_code=201)
    async def create_service(request: Request) -> JSONResponse:
        parsed = await parsed_body(request)
        svc, created = await supervisor.deploy(parsed.spec)
        view = supervisor.view(svc)
        warnings = parsed.warnings + supervisor.scaling_warnings(parsed.spec)
        view["warnings"] = [{"path": w.path, "message": w.message} for w in warnings]
        return JSONResponse(view, status_code=201 if created else 200)

    @app.put("/v1/services/{name}", dependencies=auth, status_code=202)
    async def update_service(name: str, request: Request) -> JSONResponse:
        """Roll the service to this config (a rolling update under its rolling_strategy); `rollout` tells progress."""
        service_or_404(name)
        parsed = await parsed_body(request)
        if parsed.spec.name != name:
            raise SpecError([SpecIssue("metadata.name", f"{parsed.spec.name!r} differs from the service updated, {name!r}")])
        view = supervisor.view(await supervisor.update(parsed.spec))
        warnings = parsed.warnings + supervisor.scaling_warnings(parsed.spec)
        view["warnings"] = [{"path": w.path, "message": w.message} for w in warnings]
        return JSONResponse(view, status_code=202)

    @app.post("/v1/services/{name}/rollback", dependencies=auth, status_code=202)
    async def rollback_service(name: str) -> dict:
        """Roll the service back to the revision deployed before its current one."""
        service_or_404(name)
        return supervisor.view(await supervisor.rollback(name))

    @app.post("/v1/services/{name}/scale", dependencies=auth, status_code=202)
    async def scale_service(name: str, request: Request) -> dict:
        """Set the instance count of a service without an autoscaler: {"instance": N} (until its next cron job)."""
        service_or_404(name)
        count = (await _json_object(request)).get("instance")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 1000:
            raise SpecError([SpecIssue("instance", f"{count!r}: give the instance count, a whole number from 0 to 1000")])
        return supervisor.view(await supervisor.scale(name, count))

    @app.post("/v1/services/{name}/wake", dependencies=auth)
    async def wake_service(name: str, request: Request) -> dict:
        """Activate an idle service (autoscaler min 0) for `held` waiting requests (the node gateway calls this).

        Answer: `activated` true while a start from zero is under way (since `since`, unix time;
        the gateway adds `X-Berth-Cold-Start` to the held request's response), `began` whether this
        call started it, and the `desired` and `ready` counts."""
        service_or_404(name)
        held = (await _json_object(request)).get("held", 1)
        if not isinstance(held, int) or isinstance(held, bool) or held < 0:
            raise SpecError([SpecIssue("held", f"{held!r}: give the number of requests held, a whole number >= 0")])
        return await supervisor.wake(name, held)

    @app.get("/v1/services", dependencies=auth)
    async def list_services() -> list[dict]:
        return [supervisor.view(svc) for _, svc in sorted(supervisor.services.items())]

    @app.get("/v1/services/{name}", dependencies=auth)
    async def get_service(name: str) -> dict:
        return supervisor.view(service_or_404(name))

    @app.delete("/v1/services/{name}", dependencies=auth, status_code=202)
    async def delete_service(name: str) -> dict:
        service_or_404(name)
        return supervisor.view(await supervisor.delete(name))

    @app.get("/v1/services/{name}/logs", dependencies=auth)
    async def logs(name: str, instance: str | None = None, follow: bool = False, tail: int | None = None,
                   previous: bool = False) -> Response:
        svc = service_or_404(name)
        chosen = next((inst for inst in svc.instances.values() if instance in (None, inst.id, str(inst.slot))), None)
        if chosen is None:
            raise HTTPException(404, f"service {name!r} has no instance {instance!r}; "
                                     f"instances: {', '.join(i.id for i in svc.instances.values())}")
        if previous:
            path = supervisor.previous_logs_path(chosen)
            if not path.exists():
                raise HTTPException(404, f"instance {chosen.id} has no previous run (it has not restarted)")
            lines = path.read_bytes().splitlines(keepends=True)
            return Response(b"".join(lines[-tail:] if tail else lines), media_type="text/plain")
        if chosen.handle is None:
            if chosen.last_exit is None:
                raise HTTPException(409, f"instance {chosen.id} has not started yet (state {chosen.state.value})")
            # Between two runs (a restart under way): the lines kept from the run that ended.
            kept = "".join(line + "\n" for line in chosen.last_exit.log_tail)
            return PlainTextResponse(kept)
        chunks = await asyncio.to_thread(supervisor.runtime.logs, chosen.handle.id, tail=tail, follow=follow)
        if follow:
            logs_stream.acquire_follower()
        return StreamingResponse(logs_stream.stream(chunks, held=follow), media_type="text/plain")

    @app.get("/v1/events", dependencies=auth)
    async def events(since: int = 0, service: str | None = None, follow: bool = True) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            async for event in supervisor.subscribe(since=since, service=service, follow=follow):
                yield (json.dumps(event) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def gpus_view() -> list[dict[str, Any]]:
        """Each GPU with its holder instance or its shares (each with NVML's measured use), and
        each GPU process with its container and instance."""
        instances = {inst.handle.id: inst.id for svc in supervisor.services.values() for inst in svc.every_instance()
                     if inst.handle is not None}
        gpus = supervisor.gpus.node_view()
        for gpu in gpus:
            gpu["instance"] = str(gpu["instance"]).split("@")[0] if gpu["instance"] else None
            used: dict[str, int] = {}
            for process in gpu["processes"]:
                process["instance"] = instances.get(process["container"] or supervisor.runtime.instance_of_pid(process["pid"]) or "")
                if process["instance"] and process["used_memory_bytes"] is not None:
                    used[process["instance"]] = used.get(process["instance"], 0) + process["used_memory_bytes"]
            for share in gpu["shares"]:
                share["instance"] = share["instance"].split("@")[0]
                share["used_bytes"] = used.get(share["instance"], 0)
        return gpus

    @app.get("/v1/node", dependencies=auth)
    async def node() -> dict[str, Any]:
        info = await asyncio.to_thread(supervisor.runtime.node_info)
        memory = psutil.virtual_memory()
        disks = {}
        for label, path in (("state", supervisor.config.state_dir), ("cache", supervisor.config.cache_dir),
                            ("images", info.get("root_dir"))):
            if path and os.path.exists(path):
                usage = shutil.disk_usage(path)
                disks[label] = {"path": str(path), "total": usage.total, "used": usage.used, "free": usage.free}
        return {
            "runtime": supervisor.runtime.name, "limitations": supervisor.runtime.limitations,
            "engine": info.get("engine"), "cpu": {"count": psutil.cpu_count(), "load": os.getloadavg()},
            "memory": {"total": memory.total, "available": memory.available}, "disks": disks,
            "images": info.get("images", []), "gpus": await asyncio.to_thread(gpus_view), "time": time.time(),
            "gateway": {"mode": supervisor.config.gateway, "url": routes.gateway_url, "admin_url": routes.gateway_admin_url,
                        "routes_version": routes.version, "acked_version": routes.acked},
        }

    # --- the gateway's routes and the service groups ------------------------------------------

    routes = supervisor.routes

    @app.get("/v1/routes", dependencies=auth)
    async def route_table(watch: bool = False) -> Response:
        """Every service's Ready instances and token, and every group: the gateway's table.
        With watch=1, a stream of whole tables (one JSON per line), each with a higher version."""
        if not watch:
            return JSONResponse(routes.table())

        async def tables() -> AsyncIterator[bytes]:
            async for table in routes.watch():
                yield (json.dumps(table) + "\n").encode()

        return StreamingResponse(tables(), media_type="application/x-ndjson")

    @app.post("/v1/gateway/ack", dependencies=auth)
    async def gateway_ack(request: Request) -> dict:
        """The gateway applied table `version` (the agent waits for this before stopping an instance);
        `url` and `admin_url`, when sent, are the gateway's addresses (`berth get`, `berth node`, the autoscaler)."""
        try:
            body = json.loads(await request.body())
            version = body["version"]
        except (ValueError, KeyError, TypeError):
            body, version = {}, None
        if not isinstance(version, int) or isinstance(version, bool):
            raise HTTPException(422, 'send {"version": N}, N the version of the table applied')
        routes.ack(version)
        url, admin_url = body.get("url"), body.get("admin_url")
        if isinstance(url, str) and isinstance(admin_url, str) and url.startswith("http") and admin_url.startswith("http"):
            routes.gateway_url, routes.gateway_admin_url = url, admin_url
        return {"acked": routes.acked}

    async def observed_split(name: str) -> dict[str, float]:
        """What the gateway saw the group's members answer in the last minute, in percent."""
        if not routes.gateway_admin_url:
            return {}
        try:
            async with supervisor._session.get(f"{routes.gateway_admin_url}/v1/stats", timeout=aiohttp.ClientTimeout(total=1)) as answer:
                counts = (await answer.json()).get("groups_last_minute", {}).get(name, {})
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return {}
        total = sum(counts.values()) or 1
        return {service: round(100 * count / total, 1) for service, count in counts.items()}

    def group_view(name: str) -> dict[str, Any]:
        group = routes.groups.get(name)
        table = routes.table()["groups"].get(name)
        configured = {}
        if table is not None:
            shares = {}
            for route in table["routes"]:
                if "match" not in route:
                    shares[route["service"]] = shares.get(route["service"], 0) + route.get("weight", 100)
            total = sum(shares.values()) or 1
            configured = {service: round(100 * share / total, 1) for service, share in shares.items()}
        return {"name": name, "file": group.to_json_dict() if group else None, "members": routes.members(name),
                "routes": [{k: v for k, v in route.items()} for route in table["routes"]] if table else [],
                "configured_split_percent": configured, "serving": table is not None,
                "gateway_url": f"{routes.gateway_url}/api/predict/{name}" if routes.gateway_url else None,
                "gateway_admin_url": routes.gateway_admin_url}

    @app.put("/v1/groups/{name}", dependencies=auth)
    async def put_group(name: str, request: Request) -> JSONResponse:
        """Create or change a service group (its file); new requests follow within 1 s."""
        group, warnings = parse_group(await request.body(), source="request body")
        if group.name != name:
            raise SpecError([SpecIssue("name", f"{group.name!r} differs from the group in the URL, {name!r}")])
        created = routes.apply_group(group)
        view = group_view(name)
        view["warnings"] = [{"path": w.path, "message": w.message} for w in warnings]
        return JSONResponse(view, status_code=201 if created else 200)

    @app.get("/v1/groups", dependencies=auth)
    async def list_groups() -> list[dict]:
        names = set(routes.groups) | {svc.spec.metadata.group for svc in supervisor.services.values() if svc.spec.metadata.group}
        return [group_view(name) for name in sorted(names)]

    @app.get("/v1/groups/{name}", dependencies=auth)
    async def get_group(name: str) -> dict:
        if name not in routes.groups and not routes.members(name):
            raise HTTPException(404, f"no service group named {name!r} on this node (`berth group ls` lists them)")
        return {**group_view(name), "observed_split_percent": await observed_split(name)}

    @app.delete("/v1/groups/{name}", dependencies=auth)
    async def delete_group(name: str) -> dict:
        if not routes.remove_group(name):
            raise HTTPException(404, f"no service group file named {name!r} on this node")
        return {"name": name, "deleted": True}

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(supervisor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(logs_stream.TooManyFollowers)
    async def too_many_followers(request: Request, exc: logs_stream.TooManyFollowers) -> JSONResponse:
        return JSONResponse(status_code=429, content={"detail": str(exc)})

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:
        """Every failure answers JSON that says what happened; never a bare 500."""
        if disk_full(exc):
            return JSONResponse(status_code=507, content={"detail": disk_full_message(supervisor.config.state_dir)})
        return JSONResponse(status_code=500, content={
            "detail": f"the agent failed: {type(exc).__name__}: {exc} (its log has the details)"})

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    return app


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError as exc:
        raise SpecError([SpecIssue("(body)", f"not JSON: {exc.msg}")]) from None
    if not isinstance(body, dict):
        raise SpecError([SpecIssue("(body)", "give a JSON object")])
    return body


async def _threaded(chunks) -> AsyncIterator[bytes]:
    """A blocking iterator (the runtime's log stream) read in a thread, chunk by chunk."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, chunks, done)
        if chunk is done:
            return
        yield chunk
