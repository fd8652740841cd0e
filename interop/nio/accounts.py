"""matrix-nio drives Hearth's account and device API.

Usage: accounts.py BASE_URL. Exits non-zero on the first failed check and prints
"ALL CHECKS PASSED" when every check held.
"""

import asyncio
import secrets
import sys

from nio import (
    AsyncClient,
    AsyncClientConfig,
    DeleteDevicesAuthResponse,
    DeleteDevicesResponse,
    DevicesResponse,
    LoginError,
    LoginResponse,
    LogoutResponse,
    RegisterResponse,
    UpdateDeviceResponse,
    WhoamiError,
    WhoamiResponse,
)

BASE = sys.argv[1]
PASSWORD = "nio-password-" + secrets.token_hex(4)


def client(user: str) -> AsyncClient:
    # nio retries 429s and timeouts forever by default: a broken server must fail, not hang.
    config = AsyncClientConfig(max_limit_exceeded=0, max_timeouts=2, request_timeout=20)
    return AsyncClient(BASE, user, config=config)


def check(condition: bool, what: str) -> None:
    if not condition:
        print(f"FAILED: {what}", flush=True)
        raise SystemExit(1)
    print(f"ok: {what}", flush=True)


async def main() -> None:
    user = "nio" + secrets.token_hex(4)
    first = client(user)
    second = client(user)
    stale = client(user)
    try:
        registered = await first.register(user, PASSWORD, device_name="nio first")
        check(isinstance(registered, RegisterResponse), f"register: {registered}")
        check(registered.user_id == f"@{user}:localhost", f"user id {registered.user_id}")
        first.access_token, first.user_id, first.device_id = (
            registered.access_token,
            registered.user_id,
            registered.device_id,
        )
        me = await first.whoami()
        check(isinstance(me, WhoamiResponse) and me.user_id == registered.user_id, f"whoami: {me}")

        wrong = await second.login("not the password", device_name="nio second")
        check(isinstance(wrong, LoginError), f"wrong password refused: {wrong}")
        logged_in = await second.login(PASSWORD, device_name="nio second")
        check(isinstance(logged_in, LoginResponse), f"login: {logged_in}")
        check(logged_in.device_id != registered.device_id, "login makes a new device")

        devices = await second.devices()
        check(isinstance(devices, DevicesResponse), f"devices: {devices}")
        by_id = {d.id: d for d in devices.devices}
        check(set(by_id) == {registered.device_id, logged_in.device_id}, f"both devices listed: {list(by_id)}")
        check(by_id[logged_in.device_id].display_name == "nio second", "display name from login")

        renamed = await second.update_device(registered.device_id, {"display_name": "renamed by nio"})
        check(isinstance(renamed, UpdateDeviceResponse), f"rename: {renamed}")
        devices = await second.devices()
        names = {d.id: d.display_name for d in devices.devices}
        check(names.get(registered.device_id) == "renamed by nio", f"rename visible: {names}")

        challenge = await second.delete_devices([registered.device_id])
        check(isinstance(challenge, DeleteDevicesAuthResponse), f"delete asks for auth: {challenge}")
        stages = [stage for flow in challenge.flows for stage in flow["stages"]]
        check("m.login.password" in stages, f"password stage offered: {challenge.flows}")
        auth = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": PASSWORD,
            "session": challenge.session,
        }
        deleted = await second.delete_devices([registered.device_id], auth)
        check(isinstance(deleted, DeleteDevicesResponse), f"delete with auth: {deleted}")

        gone = await first.whoami()
        check(
            isinstance(gone, WhoamiError) and gone.status_code == "M_UNKNOWN_TOKEN",
            f"deleted device's token refused: {gone}",
        )
        devices = await second.devices()
        check([d.id for d in devices.devices] == [logged_in.device_id], "one device left")

        stale.access_token, stale.user_id, stale.device_id = (
            second.access_token,
            second.user_id,
            second.device_id,
        )
        logged_out = await second.logout()
        check(isinstance(logged_out, LogoutResponse), f"logout: {logged_out}")
        after = await stale.whoami()
        check(
            isinstance(after, WhoamiError) and after.status_code == "M_UNKNOWN_TOKEN",
            f"old token refused after logout: {after}",
        )
        print("ALL CHECKS PASSED", flush=True)
    finally:
        for c in (first, second, stale):
            await c.close()


asyncio.run(main())
