"""agent.access: the API's rules as pure functions (the real-process attacks are in test_api_security.py)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.access import HOSTS_SEEN, LOG_EVERY, AccessPolicy, Caller, Refused

TOKEN = "t0ken-of-the-operator-0123456789"


def policy(api: tuple[str, int] = ("127.0.0.1", 7947), token: str | None = TOKEN, **kw: Any) -> AccessPolicy:
    return AccessPolicy(api, token, agent_uid=1000, **kw)


def check(p: AccessPolicy, method: str = "PUT", path: str = "/v1/services", uid: int | None = 1000,
          body: bool = True, **headers: str) -> Caller:
    hdrs = {"host": "127.0.0.1:7947", "content-type": "application/json"}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    hdrs = {k: v for k, v in hdrs.items() if v != ""}
    return p.check(method, path, hdrs, body, lambda: uid)


def refusal(p: AccessPolicy, **kw: Any) -> tuple[int, str]:
    with pytest.raises(Refused) as err:
        check(p, **kw)
    return err.value.status, err.value.reason


@pytest.mark.parametrize("host", ["127.0.0.1:7947", "localhost:7947", "LOCALHOST", "[::1]:7947", "127.0.0.1"])
def test_the_apis_own_names_are_served(host: str) -> None:
    assert check(policy(), host=host) == Caller(uid=1000)


@pytest.mark.parametrize("host", ["evil.example:7947", "evil.example", "127.0.0.1.evil.example:7947",
                                  "10.0.0.5:7947", "[::2]:7947", "localhost.evil:7947"])
def test_other_hosts_are_refused_even_for_health(host: str) -> None:
    p = policy()
    assert refusal(p, host=host) == (403, "host")
    assert refusal(p, method="GET", path="/v1/health", body=False, host=host) == (403, "host")


def test_allowed_names_and_a_bound_address() -> None:
    p = policy(("10.1.2.3", 7947), allow_hosts=["mesh.internal"])
    assert check(p, host="mesh.internal:7947") and check(p, host="10.1.2.3:7947")
    assert refusal(p, host="other.internal:7947") == (403, "host")
    wildcard = policy(("0.0.0.0", 7947))
    assert check(wildcard, host="192.0.2.9:7947")  # an IP literal cannot be rebound
    assert refusal(wildcard, host="evil.example:7947") == (403, "host")


def test_the_host_verdicts_remembered_change_nothing_and_stay_bounded() -> None:
    """Allowed Host values are remembered as sent (a poller sends the same one each time): a
    refused one is refused again, and no client can grow what is remembered."""
    p = policy()
    for _ in range(3):
        assert check(p, host="localhost:7947") == Caller(uid=1000)
        assert refusal(p, host="evil.example:7947") == (403, "host")
        assert refusal(p, host="LOCALHOST:7947.evil") == (403, "host")
    wildcard = policy(("0.0.0.0", 7947))
    for i in range(HOSTS_SEEN * 4):
        assert check(wildcard, host=f"10.0.{i // 250}.{i % 250 + 1}:7947")
        assert refusal(wildcard, host=f"host{i}.evil.example:7947") == (403, "host")
    assert len(wildcard._hosts_seen) == HOSTS_SEEN
    assert check(wildcard, host="10.9.9.9:7947")  # past the bound, still decided, just not remembered


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:8080", "https://127.0.0.1:7947",
                                    "http://localhost:7948", "file://", "http://evil.example:7947"])
@pytest.mark.parametrize("method,path", [("PUT", "/v1/services"), ("POST", "/v1/leave"),
                                         ("DELETE", "/v1/services/x"), ("GET", "/v1/keys")])
def test_a_foreign_origin_cannot_act(origin: str, method: str, path: str) -> None:
    assert refusal(policy(), method=method, path=path, origin=origin) == (403, "origin")


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_fetch_metadata_marks_a_cross_site_request(site: str) -> None:
    assert refusal(policy(), method="POST", path="/v1/join", sec_fetch_site=site) == (403, "origin")
    assert check(policy(), method="POST", path="/v1/join", sec_fetch_site="same-origin")
    assert check(policy(), method="POST", path="/v1/join", sec_fetch_site="none")


def test_the_apis_own_origin_may_act_and_reads_ignore_origin() -> None:
    p = policy()
    for origin in ("http://127.0.0.1:7947", "http://localhost:7947", "http://[::1]:7947"):
        assert check(p, origin=origin) == Caller(uid=1000)
    # A cross-origin page cannot read the answer (no CORS headers), so a read is not refused for it.
    assert check(p, method="GET", path="/v1/members", body=False, origin="http://evil.example")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   "", "application/json-patch+json", "text/json"])
def test_a_body_must_be_json(ctype: str) -> None:
    assert refusal(policy(), content_type=ctype) == (415, "content_type")


def test_json_with_parameters_and_bodyless_requests_pass() -> None:
    p = policy()
    assert check(p, content_type="application/json; charset=utf-8")
    assert check(p, method="POST", path="/v1/leave", body=False, content_type="")
    assert check(p, method="DELETE", path="/v1/services/x", body=False, content_type="text/plain")


def test_the_agents_user_and_root_need_no_token_others_do() -> None:
    p = policy()
    assert check(p, uid=1000) == Caller(uid=1000)
    assert check(p, uid=0) == Caller(uid=0)
    assert refusal(p, uid=1001) == (401, "credential")
    assert refusal(p, uid=None) == (401, "credential")
    assert refusal(p, method="GET", path="/v1/members", body=False, uid=1001) == (401, "credential")
    assert check(p, method="GET", path="/v1/health", body=False, uid=None) == Caller()  # liveness is public


def test_tokens() -> None:
    p = policy()
    assert check(p, uid=1001, authorization=f"Bearer {TOKEN}") == Caller(token=True)
    assert check(p, uid=None, authorization=f"bearer  {TOKEN} ") == Caller(token=True)
    for bad in ("Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"):
        assert refusal(p, uid=1001, authorization=bad) == (401, "token")
    # A token sent by the operator's own user is still checked: a wrong one is a mistake worth hearing of.
    assert refusal(p, uid=1000, authorization="Bearer wrong") == (401, "token")
    assert refusal(policy(token=None), uid=1001, authorization=f"Bearer {TOKEN}") == (401, "token")


def test_refusals_are_counted_and_their_log_is_rate_limited() -> None:
    lines: list[dict[str, Any]] = []

    class Log:
        def warning(self, event: str, **kw: Any) -> None:
            lines.append({"event": event, **kw})

    p = policy(log=Log())
    r = Refused(403, "origin", "nope")
    for i in range(5):
        p.count(r, "PUT", "/v1/services", now=100.0 + i)
    p.count(Refused(401, "credential", "who"), "GET", "/v1/members", now=101.0)
    p.count(r, "PUT", "/v1/services", now=100.0 + LOG_EVERY + 1)
    assert p.refused["origin"] == 6 and p.refused["credential"] == 1 and p.refused["host"] == 0
    assert [(ln["reason"], ln["suppressed"]) for ln in lines] == [("origin", 0), ("credential", 0), ("origin", 4)]
