"""Request -> (lane, profile, upstream), from the API key, the ``X-Guard-*`` headers or a ``/p/<profile>`` path.

Hermes profiles can set only a base URL and a key, and no header names the profile (FACTS.md), so:

1. ``/p/<profile>/v1/...`` — a per-profile base URL — names the profile; the prefix is stripped.
2. When the config lists client keys, the key decides the profile (no key or an unknown key: 401; a key used
   under another profile's path: 403). Without keys, ``X-Guard-Profile`` may name it, else ``anonymous``.
3. The lane is the profile's configured lane, else ``X-Guard-Lane`` (if allowed), else ``server.default_lane``;
   a lane that does not exist is a 400 — never a silent default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway_guard.admission.policy import Routing
from gateway_guard.errors import Forbidden, NotFound, Unauthorized, UnknownLane

PROFILE_PATH = re.compile(r"^/p/([A-Za-z0-9_.-]{1,64})(/.*)?$")
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Classified:
    lane: str
    profile: str
    path: str  # the path to forward, prefix stripped


class Classifier:
    """Routing and auth of one request, from the compiled policy's ``Routing``."""

    def __init__(self, routing: Routing) -> None:
        self._routing = routing

    def classify(self, path: str, headers: Mapping[str, str]) -> Classified:
        """``headers`` keys are lower-case."""
        path_profile = None
        match = PROFILE_PATH.match(path)
        if match:
            path_profile, path = match.group(1), match.group(2) or "/"
        profile = self._profile(path_profile, headers)
        return Classified(self._lane(profile, headers), profile, path)

    def upstream_for(self, profile: str, model: str | None) -> str:
        r = self._routing
        configured = r.profile_upstream.get(profile)
        if configured is not None:
            return configured
        if model is not None:
            owner = r.model_owner.get(model)
            if owner is not None:
                return owner
            if r.all_models_listed:
                known = ", ".join(sorted(r.model_owner))
                raise NotFound(f"model {model!r} is served by no upstream (models: {known})")
        return r.upstreams[0]

    def _profile(self, path_profile: str | None, headers: Mapping[str, str]) -> str:
        keys = self._routing.keys
        if keys:
            key = client_key(headers)
            if key is None:
                raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
            profile = keys.get(key)
            if profile is None:
                raise Unauthorized("the API key is not known to the guard")
            if path_profile is not None and path_profile != profile:
                raise Forbidden(f"this API key is not for profile {path_profile!r}")
            return profile
        return path_profile or headers.get("x-guard-profile") or ANONYMOUS

    def _lane(self, profile: str, headers: Mapping[str, str]) -> str:
        r = self._routing
        asked = headers.get("x-guard-lane") if r.lane_header else None
        if asked is not None and asked not in r.lanes:
            raise UnknownLane(f"unknown lane {asked!r} in X-Guard-Lane; lanes are: {', '.join(sorted(r.lanes))}")
        configured = r.profile_lane.get(profile)
        if configured is not None:
            return configured
        lane = asked or r.default_lane
        if lane is None:
            raise UnknownLane("no lane: send X-Guard-Lane or set server.default_lane in the config")
        return lane


def client_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None
