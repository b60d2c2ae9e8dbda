#!/usr/bin/env python3
"""Probe a gRPC server's standard health service (grpc.health.v1).

    healthcheck.py [ADDRESS [SERVICE]] [--timeout SECONDS]

ADDRESS defaults to 127.0.0.1:7400 ("unix:/path" works too), SERVICE to "" (the whole
server). Prints one line and exits 0 when the service is SERVING, 1 otherwise (not
serving, unknown service, unreachable, timed out). Used by the Dockerfile's HEALTHCHECK
and docker-compose.yml.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:7400"
DEFAULT_TIMEOUT = 2.0


def probe(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """Ask `address` for the health of `service`: (serving, one line describing it)."""
    shown = f"{address} service {service!r}"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code: str = error.code().name
            details: str = error.details() or ""
            return False, f"{shown}: {code} {details}".rstrip()
    status: int = reply.status
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return status == health_pb2.HealthCheckResponse.SERVING, f"{shown}: {name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("address", nargs="?", default=DEFAULT_ADDRESS)
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    args = parser.parse_args(argv)
    serving, line = probe(args.address, args.service, args.timeout)
    print(line, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
