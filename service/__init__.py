"""tierdisk.service: the layered-disk engine, its layer kinds and the gRPC server.

The engine (:mod:`tierdisk.service.volume`) and the layers (:mod:`tierdisk.service.layers`)
are plain asyncio code with no gRPC in them; :mod:`tierdisk.service.grpc_api` puts them on
the wire.
"""
