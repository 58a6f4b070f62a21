"""Errors as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}``.

The status matters beyond the message: the ``openai`` client retries 408,
409, 429 and every 5xx, so a client mistake answered with a 500 would be
silently run again. Bad input is always a 4xx here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ferrum.errors import (
    ContextLengthExceededError,
    ExecutorStateError,
    FerrumError,
    InvalidRequestError,
    KVCacheExhaustedError,
    RequestFailedError,
    UnsupportedFeatureError,
)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # OpenAI's, with code "invalid_api_key"
    404: "invalid_request_error",  # OpenAI's, with code "model_not_found" for a model
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error response: HTTP status, message, the offending parameter, a code."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    @classmethod
    def of(cls, error: BaseException) -> "APIError":
        """The response for any error: as it is, as :meth:`from_ferrum` shapes Ferrum's, else a server error
        (a bug) named by its type and message."""
        if isinstance(error, APIError):
            return error
        if isinstance(error, FerrumError):
            return cls.from_ferrum(error)
        return cls(500, f"{type(error).__name__}: {error}")

    @classmethod
    def from_ferrum(cls, error: FerrumError, names: Mapping[str, str] | None = None) -> "APIError":
        """The response for an error Ferrum raised while taking a request in; ``names`` gives the endpoint's
        name of the argument at fault (``InvalidRequestError.param``) where it differs from Ferrum's."""
        param = getattr(error, "param", None)
        param = (names or {}).get(param, param)
        if isinstance(error, ContextLengthExceededError):
            return cls(400, str(error), param=param, code="context_length_exceeded")
        if isinstance(error, (InvalidRequestError, UnsupportedFeatureError)):
            return cls(400, str(error), param=param)
        if isinstance(error, KVCacheExhaustedError):
            return cls(503, str(error), headers={"Retry-After": "1"})
        if isinstance(error, ExecutorStateError):  # the engine stopped: the server is shutting down
            return cls(503, "the request was aborted: the server is shutting down", code="aborted")
        if isinstance(error, RequestFailedError) and isinstance(error.__cause__, InvalidRequestError):
            return cls(400, str(error))  # taken in, then found impossible (a structure its grammar cannot follow)
        return cls(500, f"{type(error).__name__}: {error}")


#: How pydantic names the branch of a union a complaint is about, inside its location: ``str``,
#: ``list[int]``, ``function-after[...]``. No request field is named so, but a key of a map may be: a
#: union's branches are told by complaining side by side (one each) under the same field.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|[A-Za-z_-]+\[.*\])$")


def _branch_at(loc: list[str], errors: list[dict[str, Any]]) -> int | None:
    """Where ``loc`` names a union's branch: a part spelt like one, beside another complaint's other branch."""
    for i, part in enumerate(loc):
        if _UNION_BRANCH.match(part):
            others = {str(parts[i]) for e in errors
                      if len(parts := [str(p) for p in e.get("loc", ()) if p != "body"]) > i and parts[:i] == loc[:i]}
            if len(others) > 1:
                return i
    return None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 for pydantic's complaints about a request body, naming the first bad field.

    A value that fits no branch of a union draws one complaint per branch; the message gives the
    complaint of the branch that got furthest into the value and the forms the field takes."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        if "recursion limit" in detail:  # the parser's depth limit (200 levels), not a syntax error
            return APIError(400, "the request body nests objects or arrays deeper than this server reads "
                                 "(200 levels); flatten it (a JSON schema: move nested parts to $defs)")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    branch_at = _branch_at(loc, errors)
    if branch_at is not None:
        return _union_error(errors, loc[:branch_at])
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}; see the API reference for the accepted fields", param=param)
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


def _union_error(errors: list[dict[str, Any]], field: list[str]) -> APIError:
    depth = len(field)
    mine = [[str(p) for p in e.get("loc", ()) if p != "body"] for e in errors]
    mine = [(loc, e) for loc, e in zip(mine, errors) if loc[:depth] == field and len(loc) > depth]
    forms = list(dict.fromkeys(loc[depth] for loc, _ in mine))
    deepest_loc, deepest = max(mine, key=lambda pair: len(pair[0]))
    where = ".".join(field + deepest_loc[depth + 1 :])
    param = ".".join(field)
    return APIError(400, f"{where}: {deepest.get('msg', 'invalid value')} ({param} takes {' or '.join(forms)})",
                    param=param)
