"""Servers the tests start on this machine: free ports for Ray's, and a local S3-protocol
server (moto) with the AWS_* variables that point pyarrow (storage, Ray Train, Tune, Ray Data)
and the jobs started meanwhile at it."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pyarrow.fs as pafs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(bucket: str) -> Iterator[tuple[dict[str, str], pafs.S3FileSystem]]:
    """The server's environment (also set in os.environ meanwhile) and a filesystem on it,
    with `bucket` created."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"],
                               allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield env, fs
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
