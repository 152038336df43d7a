#!/usr/bin/env python3
"""Independent check of an Agentry token with a standard JOSE library (PyJWT + cryptography).

usage: verify_jwt.py JWKS_JSON_FILE TOKEN_FILE CERT_PEM_FILE ISSUER AUDIENCE
Prints the verified claims as JSON; exits 1 with a reason when the token does not verify, or when
its cnf.x5t#S256 is not the SHA-256 thumbprint of the certificate.
"""
import base64
import hashlib
import json
import sys

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


def main() -> int:
    jwks_path, token_path, cert_path, issuer, audience = sys.argv[1:6]
    with open(jwks_path) as f:
        jwks = jwt.PyJWKSet.from_json(f.read())
    with open(token_path) as f:
        token = f.read().strip()
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    header = jwt.get_unverified_header(token)
    if header.get("typ") != "JWT":
        print(f"typ is {header.get('typ')!r}", file=sys.stderr)
        return 1
    key = jwks[header["kid"]]
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=["ES256"],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
        )
    except jwt.PyJWTError as e:
        print(f"token rejected: {e}", file=sys.stderr)
        return 1
    der = cert.public_bytes(Encoding.DER)
    thumb = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    if claims.get("cnf", {}).get("x5t#S256") != thumb:
        print("cnf.x5t#S256 does not match the certificate", file=sys.stderr)
        return 1
    print(json.dumps(claims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
