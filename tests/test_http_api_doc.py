"""docs/http-api.md lists every refusal the HTTP layer can give, with its code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import earshot.service.http.openai as openai_mod
import earshot.service.http.serving as serving_mod
from earshot.core.errors import EarshotError

DOC = (Path(__file__).resolve().parent.parent / "docs" / "http-api.md").read_text()


def documented_codes() -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", DOC))


def test_every_openai_endpoint_error_is_documented() -> None:
    # Every error class the endpoints' module raises (they live in earshot.core.errors).
    codes = {
        cls.code
        for _, cls in inspect.getmembers(openai_mod, inspect.isclass)
        if issubclass(cls, EarshotError) and cls is not EarshotError
    }
    assert {"invalid_multipart", "body_timeout", "upload_too_large"} <= codes
    assert codes <= documented_codes(), codes - documented_codes()


def test_every_framework_refusal_is_documented() -> None:
    # 401 and 403 come from auth, with its own codes (docs/auth.md).
    codes = {
        (status, code)
        for status, code in serving_mod._HTTP_CODES.items()
        if status not in (401, 403)
    }
    codes |= {(503, "too_many_connections")}
    for status, code in sorted(codes):
        assert f"`{status} {code}`" in DOC or f"`{code}`" in DOC, (status, code)
