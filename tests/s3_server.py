"""A real S3-protocol server on loopback for tests: moto's standalone server (werkzeug over
HTTP), not a patch of the client. boto3 talks to it exactly as it talks to S3, R2 or MinIO.

Reusable outside pytest fixtures (the crash test starts one for processes it spawns):

    server = start_s3_server()
    bucket = server.make_bucket()
    settings = load_settings(**server.settings_for(bucket))
    ...
    server.stop()
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

ACCESS_KEY_ID = "auraserve-test"
SECRET_ACCESS_KEY = "auraserve-test-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    _server: Any

    def client(self) -> Any:
        """A plain boto3 client on the server, for checks made behind auraserve's back."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """A new, empty bucket (a fresh random name unless given)."""
        bucket = name or f"auraserve-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def make_public(self, bucket: str) -> None:
        """Let anyone read the bucket's objects (a bucket policy), as a bucket behind a CDN or
        a public R2 bucket is read: plain URLs, no signature."""
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{bucket}/*",
                }
            ],
        }
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def settings_for(self, bucket: str, prefix: str = "media") -> dict[str, Any]:
        """Settings overrides (load_settings keywords) that put media in `bucket/prefix`."""
        return {
            "media_url": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            "s3_endpoint_url": self.endpoint,
            "s3_region": REGION,
            "s3_access_key_id": ACCESS_KEY_ID,
            "s3_secret_access_key": SECRET_ACCESS_KEY,
        }

    def environment_for(self, bucket: str, prefix: str = "media") -> dict[str, str]:
        """The same as AURASERVE_* environment variables, for subprocesses."""
        return {
            f"AURASERVE_{k.upper()}": str(v) for k, v in self.settings_for(bucket, prefix).items()
        }

    def stop(self) -> None:
        self._server.stop()


def start_s3_server() -> S3Server:
    """Start moto's server in a thread of this process, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(endpoint=f"http://{host}:{port}", _server=server)
