"""gRPC client channels between the services."""

from __future__ import annotations

import grpc

from services.common.server import MAX_MESSAGE_BYTES


def open_channel(addr: str) -> grpc.aio.Channel:
    """An insecure channel to a service that can carry whole adapter uploads
    (gRPC's default limit is 4 MiB a message). Call it inside the event loop that uses it."""
    return grpc.aio.insecure_channel(
        addr,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # A restarted service is reached again within 2 s, not after gRPC's default
            # backoff (doubling up to 2 min, during which every call fails at once).
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ],
    )
