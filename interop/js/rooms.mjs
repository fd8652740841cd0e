// matrix-js-sdk drives Hearth's rooms: register, sync, create, invite, join, chat both ways,
// paginate back, typing, receipts, presence, display names, redaction, upgrade, and ignoring a
// user (whose messages then stay out of the ignorer's /sync).
//
// Usage: node rooms.mjs BASE_URL. Prints "ALL CHECKS PASSED" when every check held.

import * as sdk from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";

import { check, registeredClient, waitFor } from "./harness.mjs";

logger.disableAll();
const base = process.argv[2];
const password = "js-password-" + Math.random().toString(36).slice(2);

function user(name) {
  return registeredClient(base, name, password);
}

const suffix = Math.random().toString(36).slice(2, 8);
const alice = await user(`jsalice${suffix}`);
const bob = await user(`jsbob${suffix}`);
const carol = await user(`jscarol${suffix}`);

const bobInvited = waitFor(
  bob,
  sdk.RoomMemberEvent.Membership,
  (_event, member) => member.userId === bob.getUserId() && member.membership === "invite",
  "bob sees the invite",
);
const { room_id: roomId } = await alice.createRoom({ name: "JS room", invite: [bob.getUserId()] });
check(roomId.startsWith("!"), "alice creates a room");
await bobInvited;
await bob.joinRoom(roomId);
check(true, "bob joins");

const bobHears = waitFor(
  bob,
  sdk.RoomEvent.Timeline,
  (event, room) => room?.roomId === roomId && event.getContent().body === "hello from js",
  "bob receives alice's message",
);
await alice.sendTextMessage(roomId, "hello from js");
await bobHears;
check(true, "bob receives alice's message");

const aliceHears = waitFor(
  alice,
  sdk.RoomEvent.Timeline,
  (event, room) => room?.roomId === roomId && event.getContent().body === "hi from bob",
  "alice receives bob's reply",
);
const reply = await bob.sendTextMessage(roomId, "hi from bob");
await aliceHears;
check(true, "alice receives bob's reply");

// Typing, receipts, presence, names.
const typing = waitFor(
  bob,
  sdk.RoomMemberEvent.Typing,
  (_event, member) => member.userId === alice.getUserId() && member.typing,
  "bob sees alice typing",
);
await alice.sendTyping(roomId, true, 10000);
await typing;
check(true, "bob sees alice typing");

const receipt = waitFor(
  bob,
  sdk.RoomEvent.Receipt,
  (event) => JSON.stringify(event.getContent()).includes(alice.getUserId()),
  "bob sees alice's read receipt",
);
const aliceRoom = alice.getRoom(roomId);
const replyEvent = aliceRoom.findEventById(reply.event_id);
await alice.sendReadReceipt(replyEvent);
await receipt;
check(true, "bob sees alice's read receipt");

await alice.setPresence({ presence: "online", status_msg: "scripting" });
const presence = await bob.getPresence(alice.getUserId());
check(presence.presence === "online" && presence.status_msg === "scripting", "bob reads alice's presence");

const renamed = waitFor(
  bob,
  sdk.RoomMemberEvent.Name,
  (_event, member) => member.userId === alice.getUserId() && member.name === "Alice in JS",
  "bob sees alice's new name",
);
await alice.setDisplayName("Alice in JS");
await renamed;
check(true, "bob sees alice's new name");

// History: a fresh client of bob's pages back through the room.
const messages = await bob.createMessagesRequest(roomId, null, 50, sdk.Direction.Backward);
const bodies = messages.chunk.filter((e) => e.type === "m.room.message").map((e) => e.content.body);
check(bodies[0] === "hi from bob" && bodies.includes("hello from js"), `bob pages back: ${bodies}`);
check(messages.chunk.some((e) => e.type === "m.room.create"), "back to the room's creation");

const redacted = waitFor(
  bob,
  sdk.RoomEvent.Redaction,
  (event) => event.getAssociatedId?.() === reply.event_id || event.event?.redacts === reply.event_id,
  "alice sees bob's redaction",
);
await bob.redactEvent(roomId, reply.event_id);
await redacted;
check(true, "bob redacts his reply");

let denied = null;
try {
  await bob.setRoomName(roomId, "Bob's room");
} catch (error) {
  denied = error.errcode;
}
check(denied === "M_FORBIDDEN", `bob may not rename the room: ${denied}`);

// Alice upgrades the room to version 12; bob's client sees the tombstone and follows.
const tombstoned = waitFor(
  bob,
  sdk.RoomStateEvent.Events,
  (event) => event.getType() === "m.room.tombstone" && event.getRoomId() === roomId,
  "bob sees the tombstone",
);
const { replacement_room: newRoomId } = await alice.upgradeRoom(roomId, "12");
const [tombstone] = await tombstoned;
check(tombstone.getContent().replacement_room === newRoomId, `the tombstone names the new room ${newRoomId}`);
// The room is invite-only: alice invites its members, as Element offers when upgrading.
await alice.invite(newRoomId, bob.getUserId());
await bob.joinRoom(tombstone.getContent().replacement_room);
const hearsInNewRoom = waitFor(
  bob,
  sdk.RoomEvent.Timeline,
  (event, room) => room?.roomId === newRoomId && event.getContent().body === "in the new room",
  "bob hears alice in the new room",
);
await alice.sendTextMessage(newRoomId, "in the new room");
await hearsInNewRoom;
// The client stores the room once it has processed the whole sync response that brought it.
let newRoom = bob.getRoom(newRoomId);
for (let tries = 0; !newRoom && tries < 100; tries++) {
  await new Promise((resolve) => setTimeout(resolve, 100));
  newRoom = bob.getRoom(newRoomId);
}
check(newRoom?.getVersion() === "12", `a version 12 room: ${newRoom?.getVersion()}`);
check(newRoom.findPredecessor()?.roomId === roomId, "bob's client links the new room to the old one");

// Carol joins; bob ignores her: her next message never reaches bob's /sync while alice's, sent
// after it, does (alice, who ignores nobody, hears both).
const carolInvited = waitFor(
  carol,
  sdk.RoomMemberEvent.Membership,
  (_event, member) => member.userId === carol.getUserId() && member.membership === "invite",
  "carol sees the invite",
);
await alice.invite(newRoomId, carol.getUserId());
await carolInvited;
await carol.joinRoom(newRoomId);
check(true, "carol joins the new room");
const ignoreListSynced = waitFor(
  bob,
  sdk.ClientEvent.AccountData,
  (event) => event.getType() === "m.ignored_user_list",
  "bob's ignore list comes back through /sync",
);
await bob.setIgnoredUsers([carol.getUserId()]);
await ignoreListSynced;
check(bob.isUserIgnored(carol.getUserId()), "bob ignores carol");
const bobHeard = [];
bob.on(sdk.RoomEvent.Timeline, (event, room) => {
  if (room?.roomId === newRoomId && event.getType() === "m.room.message") bobHeard.push(event.getContent().body);
});
const bobHearsAlice = waitFor(
  bob,
  sdk.RoomEvent.Timeline,
  (event, room) => room?.roomId === newRoomId && event.getContent().body === "alice after carol",
  "bob still hears alice",
);
const aliceHearsCarol = waitFor(
  alice,
  sdk.RoomEvent.Timeline,
  (event, room) => room?.roomId === newRoomId && event.getContent().body === "carol whispers",
  "alice hears carol",
);
await carol.sendTextMessage(newRoomId, "carol whispers");
await aliceHearsCarol;
await alice.sendTextMessage(newRoomId, "alice after carol");
await bobHearsAlice;
check(bobHeard.includes("alice after carol"), `bob still hears alice: ${bobHeard}`);
check(!bobHeard.includes("carol whispers"), `bob does not hear ignored carol: ${bobHeard}`);

alice.stopClient();
bob.stopClient();
carol.stopClient();
console.log("ALL CHECKS PASSED");
process.exit(0);
