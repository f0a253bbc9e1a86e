"""Signed terminal traffic: RFC 9421 HTTP Message Signatures (ed25519) and RFC 9530 Content-Digest.

Every terminal request carries three fields::

    Content-Digest: sha-256=:<base64 of SHA-256(body)>:                      (RFC 9530 §2)
    Signature-Input: sig1=("@method" "@target-uri" "content-digest" "content-type");
                     created=<unix s>;keyid="<terminal key id>";alg="ed25519";nonce="<random>"
    Signature: sig1=:<base64 ed25519 signature over the RFC 9421 §2.5 signature base>:

(``content-type`` is covered when the request has one.) The signature base itself is built by
the ``http-message-signatures`` library; this module adds the policy: which components must be
covered, the time window, single use of nonces, and stable error codes.

Engine answers are signed by the engine's key (:func:`sign_response`) and bound to the request
they answer with RFC 9421 §2.4 ``req`` components: ``"@method";req``, ``"@target-uri";req`` and
``"signature";key="sig1";req`` (the request's own signature, which covers its nonce). A terminal
checks them with :func:`verify_response`.

Verification order (:func:`verify_request`); the first failing rule is reported as
:class:`SignatureError` carrying a :class:`SignatureResult`:

 1. ``signature_missing``          no Signature or no Signature-Input field
 2. ``signature_input_malformed``  not RFC 8941 dictionaries, labels differ, not exactly one
                                   signature, bad parameter types, alg other than ed25519,
                                   no keyid, unknown parameters
 3. ``unknown_key``                keyid resolves to no key
 4. ``component_not_covered``      @method, @target-uri, content-digest (and content-type when
                                   the message has one) are not all covered
 5. ``digest_missing``             no Content-Digest field, or it has no sha-256 member
 6. ``digest_mismatch``            Content-Digest malformed or its sha-256 differs from the body
 7. ``created_missing``            no ``created`` parameter
 8. ``signature_expired``          ``now - created > max_age_s`` (or ``expires`` passed)
 9. ``created_in_future``          ``created - now > max_skew_s``
10. ``nonce_missing``              no (or empty) ``nonce`` parameter
11. ``signature_invalid``          the library's verification failed
12. ``nonce_replayed``             key id + nonce already claimed within its TTL

Rules 1-10 read the unverified fields only to choose an error code; on success only the
parameters and component values returned by the library's ``verify`` are used. The nonce is
claimed after the signature verifies, so a forged request cannot burn a terminal's nonce.

URL handling (library quirk): ``@target-uri`` is ``scheme://authority path?query`` taken verbatim
from the absolute, percent-encoded URL given (the library does not lowercase the host or drop a
default port there; an empty path becomes ``/``). The engine must therefore verify against the
URL the terminal addressed: behind a TLS proxy, rebuild it from a configured public origin plus
the raw path and query, not from internal addresses. Methods must be upper case.
"""

from __future__ import annotations

import base64
import datetime
import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import http_sfv
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures import (
    HTTPMessageSignaturesException,
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from http_message_signatures.structures import CaseInsensitiveDict

from terminals.nonce import NonceStore

__all__ = [
    "ALGORITHM",
    "REQUEST_COMPONENTS",
    "RESPONSE_COMPONENTS",
    "SIGNATURE_LABEL",
    "SignatureError",
    "SignatureResult",
    "TerminalSigner",
    "VerifiedRequest",
    "VerifiedResponse",
    "check_content_digest",
    "content_digest",
    "nonce_key",
    "sign_request",
    "sign_response",
    "verify_request",
    "verify_response",
]

SIGNATURE_LABEL = "sig1"
ALGORITHM = "ed25519"
DEFAULT_MAX_AGE_S = 300
DEFAULT_MAX_SKEW_S = 30
#: Components every terminal request signature must cover (plus ``content-type`` when present).
REQUEST_COMPONENTS: tuple[str, ...] = ("@method", "@target-uri", "content-digest")
#: Components every engine response signature covers (plus ``content-type`` when present and
#: ``"signature";key="sig1";req`` when the request was signed).
RESPONSE_COMPONENTS: tuple[str, ...] = ("@status", "content-digest", '"@method";req', '"@target-uri";req')
_SIGNATURE_PARAMETERS = frozenset({"alg", "created", "expires", "keyid", "nonce", "tag"})


class SignatureResult(str, enum.Enum):
    """Closed set of verification failures; the value is the stable code. Declared in check order."""

    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INPUT_MALFORMED = "signature_input_malformed"
    UNKNOWN_KEY = "unknown_key"
    COMPONENT_NOT_COVERED = "component_not_covered"
    DIGEST_MISSING = "digest_missing"
    DIGEST_MISMATCH = "digest_mismatch"
    CREATED_MISSING = "created_missing"
    SIGNATURE_EXPIRED = "signature_expired"
    CREATED_IN_FUTURE = "created_in_future"
    NONCE_MISSING = "nonce_missing"
    SIGNATURE_INVALID = "signature_invalid"
    NONCE_REPLAYED = "nonce_replayed"


class SignatureError(Exception):
    """A message failed verification. ``result`` is the rule; ``code`` its stable string."""

    def __init__(self, result: SignatureResult, detail: str = "") -> None:
        self.result = result
        self.detail = detail
        super().__init__(f"{result.value}: {detail}" if detail else result.value)

    @property
    def code(self) -> str:
        return self.result.value


@dataclass(frozen=True)
class VerifiedRequest:
    """What a verified request proves: signed by ``key_id`` at ``created`` (unix s) with ``nonce``."""

    key_id: str
    created: int
    nonce: str
    label: str = SIGNATURE_LABEL


@dataclass(frozen=True)
class VerifiedResponse:
    """What a verified engine answer proves: signed by ``key_id`` at ``created`` (unix s)."""

    key_id: str
    created: int
    label: str = SIGNATURE_LABEL


# --------------------------------------------------------------------------------------------
# Content-Digest (RFC 9530)


def content_digest(body: bytes) -> str:
    """RFC 9530 §2 ``Content-Digest`` value for ``body``: ``"sha-256=:<base64 of 32 bytes>:"``.

    ``body`` is the content as sent (after any content coding), possibly ``b""``.
    """
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError("body must be bytes")
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


def check_content_digest(header: str | None, body: bytes) -> None:
    """Check an RFC 9530 ``Content-Digest`` field value against ``body``; return ``None`` if it holds.

    The value is parsed as an RFC 8941 Dictionary (``http_sfv``); only its ``sha-256`` member is
    used (other algorithms are ignored) and compared in constant time.

    :raises SignatureError: ``DIGEST_MISSING`` when ``header`` is absent/empty or has no sha-256
        member; ``DIGEST_MISMATCH`` when it is malformed, the sha-256 member is not a 32-byte Byte
        Sequence, or it differs from SHA-256(body).
    """
    if header is None or not header.strip():
        raise SignatureError(SignatureResult.DIGEST_MISSING, "no Content-Digest field")
    parsed = http_sfv.Dictionary()
    try:
        parsed.parse(header.encode("ascii"))
    except (ValueError, UnicodeError) as exc:
        raise SignatureError(SignatureResult.DIGEST_MISMATCH, "malformed Content-Digest field") from exc
    member = parsed.get("sha-256")
    if member is None:
        raise SignatureError(
            SignatureResult.DIGEST_MISSING,
            f"Content-Digest has no sha-256 member (got {', '.join(parsed.keys()) or 'none'})",
        )
    value = getattr(member, "value", None)
    if not isinstance(value, bytes) or len(value) != 32:
        raise SignatureError(SignatureResult.DIGEST_MISMATCH, "sha-256 digest is not a 32-byte Byte Sequence")
    if not hmac.compare_digest(value, hashlib.sha256(body).digest()):
        raise SignatureError(SignatureResult.DIGEST_MISMATCH, "Content-Digest does not match the body")


# --------------------------------------------------------------------------------------------
# Message adapters for the library


def _field_lines(headers: Any) -> list[tuple[str, str]]:
    """All field lines of a header container as ``(name, value)`` strings, repeats kept."""
    if headers is None:
        return []
    if hasattr(headers, "multi_items"):  # httpx.Headers, starlette Headers
        pairs: Iterable = headers.multi_items()
    elif hasattr(headers, "items"):
        pairs = headers.items()
    else:
        pairs = headers
    lines = []
    for name, value in pairs:
        if isinstance(name, bytes):
            name = name.decode("ascii")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        lines.append((str(name), str(value)))
    return lines


class _Fields:
    """Read-only header view with the interface the library reads (``items`` keeps repeats)."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self._lines = lines

    def items(self) -> list[tuple[str, str]]:
        return list(self._lines)

    def __iter__(self):
        return iter(dict.fromkeys(name for name, _ in self._lines))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n.lower() == name.lower() for n, _ in self._lines)

    def get(self, name: str) -> str | None:
        values = [v.strip(" \t") for n, v in self._lines if n.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class _Request:
    method: str
    url: str
    headers: Any


@dataclass
class _Response:
    status_code: int
    headers: Any
    request: _Request | None


class _OneKey(HTTPSignatureKeyResolver):
    """Resolver for exactly one key id (the one already resolved by the caller)."""

    def __init__(self, key_id: str, *, public_key=None, private_key=None) -> None:
        self._key_id, self._public, self._private = key_id, public_key, private_key

    def resolve_public_key(self, key_id: str):
        return self._public if key_id == self._key_id else None

    def resolve_private_key(self, key_id: str):
        if key_id != self._key_id or self._private is None:
            raise KeyError(key_id)
        return self._private


class _WindowVerifier(HTTPMessageVerifier):
    """Library verifier whose time checks use our injected clock and limits, not the wall clock.

    (The library's own check reads ``datetime.now()``, allows a fixed 5 s skew and defaults
    ``max_age`` to one day.)
    """

    def __init__(self, *, key_resolver, now: int, max_age_s: int, max_skew_s: int) -> None:
        super().__init__(signature_algorithm=algorithms.ED25519, key_resolver=key_resolver)
        self._now, self._max_age_s, self._max_skew_s = now, max_age_s, max_skew_s

    def validate_created_and_expires(self, sig_input, max_age=None):
        result = _check_window(dict(sig_input.params), self._now, self._max_age_s, self._max_skew_s)
        if result is not None:
            raise InvalidSignature(result[1])


def _check_window(params: Mapping[str, Any], now: int, max_age_s: int, max_skew_s: int):
    """``None`` when ``created``/``expires`` are acceptable at ``now``, else ``(result, detail)``."""
    created = params.get("created")
    if created is None:
        return SignatureResult.CREATED_MISSING, "signature has no created parameter"
    if now - created > max_age_s:
        return SignatureResult.SIGNATURE_EXPIRED, f"created {created} is more than {max_age_s} s before {now}"
    expires = params.get("expires")
    if expires is not None and expires < now:
        return SignatureResult.SIGNATURE_EXPIRED, f"expires {expires} is before {now}"
    if created - now > max_skew_s:
        return SignatureResult.CREATED_IN_FUTURE, f"created {created} is more than {max_skew_s} s after {now}"
    return None


@dataclass
class _SignatureInput:
    label: str
    components: list[tuple[str, frozenset]]  # (name, frozenset of params) identities
    params: dict[str, Any]


def _parse_signature_fields(fields: _Fields) -> _SignatureInput:
    """Classify the (unverified) Signature / Signature-Input fields; raise rules 1-2."""
    sig_input_value, sig_value = fields.get("signature-input"), fields.get("signature")
    if not sig_input_value or not sig_input_value.strip():
        raise SignatureError(SignatureResult.SIGNATURE_MISSING, "no Signature-Input field")
    if not sig_value or not sig_value.strip():
        raise SignatureError(SignatureResult.SIGNATURE_MISSING, "no Signature field")
    malformed = SignatureResult.SIGNATURE_INPUT_MALFORMED
    inputs, signatures = http_sfv.Dictionary(), http_sfv.Dictionary()
    try:
        inputs.parse(sig_input_value.encode("ascii"))
        signatures.parse(sig_value.encode("ascii"))
    except (ValueError, UnicodeError) as exc:
        raise SignatureError(malformed, "Signature or Signature-Input is not an RFC 8941 dictionary") from exc
    if set(inputs.keys()) != set(signatures.keys()):
        raise SignatureError(malformed, "Signature and Signature-Input have different labels")
    if len(inputs) != 1:
        raise SignatureError(malformed, f"expected exactly one signature, got {len(inputs)}")
    label = next(iter(inputs.keys()))
    inner, signature = inputs[label], signatures[label]
    if not isinstance(inner, http_sfv.InnerList):
        raise SignatureError(malformed, "Signature-Input member is not an inner list")
    if not isinstance(signature, http_sfv.Item) or not isinstance(signature.value, bytes):
        raise SignatureError(malformed, "Signature member is not a Byte Sequence")
    components = []
    for item in inner:
        if not isinstance(item.value, str) or item.value != item.value.lower():
            raise SignatureError(malformed, "covered component names must be lower-case strings")
        components.append((item.value, frozenset(dict(item.params).items())))
    if len(set(components)) != len(components):
        raise SignatureError(malformed, "a component is covered twice")
    params = dict(inner.params)
    unknown = set(params) - _SIGNATURE_PARAMETERS
    if unknown:
        raise SignatureError(malformed, f"unknown signature parameters {sorted(unknown)}")
    for name in ("created", "expires"):
        if name in params and type(params[name]) is not int:
            raise SignatureError(malformed, f"{name} must be an Integer")
    for name in ("alg", "keyid", "nonce", "tag"):
        if name in params and not isinstance(params[name], str):
            raise SignatureError(malformed, f"{name} must be a String")
    if params.get("alg", ALGORITHM) != ALGORITHM:
        raise SignatureError(malformed, f"alg {params['alg']!r} is not {ALGORITHM}")
    if not params.get("keyid"):
        raise SignatureError(malformed, "no keyid parameter")
    return _SignatureInput(label, components, params)


def _identity(component_id: str) -> tuple[str, frozenset]:
    item = http_sfv.Item()
    item.parse((component_id if component_id.startswith('"') else f'"{component_id}"').encode("ascii"))
    return item.value, frozenset(dict(item.params).items())


def _require_coverage(parsed: _SignatureInput, required: Iterable[str]) -> None:
    covered = set(parsed.components)
    missing = [c for c in required if _identity(c) not in covered]
    if missing:
        raise SignatureError(SignatureResult.COMPONENT_NOT_COVERED, f"signature does not cover {missing}")


def _resolve_key(resolve_public_key: Callable[[str], Ed25519PublicKey | None], key_id: str) -> Ed25519PublicKey:
    key = resolve_public_key(key_id)
    if key is None:
        raise SignatureError(SignatureResult.UNKNOWN_KEY, f"no key for keyid {key_id!r}")
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError(f"resolve_public_key({key_id!r}) returned {type(key).__name__}, not Ed25519PublicKey")
    return key


def _library_verify(message, *, key_id, public_key, now, max_age_s, max_skew_s, required, body):
    """Run the library's verification; return its single VerifyResult or raise SIGNATURE_INVALID."""
    verifier = _WindowVerifier(
        key_resolver=_OneKey(key_id, public_key=public_key), now=now, max_age_s=max_age_s, max_skew_s=max_skew_s
    )
    try:
        results = verifier.verify(message, max_age=None, require_components=tuple(required), body=body)
    except (HTTPMessageSignaturesException, ValueError, TypeError) as exc:
        raise SignatureError(SignatureResult.SIGNATURE_INVALID, str(exc) or type(exc).__name__) from exc
    if len(results) != 1 or results[0].parameters.get("keyid") != key_id:
        raise SignatureError(SignatureResult.SIGNATURE_INVALID, "unexpected verification result")
    result = results[0]
    # Trust only what verify returned: the digest it authenticated must match the body.
    check_content_digest(result.covered_components.get('"content-digest"'), body)
    return result


def _signer(key_id: str, private_key: Ed25519PrivateKey) -> HTTPMessageSigner:
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError("private_key must be an Ed25519PrivateKey")
    return HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_OneKey(key_id, private_key=private_key)
    )


def _writable_headers(headers: Any) -> CaseInsensitiveDict:
    """Copy of caller headers without old signatures, for signing (last value wins per name)."""
    copy = CaseInsensitiveDict()
    for name, value in _field_lines(headers):
        if name.lower() in {"signature", "signature-input"}:
            continue
        copy[name] = f"{copy[name]}, {value}" if name in copy else value
    return copy


def _added(headers: CaseInsensitiveDict, names: Iterable[str]) -> dict[str, str]:
    return {name: headers[name] for name in names}


def _created_datetime(created: int) -> datetime.datetime:
    if isinstance(created, bool) or not isinstance(created, int):
        raise TypeError("created must be an int (unix seconds)")
    return datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)


def nonce_key(key_id: str, nonce: str) -> str:
    """Nonce-store key for a request nonce: ``"sig:<len(key_id)>:<key_id>:<nonce>"`` (unambiguous)."""
    return f"sig:{len(key_id)}:{key_id}:{nonce}"


# --------------------------------------------------------------------------------------------
# Requests


def sign_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    key_id: str,
    private_key: Ed25519PrivateKey,
    created: int,
    nonce: str,
) -> dict[str, str]:
    """Sign a terminal request (RFC 9421 §3.1, alg ``ed25519`` §3.3.6) and digest its body (RFC 9530).

    :param method: upper-case HTTP method.
    :param url: absolute, percent-encoded URL exactly as sent (``https://host[:port]/path?query``).
    :param headers: the request's other header fields; ``content-type`` is covered when present.
        An existing ``Content-Digest`` must match ``body``; old Signature fields are ignored.
    :param body: content bytes as sent (``b""`` when none).
    :param key_id: the terminal's key id (``keyid`` parameter).
    :param private_key: the terminal's Ed25519 private key.
    :param created: signing time, integer unix seconds (``created`` parameter).
    :param nonce: single-use random string (``nonce`` parameter), e.g. ``secrets.token_urlsafe()``.
    :returns: the fields to add: ``{"Content-Digest", "Signature-Input", "Signature"}``; label ``sig1``,
        covering ``("@method" "@target-uri" "content-digest" ["content-type"])``, parameters
        ``created``, ``keyid``, ``alg="ed25519"``, ``nonce``.
    :raises ValueError: invalid method/URL/parameter, or an existing Content-Digest not matching ``body``.
    """
    if not nonce or not isinstance(nonce, str):
        raise ValueError("nonce must be a non-empty string")
    fields = _writable_headers(headers)
    components = list(REQUEST_COMPONENTS)
    if "content-type" in fields:
        components.append("content-type")
    message = _Request(method=method.upper(), url=url, headers=fields)
    try:
        _signer(key_id, private_key).sign(
            message,
            key_id=key_id,
            created=_created_datetime(created),
            nonce=nonce,
            label=SIGNATURE_LABEL,
            include_alg=True,
            covered_component_ids=components,
            body=bytes(body),
            use_existing_digest="content-digest" in fields,
        )
    except HTTPMessageSignaturesException as exc:
        raise ValueError(f"cannot sign request: {exc}") from exc
    return _added(fields, ("Content-Digest", "Signature-Input", "Signature"))


def verify_request(
    method: str,
    url: str,
    headers: Any,
    body: bytes,
    *,
    resolve_public_key: Callable[[str], Ed25519PublicKey | None],
    nonce_store: NonceStore,
    now: int,
    max_age_s: int = DEFAULT_MAX_AGE_S,
    max_skew_s: int = DEFAULT_MAX_SKEW_S,
) -> VerifiedRequest:
    """Verify a signed terminal request (RFC 9421 §3.2) and consume its nonce.

    :param method: the request method as received (upper case).
    :param url: the absolute URL the terminal addressed (public origin + raw path + query).
    :param headers: case-insensitive header mapping (``httpx.Headers``, Starlette ``Headers``, a
        dict, or ``(name, value)`` pairs; repeated fields are joined with ``", "``).
    :param body: raw content bytes as received.
    :param resolve_public_key: key id -> the terminal's Ed25519 public key, or ``None`` if unknown
        (errors it raises propagate).
    :param nonce_store: single-use store; the key is :func:`nonce_key` and the TTL
        ``max_age_s + max_skew_s`` seconds (the longest time the same signature stays acceptable).
    :param now: current time, integer unix seconds.
    :param max_age_s: oldest acceptable ``created``, seconds before ``now``.
    :param max_skew_s: latest acceptable ``created``, seconds after ``now`` (terminal clock ahead).
    :returns: :class:`VerifiedRequest` built only from the library's verified parameters.
    :raises SignatureError: the first failing rule, in the order listed in the module docstring.
    :raises NonceStoreError: the nonce store cannot answer (answer 503; never accept).
    """
    fields = _Fields(_field_lines(headers))
    parsed = _parse_signature_fields(fields)
    key_id = parsed.params["keyid"]
    public_key = _resolve_key(resolve_public_key, key_id)
    required = list(REQUEST_COMPONENTS)
    if "content-type" in fields:
        required.append("content-type")
    _require_coverage(parsed, required)
    check_content_digest(fields.get("content-digest"), body)
    window = _check_window(parsed.params, now, max_age_s, max_skew_s)
    if window is not None:
        raise SignatureError(*window)
    if not parsed.params.get("nonce"):
        raise SignatureError(SignatureResult.NONCE_MISSING, "signature has no nonce parameter")

    message = _Request(method=method.upper(), url=url, headers=fields)
    result = _library_verify(
        message, key_id=key_id, public_key=public_key, now=now, max_age_s=max_age_s,
        max_skew_s=max_skew_s, required=required, body=bytes(body),
    )
    verified_nonce = result.parameters.get("nonce")
    verified_created = result.parameters.get("created")
    if not isinstance(verified_nonce, str) or not verified_nonce or type(verified_created) is not int:
        raise SignatureError(SignatureResult.SIGNATURE_INVALID, "verified parameters lack nonce or created")
    if not nonce_store.claim(nonce_key(key_id, verified_nonce), max_age_s + max_skew_s):
        raise SignatureError(SignatureResult.NONCE_REPLAYED, f"nonce already used by {key_id!r}")
    return VerifiedRequest(key_id=key_id, created=verified_created, nonce=verified_nonce, label=result.label)


class TerminalSigner(httpx.Auth):
    """``httpx.Auth`` that signs every outgoing request with :func:`sign_request`.

    :param key_id: the terminal's key id.
    :param private_key: the terminal's Ed25519 private key.
    :param clock: wall clock returning unix seconds (float ok; truncated to int for ``created``).
    :param nonce_factory: zero-argument callable returning a fresh nonce string.

    Usage: ``httpx.Client(base_url=..., auth=TerminalSigner("pos-1", key))``. The request body is
    read before signing (``requires_request_body``); each send, including a redirect, gets a
    fresh ``created`` and nonce.
    """

    requires_request_body = True

    def __init__(
        self,
        key_id: str,
        private_key: Ed25519PrivateKey,
        clock: Callable[[], float] = time.time,
        nonce_factory: Callable[[], str] = secrets.token_urlsafe,
    ) -> None:
        self.key_id = key_id
        self._private_key = private_key
        self._clock = clock
        self._nonce_factory = nonce_factory

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        added = sign_request(
            request.method,
            str(request.url),
            request.headers,
            request.content,
            key_id=self.key_id,
            private_key=self._private_key,
            created=int(self._clock()),
            nonce=self._nonce_factory(),
        )
        for name, value in added.items():
            request.headers[name] = value
        yield request


# --------------------------------------------------------------------------------------------
# Responses


def _response_components(fields, request_fields: _Fields | None, request_label: str) -> list[str]:
    components = list(RESPONSE_COMPONENTS)
    if "content-type" in fields:
        components.append("content-type")
    if request_fields is not None and _has_member(request_fields.get("signature"), request_label):
        components.append(f'"signature";key="{request_label}";req')
    return components


def _has_member(value: str | None, label: str) -> bool:
    if not value:
        return False
    parsed = http_sfv.Dictionary()
    try:
        parsed.parse(value.encode("ascii"))
    except (ValueError, UnicodeError):
        return False
    return label in parsed


def sign_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    key_id: str,
    private_key: Ed25519PrivateKey,
    created: int,
    request_method: str,
    request_url: str,
    request_headers: Any = None,
    request_label: str = SIGNATURE_LABEL,
) -> dict[str, str]:
    """Sign an engine answer (RFC 9421 §3.1) and bind it to its request (§2.4 ``req``).

    Covered: ``"@status"``, ``"content-digest"`` (of this response's ``body``), ``"@method";req``,
    ``"@target-uri";req``, ``"content-type"`` when the response has one, and
    ``"signature";key="sig1";req`` - the request's own signature value, which covers its nonce -
    when ``request_headers`` carry a Signature member ``request_label``. Parameters: ``created``,
    ``keyid``, ``alg="ed25519"`` (no nonce: freshness comes from the bound request).

    :param status: HTTP status code.
    :param headers: the response's other header fields.
    :param body: response content bytes as sent.
    :param key_id: the engine's signing key id.
    :param private_key: the engine's Ed25519 private key.
    :param created: integer unix seconds.
    :param request_method: the answered request's method.
    :param request_url: the answered request's URL, as verified (:func:`verify_request`'s ``url``).
    :param request_headers: the answered request's headers (for its Signature field), or ``None``.
    :returns: ``{"Content-Digest", "Signature-Input", "Signature"}`` to add to the response.
    :raises ValueError: invalid status, URL, or parameter.
    """
    fields = _writable_headers(headers)
    request_fields = _Fields(_field_lines(request_headers)) if request_headers is not None else None
    request = _Request(method=request_method.upper(), url=request_url, headers=request_fields or _Fields([]))
    message = _Response(status_code=int(status), headers=fields, request=request)
    try:
        _signer(key_id, private_key).sign(
            message,
            key_id=key_id,
            created=_created_datetime(created),
            label=SIGNATURE_LABEL,
            include_alg=True,
            covered_component_ids=_response_components(fields, request_fields, request_label),
            body=bytes(body),
            use_existing_digest="content-digest" in fields,
        )
    except HTTPMessageSignaturesException as exc:
        raise ValueError(f"cannot sign response: {exc}") from exc
    return _added(fields, ("Content-Digest", "Signature-Input", "Signature"))


def verify_response(
    status: int,
    headers: Any,
    body: bytes,
    *,
    request_method: str,
    request_url: str,
    request_headers: Any = None,
    request_label: str = SIGNATURE_LABEL,
    resolve_public_key: Callable[[str], Ed25519PublicKey | None],
    now: int,
    max_age_s: int = DEFAULT_MAX_AGE_S,
    max_skew_s: int = DEFAULT_MAX_SKEW_S,
) -> VerifiedResponse:
    """Verify an engine answer on the terminal (RFC 9421 §3.2), same codes as :func:`verify_request`.

    Required coverage: ``"@status"``, ``"content-digest"``, ``"@method";req``, ``"@target-uri";req``,
    ``"content-type"`` when the response has one, and ``"signature";key="sig1";req`` when the
    request we sent (``request_headers``) was signed - so an answer to another request (another
    nonce) does not verify. Rules 10 and 12 (nonces) do not apply to responses.

    :param status, headers, body: the response as received (raw content bytes).
    :param request_method, request_url, request_headers: the request as we sent it.
    :param resolve_public_key: key id -> the engine's Ed25519 public key, or ``None``.
    :param now: integer unix seconds; ``max_age_s`` / ``max_skew_s`` as in :func:`verify_request`.
    :raises SignatureError: the first failing rule.
    """
    fields = _Fields(_field_lines(headers))
    parsed = _parse_signature_fields(fields)
    key_id = parsed.params["keyid"]
    public_key = _resolve_key(resolve_public_key, key_id)
    request_fields = _Fields(_field_lines(request_headers)) if request_headers is not None else _Fields([])
    required = _response_components(fields, request_fields, request_label)
    _require_coverage(parsed, required)
    check_content_digest(fields.get("content-digest"), body)
    window = _check_window(parsed.params, now, max_age_s, max_skew_s)
    if window is not None:
        raise SignatureError(*window)
    request = _Request(method=request_method.upper(), url=request_url, headers=request_fields)
    message = _Response(status_code=int(status), headers=fields, request=request)
    result = _library_verify(
        message, key_id=key_id, public_key=public_key, now=now, max_age_s=max_age_s,
        max_skew_s=max_skew_s, required=required, body=bytes(body),
    )
    return VerifiedResponse(key_id=key_id, created=result.parameters["created"], label=result.label)
