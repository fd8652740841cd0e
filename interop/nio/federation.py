"""matrix-nio drives a room shared by two federating servers: a user of the first creates a
public room with an alias, a user of the second joins it by the alias, messages both ways arrive
in the order sent through /sync, the name, power levels and topic set on either side hold on both,
a second user of the second server is invited, joins late and pages back through the history from
before the join, then is kicked and banned, which both servers enforce.

Usage: federation.py BASE_URL_OF_THE_HOST BASE_URL_OF_THE_OTHER. HARNESS_CA_FILE, if set, is the
CA the servers' certificates are checked against. Prints "ALL CHECKS PASSED" when every check held.
"""

import asyncio
import secrets
import sys

from nio import (
    AsyncClient,
    JoinResponse,
    RoomCreateResponse,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPreset,
    RoomSendResponse,
    SyncResponse,
)

from harness import check, registered_client

HOST, OTHER = sys.argv[1], sys.argv[2]
PASSWORD = "nio-password-" + secrets.token_hex(4)
ROUNDS = 15  # syncs of up to 2 s each before something is taken as not arriving


def server_of(client: AsyncClient) -> str:
    return client.user_id.split(":", 1)[1]


async def texts(client: AsyncClient, room_id: str, wanted: list) -> list:
    """Syncs until every body of `wanted` arrived in the room; the bodies of `wanted` seen, in the
    order they arrived."""
    seen = []
    for _ in range(ROUNDS):
        response = await client.sync(timeout=2000)
        check(isinstance(response, SyncResponse), f"{client.user_id} syncs: {type(response).__name__}")
        room = response.rooms.join.get(room_id)
        if room:
            seen += [e.body for e in room.timeline.events if isinstance(e, RoomMessageText) and e.body in wanted]
        if set(wanted) <= set(seen):
            break
    return seen


async def until(client: AsyncClient, what, rounds: int = ROUNDS):
    """Syncs until `what(client)` gives something; that, or None."""
    for _ in range(rounds):
        await client.sync(timeout=2000)
        found = what(client)
        if found:
            return found
    return None


async def send(client: AsyncClient, room_id: str, body: str) -> None:
    sent = await client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
    check(isinstance(sent, RoomSendResponse), f"{client.user_id} sends {body!r}: {sent}")


def ok(response) -> bool:
    return not getattr(response, "status_code", None)


async def main() -> None:
    suffix = secrets.token_hex(3)
    alice = await registered_client(HOST, f"alice{suffix}", PASSWORD)
    bob = await registered_client(OTHER, f"bob{suffix}", PASSWORD)
    dave = await registered_client(OTHER, f"dave{suffix}", PASSWORD)
    try:
        for client in (alice, bob, dave):
            check(isinstance(await client.sync(timeout=0), SyncResponse), f"{client.user_id} syncs")

        created = await alice.room_create(alias=f"across{suffix}", name="Across", preset=RoomPreset.public_chat)
        check(isinstance(created, RoomCreateResponse), f"alice creates a room: {created}")
        room_id = created.room_id
        alias = f"#across{suffix}:{server_of(alice)}"
        joined = await bob.join(alias)
        check(isinstance(joined, JoinResponse) and joined.room_id == room_id, f"bob joins by {alias}: {joined}")

        said = [f"from alice {n}" for n in range(3)]
        for body in said:
            await send(alice, room_id, body)
        check(await texts(bob, room_id, said) == said, "bob receives alice's messages in order")
        said = [f"from bob {n}" for n in range(3)]
        for body in said:
            await send(bob, room_id, body)
        check(await texts(alice, room_id, said) == said, "alice receives bob's messages in order")

        renamed = await alice.room_put_state(room_id, "m.room.name", {"name": "Across the sea"})
        check(ok(renamed), f"alice renames the room: {renamed}")
        name = await until(bob, lambda c: c.rooms[room_id].name == "Across the sea")
        check(name is not None, f"bob sees the new name: {bob.rooms[room_id].name}")

        # Bob may not set the topic until alice raises his power level; then he may, on his own server.
        denied = await bob.room_put_state(room_id, "m.room.topic", {"topic": "bob's"})
        check(getattr(denied, "status_code", None) == "M_FORBIDDEN", f"bob may not set the topic yet: {denied}")
        power = await alice.room_get_state_event(room_id, "m.room.power_levels")
        content = dict(power.content)
        content["users"] = {**content.get("users", {}), bob.user_id: 50}
        raised = await alice.room_put_state(room_id, "m.room.power_levels", content)
        check(ok(raised), f"alice gives bob power level 50: {raised}")
        level = await until(bob, lambda c: c.rooms[room_id].power_levels.get_user_level(bob.user_id) == 50)
        check(level is not None, "bob's server has his new power level")
        topic = await bob.room_put_state(room_id, "m.room.topic", {"topic": "bob's"})
        check(ok(topic), f"bob sets the topic: {topic}")
        shown = await until(alice, lambda c: c.rooms[room_id].topic == "bob's")
        check(shown is not None, f"alice sees bob's topic: {alice.rooms[room_id].topic}")

        # Dave, of bob's server, is invited late and reads what was said before he joined.
        invited = await alice.room_invite(room_id, dave.user_id)
        check(ok(invited), f"alice invites dave: {invited}")
        invite = await until(dave, lambda c: room_id in c.invited_rooms)
        check(invite is not None, "dave sees the invite in /sync")
        joined = await dave.join(room_id)
        check(isinstance(joined, JoinResponse), f"dave joins: {joined}")
        await dave.sync(timeout=0)
        history = []
        token = dave.next_batch
        for _ in range(10):
            page = await dave.room_messages(room_id, token, limit=5)
            check(isinstance(page, RoomMessagesResponse), f"dave pages back: {page}")
            history += [e.body for e in page.chunk if isinstance(e, RoomMessageText)]
            if not page.end or not page.chunk:
                break
            token = page.end
        before = [f"from alice {n}" for n in range(3)] + [f"from bob {n}" for n in range(3)]
        check(list(reversed(history)) == before, f"dave reads the history from before he joined: {history}")

        # Kicked, then banned: dave's server learns both, and dave may not come back.
        kicked = await alice.room_kick(room_id, dave.user_id, reason="out")
        check(ok(kicked), f"alice kicks dave: {kicked}")
        left = False
        for _ in range(ROUNDS):
            response = await dave.sync(timeout=2000)
            left = room_id in response.rooms.leave
            if left:
                break
        check(left, "dave's /sync has the room among those he left")
        gone = await until(bob, lambda c: dave.user_id not in c.rooms[room_id].users)
        check(gone is not None, "bob sees dave gone")
        banned = await alice.room_ban(room_id, dave.user_id, reason="for good")
        check(ok(banned), f"alice bans dave: {banned}")
        membership = None
        for _ in range(ROUNDS):
            member = await bob.room_get_state_event(room_id, "m.room.member", dave.user_id)
            membership = getattr(member, "content", {}).get("membership")
            if membership == "ban":
                break
            await asyncio.sleep(0.5)
        check(membership == "ban", f"bob's server has dave banned: {membership}")
        again = await dave.join(room_id)
        # The error code differs between servers (Synapse answers M_BAD_STATE); refused it must be.
        check(not isinstance(again, JoinResponse) and again.status_code, f"banned dave may not join again: {again}")
        member = await alice.room_get_state_event(room_id, "m.room.member", dave.user_id)
        check(getattr(member, "content", {}).get("membership") == "ban", f"dave is still banned: {member}")
        print("ALL CHECKS PASSED", flush=True)
    finally:
        for client in (alice, bob, dave):
            await client.close()


asyncio.run(main())
