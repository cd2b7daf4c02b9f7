"""A replica's id from the ``[cluster]`` settings (``ClusterSpec`` lives in ``admission/policy.py``, a leaf that
``settings.py`` reads without importing this package, and so redis)."""

from __future__ import annotations

import os
import secrets
import socket

from gateway_guard.admission.policy import ClusterSpec as ClusterSpec


def replica_id(spec: ClusterSpec) -> str:
    """Unique per process, so that ``--workers N`` and a restarted replica never share leases."""
    base = (spec.replica_id or socket.gethostname() or "guard").replace("|", "-")
    return f"{base}:{os.getpid()}:{secrets.token_hex(2)}"
