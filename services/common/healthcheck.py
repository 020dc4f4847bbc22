"""Container health check: `python -m services.common.healthcheck grpc ADDR [SERVICE]` or
`python -m services.common.healthcheck http URL`. Exit 0 when healthy, 1 otherwise.

The image has no curl and no grpc_health_probe; docker-compose health checks call this
(Kubernetes uses its native grpc/httpGet probes instead).
"""

from __future__ import annotations

import sys
import urllib.request

TIMEOUT_SECONDS = 3.0


def grpc_serving(addr: str, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as reply:
            return 200 <= reply.status < 300
    except OSError:  # URLError, HTTPError (non-2xx), refused, timed out
        return False


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "grpc" and len(argv) <= 3:
        return 0 if grpc_serving(argv[1], argv[2] if len(argv) == 3 else "") else 1
    if len(argv) == 2 and argv[0] == "http":
        return 0 if http_ok(argv[1]) else 1
    print(__doc__.splitlines()[0], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
