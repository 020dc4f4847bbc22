"""Field types that say what fits the services' proto fields, so that a value which does
not is a 400 at the edge (pydantic), never a 500 when the request proto is built."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator, Field

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

Int32 = Annotated[int, Field(ge=-(2**31), le=INT32_MAX)]
UInt32 = Annotated[int, Field(ge=0, le=UINT32_MAX)]
UInt64 = Annotated[int, Field(ge=0, le=UINT64_MAX)]
Float = Annotated[float, Field(allow_inf_nan=False)]
# Ids the services check against their own patterns; bounded here so that a huge one is
# refused before it travels (the services' patterns allow at most 256 characters).
Identifier = Annotated[str, Field(max_length=256)]
# List routes' paging (AIP-158): 0 asks for the service's default page size.
PageSize = Annotated[int, Query(ge=0, le=1000)]


def _fits_timestamp(value: datetime) -> datetime:
    """google.protobuf.Timestamp spans years 1 to 9999 in UTC; an instant at either end in
    another time zone falls outside it once shifted."""
    try:
        value.astimezone(UTC) if value.tzinfo else value
    except OverflowError:
        raise ValueError("the date is out of range (years 1 to 9999, UTC)") from None
    return value


Instant = Annotated[datetime, AfterValidator(_fits_timestamp)]
