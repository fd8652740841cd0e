"""matrix-nio with end-to-end encryption (vodozemac) drives Hearth:

- two users in an encrypted room decrypt each other's messages;
- a user's second device decrypts messages sent after it appeared;
- that device, offline while several Megolm sessions were shared with it, decrypts all of them
  when it returns; with a control directory, Hearth is killed (-9) and restarted while it is away.

Usage: e2ee.py BASE_URL [CONTROL_DIR]. With CONTROL_DIR the script writes CONTROL_DIR/kill when
the device is away and waits for CONTROL_DIR/restarted before bringing it back. With
HARNESS_OTHER_BASE set, bob and his devices are users of that server, which federates with the
first: the same checks then hold across servers (the keys asked of bob's server, the room keys
sent to his devices there, his second device announced to alice's server); HARNESS_CA_FILE is
the CA a server's certificate comes from when it is not from the system's roots.
Prints "ALL CHECKS PASSED" when every check held.
"""

import asyncio
import os
import secrets
import ssl
import sys
import tempfile
import time

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    KeysQueryError,
    KeysUploadError,
    LoginResponse,
    MegolmEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)

BASE = sys.argv[1]
CONTROL = sys.argv[2] if len(sys.argv) > 2 else None
OTHER_BASE = os.environ.get("HARNESS_OTHER_BASE") or BASE
PASSWORD = "nio-password-" + secrets.token_hex(4)
STORE = tempfile.mkdtemp(prefix="hearth-nio-e2ee-")
# A timeline long enough that a returning device sees everything it missed.
FILTER = {"room": {"timeline": {"limit": 50}}}


def check(condition: bool, what: str, detail: object = "") -> None:
    if not condition:
        print(f"FAILED: {what} {detail}", flush=True)
        raise SystemExit(1)
    print(f"ok: {what}", flush=True)


def client_for(name: str, device: str, base: str = BASE) -> AsyncClient:
    store = os.path.join(STORE, f"{name}-{device}")
    os.makedirs(store, exist_ok=True)
    config = AsyncClientConfig(
        encryption_enabled=True, store_sync_tokens=True, max_limit_exceeded=0, max_timeouts=2, request_timeout=30
    )
    # HARNESS_CA_FILE: the CA of a server whose certificate is not from the system's roots.
    ca_file = os.environ.get("HARNESS_CA_FILE")
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    return AsyncClient(base, name, store_path=store, config=config, ssl=context)


async def maintain_keys(client: AsyncClient) -> None:
    """What nio's sync_forever does between syncs: upload and query keys, send queued messages."""
    if client.should_upload_keys:
        response = await client.keys_upload()
        check(not isinstance(response, KeysUploadError), f"{client.device_id} uploads keys", response)
    if client.should_query_keys:
        response = await client.keys_query()
        check(not isinstance(response, KeysQueryError), f"{client.device_id} queries keys", response)
    await client.send_to_device_messages()


async def sync(client: AsyncClient, timeout: int = 0) -> SyncResponse:
    response = await client.sync(timeout=timeout, sync_filter=FILTER)
    check(isinstance(response, SyncResponse), f"{client.device_id} syncs", response)
    await maintain_keys(client)
    return response


async def decrypted_until(client: AsyncClient, room_id: str, wanted: set, rounds: int = 15) -> dict:
    """Syncs until every body in `wanted` arrived decrypted; returns body -> session id."""
    seen: dict = {}
    undecryptable = 0
    for _ in range(rounds):
        response = await sync(client, timeout=2000)
        room = response.rooms.join.get(room_id)
        for event in room.timeline.events if room else []:
            if isinstance(event, RoomMessageText) and event.decrypted:
                seen[event.body] = event.session_id
            elif isinstance(event, MegolmEvent):
                undecryptable += 1
        if wanted <= seen.keys():
            break
    if not wanted <= seen.keys():
        print(f"{client.device_id}: decrypted {sorted(seen)}, undecryptable {undecryptable}", flush=True)
    return seen


async def send(client: AsyncClient, room_id: str, body: str) -> None:
    if client.olm.should_share_group_session(room_id):
        await client.share_group_session(room_id, ignore_unverified_devices=True)
    response = await client.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": body}, ignore_unverified_devices=True
    )
    check(isinstance(response, RoomSendResponse), f"{client.user_id} sends {body!r} encrypted", response)


async def main() -> None:
    alice = client_for("alice" + secrets.token_hex(3), "laptop")
    bob = client_for("bob" + secrets.token_hex(3), "laptop", OTHER_BASE)
    for client in (alice, bob):
        registered = await client.register(client.user, PASSWORD, device_name="nio laptop")
        check(isinstance(registered, RegisterResponse), f"register {client.user}", registered)
        check(client.olm is not None, f"{client.user} has an Olm account")
        await sync(client)
    check(not alice.should_upload_keys, "alice's identity and one-time keys are on the server")

    created = await alice.room_create(
        name="secrets",
        invite=[bob.user_id],
        initial_state=[
            {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
        ],
    )
    check(isinstance(created, RoomCreateResponse), "alice creates an encrypted room", created)
    room_id = created.room_id
    for _ in range(15):
        await sync(bob, timeout=1000)
        if room_id in bob.invited_rooms:
            break
    check(isinstance(await bob.join(room_id), JoinResponse), "bob joins")
    await sync(bob)
    for _ in range(10):
        await sync(alice, timeout=1000)
        room = alice.rooms.get(room_id)
        if room and room.encrypted and bob.user_id in room.users and alice.device_store.active_user_devices(bob.user_id):
            break
    check(any(True for _ in alice.device_store.active_user_devices(bob.user_id)), "alice knows bob's device keys")

    # Both ways.
    await send(alice, room_id, "hello bob, in secret")
    got = await decrypted_until(bob, room_id, {"hello bob, in secret"})
    check("hello bob, in secret" in got, "bob decrypts alice's message")
    await send(bob, room_id, "hello alice, also in secret")
    got = await decrypted_until(alice, room_id, {"hello alice, also in secret"})
    check("hello alice, also in secret" in got, "alice decrypts bob's message")

    # Bob's second device: alice learns of it through her sync's device list and shares with it.
    phone = client_for(bob.user, "phone", OTHER_BASE)
    logged_in = await phone.login(PASSWORD, device_name="nio phone")
    check(isinstance(logged_in, LoginResponse), "bob logs in on a second device", logged_in)
    await sync(phone)
    for _ in range(15):
        await sync(alice, timeout=1000)
        if phone.device_id in alice.device_store[bob.user_id]:
            break
    check(phone.device_id in alice.device_store[bob.user_id], "alice sees bob's second device")
    alice.olm.outbound_group_sessions.pop(room_id, None)  # a new device gets a new session, as clients do
    await send(alice, room_id, "for both of bob's devices")
    got = await decrypted_until(phone, room_id, {"for both of bob's devices"})
    check("for both of bob's devices" in got, "bob's second device decrypts a message sent after it appeared")

    # The phone goes away; alice rotates her Megolm session before each of three messages.
    away = [f"while you were away {n}" for n in range(3)]
    for body in away:
        alice.olm.outbound_group_sessions.pop(room_id, None)
        await send(alice, room_id, body)
    if CONTROL:
        open(os.path.join(CONTROL, "kill"), "w").close()
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(CONTROL, "restarted")) and time.time() < deadline:
            await asyncio.sleep(0.1)
        check(os.path.exists(os.path.join(CONTROL, "restarted")), "hearth was killed and restarted while the phone was away")

    got = await decrypted_until(phone, room_id, set(away), rounds=30)
    check(set(away) <= got.keys(), f"the returning device decrypts all {len(away)} messages")
    check(len({got[body] for body in away}) == len(away), "they came in as many Megolm sessions")

    for client in (alice, bob, phone):
        await client.close()
    print("ALL CHECKS PASSED", flush=True)


asyncio.run(main())
