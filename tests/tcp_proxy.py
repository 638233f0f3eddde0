"""A tiny asyncio TCP proxy for tests that need to break a connection on purpose.

    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()          # listens on 127.0.0.1:<proxy.port>
    proxy.cut()                  # abort every connection open right now (both sides)
    await proxy.pause()          # stop listening: new connections are refused
    await proxy.resume()         # listen again on the same port
    proxy.stall()                # keep every connection open but forward nothing (a hung
                                 # broker, a black-holed network); proxy.flow() undoes it
    await proxy.close()

``accepted`` counts the connections accepted so far (a reconnect shows up as a new one).
With ``recording`` set, ``traffic`` keeps each chunk forwarded: ``(loop time, upstream,
bytes)``, upstream true for client -> server.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5672,
                 listen_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        self.accepted = 0
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.recording = False
        self.traffic: list[tuple[float, bool, bytes]] = []

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        path = "/" if vhost == "/" else vhost
        return f"amqp://{user}:{password}@{self.listen_host}:{self.port}/{path}"

    async def start(self) -> None:
        """Listen (on a free port the first time, on the same port afterwards)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port)
        except OSError:
            _abort(client_writer)
            return
        pair = (client_writer, upstream_writer)
        self._pairs.add(pair)
        pumps = [asyncio.create_task(self._pump(client_reader, upstream_writer, True)),
                 asyncio.create_task(self._pump(upstream_reader, client_writer, False))]
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps.difference_update(pumps)
            self._pairs.discard(pair)
            _abort(client_writer)
            _abort(upstream_writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: bool) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()  # stalled: held here, neither sent nor dropped
                if self.recording:
                    self.traffic.append((loop.time(), upstream, data))
                writer.write(data)
                await writer.drain()

    def cut(self) -> int:
        """Abort every open connection (an RST to both ends); returns how many."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            _abort(client)
            _abort(upstream)
        return len(pairs)

    def stall(self) -> None:
        """Forward nothing more, either way, on open and new connections (they stay open:
        a peer sees silence, not a close) until :meth:`flow`."""
        self._flowing.clear()

    def flow(self) -> None:
        """Forward again, what was held back first."""
        self._flowing.set()

    async def pause(self) -> None:
        """Stop listening: connection attempts are refused until :meth:`resume`."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def resume(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.pause()
        self.cut()
        pumps = list(self._pumps)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
