"""The guard's own endpoints: capacity (what guard-dispatch reads), liveness, readiness, admin limit."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway_guard.admission.limit import LimitNotSettable
from gateway_guard.admission.reservations import apply_reservations
from gateway_guard.admission.view import AdmissionGate, SlotView
from gateway_guard.app.asgi import bearer_is, is_admin
from gateway_guard.app.state import GuardState
from gateway_guard.errors import ClientError, Forbidden, GuardError, NotFound, Unauthorized
from gateway_guard.telemetry import METRICS_CONTENT_TYPE
from gateway_guard.upstream.probe import Prober

MAX_LIMIT = 10_000


def capacity_payload(
    gates: Mapping[str, AdmissionGate], batch_lane: str = "batch", *, probers: Mapping[str, Prober] | None = None
) -> dict[str, Any]:
    """Per upstream and per lane: limit / in_flight / queued / free; top-level ``free`` = batch room overall."""
    upstreams: dict[str, Any] = {}
    lanes: dict[str, dict[str, int]] = {}
    for name, gate in gates.items():
        snap = gate.snapshot()
        limit_source = gate.limit_source
        upstreams[name] = {
            "limit": snap.limit,
            "limit_reason": limit_source.reason,
            "in_flight": snap.in_flight,
            "queued": snap.queued,
            "free": snap.free,
            "lanes": {lane: view.as_dict() for lane, view in snap.lanes.items()},
            "profiles": {p: view.as_dict() for p, view in snap.profiles.items()},
        }
        if snap.held is not None:
            upstreams[name]["held"] = snap.held  # nothing granted: requests wait in their lanes
        prober = None if probers is None else probers.get(name)
        if prober is not None:  # up / down / loading, since when (seconds ago), why
            upstreams[name]["state"] = prober.state
            upstreams[name]["state_since_s"] = round(time.monotonic() - prober.state_since, 1)
            upstreams[name]["state_detail"] = prober.state_detail
        if snap.max_context_tokens is not None:
            upstreams[name]["tokens_in_flight"] = snap.tokens_in_flight
            upstreams[name]["max_context_tokens"] = snap.max_context_tokens
        history = limit_source.history
        if len(history) > 1:  # the last moves of the limit, newest last: (seconds ago, limit, reason)
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


def guard_capacity(state: GuardState) -> dict[str, Any]:
    """What ``GET /guard/capacity`` answers (and ``/guard/events`` sends): gates, upstream states, reservations."""
    return apply_reservations(capacity_payload(state.gates, probers=state.probers), state.reservations)


async def capacity(request: Request) -> Response:
    return JSONResponse(guard_capacity(_state(request)))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus text: the guard's own metrics and the upstreams' saturation gauges as the probers last read
    them. With ``server.metrics_token`` set, only for ``Authorization: Bearer <metrics_token>``."""
    token = _state(request).settings.server.metrics_token
    if token and not bearer_is(token, request.headers.get("authorization")):
        error = Unauthorized("/metrics needs the metrics token: send 'Authorization: Bearer <server.metrics_token>'")
        return Response(error.body(), 401, {"www-authenticate": "Bearer"}, media_type="application/json")
    return Response(await _state(request).telemetry.metrics(), media_type=METRICS_CONTENT_TYPE)


async def ready(request: Request) -> Response:
    """Each upstream as its prober last saw it (no call upstream per request), with the reading's age."""
    state = _state(request)
    names = list(state.probers)
    readings = await asyncio.gather(*(state.probers[n].latest() for n in names))
    report: dict[str, dict[str, Any]] = {}
    for name, reading in zip(names, readings, strict=True):
        if reading is None:
            report[name] = {"ready": False, "detail": "not probed yet", "age_s": None}
        else:
            report[name] = {"ready": reading.ready, "detail": reading.detail, "age_s": round(reading.age(), 2)}
    if state.cluster is not None:  # the shared cap: a replica in fallback serves only what it already held
        for name, status in state.cluster.status.items():
            report[name]["cluster"] = {
                "mode": status.mode,
                "reason": status.reason,
                "allowance": status.allowance,
                "replica": status.replica,
                "held": status.held,
                "idle": status.idle,  # leases kept for this replica's next requests (counted in the cap)
                "others_waiting": status.others_waiting,
                "cluster_in_flight": status.in_flight,
                "replicas": dict(status.replicas),
            }
            if not status.shared:
                report[name]["ready"] = False
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
        if gate is None:
            raise NotFound(f"no upstream named {name!r}")
        new_limit = _limit_from(await request.body())
        try:
            gate.limit_source.set(new_limit, "set by operator")
        except LimitNotSettable as exc:
            raise ClientError(str(exc)) from None
        return JSONResponse(capacity_payload(state.gates)["upstreams"][name])
    except GuardError as error:
        return Response(error.body(), status_code=error.status, media_type="application/json")


def _limit_from(body: bytes) -> int:
    """``{"limit": N}`` with N a whole number 1..10000; anything else is a 400 (never a 500)."""
    example = 'body must be JSON like {"limit": 4}'
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ClientError(example) from None
    value = payload.get("limit") if isinstance(payload, dict) else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LIMIT:
        raise ClientError(f"limit must be an integer 1..{MAX_LIMIT} ({example})")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
