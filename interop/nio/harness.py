"""What the matrix-nio harnesses share: checks that print as they pass, and registered users."""

import os
import ssl

from nio import AsyncClient, AsyncClientConfig, RegisterResponse


def check(condition: bool, what: str) -> None:
    if not condition:
        print(f"FAILED: {what}", flush=True)
        raise SystemExit(1)
    print(f"ok: {what}", flush=True)


async def registered_client(base: str, name: str, password: str) -> AsyncClient:
    """Registers `name` at `base` and returns its client, logged in. Retries are capped so that a
    broken server fails the harness instead of hanging it."""
    config = AsyncClientConfig(max_limit_exceeded=0, max_timeouts=2, request_timeout=30)
    # HARNESS_CA_FILE: the CA of a server whose certificate is not from the system's roots.
    ca_file = os.environ.get("HARNESS_CA_FILE")
    client = AsyncClient(base, name, config=config, ssl=ssl.create_default_context(cafile=ca_file) if ca_file else None)
    registered = await client.register(name, password, device_name=f"{name}'s nio")
    check(isinstance(registered, RegisterResponse), f"register {name}: {registered}")
    client.access_token, client.user_id, client.device_id = (
        registered.access_token,
        registered.user_id,
        registered.device_id,
    )
    return client
