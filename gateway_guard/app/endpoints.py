"""The guard's own endpoints: capacity (what guard-dispatch reads), liveness, readiness, admin limit."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway_guard.admission.gate import AdmissionGate, Gate, SlotView
from gateway_guard.app.asgi import is_admin
from gateway_guard.app.state import GuardState
from gateway_guard.errors import ClientError, Forbidden, GuardError, NotFound
from gateway_guard.telemetry import METRICS_CONTENT_TYPE


def capacity_payload(gates: dict[str, AdmissionGate], batch_lane: str = "batch") -> dict[str, Any]:
    """Per upstream and per lane: limit / in_flight / queued / free; top-level ``free`` = batch room overall."""
    upstreams: dict[str, Any] = {}
    lanes: dict[str, dict[str, int]] = {}
    for name, gate in gates.items():
        snap = gate.snapshot()
        limit_source = gate.limit_source if isinstance(gate, Gate) else None
        upstreams[name] = {
            "limit": snap.limit,
            "limit_reason": getattr(limit_source, "reason", None),
            "in_flight": snap.in_flight,
            "queued": snap.queued,
            "free": snap.free,
            "lanes": {lane: view.as_dict() for lane, view in snap.lanes.items()},
            "profiles": {p: view.as_dict() for p, view in snap.profiles.items()},
        }
        if snap.max_context_tokens is not None:
            upstreams[name]["tokens_in_flight"] = snap.tokens_in_flight
            upstreams[name]["max_context_tokens"] = snap.max_context_tokens
        history = getattr(limit_source, "history", None)
        if history:  # the last moves of the limit, newest last: (seconds ago, limit, reason)
            now = time.monotonic()
            upstreams[name]["limit_history"] = [
                {"ago_s": round(now - c.at, 1), "limit": c.limit, "reason": c.reason} for c in list(history)[-5:]
            ]
        for lane, view in snap.lanes.items():
            _add(lanes.setdefault(lane, {"limit": 0, "in_flight": 0, "queued": 0, "free": 0}), view)
    free = lanes.get(batch_lane, {}).get("free", 0)
    return {"free": free, "lanes": lanes, "upstreams": upstreams}


def _add(total: dict[str, int], view: SlotView) -> None:
    total["limit"] += view.limit or 0
    total["in_flight"] += view.in_flight
    total["queued"] += view.queued
    total["free"] += view.free or 0


def _state(request: Request) -> GuardState:
    state: GuardState = request.app.state.guard
    return state


async def capacity(request: Request) -> Response:
    return JSONResponse(capacity_payload(_state(request).gates))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus text: the guard's own metrics and the upstreams' saturation gauges, read now."""
    telemetry = _state(request).telemetry
    return Response(await telemetry.metrics(), media_type=METRICS_CONTENT_TYPE)


async def ready(request: Request) -> Response:
    state = _state(request)
    results = await asyncio.gather(*(up.ready() for up in state.upstreams.values()))
    report = {
        name: {"ready": ok, "detail": detail} for name, (ok, detail) in zip(state.upstreams, results, strict=True)
    }
    ok = all(r["ready"] for r in report.values())
    return JSONResponse({"ready": ok, "upstreams": report}, status_code=200 if ok else 503)


async def set_limit(request: Request) -> Response:
    """``POST /guard/upstreams/{name}/limit {"limit": N}`` with the admin token: change a fixed cap live."""
    state = _state(request)
    try:
        if not is_admin(state.settings.server.admin_token, {k.lower(): v for k, v in request.headers.items()}):
            raise Forbidden("changing a limit needs the admin token (server.admin_token / GUARD_ADMIN_TOKEN)")
        name = request.path_params["name"]
        gate = state.gates.get(name)
        if not isinstance(gate, Gate):
            raise NotFound(f"no upstream named {name!r}")
        try:
            payload = await request.json()
            new_limit = int(payload["limit"])
        except (ValueError, KeyError, TypeError):
            raise ClientError('body must be JSON like {"limit": 4}') from None
        source = gate.limit_source
        if new_limit < 1 or not hasattr(source, "set"):
            raise ClientError(f"limit must be an integer >= 1 on an upstream with a fixed cap (got {new_limit})")
        source.set(new_limit, "set by operator")
        return JSONResponse(capacity_payload(state.gates)["upstreams"][name])
    except GuardError as error:
        return Response(error.body(), status_code=error.status, media_type="application/json")
