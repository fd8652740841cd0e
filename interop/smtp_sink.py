"""A real SMTP server (aiosmtpd) that stores each message it receives as JSON.

Usage: smtp_sink.py DIR. Prints the port it listens on (127.0.0.1), then serves until killed.
Each message becomes DIR/<n>.json with envelope sender and recipients, the headers the tests
check, and the text and HTML parts, decoded.
"""

import asyncio
import email
import email.policy
import json
import os
import socket
import sys

from aiosmtpd.controller import Controller

OUT = sys.argv[1]


class Store:
    def __init__(self):
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        parts = {}
        for part in message.walk():
            if part.get_content_type() in ("text/plain", "text/html") and not part.is_multipart():
                parts[part.get_content_type()] = part.get_content()
        self.count += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "from": str(message["From"]),
            "to": str(message["To"]),
            "subject": str(message["Subject"]),
            "text": parts.get("text/plain", ""),
            "html": parts.get("text/html", ""),
        }
        path = os.path.join(OUT, f"{self.count:04d}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main():
    port = free_port()
    controller = Controller(Store(), hostname="127.0.0.1", port=port)
    controller.start()
    print(port, flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
