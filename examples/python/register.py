#!/usr/bin/env python3
"""Register an agent with the Agentry API, the way an agent does when it starts.

The API is HTTPS with mutual TLS: the agent presents the client certificate from its identity Secret,
trusts the Agentry CA from the same Secret, and sends the Secret's token as a bearer JWT.

  python3 register.py --api https://127.0.0.1:18443 --identity-dir ./identity \
      --id team-a/summarizer --capabilities summarize

Prints assigned_resources as JSON on stdout (--full: the whole response).
Exit codes: 0 registered; 1 bad arguments or local files; 2 the API refused the request (its
{"error", "field", "message"} goes to stderr) or its answer is unusable; 3 connection or TLS failure.
Needs python3 and httpx only (pip install -r requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx

EXIT_USAGE, EXIT_REFUSED, EXIT_CONNECTION = 1, 2, 3


class Failure(Exception):
    """An expected failure: printed as one message, no traceback."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    cacert: Path
    token: str


def load_identity(args: argparse.Namespace) -> Identity:
    """Explicit --cert/--key/--cacert/--token-file win over the files of --identity-dir."""
    base = Path(args.identity_dir) if args.identity_dir else None

    def pick(explicit: str | None, name: str, flag: str) -> Path:
        if explicit:
            return Path(explicit)
        if base is None:
            raise Failure(EXIT_USAGE, f"give --identity-dir or {flag}")
        return base / name

    cert = pick(args.cert, "tls.crt", "--cert")
    key = pick(args.key, "tls.key", "--key")
    cacert = pick(args.cacert, "ca.crt", "--cacert")
    token_file = pick(args.token_file, "token", "--token-file")
    for path in (cert, key, cacert, token_file):
        if not path.is_file():
            raise Failure(EXIT_USAGE, f"{path}: no such file")
    token = token_file.read_text().strip()
    if not token:
        raise Failure(EXIT_USAGE, f"{token_file} is empty")
    return Identity(cert, key, cacert, token)


def tls_context(identity: Identity) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(identity.cacert))
        ctx.load_cert_chain(identity.cert, identity.key)
    except (ssl.SSLError, OSError) as e:
        raise Failure(EXIT_USAGE, f"cannot load the TLS files ({identity.cert}, {identity.key}, {identity.cacert}): {e}")
    return ctx


def register(api: str, identity: Identity, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST /v1/agents/register; returns the response object or raises Failure."""
    url = api.rstrip("/") + "/v1/agents/register"
    headers = {"Authorization": f"Bearer {identity.token}", "Accept": "application/json"}
    try:
        with httpx.Client(verify=tls_context(identity), timeout=timeout) as client:
            response = client.post(url, json=body, headers=headers)
    except httpx.TimeoutException:
        raise Failure(EXIT_CONNECTION, f"timed out after {timeout}s talking to {url}")
    except httpx.TransportError as e:
        detail = str(e) or type(e).__name__
        kind = "TLS handshake with" if "SSL" in detail or "certificate" in detail else "connection to"
        raise Failure(EXIT_CONNECTION, f"{kind} {url} failed: {detail}")
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.is_success and isinstance(payload, dict) and isinstance(payload.get("assigned_resources"), dict):
        return payload
    if response.is_success:
        raise Failure(EXIT_REFUSED, f"unexpected answer from {url} (HTTP {response.status_code}): {response.text[:300]}")
    if isinstance(payload, dict) and "error" in payload:
        error = {k: payload.get(k) for k in ("error", "field", "message")}
        raise Failure(EXIT_REFUSED, f"registration refused (HTTP {response.status_code}): {json.dumps(error)}")
    raise Failure(EXIT_REFUSED, f"registration refused (HTTP {response.status_code}): {response.text[:300]}")


_UNITS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}  # fmt: skip


def memory_bytes(quantity: str) -> int:
    """'384Mi' -> 402653184. Kubernetes suffixes, plus KB/MB/GB/TB as decimal units."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity.strip())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def cpu_millicores(quantity: str) -> int:
    """'250m' -> 250, '1' -> 1000."""
    q = quantity.strip()
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def allocate_resources(assigned: dict[str, Any], max_mem: str = "512Mi") -> dict[str, int | None]:
    """The seed's allocate step: check the assignment against its ceilings, say what would be allocated."""
    memory = memory_bytes(assigned["memory"])
    ceiling = min(memory_bytes(assigned.get("max_memory", max_mem)), memory_bytes(max_mem))
    if memory > ceiling:
        raise Failure(EXIT_REFUSED, f"assigned memory {assigned['memory']} exceeds the ceiling ({ceiling} bytes)")
    cpu = assigned.get("cpu")  # null when the Agent sets no resources.cpu (no CPU request)
    plan = {"memory_bytes": memory, "max_memory_bytes": ceiling, "cpu_millicores": cpu_millicores(cpu) if cpu else None}
    print(
        f"would allocate memory={assigned['memory']} ({memory} bytes, ceiling {ceiling}), cpu={cpu or 'unset'}",
        file=sys.stderr,
    )
    return plan


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 1, not 2 (2 means "the API refused")
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api", required=True, help="https://HOST:PORT of the Agentry API")
    p.add_argument("--identity-dir", help="the mounted identity Secret: tls.crt, tls.key, ca.crt, token")
    p.add_argument("--cert", help="client certificate (PEM); default IDENTITY_DIR/tls.crt")
    p.add_argument("--key", help="client key (PEM); default IDENTITY_DIR/tls.key")
    p.add_argument("--cacert", help="CA bundle to trust (PEM); default IDENTITY_DIR/ca.crt")
    p.add_argument("--token-file", help="bearer JWT; default IDENTITY_DIR/token")
    p.add_argument("--id", default=os.environ.get("AGENTRY_AGENT_ID"), help="NAMESPACE/NAME (default: $AGENTRY_AGENT_ID)")
    p.add_argument("--capabilities", default="", help="comma-separated, e.g. summarize,translate")
    p.add_argument("--backup-prefs", help='JSON, e.g. \'{"schedule": "0 */6 * * *", "paths": ["/data"]}\'')
    p.add_argument("--max-mem", default="512Mi", help="the agent's own memory ceiling (default 512Mi)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--full", action="store_true", help="print the whole response, not only assigned_resources")
    args = p.parse_args(argv)
    if not args.api.startswith("https://"):
        p.error("--api must be an https:// URL")
    if not args.id:
        p.error("give --id NAMESPACE/NAME or set AGENTRY_AGENT_ID")
    return args


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"id": args.id, "capabilities": [c.strip() for c in args.capabilities.split(",") if c.strip()]}
    if args.backup_prefs is not None:
        try:
            prefs = json.loads(args.backup_prefs)
        except json.JSONDecodeError as e:
            raise Failure(EXIT_USAGE, f"--backup-prefs is not JSON: {e}")
        if not isinstance(prefs, dict):
            raise Failure(EXIT_USAGE, "--backup-prefs must be a JSON object")
        body["backup_prefs"] = prefs
    return body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        body = request_body(args)
        response = register(args.api, load_identity(args), body, args.timeout)
        try:
            allocate_resources(response["assigned_resources"], max_mem=args.max_mem)
        except (KeyError, ValueError) as e:
            raise Failure(EXIT_REFUSED, f"unusable assigned_resources {response['assigned_resources']}: {e}")
    except Failure as e:
        print(f"register: {e}", file=sys.stderr)
        return e.code
    print(json.dumps(response if args.full else response["assigned_resources"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
