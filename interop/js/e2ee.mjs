// matrix-js-sdk with its Rust crypto (WebAssembly) talks end-to-end encrypted with a matrix-nio
// user through Hearth, then backs its room keys up to Hearth and restores them on a new device,
// which decrypts the conversation from history.
//
// Usage: node e2ee.mjs BASE_URL PYTHON NIO_PEER_SCRIPT. Prints "ALL CHECKS PASSED" when every
// check held.

import { spawn } from "node:child_process";
import { createInterface } from "node:readline";

import * as sdk from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";

import { check, waitFor } from "./harness.mjs";

logger.disableAll();
const [base, python, peerScript] = process.argv.slice(2);
const password = "js-password-" + Math.random().toString(36).slice(2);

/** A started client with Rust crypto for a session (`registerRequest` or `loginRequest` answer). */
async function start(session) {
  const client = sdk.createClient({
    baseUrl: base,
    accessToken: session.access_token,
    userId: session.user_id,
    deviceId: session.device_id,
  });
  await client.initRustCrypto({ useIndexedDB: false });
  const prepared = waitFor(client, sdk.ClientEvent.Sync, (state) => state === "PREPARED", "the client syncs");
  await client.startClient({ initialSyncLimit: 20 });
  await prepared;
  return client;
}

// The nio side, line by line over its stdin and stdout.
const peer = spawn(python, [peerScript, base], { stdio: ["pipe", "pipe", "inherit"] });
const peerLines = createInterface({ input: peer.stdout });
const waiting = [];
const said = [];
peerLines.on("line", (line) => {
  console.log(`nio: ${line}`);
  if (line.startsWith("FAILED")) check(false, `the nio peer: ${line}`);
  const next = waiting.shift();
  if (next) next(line);
  else said.push(line);
});
const peerSays = () =>
  said.length > 0 ? Promise.resolve(said.shift()) : new Promise((resolve) => waiting.push(resolve));

const name = "jscrypto" + Math.random().toString(36).slice(2, 8);
const session = await sdk.createClient({ baseUrl: base }).registerRequest({
  username: name,
  password,
  auth: { type: "m.login.dummy" },
  initial_device_display_name: "js-sdk laptop",
});
const alice = await start(session);
const crypto = alice.getCrypto();
check(crypto !== undefined, `js-sdk runs ${crypto.getVersion()}`);

const nioUser = (await peerSays()).replace(/^USER /, "");
check(nioUser.startsWith("@niopeer"), "the nio user is registered with its keys");

const { room_id: roomId } = await alice.createRoom({
  name: "across clients",
  invite: [nioUser],
  initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
});
check(roomId.startsWith("!"), "js-sdk creates an encrypted room and invites the nio user");
const fromNio = waitFor(
  alice,
  sdk.MatrixEventEvent.Decrypted,
  (event) => event.getSender() === nioUser && event.getContent().body === "hello from nio",
  "js-sdk decrypts the nio user's message",
);
peer.stdin.write(`ROOM ${roomId}\n`);
await fromNio;
check(true, "js-sdk decrypts the nio user's message");

// The nio user must have joined for js-sdk to share its session with them.
const room = alice.getRoom(roomId);
check(room.getMember(nioUser)?.membership === "join", "the nio user has joined");
await alice.sendTextMessage(roomId, "hello from js");
const got = await peerSays();
check(got === "GOT hello from js", "the nio user decrypts js-sdk's message");
check((await peerSays()) === "DONE", "the nio user is done");

// Key backup: a new backup version, the room keys uploaded to it.
await crypto.resetKeyBackup();
let version = null;
for (let i = 0; i < 100 && version === null; i++) {
  version = await crypto.getActiveSessionBackupVersion();
  if (version === null) await new Promise((r) => setTimeout(r, 100));
}
check(version !== null, `a backup version is active (${version})`);
let info;
for (let i = 0; i < 100; i++) {
  info = await alice.http.authedRequest(sdk.Method.Get, "/room_keys/version");
  if (info.count >= 2) break;
  await new Promise((r) => setTimeout(r, 200));
}
check(info.version === version && info.count >= 2, `both sessions are backed up (count ${info.count})`);
const backupKey = await crypto.getSessionBackupPrivateKey();
check(backupKey !== null, "js-sdk holds the backup's private key");

// A new device of the same user restores the backup and decrypts the history.
const login = await sdk.createClient({ baseUrl: base }).loginRequest({
  type: "m.login.password",
  identifier: { type: "m.id.user", user: name },
  password,
  initial_device_display_name: "js-sdk phone",
});
const phone = await start(login);
const phoneCrypto = phone.getCrypto();
await phoneCrypto.storeSessionBackupPrivateKey(backupKey, version);
const restored = await phoneCrypto.restoreKeyBackup();
check(restored.imported >= 2, `the new device restores the backup (${restored.imported} of ${restored.total} keys)`);
const page = await phone.createMessagesRequest(roomId, null, 50, sdk.Direction.Backward);
const bodies = [];
for (const raw of page.chunk.filter((e) => e.type === "m.room.encrypted")) {
  const event = new sdk.MatrixEvent(raw);
  await phone.decryptEventIfNeeded(event);
  bodies.push(event.getContent().body);
}
check(bodies.includes("hello from nio") && bodies.includes("hello from js"), `history decrypts on the new device: ${bodies}`);

alice.stopClient();
phone.stopClient();
peer.kill();
console.log("ALL CHECKS PASSED");
process.exit(0);
