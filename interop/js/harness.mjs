// What every js-sdk harness shares: checks that print as they pass, and waiting for events.

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
