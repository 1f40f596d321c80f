#!/usr/bin/env python3
"""Publishes one JSON GenerateRequest to torchwire's JetStream work queue with
nats-py (a third-party NATS client: no torchwire code) and prints the responses.

Subscribes to the reply subject first, then publishes the request with the
headers a torchwire server reads (Torchwire-Reply-To, Content-Type:
application/json, and Torchwire-Request-Id when the request has a
requestId). Each response is printed as one JSON line:

    {"seq": 0, "delivery": 1, "final": false, "requestId": "...",
     "contentType": "application/json", "response": {...GenerateResponse...}}

Exit status: 0 after the final response, 1 when the final response carries
an error, 2 on timeout, 3 on a response that is not JSON.

    python publish_json.py --url nats://127.0.0.1:4222 \
        --request '{"prompt": "Hello", "maxNewTokens": 16}'
"""

import argparse
import asyncio
import json
import sys
import uuid

import nats

REPLY_TO = "Torchwire-Reply-To"
SEQUENCE = "Torchwire-Seq"
REQUEST_ID = "Torchwire-Request-Id"
DELIVERY = "Torchwire-Delivery"
FINAL = "Torchwire-Final"
JSON = "application/json"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument("--subject", default="torchwire.generate", help="work-queue subject")
    p.add_argument("--reply", help="reply subject (default: a fresh inbox)")
    p.add_argument(
        "--request",
        default="-",
        help="GenerateRequest as proto3 JSON, or - to read it from stdin",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the final response"
    )
    return p.parse_args()


async def run(args):
    body = sys.stdin.read() if args.request == "-" else args.request
    request = json.loads(body)  # fail early, here, on a typo in the request itself
    reply = args.reply or f"_INBOX.{uuid.uuid4().hex}"
    headers = {REPLY_TO: reply, "Content-Type": JSON}
    if isinstance(request, dict) and request.get("requestId"):
        # Also as a header, so that even a response to a request the server
        # cannot decode or accept names it.
        headers[REQUEST_ID] = request["requestId"]

    nc = await nats.connect(args.url, connect_timeout=10, max_reconnect_attempts=3)
    done = asyncio.get_running_loop().create_future()

    async def on_response(msg):
        if done.done():
            return
        h = msg.headers or {}
        content_type = h.get("Content-Type", "")
        try:
            response = json.loads(msg.data)
        except ValueError as e:
            print(f"response is not JSON ({content_type}): {e}", file=sys.stderr)
            done.set_result(3)
            return
        final = h.get(FINAL) == "true"
        line = {
            "seq": int(h.get(SEQUENCE, "-1")),
            "delivery": int(h.get(DELIVERY, "1")),
            "final": final,
            "requestId": h.get(REQUEST_ID, ""),
            "contentType": content_type,
            "response": response,
        }
        print(json.dumps(line), flush=True)
        if final:
            error = response.get("error")
            if error:
                print(f"error {error.get('code')}: {error.get('message')}", file=sys.stderr)
            done.set_result(1 if error else 0)

    try:
        await nc.subscribe(reply, cb=on_response)
        await nc.flush()  # the subscription is in place before any response can arrive
        js = nc.jetstream()
        ack = await js.publish(
            args.subject,
            body.encode(),
            headers=headers,
        )
        print(f"published to stream {ack.stream} as message {ack.seq}", file=sys.stderr)
        try:
            return await asyncio.wait_for(done, args.timeout)
        except asyncio.TimeoutError:
            print(f"no final response on {reply} within {args.timeout} s", file=sys.stderr)
            return 2
    finally:
        await nc.drain()


def main():
    sys.exit(asyncio.run(run(parse_args())))


if __name__ == "__main__":
    main()
