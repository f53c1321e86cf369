"""API keys and per-key rate limits on the forecast routes, against the real Redis, with two
replicas sharing one limit."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis

from service.api.access import key_digest
from service.config import Settings
from tests.service.conftest import NAME, serving, window

BODY = {"model": NAME, "series": [{"id": "a", "values": window()}]}


def _post(c: httpx.Client, key: str | None = None, path: str = "/v1/forecast") -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return c.post(path, json=BODY, headers=headers)


def test_keys_two_replicas_share_one_limit(
    registry_root: Path, redis_url: str, redis_prefix: str
) -> None:
    common = {
        "registry_root": registry_root, "redis_url": redis_url, "redis_prefix": redis_prefix,
        "api_keys": (key_digest("key-alpha"), key_digest("key-beta")),
        "rate_limit": "6/minute",
    }
    with serving(**common) as a, serving(**common) as b, a.client() as ca, b.client() as cb:
        r = _post(ca)
        assert r.status_code == 401 and r.json()["error"]["field"] == "X-API-Key"
        assert r.headers["www-authenticate"] == "ApiKey"
        r = _post(cb, "key-wrong")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert _post(ca, "key-alpha", "/v1/forecast/batch").status_code == 200  # batch too

        # Five more for key-alpha, alternating replicas: six in all, the limit.
        for i in range(5):
            r = _post(ca if i % 2 else cb, "key-alpha")
            assert r.status_code == 200, (i, r.text)
        for c in (ca, cb):  # the seventh is refused on either replica
            r = _post(c, "key-alpha")
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(r.headers["retry-after"]) <= 60
        # The limit is per key; other routes are not limited.
        assert _post(cb, "key-beta").status_code == 200
        assert ca.get("/v1/models").status_code == 200
        metrics = ca.get("/metrics").text
        assert 'distilcast_rejections_total{reason="rate_limited"}' in metrics

    # The counts live in Redis under the service's prefix (not in either process).
    client = redis.Redis.from_url(redis_url)
    try:
        assert any(k.startswith(redis_prefix.encode()) and b"limits" in k
                   for k in client.scan_iter(f"{redis_prefix}*"))
    finally:
        client.close()


def test_keys_in_redis(registry_root: Path, redis_url: str, redis_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.sadd(f"{redis_prefix}api-keys", key_digest("from-redis"))
    try:
        with serving(registry_root=registry_root, redis_url=redis_url, redis_prefix=redis_prefix,
                     api_keys_redis=True) as s, s.client() as c:
            assert _post(c, "from-redis").status_code == 200
            assert _post(c, "not-there").status_code == 403
            assert _post(c).status_code == 401
            client.srem(f"{redis_prefix}api-keys", key_digest("from-redis"))  # revoked at once
            assert _post(c, "from-redis").status_code == 403
    finally:
        client.close()


def test_limit_without_keys_is_per_client_and_in_process(registry_root: Path) -> None:
    with serving(registry_root=registry_root, rate_limit="2/minute") as s, s.client() as c:
        assert [_post(c).status_code for _ in range(3)] == [200, 200, 429]


def test_open_by_default(client: httpx.Client) -> None:
    assert _post(client).status_code == 200


@pytest.mark.parametrize("bad", [
    {"api_keys": ("not-a-digest",)},
    {"rate_limit": "lots"},
])
def test_bad_access_settings_fail_fast(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Settings(**bad)  # type: ignore[arg-type]


def test_limiter_fails_open_when_redis_is_away(registry_root: Path) -> None:
    from tests.models_registry.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with serving(registry_root=registry_root, redis_url=url, rate_limit="1/minute",
                 api_keys=(key_digest("k"),)) as s, s.client() as c:
        # Served (over the limit of 1 too): a Redis outage must not become a full outage.
        assert [_post(c, "k").status_code for _ in range(3)] == [200, 200, 200]
        assert _post(c, "wrong").status_code == 403  # keys in the settings still checked
        assert 'reason="rate_limiter_down"' in c.get("/metrics").text
