"""matrix-nio drives Hearth's rooms: create, invite, join, chat both ways, paginate back,
change the room's name, see typing, receipts, presence and display names, redact, upgrade,
and ignore a user (whose messages then stay out of the ignorer's /sync).

Usage: rooms.py BASE_URL. Prints "ALL CHECKS PASSED" when every check held.
"""

import asyncio
import json
import secrets
import sys

from nio import (
    AsyncClient,
    JoinResponse,
    RoomCreateResponse,
    RoomMessagesResponse,
    RoomMessageText,
    RoomRedactResponse,
    RoomSendResponse,
    SyncResponse,
)

from harness import check, registered_client

BASE = sys.argv[1]
PASSWORD = "nio-password-" + secrets.token_hex(4)


async def new_user(name: str) -> AsyncClient:
    return await registered_client(BASE, name, PASSWORD)


async def texts_until(client: AsyncClient, room_id: str, wanted: str, rounds: int = 10) -> list:
    """Syncs until a text message with body `wanted` arrives in the room; returns the bodies seen."""
    seen = []
    for _ in range(rounds):
        response = await client.sync(timeout=5000)
        check(isinstance(response, SyncResponse), f"{client.user_id} syncs: {type(response).__name__}")
        room = response.rooms.join.get(room_id)
        if room:
            seen += [e.body for e in room.timeline.events if isinstance(e, RoomMessageText)]
        if wanted in seen:
            return seen
    return seen


async def main() -> None:
    suffix = secrets.token_hex(3)
    alice = await new_user(f"alice{suffix}")
    bob = await new_user(f"bob{suffix}")
    carol = await new_user(f"carol{suffix}")
    try:
        first = await bob.sync(timeout=0)
        check(isinstance(first, SyncResponse), "bob's first sync")
        await alice.sync(timeout=0)

        created = await alice.room_create(name="Tea room", topic="brewing", invite=[bob.user_id])
        check(isinstance(created, RoomCreateResponse), f"alice creates a room: {created}")
        room_id = created.room_id

        invited = None
        for _ in range(5):
            response = await bob.sync(timeout=5000)
            if room_id in response.rooms.invite:
                invited = response.rooms.invite[room_id]
                break
        check(invited is not None, "bob sees the invite in /sync")

        joined = await bob.join(room_id)
        check(isinstance(joined, JoinResponse), f"bob joins: {joined}")
        await alice.sync(timeout=0)
        await bob.sync(timeout=0)

        sent = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hello bob"})
        check(isinstance(sent, RoomSendResponse), f"alice sends: {sent}")
        seen = await texts_until(bob, room_id, "hello bob")
        check("hello bob" in seen, f"bob receives alice's message: {seen}")

        reply = await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hi alice"})
        check(isinstance(reply, RoomSendResponse), f"bob replies: {reply}")
        seen = await texts_until(alice, room_id, "hi alice")
        check("hi alice" in seen, f"alice receives bob's reply: {seen}")

        for n in range(5):
            await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"line {n}"})
        await texts_until(bob, room_id, "line 4")
        start = bob.next_batch
        collected = []
        token = start
        for _ in range(10):
            page = await bob.room_messages(room_id, token, limit=3)
            check(isinstance(page, RoomMessagesResponse), f"bob paginates back: {type(page).__name__}")
            collected += [e.body for e in page.chunk if isinstance(e, RoomMessageText)]
            if not page.end or not page.chunk:
                break
            token = page.end
        check(collected[:3] == ["line 4", "line 3", "line 2"], f"newest first: {collected[:3]}")
        check("hello bob" in collected and "hi alice" in collected, f"all the history: {collected}")

        renamed = await alice.room_put_state(room_id, "m.room.name", {"name": "Coffee room"})
        check(not hasattr(renamed, "status_code") or renamed.status_code is None, f"alice renames: {renamed}")
        name = None
        for _ in range(5):
            await bob.sync(timeout=3000)
            name = bob.rooms[room_id].name if room_id in bob.rooms else None
            if name == "Coffee room":
                break
        check(name == "Coffee room", f"bob sees the new name: {name}")

        # Typing, receipts, presence and display names, as nio sees them through /sync.
        typing = await alice.room_typing(room_id, typing_state=True, timeout=10000)
        check(not getattr(typing, "status_code", None), f"alice types: {typing}")
        users = []
        for _ in range(5):
            await bob.sync(timeout=3000)
            users = list(bob.rooms[room_id].typing_users)
            if alice.user_id in users:
                break
        check(alice.user_id in users, f"bob sees alice typing: {users}")

        marked = await alice.room_read_markers(room_id, reply.event_id, reply.event_id)
        check(not getattr(marked, "status_code", None), f"alice marks bob's reply read: {marked}")
        receipts = {}
        for _ in range(5):
            await bob.sync(timeout=3000)
            receipts = {r.user_id: r.event_id for r in bob.rooms[room_id].read_receipts.values()} if hasattr(
                bob.rooms[room_id], "read_receipts") else {}
            if receipts.get(alice.user_id) == reply.event_id:
                break
        check(receipts.get(alice.user_id) == reply.event_id, f"bob sees alice's read receipt: {receipts}")

        status = await alice.set_presence("online", "brewing tea")
        check(not getattr(status, "status_code", None), f"alice sets presence: {status}")
        seen = await bob.get_presence(alice.user_id)
        check(getattr(seen, "presence", None) == "online" and seen.status_msg == "brewing tea", f"bob reads it: {seen}")

        renamed_user = await alice.set_displayname("Alice the Brewer")
        check(not getattr(renamed_user, "status_code", None), f"alice changes her name: {renamed_user}")
        shown = None
        for _ in range(5):
            await bob.sync(timeout=3000)
            shown = bob.rooms[room_id].user_name(alice.user_id)
            if shown == "Alice the Brewer":
                break
        check(shown == "Alice the Brewer", f"bob sees alice's new name: {shown}")

        redacted = await alice.room_redact(room_id, sent.event_id, reason="typo")
        check(isinstance(redacted, RoomRedactResponse), f"alice redacts her message: {redacted}")
        denied = await bob.room_put_state(room_id, "m.room.name", {"name": "Bob's room"})
        check(getattr(denied, "status_code", None) == "M_FORBIDDEN", f"bob may not rename: {denied}")

        # Alice upgrades the room to version 12; bob's client sees the tombstone and follows.
        upgraded = await alice.send(
            "POST",
            f"/_matrix/client/v3/rooms/{room_id}/upgrade",
            '{"new_version": "12"}',
            headers={"Authorization": f"Bearer {alice.access_token}", "Content-Type": "application/json"},
        )
        answer = await upgraded.json()
        check(upgraded.status == 200 and "replacement_room" in answer, f"alice upgrades the room: {answer}")
        new_room = answer["replacement_room"]
        replacement = None
        for _ in range(5):
            await bob.sync(timeout=3000)
            replacement = bob.rooms[room_id].replacement_room
            if replacement:
                break
        check(replacement == new_room, f"bob's client sees the room replaced by {new_room}: {replacement}")
        # The room is invite-only: alice invites its members, as Element offers when upgrading.
        invited = await alice.room_invite(new_room, bob.user_id)
        check(not getattr(invited, "status_code", None), f"alice invites bob to the new room: {invited}")
        followed = await bob.join(replacement)
        check(isinstance(followed, JoinResponse), f"bob follows into the new room: {followed}")
        await alice.room_send(new_room, "m.room.message", {"msgtype": "m.text", "body": "in the new room"})
        seen = await texts_until(bob, new_room, "in the new room")
        check("in the new room" in seen, f"bob hears alice in the new room: {seen}")
        check(bob.rooms[new_room].room_version == "12", f"a version 12 room: {bob.rooms[new_room].room_version}")

        # Carol joins; bob ignores her (m.ignored_user_list account data, which nio has no call
        # for): her next message never reaches bob's /sync while alice's, sent after it, does.
        invited = await alice.room_invite(new_room, carol.user_id)
        check(not getattr(invited, "status_code", None), f"alice invites carol: {invited}")
        joined = await carol.join(new_room)
        check(isinstance(joined, JoinResponse), f"carol joins the new room: {joined}")
        ignored = await bob.send(
            "PUT",
            f"/_matrix/client/v3/user/{bob.user_id}/account_data/m.ignored_user_list",
            json.dumps({"ignored_users": {carol.user_id: {}}}),
            headers={"Authorization": f"Bearer {bob.access_token}", "Content-Type": "application/json"},
        )
        check(ignored.status == 200, f"bob ignores carol: {await ignored.text()}")
        await bob.sync(timeout=0)
        await alice.sync(timeout=0)
        said = await carol.room_send(new_room, "m.room.message", {"msgtype": "m.text", "body": "carol whispers"})
        check(isinstance(said, RoomSendResponse), f"carol sends: {said}")
        await alice.room_send(new_room, "m.room.message", {"msgtype": "m.text", "body": "alice after carol"})
        seen = await texts_until(bob, new_room, "alice after carol")
        check("alice after carol" in seen, f"bob still hears alice: {seen}")
        check("carol whispers" not in seen, f"bob does not hear ignored carol: {seen}")
        seen = await texts_until(alice, new_room, "alice after carol")
        check("carol whispers" in seen, f"alice, who ignores nobody, hears carol: {seen}")
        print("ALL CHECKS PASSED", flush=True)
    finally:
        await alice.close()
        await bob.close()
        await carol.close()


asyncio.run(main())
