"""Who may listen and who may publish: bearer tokens (JWT), channel grants, publisher and admin keys, origins.

docs/security.md is the user's guide. The rules in short:
- A subscriber presents a JWT signed with the shared secret (HS256) or the key pair whose public half is
  configured (RS256/ES256). It must carry `exp`; its `channels` claim lists channel patterns: `*` matches any run
  of channel characters, `{claim}` is replaced by that claim's value (`user:{sub}`), taken literally.
- `POST /publish`, `/admin/*` and `GET /metrics` (the metrics key or the admin key) take a static key (several,
  comma-separated, to rotate without downtime), compared in constant time. Admin keys may be named
  (SIDECAR_ADMIN_KEYS="ops-anna:<key>,..."): the policy-change log then says who changed what.
- A guard with nothing configured is open in dev mode and closed (disabled) otherwise; the sidecar refuses to
  start in production mode without a token key (:func:`check_startup`).
Nothing here logs a token or a key, nor puts one in an error message. No Flask import: app.py and ws.py adapt.

Example::

    auth = Auth(settings)
    grant = auth.grant(presented_token(request.headers.get("Authorization"), request.args.getlist("token")))
    auth.authorize(grant, ["user:42"])          # AuthError(403) if the token does not grant it
"""

from __future__ import annotations

import hmac
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

from sidecar.config import Settings
from sidecar.core.patterns import glob_match
from sidecar.core.protocol import CHANNEL_RE, MAX_CHANNEL_LEN

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
# RFC 7518 section 3.2: an HMAC key is at least the size of the hash output.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
HMAC_ALGORITHMS = tuple(MIN_SECRET_BYTES)
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# A placeholder names a claim; a pattern is otherwise channel characters and `*`.
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
PATTERN_CHARS_RE = re.compile(r"[A-Za-z0-9_\-:.@*]*")
MAX_PATTERNS = 1_000
TIME_CLAIMS = ("exp", "nbf", "iat")


class AuthError(Exception):
    """A refused request. `message` is safe to show to the client: it never echoes the token or key."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        if self.status != 401:
            return {}
        # RFC 6750 section 3: no error code when the request carried no credentials at all.
        if self.code == "unauthorized" and self.message in (MISSING, KEY_MISSING):
            return {"WWW-Authenticate": 'Bearer realm="sidecar"'}
        return {"WWW-Authenticate": 'Bearer realm="sidecar", error="invalid_token"'}


class InsecureConfig(ValueError):
    """Settings the sidecar refuses to start with."""


MISSING = "a bearer token is required"
KEY_MISSING = "a bearer key is required"
INVALID = "the token is not valid"  # the same words for every reason: no oracle for forgers


@dataclass(frozen=True)
class Grant:
    """The channels one token may read, until `expires` (epoch seconds; None: no end)."""

    patterns: tuple[str, ...]  # globs (sidecar/core/patterns.py), placeholders filled in
    expires: float | None = None

    def allows(self, channel: str) -> bool:
        return any(glob_match(p, channel) for p in self.patterns)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def wait(self, longest: float, now: float) -> float:
        """How long a connection may sleep before it must look at the token's expiry again."""
        return longest if self.expires is None else max(0.0, min(longest, self.expires - now))


OPEN = Grant(("*",))


def compile_pattern(pattern: object, claims: Mapping[str, Any]) -> str | None:
    """One grant pattern as a glob, or None when it grants nothing (malformed, or a claim it names is missing).

    A claim's value is inserted literally: it must be channel characters, which have no ``*``, so a `sub` of
    ``*`` grants nothing rather than every user.
    """
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_CHANNEL_LEN:
        return None
    parts: list[str] = []
    pos = 0
    for match in PLACEHOLDER_RE.finditer(pattern):
        literal = pattern[pos : match.start()]
        if not PATTERN_CHARS_RE.fullmatch(literal):
            return None
        parts.append(literal)
        value = claims.get(match[1])
        if isinstance(value, bool) or not isinstance(value, str | int):
            return None
        value = str(value)
        if not CHANNEL_RE.fullmatch(value):
            return None
        parts.append(value)
        pos = match.end()
    tail = pattern[pos:]
    if not PATTERN_CHARS_RE.fullmatch(tail):
        return None
    parts.append(tail)
    return "".join(parts)


def grant_from_claims(claims: Mapping[str, Any], claim: str = "channels", leeway: float = 0.0) -> Grant:
    """The grant of verified claims: patterns from `claim` (a list, or one space-separated string); it ends
    at `exp` plus the clock-skew `leeway` the token was accepted with."""
    raw = claims.get(claim)
    if isinstance(raw, str):
        raw = raw.split()
    if not isinstance(raw, list):
        raw = []
    patterns = tuple(p for p in (compile_pattern(x, claims) for x in raw[:MAX_PATTERNS]) if p is not None)
    exp = numeric_date(claims.get("exp"))
    return Grant(patterns, None if exp is None else exp + leeway)


def numeric_date(value: object) -> float | None:
    """A time claim's seconds when it is a NumericDate (RFC 7519 section 2: a JSON number), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer past any float
        return None
    return seconds if math.isfinite(seconds) else None


def bearer(authorization: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header (RFC 6750 section 2.1), else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def presented_token(authorization: str | None, query: Iterable[str] = ()) -> str | None:
    """The one token of a request: `Authorization: Bearer`, or `?token=` (EventSource and browsers' WebSocket
    cannot set headers). Two different tokens are refused (400) rather than one of them winning in silence."""
    tokens = {token for token in (bearer(authorization), *query) if token}
    if len(tokens) > 1:
        raise AuthError(400, "ambiguous-token", "send one token, in Authorization or in ?token=, not two different")
    return tokens.pop() if tokens else None


def split_list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


ADMIN_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _named_keys(value: str | None) -> tuple[tuple[str, str], ...]:
    """SIDECAR_ADMIN_KEYS: ``name:key`` pairs, comma-separated (a key may hold ``:``, a name may not). Errors
    name the entry by its position, never show it."""
    named = []
    for i, entry in enumerate(split_list(value), 1):
        name, colon, key = entry.partition(":")
        if not colon or not ADMIN_NAME_RE.fullmatch(name.strip()):
            raise InsecureConfig(f"SIDECAR_ADMIN_KEYS: entry {i} must be name:key, the name 1-64 letters, digits, "
                                 "_ . @ or -")  # fmt: skip
        if len(key.strip()) < MIN_KEY_CHARS:
            raise InsecureConfig(f"SIDECAR_ADMIN_KEYS: the key of {name.strip()} must be at least {MIN_KEY_CHARS} "
                                 "characters")  # fmt: skip
        named.append((name.strip(), key.strip()))
    return tuple(named)


def keys_match(presented: str | None, configured: Iterable[str]) -> bool:
    """Constant-time comparison against every configured key (their number is no secret)."""
    given = (presented or "").encode("utf-8", "surrogatepass")
    found = False
    for key in configured:
        found |= hmac.compare_digest(given, key.encode("utf-8", "surrogatepass"))
    return found and bool(presented)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...], dev: bool) -> bool:
    """The WebSocket handshake's Origin check (cross-site WebSocket hijacking).

    No Origin header: not a browser, so no ambient credentials to hijack. An allowlist, when set, is exact
    (``*`` allows any). Without one: any origin in dev mode, the same origin (Origin host == Host) otherwise.
    """
    if origin is None:
        return True
    normalized = origin.strip().rstrip("/").lower()
    if allowed:
        return "*" in allowed or normalized in allowed
    if dev:
        return True
    return host is not None and urlsplit(normalized).netloc == host.strip().lower()


def cors_origin(origin: str | None, allowed: tuple[str, ...], dev: bool) -> str | None:
    """The `Access-Control-Allow-Origin` value for a request from `origin`, or None for no CORS headers."""
    if origin is None:
        return None
    if "*" in allowed or (dev and not allowed):
        return "*"
    normalized = origin.strip().rstrip("/").lower()
    return origin if normalized in allowed else None


class Auth:
    """The configured guards of one sidecar process. Raises :class:`InsecureConfig` for unusable settings."""

    def __init__(self, settings: Settings) -> None:
        self.dev = settings.dev
        self.claim = settings.jwt_channels_claim
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.leeway = settings.jwt_leeway
        self.secret = settings.jwt_secret or None
        self.public_key = _load_public_key(settings.jwt_public_key) if settings.jwt_public_key else None
        self.algorithms = self._algorithms(split_list(settings.jwt_algorithms))
        self.publisher_keys = self._keys("SIDECAR_PUBLISHER_KEY", settings.publisher_key)
        # (name, key) of every admin key: SIDECAR_ADMIN_KEY's are named "admin", SIDECAR_ADMIN_KEYS' their own.
        self.admin_named = tuple(("admin", k) for k in self._keys("SIDECAR_ADMIN_KEY", settings.admin_key))
        self.admin_named += _named_keys(settings.admin_keys)
        self.admin_keys = tuple(key for _, key in self.admin_named)
        self.metrics_keys = self._keys("SIDECAR_METRICS_KEY", settings.metrics_key)
        self.allowed_origins = tuple(o.rstrip("/").lower() for o in split_list(settings.allowed_origins))
        self.cors_origins = tuple(o.rstrip("/").lower() for o in split_list(settings.cors_origins))

    def _algorithms(self, configured: tuple[str, ...]) -> tuple[str, ...]:
        if not configured:
            configured = (("HS256",) if self.secret else ()) + (("RS256", "ES256") if self.public_key else ())
        for alg in configured:
            if alg in HMAC_ALGORITHMS and self.secret is None:
                raise InsecureConfig(f"SIDECAR_JWT_ALGORITHMS lists {alg} but no SIDECAR_JWT_SECRET is set")
            if alg in HMAC_ALGORITHMS and len((self.secret or "").encode()) < MIN_SECRET_BYTES[alg]:
                raise InsecureConfig(f"SIDECAR_JWT_SECRET must be at least {MIN_SECRET_BYTES[alg]} bytes for {alg}")
            if alg in PUBLIC_KEY_ALGORITHMS and self.public_key is None:
                raise InsecureConfig(f"SIDECAR_JWT_ALGORITHMS lists {alg} but no SIDECAR_JWT_PUBLIC_KEY is set")
            if alg not in HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS:
                raise InsecureConfig(f"SIDECAR_JWT_ALGORITHMS: {alg!r} is not a supported signing algorithm")
        return configured

    @staticmethod
    def _keys(name: str, value: str | None) -> tuple[str, ...]:
        keys = split_list(value)
        if any(len(k) < MIN_KEY_CHARS for k in keys):
            raise InsecureConfig(f"{name}: every key must be at least {MIN_KEY_CHARS} characters")
        return keys

    @property
    def tokens_required(self) -> bool:
        return bool(self.algorithms)

    # -- subscribers ----------------------------------------------------------------------------------------
    def grant(self, token: str | None) -> Grant:
        """The grant of a presented token; AuthError(401) when it is missing, expired or not valid."""
        if not self.tokens_required:
            return OPEN
        if not token:
            raise AuthError(401, "unauthorized", MISSING)
        try:
            alg = jwt.get_unverified_header(token).get("alg")
            if alg not in self.algorithms:
                raise jwt.InvalidAlgorithmError(alg)
            key: Any = self.secret if alg in HMAC_ALGORITHMS else self.public_key
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
            # PyJWT checks these with int(), which also takes "1700000000" and true. The grant would then miss
            # the expiry the door checked, and the connection outlive its token: only numbers are times.
            if any(name in claims and numeric_date(claims[name]) is None for name in TIME_CLAIMS):
                raise jwt.InvalidTokenError("a time claim is not a number")
        except jwt.ExpiredSignatureError:
            # PyJWT checks `exp` only after the signature: saying "expired" tells nothing to a forger.
            raise AuthError(401, "token-expired", "the token has expired") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError(401, "unauthorized", INVALID) from None
        return grant_from_claims(claims, self.claim, self.leeway)

    @staticmethod
    def authorize(grant: Grant, channels: Iterable[str]) -> None:
        """AuthError(403) naming the first channel the grant does not cover (the client named it itself)."""
        for channel in channels:
            if not grant.allows(channel):
                raise AuthError(403, "forbidden", f"the token does not grant channel {channel}")

    # -- publishers and admins ------------------------------------------------------------------------------
    def require_publisher(self, presented: str | None) -> None:
        self._require(presented, self.publisher_keys, "publishing over HTTP", "SIDECAR_PUBLISHER_KEY")

    def require_admin(self, presented: str | None) -> str:
        """Who is asking: the name of the admin key presented (``admin`` for a key of SIDECAR_ADMIN_KEY), or
        ``dev`` in dev mode without admin keys; AuthError otherwise. Never the key itself."""
        self._require(presented, self.admin_keys, "the admin API", "SIDECAR_ADMIN_KEY")
        if not self.admin_keys:
            return "dev"
        given = (presented or "").encode("utf-8", "surrogatepass")
        name = ""
        for key_name, key in self.admin_named:  # every key compared (constant time), the first match named
            if hmac.compare_digest(given, key.encode("utf-8", "surrogatepass")) and not name:
                name = key_name
        return name or "admin"

    def require_metrics(self, presented: str | None) -> None:
        """GET /metrics: the metrics key (so that a scraper need not hold the admin key), or the admin key."""
        self._require(presented, self.metrics_keys + self.admin_keys, "/metrics", "SIDECAR_METRICS_KEY")

    def _require(self, presented: str | None, keys: tuple[str, ...], what: str, name: str) -> None:
        if not keys:
            if self.dev:
                return
            raise AuthError(403, "disabled", f"{what} is disabled: no {name} is configured")
        if not presented:
            raise AuthError(401, "unauthorized", KEY_MISSING)
        if not keys_match(presented, keys):
            raise AuthError(401, "unauthorized", "the key is not valid")

    # -- browsers -------------------------------------------------------------------------------------------
    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        return origin_allowed(origin, host, self.allowed_origins, self.dev)

    def cors_origin(self, origin: str | None) -> str | None:
        return cors_origin(origin, self.cors_origins, self.dev)


def _load_public_key(value: str) -> Any:
    """A PEM public key, given inline or as a path to a PEM file."""
    text = value if value.lstrip().startswith("-----BEGIN") else _read(value)
    try:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        msg = "SIDECAR_JWT_PUBLIC_KEY needs the cryptography package (pip install 'pyjwt[crypto]')"
        raise InsecureConfig(msg) from None
    try:
        return load_pem_public_key(text.encode())
    except ValueError:
        raise InsecureConfig("SIDECAR_JWT_PUBLIC_KEY is not a PEM public key") from None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise InsecureConfig(f"SIDECAR_JWT_PUBLIC_KEY: cannot read {path}: {exc.strerror}") from None


def check_startup(settings: Settings) -> Auth:
    """Refuse production settings that would leave the relay open; in dev mode, say loudly what is open."""
    auth = Auth(settings)
    if not auth.tokens_required and not settings.dev:
        raise InsecureConfig(
            "no SIDECAR_JWT_SECRET or SIDECAR_JWT_PUBLIC_KEY: refusing to start with every channel open to "
            "anyone. Configure one (docs/security.md), or run in dev mode (SIDECAR_DEV=1, `sidecar serve --dev`)."
        )
    open_parts = []
    if not auth.tokens_required:
        open_parts.append("anyone may subscribe to any channel (no SIDECAR_JWT_SECRET/SIDECAR_JWT_PUBLIC_KEY)")
    if not auth.publisher_keys:
        if settings.dev:
            open_parts.append("anyone may POST /publish (no SIDECAR_PUBLISHER_KEY)")
        else:
            log.warning("POST /publish is disabled: no SIDECAR_PUBLISHER_KEY is configured")
    if not auth.admin_keys:
        if settings.dev:
            open_parts.append("anyone may use /admin (no SIDECAR_ADMIN_KEY)")
        else:
            log.warning("the admin API is disabled: no SIDECAR_ADMIN_KEY is configured")
    if not auth.metrics_keys and not auth.admin_keys:
        if settings.dev:
            open_parts.append("anyone may read /metrics (no SIDECAR_METRICS_KEY)")
        else:
            log.warning("/metrics is disabled: no SIDECAR_METRICS_KEY (or SIDECAR_ADMIN_KEY) is configured")
    if settings.dev and not auth.allowed_origins:
        open_parts.append("WebSockets are accepted from any Origin (no SIDECAR_ALLOWED_ORIGINS)")
    if open_parts:
        banner = "!" * 72
        log.warning(
            "%s\nDEV MODE, NOT FOR PRODUCTION:\n  - %s\n%s", banner, "\n  - ".join(open_parts), banner
        )
    return auth
