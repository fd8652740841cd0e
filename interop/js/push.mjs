// matrix-js-sdk sets an HTTP pusher and a push rule of its own on Hearth; a mention of its user,
// and a message its rule matches, are then notified (the test's push gateway checks what
// arrives). js-sdk's own evaluation of the rules Hearth serves agrees that they highlight.
//
// Usage: node push.mjs BASE_URL GATEWAY_URL. Prints `PUSHED <event id> <pushkey>` for each event
// the gateway must receive, and "ALL CHECKS PASSED" when every check held.

import * as sdk from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";

import { check, registeredClient, waitFor } from "./harness.mjs";

logger.disableAll();
const base = process.argv[2];
const gateway = process.argv[3];
const password = "js-password-" + Math.random().toString(36).slice(2);
const pushkey = "js-pushkey-" + Math.random().toString(36).slice(2, 10);

function user(name) {
  return registeredClient(base, name, password);
}

/** Polls /notifications until the event is listed (the server evaluates beside the send). */
async function notified(client, eventId) {
  for (let i = 0; i < 200; i++) {
    const listed = await client.http.authedRequest(sdk.Method.Get, "/notifications");
    const found = listed.notifications.find((n) => n.event.event_id === eventId);
    if (found) return found;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  check(false, `${eventId} was notified`);
}

const suffix = Math.random().toString(36).slice(2, 8);
const alice = await user(`jspushalice${suffix}`);
const bob = await user(`jspushbob${suffix}`);

check(alice.pushRules?.global?.override?.length > 0, "js-sdk has the server's push rules");
await alice.setPusher({
  kind: "http",
  app_id: "org.example.js",
  pushkey,
  app_display_name: "js-sdk test",
  device_display_name: "js-sdk device",
  lang: "en",
  append: false,
  data: { url: gateway },
});
const { pushers } = await alice.getPushers();
check(pushers.length === 1 && pushers[0].pushkey === pushkey, "alice's pusher is listed");
await alice.addPushRule("global", "content", "kettle", {
  actions: ["notify", { set_tweak: "highlight", value: true }],
  pattern: "kettle",
});
check(true, "alice adds a content rule with js-sdk");

const aliceInvited = waitFor(
  alice,
  sdk.RoomMemberEvent.Membership,
  (_event, member) => member.userId === alice.getUserId() && member.membership === "invite",
  "alice sees the invite",
);
const { room_id: roomId } = await bob.createRoom({ name: "JS push room", invite: [alice.getUserId()] });
await aliceInvited;
await alice.joinRoom(roomId);
check(true, "alice joins");

const aliceHears = waitFor(
  alice,
  sdk.RoomEvent.Timeline,
  (event, room) => room?.roomId === roomId && event.getContent().body === "the kettle boils",
  "alice receives the second message",
);
const mention = await bob.sendMessage(roomId, {
  msgtype: "m.text",
  body: "alice, look",
  "m.mentions": { user_ids: [alice.getUserId()] },
});
const matched = await bob.sendTextMessage(roomId, "the kettle boils");
const [heard] = await aliceHears;
const clientSide = alice.getPushActionsForEvent(heard, true);
check(clientSide?.notify && clientSide.tweaks?.highlight === true, "js-sdk's own evaluation highlights the rule's match");

for (const [eventId, what] of [
  [mention.event_id, "the mention"],
  [matched.event_id, "the rule's match"],
]) {
  const notification = await notified(alice, eventId);
  const highlight = notification.actions.some((a) => a?.set_tweak === "highlight" && a.value !== false);
  check(highlight, `${what} highlights on the server`);
  console.log(`PUSHED ${eventId} ${pushkey}`);
}
alice.stopClient();
bob.stopClient();
console.log("ALL CHECKS PASSED");
process.exit(0);
