"""matrix-nio sets an HTTP pusher and a push rule of its own on Hearth; a mention of its user, and
a message its rule matches, are then notified (the test's push gateway checks what arrives).

Usage: push.py BASE_URL GATEWAY_URL. Prints `PUSHED <event id> <pushkey>` for each event the
gateway must receive, and "ALL CHECKS PASSED" when every check held.
"""

import asyncio
import json
import secrets
import sys

from nio import (
    AsyncClient,
    JoinResponse,
    PushNotify,
    PushRuleKind,
    PushRulesEvent,
    PushSetTweak,
    RoomCreateResponse,
    RoomSendResponse,
    SetPushRuleResponse,
    SyncResponse,
)

from harness import check, registered_client

BASE = sys.argv[1]
GATEWAY = sys.argv[2]
PASSWORD = "nio-password-" + secrets.token_hex(4)
PUSHKEY = "nio-pushkey-" + secrets.token_hex(4)


async def new_user(name: str) -> AsyncClient:
    return await registered_client(BASE, name, PASSWORD)


async def call(client: AsyncClient, method: str, path: str, body=None) -> tuple[int, dict]:
    """A request nio has no method for, through nio's own session."""
    headers = {"Authorization": f"Bearer {client.access_token}", "Content-Type": "application/json"}
    data = json.dumps(body) if body is not None else None
    response = await client.send(method, path, data, headers)
    return response.status, await response.json()


async def wait_notified(client: AsyncClient, event_id: str) -> dict:
    """Polls /notifications until the event is listed (the server evaluates beside the send)."""
    for _ in range(200):
        status, listed = await call(client, "GET", "/_matrix/client/v3/notifications")
        if status != 200:
            check(False, f"/notifications answers: {listed}")
        for notification in listed.get("notifications", []):
            if notification["event"]["event_id"] == event_id:
                return notification
        await asyncio.sleep(0.1)
    check(False, f"{event_id} was notified")
    return {}


async def main() -> None:
    suffix = secrets.token_hex(3)
    alice = await new_user(f"pushalice{suffix}")
    bob = await new_user(f"pushbob{suffix}")
    try:
        # nio reads the server's default push rules from account data.
        first = await alice.sync(timeout=0)
        check(isinstance(first, SyncResponse), "alice's first sync")
        rules = [e for e in first.account_data_events if isinstance(e, PushRulesEvent)]
        check(len(rules) == 1 and len(rules[0].global_rules.override) > 0, "nio parses the default push rules")

        pusher = {
            "kind": "http",
            "app_id": "org.example.nio",
            "pushkey": PUSHKEY,
            "app_display_name": "nio test",
            "device_display_name": "nio device",
            "lang": "en",
            "data": {"url": GATEWAY},
        }
        status, answer = await call(alice, "POST", "/_matrix/client/v3/pushers/set", pusher)
        check(status == 200, f"alice sets an HTTP pusher: {answer}")
        status, listed = await call(alice, "GET", "/_matrix/client/v3/pushers")
        check(
            status == 200 and [p["pushkey"] for p in listed["pushers"]] == [PUSHKEY],
            f"the pusher is listed: {listed}",
        )

        rule = await alice.set_pushrule(
            "global",
            PushRuleKind.content,
            "teapot",
            actions=[PushNotify(), PushSetTweak("highlight", True)],
            pattern="teapot",
        )
        check(isinstance(rule, SetPushRuleResponse), f"alice adds a content rule with nio: {rule}")

        created = await bob.room_create(name="Push room", invite=[alice.user_id])
        check(isinstance(created, RoomCreateResponse), f"bob creates a room: {created}")
        room_id = created.room_id
        joined = await alice.join(room_id)
        check(isinstance(joined, JoinResponse), f"alice joins: {joined}")

        mention = await bob.room_send(
            room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": "alice, look", "m.mentions": {"user_ids": [alice.user_id]}},
        )
        check(isinstance(mention, RoomSendResponse), f"bob mentions alice: {mention}")
        matched = await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "the teapot is hot"})
        check(isinstance(matched, RoomSendResponse), f"bob says the word: {matched}")

        for event_id, what in [(mention.event_id, "the mention"), (matched.event_id, "the rule's match")]:
            notification = await wait_notified(alice, event_id)
            highlight = any(
                isinstance(a, dict) and a.get("set_tweak") == "highlight" and a.get("value", True)
                for a in notification["actions"]
            )
            check(highlight, f"{what} highlights: {notification['actions']}")
            print(f"PUSHED {event_id} {PUSHKEY}", flush=True)
        print("ALL CHECKS PASSED", flush=True)
    finally:
        await alice.close()
        await bob.close()


asyncio.run(main())
