"""The Dockerfile, the compose stack and the Grafana dashboard, checked without a Docker engine (none runs here).

What can be checked here is checked for real: the dashboard's every query against the metric names a live
guard exports, the HEALTHCHECK's own command against a live guard (and a dead port), the files that the
compose file mounts exist. Building the image and starting the stack need Docker (docs/telemetry.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway_guard.sim import SimConfig
from tests.telemetry.conftest import chat, running_guard, samples

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "config" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "gateway-guard.json"
COMPOSE = GRAFANA / "docker-compose.yml"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


# -- dashboard ---------------------------------------------------------------------------------------------


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Names in a PromQL expression that are metrics: identifiers not followed by '(' and not inside {...} or
    [...], that are neither keywords nor label names after 'by'/'without'/'label_values(…, x)'."""
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    text = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", text)
    text = re.sub(r",\s*[a-zA-Z_]\w*\s*\)", ")", text)  # label_values(metric, label)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        after = text[m.end() :].lstrip()
        if after.startswith("(") or m.group() in PROMQL_WORDS or m.group().startswith("__"):
            continue
        names.add(m.group())
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = 'histogram_quantile(0.95, sum by (lane, le) (rate(a_seconds_bucket{x=~"$u", y!="b"}[$__rate_interval])))'
    assert metric_names(expr) == {"a_seconds_bucket"}
    assert metric_names("label_values(gateway_guard_limit, upstream)") == {"gateway_guard_limit"}


def test_the_dashboard_is_grafana_dashboard_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in dashboard["panels"]:
        assert p["type"] in {"timeseries", "stat", "gauge", "table", "bargauge"}
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"])
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("in flight vs limit", "queue depth per lane", "queue wait p95 per lane", "first token p95 per lane"):
        assert wanted in titles
    assert "rejections by reason" in titles and "tokens per second" in titles


def test_every_datasource_the_dashboard_uses_is_provisioned() -> None:
    yaml = pytest.importorskip("yaml")
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"]}
    used |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert used <= uids and "tempo" in uids
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


async def test_every_dashboard_query_names_a_metric_the_guard_exports() -> None:
    lanes = {"interactive": {"queue_size": 0}}
    async with running_guard(max_inflight=1, sim=SimConfig(tokens_per_second=100.0, ttft=0.01), lanes=lanes) as g:
        headers = {"x-guard-lane": "interactive"}
        async with g.client.stream("POST", "/v1/chat/completions", json=chat(8), headers=headers) as first:
            chunks = first.aiter_raw()
            await chunks.__anext__()
            refused = await g.client.post("/v1/chat/completions", json=chat(), headers=headers)
            async for _ in chunks:
                pass
        assert refused.status_code == 429
        exported = {name for name, _ in samples((await g.client.get("/metrics")).text)}
    exprs = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 10
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        missing = names - exported
        assert not missing, f"{expr!r} names {missing}, which the guard does not export"


# -- Dockerfile --------------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages


def test_the_dockerfile_is_multi_stage_non_root_and_healthchecked() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    keywords = [k for k, _ in final]
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in {"root", "0"}, "the final stage runs as a non-root user"
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    runs = " ".join(a for k, a in final if k == "RUN")
    for tool in ("apt-get install", "pip install", "gcc", "build-essential", "curl", "wget"):
        assert tool not in runs, f"no {tool} in the final image"
    assert any(k == "COPY" and a.startswith("--from=") for k, a in final), "the final stage copies the built venv"
    env = " ".join(a for k, a in final if k == "ENV")
    assert "GUARD__SERVER__HOST=0.0.0.0" in env
    (health,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert "/guard/health" in health and "curl" not in health and "wget" not in health
    assert "/etc/gateway-guard/guard.toml" in dict(final)["CMD"]
    for args in [a for stage in stages for k, a in stage if k == "COPY" and "--from" not in a]:
        for source in shlex.split(args)[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv*" in ignored and ".git" in ignored


def healthcheck_argv() -> list[str]:
    (health,) = [a for stage in dockerfile_stages() for k, a in stage if k == "HEALTHCHECK"]
    argv: list[str] = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[0] == "python", "the image's own python, not curl"
    return [sys.executable, *argv[1:]]


async def _run(argv: list[str], port: int) -> int:
    env = {**os.environ, "GUARD__SERVER__PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 20)


async def test_the_healthcheck_command_passes_on_a_live_guard_and_fails_on_a_dead_port() -> None:
    argv = healthcheck_argv()
    async with running_guard(sim=SimConfig(mode="zero")) as g:
        port = int(g.url.rsplit(":", 1)[1])
        assert await _run(argv, port) == 0
    assert await _run(argv, port) != 0, "nothing listens there any more"


# -- compose -----------------------------------------------------------------------------------------------


def test_the_compose_stack_parses_and_mounts_files_that_exist() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"guard", "prometheus", "tempo", "grafana"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source}, which does not exist"
    guard = services["guard"]
    assert guard["build"]["context"] == "../.." and (COMPOSE.parent / "../../Dockerfile").exists()
    assert any(v.endswith(":/etc/gateway-guard/guard.toml:ro") for v in guard["volumes"])
    assert guard["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://tempo:4318"

    prometheus = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["guard:8090"]
    tempo = yaml.safe_load((ROOT / "config" / "tempo" / "tempo.yaml").read_text())
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")


def test_the_compose_guard_config_is_a_valid_guard_config() -> None:
    from gateway_guard.settings import load_settings

    settings = load_settings(GRAFANA / "guard.compose.toml", environ={"GUARD__SERVER__HOST": "0.0.0.0"})
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8090
    assert settings.upstreams["gpu"].url == "http://sim:8081"
