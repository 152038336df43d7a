#!/usr/bin/env python3
"""Independent check of an Agentry A2A agent card (A2A 1.0) with a2a-sdk and PyJWT.

usage:
  check_agent_card.py --base-url https://127.0.0.1:PORT --card-path /a2a/NS/NAME/.well-known/agent-card.json \
      --cacert CA.pem --cert CLIENT.pem --key CLIENT.key --jwks JWKS.json [--expect-name N] [--expect-skill-tag T]
  check_agent_card.py --card-file CARD.json --jwks JWKS.json [--expect-name N] [--expect-skill-tag T]
  check_agent_card.py --selftest

Fetches the card with a2a-sdk's A2ACardResolver over mutual TLS (or reads it from a file) and checks:
  * it parses into a2a-sdk's AgentCard (lf.a2a.v1) with unknown fields rejected, has every REQUIRED field,
    and is already in the SDK's proto-JSON shape (camelCase names, no default-valued plain fields), so that
    the bytes a signer canonicalizes from this JSON are the bytes the SDK's verifier canonicalizes;
  * a supportedInterface with an https URL, an mTLS and an HTTP bearer security scheme, and a
    securityRequirements entry that needs both;
  * every signature, each on its own: ES256 JWS over the RFC 8785 canonical card (signatures removed, empty
    strings/lists/objects dropped), once with a2a-sdk's verifier and once with PyJWT over an independent
    canonicalization, with the key picked by the protected header's kid from the JWKS file.
Prints a one-line JSON summary and exits 0, or prints the reason to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import json
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from a2a.client.card_resolver import A2ACardResolver, parse_agent_card
from a2a.client.errors import AgentCardResolutionError
from a2a.types import AgentCard
from a2a.utils.errors import InvalidParamsError
from a2a.utils.proto_utils import validate_proto_required_fields
from a2a.utils.signing import SignatureVerificationError, create_signature_verifier

ALGORITHMS = ["ES256"]


class CheckFailed(Exception):
    """A check did not hold; the message says which and why."""


# --- independent canonicalization (the A2A 1.0 card-signing input) -------------------------------


def clean_empty(value: Any) -> Any:
    """Drops empty strings, empty lists and empty objects, recursively (False and 0 stay)."""
    if isinstance(value, dict):
        cleaned = {k: c for k, v in value.items() if (c := clean_empty(v)) is not None}
        return cleaned or None
    if isinstance(value, list):
        items = [c for v in value if (c := clean_empty(v)) is not None]
        return items or None
    if isinstance(value, str) and not value:
        return None
    return value


def jcs(value: Any) -> str:
    """RFC 8785 canonical JSON, for the values an agent card holds."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + jcs(v) for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(jcs(v) for v in value) + "]"
    if value is None or isinstance(value, (bool, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    text = repr(value)
    if isinstance(value, float) and "e" not in text and "n" not in text:
        return text
    raise CheckFailed(f"number {value!r} has no canonical form this checker can write")


def canonical_card_bytes(raw: dict[str, Any]) -> bytes:
    body = {k: v for k, v in raw.items() if k != "signatures"}
    return jcs(clean_empty(body)).encode("utf-8")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- loading ---------------------------------------------------------------------------------------


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise CheckFailed(f"card JSON repeats the key(s) {dupes}")
    return dict(pairs)


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data, object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckFailed(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckFailed(f"{what} is not a JSON object")
    return value


def load_jwks(path: str) -> jwt.PyJWKSet:
    try:
        return jwt.PyJWKSet.from_json(Path(path).read_text())
    except (OSError, jwt.PyJWTError, ValueError) as e:
        raise CheckFailed(f"cannot load JWKS {path}: {e}") from None


def a2a_verifier(jwks: jwt.PyJWKSet) -> Callable[[AgentCard], None]:
    def key_provider(kid: str | None, _jku: str | None) -> jwt.PyJWK:
        try:
            return jwks[kid or ""]
        except KeyError:
            raise jwt.InvalidKeyError(f"no key with kid {kid!r} in the JWKS") from None

    return create_signature_verifier(key_provider, ALGORITHMS)


async def fetch_card(args: argparse.Namespace) -> tuple[bytes, AgentCard, str]:
    """Fetches the card with a2a-sdk's resolver; signatures are verified later, after the shape checks."""
    try:
        tls = ssl.create_default_context(cafile=args.cacert)
        tls.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as e:
        raise CheckFailed(f"cannot load the TLS files: {e}") from None
    seen: dict[str, Any] = {}

    async def keep_body(response: httpx.Response) -> None:
        await response.aread()
        seen["body"] = response.content
        seen["content_type"] = response.headers.get("content-type", "")

    async with httpx.AsyncClient(verify=tls, timeout=15, event_hooks={"response": [keep_body]}) as client:
        resolver = A2ACardResolver(client, args.base_url, agent_card_path=args.card_path)
        try:
            card = await resolver.get_agent_card()
        except AgentCardResolutionError as e:
            raise CheckFailed(f"a2a-sdk card resolver failed: {e}") from None
    if not seen["content_type"].startswith("application/json"):
        raise CheckFailed(f"card served as {seen['content_type']!r}, not application/json")
    return seen["body"], card, f"{resolver.base_url}/{resolver.agent_card_path}"


# --- the checks ------------------------------------------------------------------------------------


def diff_paths(a: Any, b: Any, path: str = "$") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k} ({'only in the served JSON' if k in a else 'only in the parsed card'})")
            else:
                out += diff_paths(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_paths(x, y, f"{path}[{i}]")]
    same_type = type(a) is type(b) or {type(a), type(b)} <= {int, float}  # Struct numbers parse back as floats
    return [] if same_type and a == b else [path]


def check_model(raw: dict[str, Any], resolved: AgentCard) -> AgentCard:
    try:
        card = ParseDict(copy.deepcopy(raw), AgentCard(), ignore_unknown_fields=False)
    except ParseError as e:
        raise CheckFailed(f"not an A2A 1.0 AgentCard: {e}".splitlines()[0]) from None
    try:
        validate_proto_required_fields(card)
    except InvalidParamsError as e:
        errors = (e.data or {}).get("errors", [])
        raise CheckFailed(f"REQUIRED fields missing or empty: {[x['field'] for x in errors]}") from None
    if card != resolved:
        raise CheckFailed("a2a-sdk's resolver parsed the card differently from the strict parse (legacy 0.3 fields?)")
    served = clean_empty({k: v for k, v in raw.items() if k != "signatures"})
    parsed = clean_empty({k: v for k, v in MessageToDict(card).items() if k != "signatures"})
    if diffs := diff_paths(served, parsed):
        raise CheckFailed(
            "card JSON is not in proto-JSON shape (a signer over it and a2a-sdk's verifier would canonicalize "
            f"different bytes) at: {', '.join(diffs)}"
        )
    return card


def check_content(card: AgentCard, args: argparse.Namespace) -> dict[str, Any]:
    https = [i.url for i in card.supported_interfaces if i.url.startswith("https://")]
    if not https:
        raise CheckFailed(f"no supportedInterface has an https URL: {[i.url for i in card.supported_interfaces]}")
    kinds = {name: s.WhichOneof("scheme") for name, s in card.security_schemes.items()}
    mtls = {n for n, k in kinds.items() if k == "mtls_security_scheme"}
    bearer = {
        n
        for n, k in kinds.items()
        if k == "http_auth_security_scheme" and card.security_schemes[n].http_auth_security_scheme.scheme.lower() == "bearer"
    }
    if not mtls:
        raise CheckFailed(f"no mtlsSecurityScheme in securitySchemes {kinds}")
    if not bearer:
        raise CheckFailed(f"no httpAuthSecurityScheme with scheme Bearer in securitySchemes {kinds}")
    requirements = [sorted(r.schemes) for r in card.security_requirements]
    for names in requirements:
        if unknown := [n for n in names if n not in kinds]:
            raise CheckFailed(f"securityRequirements names undeclared scheme(s) {unknown}")
    if not any(mtls & set(r) and bearer & set(r) for r in requirements):
        raise CheckFailed(f"no securityRequirements entry needs both mTLS and bearer: {requirements}")
    if args.expect_name is not None and card.name != args.expect_name:
        raise CheckFailed(f"card name is {card.name!r}, expected {args.expect_name!r}")
    tags = sorted({t for s in card.skills for t in s.tags})
    if args.expect_skill_tag is not None and args.expect_skill_tag not in tags:
        raise CheckFailed(f"no skill has tag {args.expect_skill_tag!r}; tags: {tags}")
    return {
        "name": card.name,
        "version": card.version,
        "interfaces": [
            {"url": i.url, "protocolBinding": i.protocol_binding, "protocolVersion": i.protocol_version}
            for i in card.supported_interfaces
        ],
        "security_schemes": {n: k.removesuffix("_security_scheme") for n, k in sorted(kinds.items())},
        "security_requirements": requirements,
        "skills": [s.id for s in card.skills],
        "skill_tags": tags,
    }


def check_signatures(raw: dict[str, Any], card: AgentCard, jwks: jwt.PyJWKSet) -> list[dict[str, Any]]:
    if not card.signatures:
        raise CheckFailed("card has no signatures")
    from a2a.utils.signing import _canonicalize_agent_card  # the SDK's signing input, to compare with ours

    payload = canonical_card_bytes(raw)
    if _canonicalize_agent_card(card).encode("utf-8") != payload:
        raise CheckFailed("independent RFC 8785 canonical form differs from a2a-sdk's canonical form")
    verify_with_sdk = a2a_verifier(jwks)
    results = []
    for i, sig in enumerate(card.signatures):
        try:
            header = json.loads(b64url_decode(sig.protected))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckFailed(f"signature {i}: protected header is not base64url JSON: {e}") from None
        if not isinstance(header, dict) or header.get("alg") not in ALGORITHMS:
            raise CheckFailed(f"signature {i}: protected header {header} has no alg in {ALGORITHMS}")
        kid = header.get("kid")
        try:
            key = jwks[kid]
        except KeyError:
            raise CheckFailed(f"signature {i}: kid {kid!r} is not in the JWKS") from None
        # a2a-sdk's verifier, given a card that carries only this signature.
        one = AgentCard()
        one.CopyFrom(card)
        del one.signatures[:]
        one.signatures.append(sig)
        try:
            verify_with_sdk(one)
        except SignatureVerificationError as e:
            raise CheckFailed(f"signature {i} (kid {kid}): a2a-sdk verifier: {type(e).__name__}: {e}") from None
        # PyJWT, over our own canonicalization of the served JSON.
        token = f"{sig.protected}.{b64url(payload)}.{sig.signature}"
        try:
            decoded = jwt.api_jws.decode_complete(token, key, algorithms=ALGORITHMS)
        except jwt.PyJWTError as e:
            raise CheckFailed(f"signature {i} (kid {kid}): PyJWT: {type(e).__name__}: {e}") from None
        assert decoded["payload"] == payload
        results.append({"kid": kid, "alg": header["alg"], "typ": header.get("typ"), "verified_by": ["a2a-sdk", "pyjwt"]})
    try:
        verify_with_sdk(card)  # what A2ACardResolver.get_agent_card(signature_verifier=...) runs: any one valid
    except SignatureVerificationError as e:
        raise CheckFailed(f"a2a-sdk verifier: {type(e).__name__}: {e}") from None
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    jwks = load_jwks(args.jwks)
    if args.card_file:
        try:
            body = Path(args.card_file).read_bytes()
        except OSError as e:
            raise CheckFailed(f"cannot read {args.card_file}: {e}") from None
        raw = load_json(body, args.card_file)
        try:
            resolved = parse_agent_card(copy.deepcopy(raw))  # what A2ACardResolver does with a fetched body
        except ParseError as e:
            raise CheckFailed(f"a2a-sdk card parser failed: {e}".splitlines()[0]) from None
        source = args.card_file
    else:
        body, resolved, source = await fetch_card(args)
        raw = load_json(body, source)
    card = check_model(raw, resolved)
    summary = {"ok": True, "source": source, **check_content(card, args)}
    summary["signatures"] = check_signatures(raw, card, jwks)
    canonical = canonical_card_bytes(raw)
    summary["canonical_sha256"] = hashlib.sha256(canonical).hexdigest()
    # What the signature does not cover, because the canonical form drops empty values
    # (e.g. securityRequirements whose scope lists are all empty, an mtlsSecurityScheme without description).
    served = {k: v for k, v in raw.items() if k != "signatures"}
    summary["unsigned"] = [p.split(" (")[0] for p in diff_paths(served, json.loads(canonical))]
    return summary


# --- self-test -------------------------------------------------------------------------------------


def selftest() -> int:
    """Signs a sample card the way the Rust side must, then checks good and broken variants."""
    import threading
    from datetime import datetime, timedelta, timezone
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    from cryptography.x509.oid import NameOID

    work = Path(tempfile.mkdtemp(prefix="agentcard-selftest-"))
    key = ec.generate_private_key(ec.SECP256R1())
    kid = "agentry-card-test"
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    (work / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "ES256"}]}))

    def sign(card: dict[str, Any], kid: str = kid) -> dict[str, Any]:
        """The algorithm, spelled out without PyJWT or a2a-sdk."""
        protected = b64url(json.dumps({"alg": "ES256", "kid": kid, "typ": "JOSE"}, separators=(",", ":")).encode())
        signing_input = f"{protected}.{b64url(canonical_card_bytes(card))}".encode("ascii")
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return {**card, "signatures": [{"protected": protected, "signature": signature}]}

    unsigned: dict[str, Any] = {
        "name": "summarizer",
        "description": "Summarizes documents (team-a/summarizer) — ünïcode too",
        "supportedInterfaces": [
            {"url": "https://127.0.0.1:18443/a2a/team-a/summarizer", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0"}
        ],
        "provider": {"organization": "Agentry", "url": "https://agentry.dev"},
        "version": "1.0.0",
        "capabilities": {"streaming": False, "pushNotifications": False, "extendedAgentCard": False},
        "securitySchemes": {
            "mtls": {"mtlsSecurityScheme": {"description": "client certificate issued by the Agentry CA"}},
            "bearer": {"httpAuthSecurityScheme": {"scheme": "Bearer", "bearerFormat": "JWT", "description": "Agentry token"}},
        },
        "securityRequirements": [{"schemes": {"mtls": {"list": []}, "bearer": {"list": []}}}],
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain", "application/json"],
        "skills": [
            {"id": "summarize", "name": "summarize", "description": "Summarize text", "tags": ["summarize"], "examples": ["Summarize this"]}
        ],
    }
    good = sign(unsigned)
    passes: list[str] = []
    failures: list[str] = []

    def write(name: str, data: bytes | dict[str, Any]) -> Path:
        path = work / name
        path.write_bytes(data if isinstance(data, bytes) else json.dumps(data, indent=2, ensure_ascii=False).encode())
        return path

    def expect(label: str, extra: list[str], ok: bool, needle: str = "") -> None:
        cmd = [sys.executable, __file__, "--jwks", str(work / "jwks.json"), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        passed = (proc.returncode == 0) == ok and (ok or proc.returncode == 1) and needle in (proc.stdout + proc.stderr)
        out = (proc.stdout or proc.stderr).strip()
        print(f"  {'ok  ' if passed else 'FAIL'} {label}: exit {proc.returncode}: {out[:220]}")
        (passes if passed else failures).append(label)

    print(f"self-test in {work}")
    good_path = write("good.json", good)
    expect("signed card", ["--card-file", str(good_path), "--expect-name", "summarizer", "--expect-skill-tag", "summarize"], True)
    body = good_path.read_bytes()
    at = body.index(b"Summarizes documents") + 3
    flipped = body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1 :]
    expect("one byte flipped in the card", ["--card-file", str(write("flipped.json", flipped))], False, "signature")
    sig = good["signatures"][0]
    bad_sig = {**good, "signatures": [{**sig, "signature": ("B" if sig["signature"][0] != "B" else "C") + sig["signature"][1:]}]}
    expect("signature altered", ["--card-file", str(write("badsig.json", bad_sig))], False, "signature")
    expect("unknown kid", ["--card-file", str(write("kid.json", sign(unsigned, kid="other")))], False, "kid")
    legacy = sign({**unsigned, "url": "https://127.0.0.1:18443/a2a/team-a/summarizer"})
    expect("unknown field (0.3 'url')", ["--card-file", str(write("legacy.json", legacy))], False, "no field named")
    no_req = sign({**unsigned, "securityRequirements": [{"schemes": {"mtls": {"list": []}}}]})
    expect("requirement without bearer", ["--card-file", str(write("noreq.json", no_req))], False, "both")
    snake = sign({("default_input_modes" if k == "defaultInputModes" else k): v for k, v in unsigned.items()})
    expect("snake_case field name", ["--card-file", str(write("snake.json", snake))], False, "proto-JSON shape")
    expect("wrong expected name", ["--card-file", str(good_path), "--expect-name", "other"], False, "expected")
    unsigned_only = {k: v for k, v in good.items() if k != "signatures"}
    expect("no signatures", ["--card-file", str(write("unsigned.json", unsigned_only))], False, "no signatures")

    # a2a-sdk's own signer must produce a card our checker accepts (same algorithm, other implementation).
    from a2a.utils.signing import create_agent_card_signer

    sdk_card = ParseDict(copy.deepcopy(unsigned), AgentCard())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    header: Any = {"alg": "ES256", "kid": kid, "typ": "JOSE"}
    create_agent_card_signer(private_pem, header)(sdk_card)
    sdk_signed = {**unsigned, "signatures": [MessageToDict(s) for s in sdk_card.signatures]}
    expect("card signed by a2a-sdk's signer", ["--card-file", str(write("sdk.json", sdk_signed))], True)

    # Over HTTPS with a client certificate, through a2a-sdk's A2ACardResolver.
    now = datetime.now(timezone.utc)

    def issue(cn: str, issuer_key: Any, issuer: x509.Name | None, ca: bool, san: x509.GeneralName | None):
        k = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (
            x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        cert = b.sign(issuer_key or k, hashes.SHA256())
        (work / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (work / f"{cn}.key").write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return k, name

    import ipaddress

    ca_key, ca_name = issue("ca", None, None, True, None)
    issue("server", ca_key, ca_name, False, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    issue("client", ca_key, ca_name, False, None)
    card_path = "/a2a/team-a/summarizer/.well-known/agent-card.json"
    served = json.dumps(good).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            status, body = (200, served) if self.path == card_path else (404, b'{"error":"not_found"}')
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(work / "server.pem", work / "server.key")
    ctx.load_verify_locations(work / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"https://127.0.0.1:{server.server_address[1]}"
    tls_args = ["--cacert", str(work / "ca.pem"), "--cert", str(work / "client.pem"), "--key", str(work / "client.key")]
    try:
        expect("fetched over mTLS", ["--base-url", base, "--card-path", card_path, *tls_args, "--expect-name", "summarizer"], True)
        expect("fetched, wrong path", ["--base-url", base, "--card-path", "/nope", *tls_args], False, "HTTP 404")
        wrong_ca = ["--cacert", str(work / "server.pem"), *tls_args[2:]]
        expect("fetched, untrusted server", ["--base-url", base, "--card-path", card_path, *wrong_ca], False, "resolver failed")
    finally:
        server.shutdown()

    print(f"{len(passes)} passed, {len(failures)} failed")
    if failures:
        print(f"self-test files kept in {work}")
        return 1
    shutil.rmtree(work)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url")
    p.add_argument("--card-path", default="/.well-known/agent-card.json")
    p.add_argument("--cacert")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--card-file", help="check this local JSON file instead of fetching")
    p.add_argument("--jwks", help="JWKS JSON file with the card-signing public key(s)")
    p.add_argument("--expect-name")
    p.add_argument("--expect-skill-tag")
    p.add_argument("--selftest", action="store_true")
    args = p.parse_args()
    if args.selftest:
        return selftest()
    if not args.jwks:
        p.error("--jwks is required")
    if not args.card_file and not (args.base_url and args.cacert and args.cert and args.key):
        p.error("give --card-file, or --base-url with --cacert, --cert and --key")
    try:
        summary = asyncio.run(run(args))
    except CheckFailed as e:
        print(f"agent card check failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps(summary, ensure_ascii=False, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
