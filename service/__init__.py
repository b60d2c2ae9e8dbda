"""tierdisk.service: the layered-disk engine, its layer kinds and the gRPC server.

The engine (:mod:`tierdisk.service.volume`) and the layers (:mod:`tierdisk.service.layers`)
are plain asyncio code with no gRPC in them; :mod:`tierdisk.service.grpc_api` puts them on
the wire.

The package itself re-exports nothing (importing it imports neither grpc nor the layers):
import from the module that defines a name, e.g. :class:`tierdisk.service.volume.Volume`,
:class:`tierdisk.service.server.Server`, :func:`tierdisk.service.config.load_config`, the
domain errors of :mod:`tierdisk.service.errors`. Each module's ``__all__`` is its API.
"""

__all__: list[str] = []
