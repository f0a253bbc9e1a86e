"""The one small exception hierarchy of the domain (STYLE.md habit 3).

Business code raises these; ``api/errors.py`` maps each class to an HTTP status and an RFC 9457
problem document in exactly one place, and the CLI prints ``code: detail`` on one line.
Each error carries a stable machine-readable ``code`` (snake_case rule name) and a human
``detail``; ``extra`` holds JSON-ready context (for example the failing field).
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class: a request could not be carried out; nothing was posted."""

    status = 400
    title = "Request failed"

    def __init__(self, code: str, detail: str = "", **extra: Any) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail or code
        self.extra = extra


class Invalid(DomainError):
    """The request is malformed or breaks a rule of the input (HTTP 422)."""

    status = 422
    title = "Invalid request"


class NotFound(DomainError):
    """A referenced thing (card, settlement, terminal) does not exist (HTTP 404)."""

    status = 404
    title = "Not found"


class Conflict(DomainError):
    """The request conflicts with the current state or an earlier request with the same
    idempotency key but other content (HTTP 409)."""

    status = 409
    title = "Conflict"


class Rejected(DomainError):
    """A well-formed request refused by a business rule: insufficient funds, blocked card,
    bad cryptogram (HTTP 402 for funds, 403 for authorisation; see ``status``)."""

    status = 403
    title = "Rejected"

    def __init__(self, code: str, detail: str = "", *, status: int = 403, **extra: Any) -> None:
        super().__init__(code, detail, **extra)
        self.status = status


class Unauthenticated(DomainError):
    """The request's signature is missing or does not verify (HTTP 401)."""

    status = 401
    title = "Unauthenticated"


class Unavailable(DomainError):
    """A dependency (database, nonce store) is down; retry later with the same key (HTTP 503)."""

    status = 503
    title = "Service unavailable"
