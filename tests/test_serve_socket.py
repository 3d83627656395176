"""The serving socket: accepted connections have Nagle off, so a streamed token is sent when it is written."""
import asyncio
import socket

from telechat_ms.serve.server import _bind


def test_accepted_connections_have_tcp_nodelay():
    """asyncio sets TCP_NODELAY only where the socket's proto is IPPROTO_TCP; a listener made with proto 0 left
    Nagle on, and keep-alive streams' first tokens waited ~40 ms for the client's delayed ACK."""
    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = _bind("127.0.0.1", 0)
        server = await asyncio.start_server(handle, sock=sock)
        client = socket.create_connection(sock.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == 1
