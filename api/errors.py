"""Domain errors to RFC 9457 problem details, in exactly one place."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import Response

from ledger.errors import DomainError

PROBLEM_BASE = "https://citizencard.example/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem(status: int, code: str, title: str, detail: str, *, instance: str = "", **extra) -> dict:
    """An RFC 9457 problem document: ``type`` (a URI naming ``code``), ``title``, ``status``,
    ``detail``, ``instance`` and extension members (``code`` and any ``extra``)."""
    doc = {"type": PROBLEM_BASE + code.replace("_", "-"), "title": title, "status": status,
           "detail": detail, "code": code}
    if instance:
        doc["instance"] = instance
    doc.update(extra)
    return doc


def problem_body(doc: dict) -> bytes:
    """Serialise a problem document."""
    return json.dumps(doc, ensure_ascii=False).encode()


def from_domain(exc: DomainError, request: Request | None = None) -> dict:
    """The problem document for a domain error."""
    return problem(exc.status, exc.code, exc.title, exc.detail,
                   instance=str(request.url.path) if request is not None else "", **exc.extra)


def plain_problem_response(doc: dict) -> Response:
    """An unsigned problem response (used before a request could be attributed to anyone)."""
    return Response(problem_body(doc), status_code=doc["status"], media_type=PROBLEM_MEDIA_TYPE)
