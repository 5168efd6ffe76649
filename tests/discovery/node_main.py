"""A tiny discovery program the tests run inside a network namespace.

    python -m tests.discovery.node_main CONFIG_JSON

It runs one `Discovery` (or, with "raw_txt_hex", a bare zeroconf registration
carrying whatever TXT bytes the test wants) and prints one JSON object per line
on stdout: `started`, `found`, `lost`, `incompatible`, `peers` (on request),
`log` (every record from the `discovery` loggers, and WARNING or worse from
anything), `closed`. Commands on stdin, one per line: `peers`, `close`.
End of stdin or SIGTERM closes it too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
from typing import Any

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from discovery import SERVICE_TYPE, Discovery, PeerAddress


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class JsonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit(
            "log",
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
            exc=self.format(record) if record.exc_info else None,
        )


def peer_fields(peer: PeerAddress) -> dict[str, Any]:
    return dataclasses.asdict(peer)


async def commands(stop: asyncio.Event, on_peers: Any) -> None:
    """Read stdin commands until `close` or end of input, then set `stop`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().strip()
        if command == "peers":
            on_peers()
        elif command == "close":
            break
    stop.set()


async def run_discovery(config: dict[str, Any]) -> None:
    def on_found(peer: PeerAddress) -> None:
        emit("found", **peer_fields(peer))
        if config.get("raise_in_callbacks"):
            raise RuntimeError("test callback failure (on_found)")

    def on_lost(peer: PeerAddress) -> None:
        emit("lost", **peer_fields(peer))
        if config.get("raise_in_callbacks"):
            raise RuntimeError("test callback failure (on_lost)")

    def on_incompatible(peer: PeerAddress, version: int) -> None:
        emit("incompatible", version=version, **peer_fields(peer))

    discovery = Discovery(
        volume_tag=config["tag"],
        node_id=config["node_id"],
        name=config.get("name", "node"),
        port=config["port"],
        protocol=config.get("protocol", 1),
        static=[tuple(p) for p in config.get("static", [])],
        remembered=[tuple(p) for p in config.get("remembered", [])],
        mdns=config.get("mdns", True),
        addresses=config.get("addresses"),
        on_found=on_found,
        on_lost=on_lost,
        on_incompatible=on_incompatible if config.get("report_incompatible", True) else None,
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        try:
            await discovery.start()
        except OSError as e:
            emit("error", message=str(e))
            return
        emit("started")
        async with asyncio.TaskGroup() as tasks:
            reading = tasks.create_task(
                commands(
                    stop, lambda: emit("peers", peers=list(map(peer_fields, discovery.peers())))
                )
            )
            await stop.wait()
            reading.cancel()
    finally:
        await discovery.close()
        emit("closed")


async def run_raw(config: dict[str, Any]) -> None:
    """Advertise our service type with arbitrary TXT bytes, as a stranger might."""
    aiozc = AsyncZeroconf(interfaces=config["addresses"])
    try:
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{config['name']}.{SERVICE_TYPE}",
            port=config["port"],
            properties=bytes.fromhex(config["raw_txt_hex"]),
            server=f"{config['name']}.local.",
            parsed_addresses=config["addresses"],
        )
        await (await aiozc.async_register_service(info))
        emit("started")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await commands(stop, lambda: emit("peers", peers=[]))
    finally:
        await aiozc.async_close()
        emit("closed")


def main() -> None:
    config = json.loads(sys.argv[1])
    handler = JsonLogHandler()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    # Handlers of ancestors see a record whatever the ancestors' own levels are,
    # so this brings every `discovery` record to the handler above.
    logging.getLogger("discovery").setLevel(logging.DEBUG)
    asyncio.run(run_raw(config) if "raw_txt_hex" in config else run_discovery(config))


if __name__ == "__main__":
    main()
