"""A matrix-nio user with encryption, driven over stdin/stdout by another harness (js/e2ee.mjs):
it is the other side of an encrypted conversation with a different client library.

Protocol, one line each: prints "USER <user id>" once registered with its keys uploaded; reads
"ROOM <room id>"; joins, sends the encrypted text "hello from nio", and prints "GOT <body>" for
the first encrypted message from the other user it decrypts, then "DONE".
"""

import asyncio
import os
import secrets
import sys
import tempfile

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    RegisterResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)

BASE = sys.argv[1]


def say(line: str) -> None:
    print(line, flush=True)


def fail(what: str) -> None:
    say(f"FAILED: {what}")
    raise SystemExit(1)


async def sync(client: AsyncClient, timeout: int = 0) -> SyncResponse:
    response = await client.sync(timeout=timeout, sync_filter={"room": {"timeline": {"limit": 50}}})
    if not isinstance(response, SyncResponse):
        fail(f"sync: {response}")
    if client.should_upload_keys:
        await client.keys_upload()
    if client.should_query_keys:
        await client.keys_query()
    await client.send_to_device_messages()
    return response


async def main() -> None:
    store = tempfile.mkdtemp(prefix="hearth-nio-peer-")
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True, max_timeouts=2, request_timeout=30)
    name = "niopeer" + secrets.token_hex(3)
    client = AsyncClient(BASE, name, store_path=store, config=config)
    registered = await client.register(name, "nio-peer-" + secrets.token_hex(4), device_name="nio peer")
    if not isinstance(registered, RegisterResponse):
        fail(f"register: {registered}")
    await sync(client)
    say(f"USER {client.user_id}")

    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line.startswith("ROOM "):
        fail(f"expected a room, got {line!r}")
    room_id = line.split()[1]
    for _ in range(20):
        await sync(client, timeout=1000)
        if room_id in client.invited_rooms:
            break
    if not isinstance(await client.join(room_id), JoinResponse):
        fail("join")
    others = []
    for _ in range(20):
        await sync(client, timeout=1000)
        room = client.rooms.get(room_id)
        others = [u for u in (room.users if room else {}) if u != client.user_id]
        if room and room.encrypted and others and all(list(client.device_store.active_user_devices(u)) for u in others):
            break
    if not others:
        fail("the other user never appeared in the room")
    await client.share_group_session(room_id, ignore_unverified_devices=True)
    sent = await client.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": "hello from nio"}, ignore_unverified_devices=True
    )
    if not isinstance(sent, RoomSendResponse):
        fail(f"send: {sent}")
    for _ in range(40):
        response = await sync(client, timeout=1000)
        room = response.rooms.join.get(room_id)
        for event in room.timeline.events if room else []:
            if isinstance(event, RoomMessageText) and event.decrypted and event.sender != client.user_id:
                say(f"GOT {event.body}")
                await client.close()
                say("DONE")
                return
    fail("no encrypted message from the other user decrypted")


asyncio.run(main())
