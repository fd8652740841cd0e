// What every js-sdk harness shares: checks that print as they pass, waiting for events, and
// users registered with a started client.

import * as sdk from "matrix-js-sdk";

/** Prints `ok: what`, or `FAILED: what` and exits when `condition` does not hold. */
export function check(condition, what) {
  if (!condition) {
    console.log(`FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

/** Resolves when `predicate` holds for an event `name` of `emitter`, or fails after `ms`. */
export function waitFor(emitter, name, predicate, what, ms = 30000) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => check(false, `${what} (timed out)`), ms);
    const listener = (...args) => {
      if (predicate(...args)) {
        clearTimeout(timer);
        emitter.removeListener(name, listener);
        resolve(args);
      }
    };
    emitter.on(name, listener);
  });
}

/** Registers `name` with `password` at `base` and returns its client, started and synced. */
export async function registeredClient(base, name, password) {
  const anonymous = sdk.createClient({ baseUrl: base });
  const registered = await anonymous.registerRequest({
    username: name,
    password,
    auth: { type: "m.login.dummy" },
    initial_device_display_name: `${name}'s js-sdk`,
  });
  check(registered.user_id === `@${name}:localhost`, `register ${name}`);
  const client = sdk.createClient({
    baseUrl: base,
    accessToken: registered.access_token,
    userId: registered.user_id,
    deviceId: registered.device_id,
  });
  const prepared = waitFor(client, sdk.ClientEvent.Sync, (state) => state === "PREPARED", `${name} syncs`);
  await client.startClient({ initialSyncLimit: 20 });
  await prepared;
  check(true, `${name}'s client is prepared`);
  return client;
}
