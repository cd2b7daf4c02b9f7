"""Log scrape: a guard run that uses client keys, an admin token, an upstream key and (refused) a URL password
prints none of them: not on stdout/stderr, not in the access log, in text or JSON, even at debug level."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.integration.edge_support import GUARD_BIN, RecordingUpstream, edge_guard, raw_exchange, request, write_config

CLIENT_KEY = "sk-client-key-4f1d9c"
OTHER_KEY = "sk-other-key-77ab10"
WRONG_KEY = "sk-wrong-key-000aa1"
ADMIN = "adm-token-9q8w7e"
UPSTREAM_KEY = "up-key-secret-5t6y"
METRICS = "metrics-token-z1x2"
URL_PASSWORD = "url-pass-h7j8k9"
SECRETS = (CLIENT_KEY, OTHER_KEY, WRONG_KEY, ADMIN, UPSTREAM_KEY, METRICS, URL_PASSWORD)


@pytest.mark.parametrize("log_json", [False, True])
async def test_no_secret_is_ever_logged(log_json: bool) -> None:
    server = {"admin_token": ADMIN, "metrics_token": METRICS, "log_level": "debug", "log_json": log_json}
    tables = {
        "profiles.worker": {"lane": "batch"},
        "profiles.chat": {"lane": "interactive"},
        "keys": {"worker": CLIENT_KEY, "chat": OTHER_KEY},
    }
    async with RecordingUpstream() as up:
        with edge_guard(up.url, server=server, upstream_table={"api_key": UPSTREAM_KEY}, tables=tables) as guard:
            async with httpx.AsyncClient(base_url=guard.url, timeout=30) as client:
                chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                for key in (CLIENT_KEY, OTHER_KEY, WRONG_KEY):
                    await client.post("/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {key}"})
                await client.post("/p/chat/v1/chat/completions", json=chat, headers={"x-api-key": CLIENT_KEY})
                admin = {"authorization": f"Bearer {CLIENT_KEY}", "x-guard-admin-token": ADMIN}
                assert (await client.post("/api/pull", json={"model": "m"}, headers=admin)).status_code == 200
                await client.post(
                    "/guard/upstreams/gpu/limit", json={"limit": 3}, headers={"x-guard-admin-token": ADMIN}
                )
                await client.post(
                    "/guard/upstreams/gpu/limit", json={"limit": 3}, headers={"x-guard-admin-token": WRONG_KEY}
                )
                await client.post("/guard/reload", headers={"authorization": f"Bearer {ADMIN}"})
                assert (await client.get("/metrics", headers={"authorization": f"Bearer {METRICS}"})).status_code == 200
                await client.get("/metrics", headers={"authorization": f"Bearer {WRONG_KEY}"})
            # secrets in odd places: a header that is too big, the query string (never logged); a bad path
            await raw_exchange(guard.port, request("GET", "/v1/models/x%0a", {"authorization": f"Bearer {CLIENT_KEY}"}))
            await raw_exchange(guard.port, request("POST", "/v1/x", {"x-api-key": CLIENT_KEY, "x-big": ADMIN * 4000}))
            await raw_exchange(
                guard.port, request("GET", f"/v1/models?key={ADMIN}", {"authorization": f"Bearer {CLIENT_KEY}"})
            )
            # 2 chats (the wrong key is a 401, the worker's key under /p/chat a 403), the pull; GETs of models
            assert [r.target for r in up.requests][:3] == ["/v1/chat/completions"] * 2 + ["/api/pull"]
            assert all(("authorization", f"Bearer {UPSTREAM_KEY}") in r.headers for r in up.requests)
        log = guard.log()
    assert "gateway_guard.access" in log and "/v1/chat/completions" in log  # the run was logged
    leaked = [s for s in SECRETS if s in log]
    assert not leaked, f"secrets in the log: {leaked}"


async def test_a_url_password_is_never_printed_at_start_up() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "g.toml"
        write_config(
            config,
            {
                "server": {"log_level": "debug"},
                "upstreams.gpu": {"url": f"http://guard:{URL_PASSWORD}@127.0.0.1:9", "api_key": UPSTREAM_KEY},
            },
        )
        proc = await asyncio.create_subprocess_exec(
            str(GUARD_BIN), "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = (out + err).decode()
    assert proc.returncode == 2 and "upstreams.gpu.url" in text
    assert URL_PASSWORD not in text and UPSTREAM_KEY not in text
