"""Tokens, grants, keys and origins (sidecar/auth.py), and the subscribe rate bucket (sidecar/core/limits.py)."""

from __future__ import annotations

import time

import jwt
import pytest

from sidecar.auth import (
    OPEN,
    Auth,
    AuthError,
    InsecureConfig,
    bearer,
    check_startup,
    compile_pattern,
    cors_origin,
    grant_from_claims,
    keys_match,
    origin_allowed,
)
from sidecar.config import Settings

SECRET = "s" * 32
HOUR = 3600


def token(claims: dict, key: object = SECRET, alg: str = "HS256") -> str:
    return jwt.encode({"exp": int(time.time()) + HOUR, **claims}, key, algorithm=alg)  # type: ignore[arg-type]


def grants(patterns: list, channel: str, **claims: object) -> bool:
    return grant_from_claims({"channels": patterns, **claims}).allows(channel)


# -- patterns -----------------------------------------------------------------------------------------------
def test_an_exact_pattern_grants_only_that_channel():
    assert grants(["user:42"], "user:42")
    assert not grants(["user:42"], "user:420")
    assert not grants(["user:42"], "user:4")


def test_a_star_matches_any_run_of_channel_characters():
    assert grants(["sprint:*"], "sprint:7")
    assert grants(["sprint:*"], "sprint:7:tasks")
    assert not grants(["sprint:*"], "sprints:7")
    assert grants(["*:public"], "news:public")
    assert grants(["*"], "anything@all")


def test_regex_characters_in_a_pattern_are_literal():
    assert grants(["a.b"], "a.b")
    assert not grants(["a.b"], "axb")


def test_sub_is_substituted_into_a_pattern():
    assert grants(["user:{sub}"], "user:42", sub="42")
    assert not grants(["user:{sub}"], "user:43", sub="42")
    assert grants(["org:{org}:*"], "org:acme:billing", org="acme")
    assert grants(["user:{uid}"], "user:7", uid=7)  # integer claims too


def test_a_claim_value_is_literal_text_never_a_wildcard():
    assert grants(["user:{sub}"], "user:*", sub="*") is False  # `*` is not a channel character
    assert not grants(["user:{sub}"], "user:42", sub="*")
    assert not grants(["user:{sub}"], "user:42", sub="4.")  # `.` is not "any character"
    assert not grants(["user:{sub}"], "user:4x2", sub="4.2")


def test_a_pattern_naming_a_missing_or_unusable_claim_grants_nothing():
    assert not grants(["user:{sub}"], "user:")
    assert not grants(["user:{sub}"], "user:None", sub=None)
    assert not grants(["user:{sub}"], "user:True", sub=True)
    assert not grants(["user:{sub}"], "user:x", sub={"a": 1})
    assert not grants(["user:{sub}"], "user:a}b", sub="a}b")
    assert compile_pattern("user:{sub}", {"sub": "a b"}) is None


def test_malformed_patterns_grant_nothing_and_do_not_spoil_the_others():
    claims = {"channels": ["bad pattern", "{", "x" * 300, 42, None, "ok:*"]}
    grant = grant_from_claims(claims)
    assert grant.allows("ok:1")
    assert not grant.allows("bad pattern")
    assert len(grant.patterns) == 1


def test_channels_claim_may_be_a_space_separated_string_and_anything_else_grants_nothing():
    assert grant_from_claims({"channels": "a:1 b:*"}).allows("b:2")
    assert not grant_from_claims({"channels": {"a:1": True}}).allows("a:1")
    assert not grant_from_claims({}).allows("a:1")


def test_a_grant_ends_at_exp_plus_leeway_and_bounds_a_wait():
    grant = grant_from_claims({"channels": ["a"], "exp": 1000}, leeway=5)
    assert grant.expires == 1005
    assert not grant.expired(1004.9) and grant.expired(1005)
    assert grant.wait(15, now=1000) == 5
    assert grant.wait(15, now=2000) == 0
    assert OPEN.wait(15, now=0) == 15 and not OPEN.expired(1e12)


# -- tokens -------------------------------------------------------------------------------------------------
def auth(**settings: object) -> Auth:
    return Auth(Settings(**{"jwt_secret": SECRET, **settings}))  # type: ignore[arg-type]


def refused(a: Auth, presented: str | None) -> AuthError:
    with pytest.raises(AuthError) as info:
        a.grant(presented)
    return info.value


def test_a_valid_hs256_token_yields_its_grant():
    grant = auth().grant(token({"sub": "42", "channels": ["user:{sub}"]}))
    assert grant.allows("user:42") and not grant.allows("user:43")
    assert grant.expires is not None


def test_missing_bad_and_expired_tokens_are_401s_that_say_little():
    a = auth()
    missing = refused(a, None)
    assert (missing.status, missing.code) == (401, "unauthorized")
    assert missing.headers == {"WWW-Authenticate": 'Bearer realm="sidecar"'}
    forged = refused(a, token({"channels": ["*"]}, key="f" * 32))
    garbage = refused(a, "not.a.jwt")
    assert (forged.status, forged.code, forged.message) == (401, "unauthorized", garbage.message)
    assert 'error="invalid_token"' in forged.headers["WWW-Authenticate"]
    expired = refused(a, jwt.encode({"exp": int(time.time()) - HOUR, "channels": ["*"]}, SECRET))
    assert (expired.status, expired.code) == (401, "token-expired")


def test_a_forged_expired_token_is_invalid_not_expired():
    forged = jwt.encode({"exp": int(time.time()) - HOUR}, "f" * 32)
    assert refused(auth(), forged).code == "unauthorized"


def test_a_token_without_exp_is_refused():
    assert refused(auth(), jwt.encode({"channels": ["*"]}, SECRET)).code == "unauthorized"


def test_time_claims_that_are_not_json_numbers_are_refused():
    # PyJWT reads them with int(): a string `exp` passed the door, and the grant, finding no number, never ended.
    now, a = int(time.time()), auth(jwt_leeway=5)
    for claims in ({"exp": str(now + HOUR)}, {"exp": f" {now + 2} "}, {"exp": 10**400}, {"nbf": str(now - 60)},
                   {"iat": str(now)}, {"iat": True}, {"nbf": False}):  # fmt: skip
        assert refused(a, token({"channels": ["*"], **claims})).code == "unauthorized", claims
    grant = a.grant(token({"channels": ["*"], "exp": now + 2.5, "nbf": now - 60, "iat": now - 60.5}))
    assert grant.expires == now + 2.5 + 5


def test_alg_none_and_unlisted_algorithms_are_refused():
    unsigned = jwt.encode({"exp": int(time.time()) + HOUR, "channels": ["*"]}, None, algorithm="none")
    assert refused(auth(), unsigned).code == "unauthorized"
    long_secret = "L" * 64
    hs512 = token({"channels": ["*"]}, key=long_secret, alg="HS512")
    assert refused(auth(jwt_secret=long_secret), hs512).code == "unauthorized"
    assert auth(jwt_secret=long_secret, jwt_algorithms="HS256,HS512").grant(hs512).allows("x")


def test_audience_and_issuer_are_checked_when_configured():
    a = auth(jwt_audience="sidecar", jwt_issuer="https://id.example")
    good = token({"aud": "sidecar", "iss": "https://id.example", "channels": ["*"]})
    assert a.grant(good).allows("x")
    assert refused(a, token({"aud": "other", "iss": "https://id.example"})).code == "unauthorized"
    assert refused(a, token({"aud": "sidecar"})).code == "unauthorized"


def test_the_token_is_never_in_the_error():
    bad = token({"channels": ["*"]}, key="f" * 32)
    err = refused(auth(), bad)
    assert bad not in str(err) and bad not in err.message and bad.split(".")[2] not in repr(err)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_tokens(alg, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path = tmp_path / "key.pem"
    path.write_text(pem)
    for configured in (pem, str(path)):
        a = Auth(Settings(jwt_public_key=configured))
        assert a.grant(token({"channels": ["a:*"]}, key=private, alg=alg)).allows("a:1")
        # The HS256-with-the-public-key-as-secret confusion attack: HS256 is not accepted at all.
        assert refused(a, jwt.encode({"exp": int(time.time()) + HOUR}, "x" * 40)).code == "unauthorized"


# -- keys ---------------------------------------------------------------------------------------------------
def test_keys_compare_exactly_and_any_configured_key_works():
    assert keys_match("k" * 16, ["k" * 16])
    assert keys_match("b" * 16, ["a" * 16, "b" * 16])
    assert not keys_match("k" * 15, ["k" * 16])
    assert not keys_match("", [""])
    assert not keys_match(None, ["k" * 16])
    assert not keys_match("ключ-ключ-ключ-ключ", ["k" * 16])  # non-ASCII input compares, never raises


def test_publisher_key_is_required_when_set_open_in_dev_without_and_disabled_in_production():
    key = "p" * 20
    with_key = Auth(Settings(jwt_secret=SECRET, publisher_key=key, admin_key="a" * 20))
    with_key.require_publisher(key)
    with_key.require_admin("a" * 20)
    for presented in (None, "", "p" * 19, "a" * 20):
        with pytest.raises(AuthError) as info:
            with_key.require_publisher(presented)
        assert info.value.status == 401
    Auth(Settings(dev=True)).require_publisher(None)
    with pytest.raises(AuthError) as info:
        Auth(Settings(jwt_secret=SECRET)).require_admin("anything")
    assert (info.value.status, info.value.code) == (403, "disabled")


def test_bearer_reads_the_authorization_header():
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer") is None
    assert bearer(None) is None


# -- origins ------------------------------------------------------------------------------------------------
def test_websocket_origin_allowlist():
    allowed = ("https://app.example",)
    assert origin_allowed("https://app.example", "relay.example", allowed, dev=False)
    assert origin_allowed("https://APP.example/", "relay.example", allowed, dev=False)
    assert not origin_allowed("https://evil.example", "relay.example", allowed, dev=True)
    assert origin_allowed(None, "relay.example", allowed, dev=False)  # not a browser
    assert origin_allowed("https://evil.example", "x", ("*",), dev=False)


def test_without_an_allowlist_production_accepts_only_the_same_origin_and_dev_any():
    assert origin_allowed("http://relay.example:8000", "relay.example:8000", (), dev=False)
    assert not origin_allowed("http://evil.example", "relay.example:8000", (), dev=False)
    assert not origin_allowed("null", "relay.example", (), dev=False)
    assert origin_allowed("http://evil.example", "relay.example:8000", (), dev=True)


def test_cors_answers_only_allowed_origins():
    assert cors_origin("https://app.example", ("https://app.example",), dev=False) == "https://app.example"
    assert cors_origin("https://evil.example", ("https://app.example",), dev=False) is None
    assert cors_origin("https://x.example", ("*",), dev=False) == "*"
    assert cors_origin("https://x.example", (), dev=False) is None
    assert cors_origin("https://x.example", (), dev=True) == "*"
    assert cors_origin(None, ("*",), dev=True) is None


# -- startup ------------------------------------------------------------------------------------------------
def test_production_refuses_to_start_open_and_dev_says_so(caplog):
    with pytest.raises(InsecureConfig, match="refusing to start"):
        check_startup(Settings())
    check_startup(Settings(dev=True))
    assert "DEV MODE" in caplog.text and "anyone may subscribe" in caplog.text
    caplog.clear()
    check_startup(Settings(jwt_secret=SECRET))
    assert "DEV MODE" not in caplog.text
    assert "POST /publish is disabled" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"jwt_secret": "short"}, "at least 32 bytes"),
        ({"jwt_secret": SECRET, "jwt_algorithms": "HS512"}, "at least 64 bytes for HS512"),
        ({"jwt_secret": SECRET, "jwt_algorithms": "RS256"}, "no SIDECAR_JWT_PUBLIC_KEY"),
        ({"jwt_public_key": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"}, "not a PEM"),
        ({"jwt_public_key": "/nonexistent/key.pem"}, "cannot read"),
        ({"jwt_secret": SECRET, "jwt_algorithms": "none"}, "not a supported"),
        ({"jwt_secret": SECRET, "publisher_key": "short"}, "at least 16"),
    ],
)
def test_unusable_auth_settings_are_refused_even_in_dev_mode(settings, message):
    with pytest.raises(InsecureConfig, match=message):
        Auth(Settings(dev=True, **settings))


def test_secrets_stay_out_of_the_settings_repr():
    text = repr(Settings(jwt_secret=SECRET, publisher_key="p" * 20, admin_key="a" * 20))
    assert SECRET not in text and "p" * 20 not in text and "a" * 20 not in text
