#!/usr/bin/env python3
"""Measure message round trips through Agentry with an agent's own Redis credentials.

The agent sends each message to its outbox (XADD id, to, type, body); the controller's relay checks
the policy, stamps `from` and writes it to the receiver's inbox; the receiver reads it with
XREADGROUP (group `agent`) and acknowledges it (XACK). The time from the XADD to the XREADGROUP that
returns the message is one round trip; p50/p99 are printed next to the seed's 85-175 ms.

By default the agent sends to itself, so one process holds both ends with one set of credentials:

  python3 messaging.py --identity-dir ./identity --count 1000

An agent's credentials cannot read another agent's inbox, so a round trip to another agent needs
that agent's identity directory too (both agents must allow it: spec.messaging.allowTo/allowFrom):

  python3 messaging.py --identity-dir ./alice --to smoke/bob --reply-from ./bob

An identity directory holds redis.json ({urls, cluster, user, inbox, outbox, dead, spiffeId}) and
redis-password, from the Agent's identity Secret (with spec.messaging.enabled).
Exit codes: 0 measured; 1 bad arguments or local files; 2 a message was refused (the relay's
agentry.undeliverable notice is printed) or not received in time; 3 connection, login or
permission failure. Needs python3 and redis (redis-py) only.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

EXIT_USAGE, EXIT_REFUSED, EXIT_CONNECTION = 1, 2, 3
GROUP = "agent"
UNDELIVERABLE = "agentry.undeliverable"
SEED_MS = (85, 175)
SPIFFE = re.compile(r"spiffe://[^/]+/ns/([a-z0-9][a-z0-9.-]*)/agent/([a-z0-9][a-z0-9.-]*)")
TARGET = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


class Failure(Exception):
    """An expected failure: printed as one message, no traceback."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Endpoint:
    urls: list[str]
    cluster: bool
    user: str
    inbox: str
    outbox: str
    spiffe_id: str
    password: str

    @property
    def agent(self) -> str:
        """namespace/name, from the SPIFFE ID."""
        match = SPIFFE.fullmatch(self.spiffe_id)
        if not match:
            raise Failure(EXIT_USAGE, f"spiffeId {self.spiffe_id!r} is not spiffe://<trust domain>/ns/<ns>/agent/<name>")
        return f"{match.group(1)}/{match.group(2)}"


def load_endpoint(directory: str) -> Endpoint:
    base = Path(directory)
    hint = "(is spec.messaging.enabled on the Agent, and is this its identity directory?)"
    if not base.is_dir():
        raise Failure(EXIT_USAGE, f"{base}: no such directory")
    files = {name: base / name for name in ("redis.json", "redis-password")}
    for path in files.values():
        if not path.is_file():
            raise Failure(EXIT_USAGE, f"{path}: no such file {hint}")
    try:
        doc = json.loads(files["redis.json"].read_text())
    except (OSError, ValueError) as e:
        raise Failure(EXIT_USAGE, f"{files['redis.json']}: not readable JSON: {e}")
    missing = [k for k in ("urls", "user", "inbox", "outbox", "spiffeId") if not doc.get(k)] if isinstance(doc, dict) else ["all"]
    if missing:
        raise Failure(EXIT_USAGE, f"{files['redis.json']}: missing {', '.join(missing)} {hint}")
    password = files["redis-password"].read_text().strip()
    if not password:
        raise Failure(EXIT_USAGE, f"{files['redis-password']} is empty")
    urls = doc["urls"] if isinstance(doc["urls"], list) else [doc["urls"]]
    return Endpoint(urls, bool(doc.get("cluster")), doc["user"], doc["inbox"], doc["outbox"], doc["spiffeId"], password)


def login_failure(endpoint: Endpoint, e: Exception) -> Failure:
    where = " ".join(endpoint.urls)
    if isinstance(e, redis.AuthenticationError):
        return Failure(EXIT_CONNECTION, f"{where}: login as {endpoint.user} refused ({e}); the password may have been rotated: read redis-password again")
    if isinstance(e, redis.exceptions.NoPermissionError):
        return Failure(EXIT_CONNECTION, f"{where}: {endpoint.user} may not do that ({e})")
    return Failure(EXIT_CONNECTION, f"{where}: {type(e).__name__}: {e}")


class Nodes:
    """A cluster without redis-py's RedisCluster: a plain connection to the node that owns each key.

    RedisCluster asks the server for COMMAND when it starts, which an agent's ACL user may not run;
    an agent touches only its own few keys, so routing them by slot (CLUSTER SLOTS) is enough.
    """

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.by_addr: dict[tuple[str, int], redis.Redis] = {}
        self.slots: list[tuple[int, int, tuple[str, int]]] = []
        self.refresh()

    def _connect(self, host: str, port: int) -> redis.Redis:
        if (host, port) not in self.by_addr:
            tls = any(u.startswith("rediss://") for u in self.endpoint.urls)
            self.by_addr[(host, port)] = redis.Redis(
                host=host, port=port, username=self.endpoint.user, password=self.endpoint.password,
                ssl=tls, socket_timeout=self.timeout, socket_connect_timeout=5,
            )  # fmt: skip
        return self.by_addr[(host, port)]

    def refresh(self) -> None:
        error: Exception | None = None
        for url in self.endpoint.urls:
            u = urlparse(url)
            try:
                reply = self._connect(u.hostname or "127.0.0.1", u.port or 6379).execute_command("CLUSTER", "SLOTS")
            except redis.RedisError as e:
                error = e
                continue
            self.slots = [(int(r[0]), int(r[1]), (r[2][0].decode() or u.hostname, int(r[2][1]))) for r in reply]
            return
        raise login_failure(self.endpoint, error or redis.ConnectionError("no seed answered"))

    def for_key(self, key: str) -> redis.Redis:
        slot = key_slot(key.encode())
        for low, high, (host, port) in self.slots:
            if low <= slot <= high:
                return self._connect(host, port)
        raise Failure(EXIT_CONNECTION, f"no cluster node owns slot {slot} (cluster state not ok?)")

    def call(self, key: str, *args: Any) -> Any:
        try:
            return self.for_key(key).execute_command(*args)
        except (redis.exceptions.MovedError, redis.exceptions.AskError):
            pass
        self.refresh()  # resharded: ask again, once
        return self.for_key(key).execute_command(*args)


def text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Client:
    """One agent's connection: a plain client, RedisCluster, or Nodes when RedisCluster is refused."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.endpoint = endpoint
        self.nodes: Nodes | None = None
        self.conn: Any = None
        try:
            if not endpoint.cluster:
                if len(endpoint.urls) != 1:
                    raise Failure(EXIT_USAGE, f"redis.json: {len(endpoint.urls)} urls but cluster is false")
                self.conn = redis.Redis.from_url(
                    endpoint.urls[0], username=endpoint.user, password=endpoint.password,
                    socket_timeout=timeout, socket_connect_timeout=5,
                )  # fmt: skip
                self.conn.ping()
                return
            seeds = [urlparse(u) for u in endpoint.urls]
            try:
                self.conn = RedisCluster(
                    startup_nodes=[ClusterNode(u.hostname or "127.0.0.1", u.port or 6379) for u in seeds],
                    username=endpoint.user, password=endpoint.password,
                    ssl=any(u.scheme == "rediss" for u in seeds), socket_timeout=timeout, socket_connect_timeout=5,
                )  # fmt: skip
            except redis.exceptions.NoPermissionError as e:
                if "'command'" not in str(e):
                    raise
                print(f"messaging: RedisCluster needs COMMAND, which {endpoint.user} may not run; routing by slot instead", file=sys.stderr)
                self.nodes = Nodes(endpoint, timeout)
        except (redis.RedisError, OSError) as e:
            raise login_failure(endpoint, e)

    def call(self, key: str, *args: Any) -> Any:
        try:
            if self.nodes is not None:
                return self.nodes.call(key, *args)
            return self.conn.execute_command(*args)
        except (redis.RedisError, OSError) as e:
            raise login_failure(self.endpoint, e)

    def send(self, to: str, kind: str, body: str) -> str:
        msg_id = secrets.token_hex(16)
        ep = self.endpoint
        self.call(ep.outbox, "XADD", ep.outbox, "*", "id", msg_id, "to", to, "type", kind, "body", body)
        return msg_id

    def read(self, consumer: str, block_ms: int | None, start: str = ">") -> list[tuple[str, dict[str, str]]]:
        """Inbox entries as (entry, fields): new ones (">"), or this consumer's pending ones ("0")."""
        ep = self.endpoint
        block = ["BLOCK", block_ms] if block_ms is not None else []
        reply = self.call(ep.inbox, "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", 16, *block, "STREAMS", ep.inbox, start)
        entries: list[tuple[str, dict[str, str]]] = []
        # redis-py gives [[stream, [(entry, {field: value}), ...]]]; a trimmed entry has no fields.
        for _, items in reply or []:
            for entry, fields in items:
                pairs = (fields or {}).items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2])
                entries.append((text(entry), {text(k): text(v) for k, v in pairs}))
        return entries

    def notice_for(self, msg_id: str) -> str | None:
        """The relay's refusal of `msg_id` in this agent's own inbox, if any (read, not consumed)."""
        ep = self.endpoint
        for _, fields in self.call(ep.inbox, "XREVRANGE", ep.inbox, "+", "-", "COUNT", 50) or []:
            f = {text(k): text(v) for k, v in (fields or {}).items()}
            if f.get("type") == UNDELIVERABLE and f.get("id") == f"{msg_id}.undeliverable":
                return f.get("body", "")
        return None

    def ack(self, entry: str) -> None:
        ep = self.endpoint
        self.call(ep.inbox, "XACK", ep.inbox, GROUP, entry)


def clear_stale(receiver: Client, sender: Endpoint, args: argparse.Namespace) -> None:
    """Acknowledges this script's own earlier pings still pending at its consumer (a run that stopped)."""
    cleared = 0
    for _ in range(100):
        stale = [
            entry for entry, f in receiver.read(args.consumer, None, start="0")
            if f.get("type") == args.type and f.get("from") == sender.spiffe_id
        ]  # fmt: skip
        if not stale:
            break
        for entry in stale:
            receiver.ack(entry)
        cleared += len(stale)
    if cleared:
        print(f"messaging: acknowledged {cleared} pings left pending by an earlier run", file=sys.stderr)


def round_trips(sender: Client, receiver: Client, to: str, args: argparse.Namespace) -> list[float]:
    """Round trips in ms, warm-up excluded."""
    clear_stale(receiver, sender.endpoint, args)
    out: list[float] = []
    skipped = 0
    for i in range(args.warmup + args.count):
        start = time.perf_counter()
        msg_id = sender.send(to, args.type, f"ping {i}")
        deadline = start + args.timeout
        got = None
        while got is None:
            left_ms = int((deadline - time.perf_counter()) * 1000)
            if left_ms <= 0:
                raise Failure(EXIT_REFUSED, f"message {i} ({msg_id}) was not received within {args.timeout}s: is the controller (the relay) running?")
            # Reading another agent's inbox, a refusal lands in the sender's: look there between reads.
            slice_ms = 5000 if receiver is sender else 250
            entries = receiver.read(args.consumer, max(1, min(left_ms, slice_ms)))
            if not entries and receiver is not sender and (notice := sender.notice_for(msg_id)) is not None:
                raise Failure(EXIT_REFUSED, f"message {msg_id} to {to} was refused: {notice}")
            for entry, fields in entries:
                if fields.get("id") == msg_id:
                    got = (time.perf_counter(), entry)
                elif fields.get("type") == args.type and fields.get("from") == sender.endpoint.spiffe_id:
                    receiver.ack(entry)  # an earlier run's ping, arriving late
                elif fields.get("type") == UNDELIVERABLE and fields.get("id") == f"{msg_id}.undeliverable":
                    receiver.ack(entry)
                    raise Failure(EXIT_REFUSED, f"message {msg_id} to {to} was refused: {fields.get('body')}")
                else:
                    skipped += 1  # not ours: left pending for the agent's own reader to reclaim
        if i >= args.warmup:
            out.append((got[0] - start) * 1000)
        receiver.ack(got[1])
    if skipped:
        print(f"messaging: {skipped} other messages in the inbox were read and left unacknowledged (they are reclaimed after claimIdle)", file=sys.stderr)
    return out


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 1, not 2 (2 means "refused")
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--identity-dir", required=True, help="the sender's identity directory: redis.json, redis-password")
    p.add_argument("--to", help="NAMESPACE/NAME to send to (default: the sender itself)")
    p.add_argument("--reply-from", help="the receiver's identity directory, to read its inbox (needed when --to is another agent)")
    p.add_argument("--count", type=int, default=1000, help="measured round trips (default 1000)")
    p.add_argument("--warmup", type=int, default=10, help="round trips before measuring (default 10)")
    p.add_argument("--type", default="bench.ping", help="message type (default bench.ping)")
    p.add_argument("--consumer", default=f"messaging-py-{socket.gethostname()}", help="consumer name in the inbox group (default messaging-py-HOSTNAME)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one message may take (default 10)")
    args = p.parse_args(argv)
    if args.count < 1 or args.warmup < 0:
        p.error("--count must be at least 1 and --warmup at least 0")
    if args.to is not None and not TARGET.fullmatch(args.to):
        p.error(f"--to {args.to!r} is not NAMESPACE/NAME, e.g. team-a/summarizer")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        own = load_endpoint(args.identity_dir)
        reply = load_endpoint(args.reply_from) if args.reply_from else None
        to = args.to or (reply.agent if reply else own.agent)
        receiver_ep = reply or own
        if to != receiver_ep.agent:
            raise Failure(
                EXIT_USAGE,
                f"--to {to} is not {own.agent}: this agent's credentials cannot read {to}'s inbox; "
                f"add --reply-from with {to}'s identity directory",
            )
        # Socket timeout: past the longest blocking read (at most --timeout).
        sender = Client(own, args.timeout + 5)
        receiver = sender if receiver_ep is own else Client(receiver_ep, args.timeout + 5)
        ms = sorted(round_trips(sender, receiver, to, args))
    except Failure as e:
        print(f"messaging: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    mode = "cluster" if own.cluster else "standalone"
    print(f"{len(ms)} round trips {own.agent} -> {to} through the relay ({mode} {' '.join(own.urls)}), after {args.warmup} warm-up")
    print(f"round trip (send -> receive), ms: p50 {percentile(ms, 0.50):.2f}  p99 {percentile(ms, 0.99):.2f}  max {ms[-1]:.2f}")
    print(f"the seed reported {SEED_MS[0]}-{SEED_MS[1]} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
