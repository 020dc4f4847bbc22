"""Opaque page tokens for List RPCs (AIP-132): an offset, base64url-encoded JSON."""

from __future__ import annotations

import base64
import json

from services.common.errors import InvalidArgument


def encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode()


def decode_page_token(token: str) -> int:
    """The offset a token stands for; '' is the first page."""
    if not token:
        return 0
    try:
        offset = int(json.loads(base64.urlsafe_b64decode(token.encode()))["o"])
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidArgument("invalid page_token", reason="BAD_PAGE_TOKEN") from err
    if offset < 0:
        raise InvalidArgument("invalid page_token", reason="BAD_PAGE_TOKEN")
    return offset
