#!/usr/bin/env python3
"""Independent S3 checks (boto3) against the stores started by hack/s3-stores.

Usage:
    hack/s3-check.py [primary] [secondary] [--keep]

Reads AGENTRY_S3_{PRIMARY,SECONDARY}_{ENDPOINT,BUCKET,ACCESS_KEY,SECRET_KEY} and AWS_REGION
from the environment (eval "$(hack/s3-stores env)"); when they are unset it asks
`hack/s3-stores env` itself. Checks each store (default: both):

  - GetBucketVersioning says Enabled
  - two PUTs of one key give two different version ids; GetObject by each versionId returns
    the matching body; GetObject without one returns the latest
  - user metadata (x-amz-meta-blake3) round-trips on GetObject and HeadObject
  - a multipart upload of 2 x 5 MiB completes and reads back byte-identical
  - ListMultipartUploads lists an open upload; AbortMultipartUpload removes it
  - a DELETE without versionId leaves a delete marker: GET is 404, old versions stay readable
  - a wrong secret key is refused
and, for information only (they do not fail the run), what the store does with
x-amz-checksum-* headers: is a correct CRC32/SHA256 accepted, stored and returned
(GetObject with ChecksumMode=ENABLED), is a wrong one refused.

Prints one JSON line per store; exit status 0 iff every required check passed on every store.
Test objects live under s3-check/<random>/ and are deleted (all versions) afterwards unless
--keep is given.

Needs boto3 and blake3 (pip install boto3==1.44.8 blake3==1.0.11).
"""

import base64
import hashlib
import json
import os
import shlex
import subprocess
import sys
import uuid
import zlib

try:
    import blake3
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
except ImportError as e:  # pragma: no cover
    # Run by a python3 without boto3/blake3: re-exec with the project's test venv if there is one.
    _venv = os.path.join(
        os.environ.get("AGENTRY_CACHE") or os.path.expanduser("~/.cache/agentry"), "venv", "bin", "python3"
    )
    if os.path.exists(_venv) and not os.environ.get("AGENTRY_S3_CHECK_REEXEC"):
        os.environ["AGENTRY_S3_CHECK_REEXEC"] = "1"
        os.execv(_venv, [_venv, os.path.abspath(__file__)] + sys.argv[1:])
    sys.exit(f"s3-check: {e}: pip install boto3==1.44.8 blake3==1.0.11")

HERE = os.path.dirname(os.path.abspath(__file__))
STORES = ("primary", "secondary")
MIB = 1024 * 1024


def store_env():
    """The AGENTRY_S3_* variables, from the environment or from `hack/s3-stores env`."""
    env = dict(os.environ)
    if not all(f"AGENTRY_S3_{s.upper()}_ENDPOINT" in env for s in STORES):
        out = subprocess.run(
            [os.path.join(HERE, "s3-stores"), "env"], check=True, capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            parts = shlex.split(line)
            if len(parts) == 2 and parts[0] == "export" and "=" in parts[1]:
                k, v = parts[1].split("=", 1)
                env.setdefault(k, v)
    return env


def client(env, store, secret=None):
    s = store.upper()
    return boto3.client(
        "s3",
        endpoint_url=env[f"AGENTRY_S3_{s}_ENDPOINT"],
        aws_access_key_id=env[f"AGENTRY_S3_{s}_ACCESS_KEY"],
        aws_secret_access_key=secret or env[f"AGENTRY_S3_{s}_SECRET_KEY"],
        region_name=env.get("AWS_REGION", "us-east-1"),
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            # Like the B2-mode client: send/validate checksums only when an operation requires
            # them. The checksum probes below opt in explicitly.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


def b3(data):
    return blake3.blake3(data).hexdigest()


def err_code(e):
    return f"{e.response.get('ResponseMetadata', {}).get('HTTPStatusCode')} {e.response.get('Error', {}).get('Code')}"


def check_store(env, store, keep):
    s3 = client(env, store)
    bucket = env[f"AGENTRY_S3_{store.upper()}_BUCKET"]
    prefix = f"s3-check/{uuid.uuid4().hex[:12]}/"
    res = {"store": store, "endpoint": env[f"AGENTRY_S3_{store.upper()}_ENDPOINT"], "bucket": bucket}
    failures = []

    def need(name, ok, detail=None):
        res[name] = detail if detail is not None else bool(ok)
        if not ok:
            failures.append(name)

    def step(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record and go on with the other checks
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:300]
            if name not in failures:
                failures.append(name)

    # --- versioning ---
    def versioning():
        st = s3.get_bucket_versioning(Bucket=bucket).get("Status")
        need("versioning", st == "Enabled", st or "never enabled")

    step("versioning", versioning)

    # --- two versions of one key, metadata, get by versionId ---
    def versions():
        key = prefix + "versioned.txt"
        bodies = [b"first version\n", b"second version, longer\n"]
        vids = []
        for body in bodies:
            r = s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"blake3": b3(body)})
            vids.append(r.get("VersionId"))
        need("version_ids", len(set(vids)) == 2 and all(vids) and "null" not in vids, vids)
        by_id = []
        for vid, body in zip(vids, bodies):
            g = s3.get_object(Bucket=bucket, Key=key, VersionId=vid)
            by_id.append(g["Body"].read() == body and g.get("VersionId") == vid)
        need("get_by_version", all(by_id))
        latest = s3.get_object(Bucket=bucket, Key=key)
        data = latest["Body"].read()
        need("get_latest", data == bodies[1] and latest.get("VersionId") == vids[1])
        head = s3.head_object(Bucket=bucket, Key=key, VersionId=vids[0])
        meta_ok = (
            latest.get("Metadata", {}).get("blake3") == b3(bodies[1])
            and head.get("Metadata", {}).get("blake3") == b3(bodies[0])
        )
        need("metadata_roundtrip", meta_ok)
        lv = s3.list_object_versions(Bucket=bucket, Prefix=key)
        listed = sorted(v["VersionId"] for v in lv.get("Versions", []))
        need("list_object_versions", listed == sorted(vids), listed)
        # A plain DELETE only adds a delete marker: the versions stay readable by id.
        d = s3.delete_object(Bucket=bucket, Key=key)
        try:
            s3.get_object(Bucket=bucket, Key=key)
            gone = False
        except ClientError as e:
            gone = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
        still = s3.get_object(Bucket=bucket, Key=key, VersionId=vids[0])["Body"].read() == bodies[0]
        need("delete_marker", bool(d.get("DeleteMarker")) and gone and still)

    step("versions", versions)

    # --- multipart 2 x 5 MiB ---
    def multipart():
        key = prefix + "multipart.bin"
        parts_data = [os.urandom(5 * MIB), os.urandom(5 * MIB)]
        whole = b"".join(parts_data)
        up = s3.create_multipart_upload(Bucket=bucket, Key=key, Metadata={"blake3": b3(whole)})
        uid = up["UploadId"]
        parts = []
        for i, data in enumerate(parts_data, start=1):
            r = s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=i, Body=data)
            parts.append({"PartNumber": i, "ETag": r["ETag"]})
        done = s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}
        )
        g = s3.get_object(Bucket=bucket, Key=key)
        back = g["Body"].read()
        res["multipart"] = {
            "bytes": len(back),
            "identical": back == whole,
            "etag": done.get("ETag"),
            "version_id": done.get("VersionId"),
            "metadata": g.get("Metadata", {}).get("blake3") == b3(whole),
        }
        if not (back == whole and g.get("Metadata", {}).get("blake3") == b3(whole)):
            failures.append("multipart")

    step("multipart", multipart)

    # --- list / abort multipart ---
    def list_abort():
        key = prefix + "aborted.bin"
        uid = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=1, Body=b"x" * 1024)
        listed = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        need("list_multipart_uploads", any(u["UploadId"] == uid and u["Key"] == key for u in listed))
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid)
        after = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        need("abort_multipart_upload", not any(u["UploadId"] == uid for u in after))

    step("list_abort", list_abort)

    # --- auth is enforced ---
    def wrong_secret():
        bad = client(env, store, secret="definitely-not-the-secret")
        try:
            bad.list_objects_v2(Bucket=bucket, MaxKeys=1)
            need("wrong_secret_refused", False, "accepted")
        except ClientError as e:
            need("wrong_secret_refused", True, err_code(e))

    step("wrong_secret", wrong_secret)

    # Informational: how an unknown access key is refused (AWS: 403 InvalidAccessKeyId).
    def unknown_key():
        s = store.upper()
        other = boto3.client(
            "s3", endpoint_url=res["endpoint"], aws_access_key_id="agentry-unknown-key",
            aws_secret_access_key=env[f"AGENTRY_S3_{s}_SECRET_KEY"], region_name=env.get("AWS_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        try:
            other.list_objects_v2(Bucket=bucket, MaxKeys=1)
            res["unknown_access_key"] = "ACCEPTED"
        except ClientError as e:
            res["unknown_access_key"] = f"refused {err_code(e)}"

    step("unknown_key", unknown_key)

    # --- x-amz-checksum-* behaviour (informational) ---
    def checksums():
        info = {}
        body = b"checksum probe\n"
        crc32 = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        sha256 = base64.b64encode(hashlib.sha256(body).digest()).decode()
        for algo, value, arg in (("crc32", crc32, "ChecksumCRC32"), ("sha256", sha256, "ChecksumSHA256")):
            key = f"{prefix}checksum-{algo}.txt"
            entry = {}
            try:
                p = s3.put_object(Bucket=bucket, Key=key, Body=body, **{arg: value})
                entry["put"] = "accepted"
                entry["put_echo"] = p.get(arg) == value
                g = s3.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
                g["Body"].read()
                entry["get_returns"] = g.get(arg) == value
                h = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
                entry["head_returns"] = h.get(arg) == value
            except ClientError as e:
                entry["put"] = f"refused {err_code(e)}"
            try:
                wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode() if algo == "sha256" else \
                    base64.b64encode((zlib.crc32(b"other")).to_bytes(4, "big")).decode()
                s3.put_object(Bucket=bucket, Key=key + ".wrong", Body=body, **{arg: wrong})
                entry["wrong_value"] = "ACCEPTED"
            except ClientError as e:
                entry["wrong_value"] = f"refused {err_code(e)}"
            info[algo] = entry
        # The SDK-default path (boto3 >= 1.36: request_checksum_calculation=when_supported).
        default = boto3.client(
            "s3",
            endpoint_url=res["endpoint"],
            aws_access_key_id=env[f"AGENTRY_S3_{store.upper()}_ACCESS_KEY"],
            aws_secret_access_key=env[f"AGENTRY_S3_{store.upper()}_SECRET_KEY"],
            region_name=env.get("AWS_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        try:
            key = prefix + "sdk-default.txt"
            default.put_object(Bucket=bucket, Key=key, Body=body)
            g = default.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            ok = g["Body"].read() == body
            info["sdk_default_put"] = "ok" if ok else "BODY MISMATCH"
            info["sdk_default_get_crc32"] = g.get("ChecksumCRC32") is not None
        except ClientError as e:
            info["sdk_default_put"] = f"refused {err_code(e)}"
        # aws-chunked body with a trailing x-amz-checksum-crc32 (STREAMING-UNSIGNED-PAYLOAD-TRAILER):
        # what boto3 sends over https and the Rust SDK sends for streaming bodies. boto3 only does
        # it over TLS, so a before-call hook moves the checksum to the trailer here.
        def to_trailer(params, **_):
            alg = params.get("context", {}).get("checksum", {}).get("request_algorithm")
            if isinstance(alg, dict):
                alg["in"] = "trailer"

        default.meta.events.register("before-call.s3.PutObject", to_trailer)
        default.meta.events.register("before-call.s3.UploadPart", to_trailer)
        try:
            key = prefix + "aws-chunked.txt"
            default.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="CRC32")
            g = default.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            ok = g["Body"].read() == body
            info["aws_chunked_trailer_put"] = "ok" if ok else "BODY MISMATCH"
            info["aws_chunked_trailer_crc32_stored"] = g.get("ChecksumCRC32") == crc32
        except ClientError as e:
            info["aws_chunked_trailer_put"] = f"refused {err_code(e)}"
        res["checksums"] = info

    step("checksums", checksums)
    failures[:] = [f for f in failures if f not in ("checksums", "unknown_key")]  # informational only

    # --- clean up every version and delete marker under the prefix ---
    if not keep:
        try:
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
                for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    s3.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
            for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
                s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
            left = s3.list_object_versions(Bucket=bucket, Prefix=prefix)
            res["cleaned_up"] = not (left.get("Versions") or left.get("DeleteMarkers"))
        except Exception as e:  # noqa: BLE001
            res["cleaned_up"] = f"{type(e).__name__}: {e}"[:200]

    res["ok"] = not failures
    if failures:
        res["failed"] = failures
    return res


def main(argv):
    keep = "--keep" in argv
    wanted = [a for a in argv if not a.startswith("--")] or list(STORES)
    for w in wanted:
        if w not in STORES:
            sys.exit(f"usage: {sys.argv[0]} [primary] [secondary] [--keep]")
    env = store_env()
    ok = True
    for store in wanted:
        try:
            res = check_store(env, store, keep)
        except Exception as e:  # noqa: BLE001
            res = {"store": store, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        ok &= res["ok"]
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
