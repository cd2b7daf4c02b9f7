"""``guard-dispatch status``: the board's ready/running cards per profile beside the guard's capacity."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from gateway_guard.dispatch.capacity import Capacity
from gateway_guard.dispatch.decide import Decision, Policy


def render(
    *, board: str, db_path: str, hermes: str, version: str, meaning: str, guard_url: str,
    counts: Mapping[str, Mapping[str, int]], capacity: Capacity | None, capacity_error: str,
    policy: Policy, upstream: str | None, decision: Decision | None, now: datetime,
) -> str:
    lines = [
        f"board   {board}  ({db_path})",
        f"hermes  {hermes}  v{version}  --max means {meaning}",
    ]
    profile_free: dict[str, int] = {}
    if capacity is None:
        lines.append(f"guard   {guard_url}  UNREACHABLE: {capacity_error}")
    else:
        try:
            free = str(capacity.batch_free(upstream))
            profile_free = capacity.profile_free(upstream)
        except ValueError as exc:
            free = f"? ({exc})"
        scope = f"upstream {upstream}" if upstream else "all upstreams"
        lines.append(f"guard   {guard_url}  free batch slots: {free} ({scope})")
        for name, up in sorted(capacity.upstreams.items()):
            lanes = "  ".join(
                f"{lane} {s.in_flight}/{s.limit} q{s.queued} free {s.free}" for lane, s in sorted(up.lanes.items())
            )
            lines.append(
                f"        {name}: {up.slots.in_flight}/{up.slots.limit} in flight, {up.slots.queued} queued, "
                f"{up.slots.free} free" + (f"  [{lanes}]" if lanes else "")
            )
    lines.append("")
    profiles = sorted(set(counts) | set(profile_free) | {p for pool in policy.pools for p in pool.profiles})
    rows = [("PROFILE", "POOL", "READY", "RUNNING", "GUARD FREE")]
    for profile in profiles:
        pool = policy.pool_of(profile)
        c = counts.get(profile, {})
        rows.append((
            profile or "(unassigned)",
            f"{pool.name} (limit {pool.limit})" if pool else "-",
            str(c.get("ready", 0)),
            str(c.get("running", 0)),
            str(profile_free[profile]) if profile in profile_free else "-",
        ))
    rows.append((
        "total", "", str(sum(c.get("ready", 0) for c in counts.values())),
        str(sum(c.get("running", 0) for c in counts.values())), "",
    ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip())
    lines.append("")
    target = policy.schedule.target_at(now)
    where = f"window {target.window.describe()}" if target.window else "no window: default"
    lines.append(f"target  {target.value}  ({where}, {policy.schedule.timezone.key} "
                 f"{now.astimezone(policy.schedule.timezone):%Y-%m-%d %H:%M})")
    if decision is not None:
        lines.append(f"a tick now would ask for {decision.add} (stopped={decision.stopped})")
    else:
        lines.append("a tick now would dispatch nothing (guard unreachable: fail closed)")
    return "\n".join(lines)
