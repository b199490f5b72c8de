"""Benchmark (not a test): bulk-segment the same X-rays from local disk and from S3, side by side.

Copies the packaged sample under new ids up to ``--images`` files, into a local folder and into
a bucket on a loopback S3 endpoint (moto's server, in this process), then runs the segment job on
each in alternation, ``--rounds`` times, and prints images/s and the S3 / local ratio.

    python tests/benchmarks/segment_s3_vs_local.py --images 1000 --rounds 2

moto is a Python server sharing this machine's cores: the ratio bounds what a real object store
costs the pipeline from above, it does not measure S3 itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.update(
    AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
)

import boto3
import ray
from moto.server import ThreadedMotoServer

from lungseg.core.config import SAMPLE, SegmentConfig
from lungseg.jobs.segment import run_segmentation
from lungseg.model.unet import build_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help=".keras model (default: untrained U-Net)")
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="lungseg-bench-"))
    try:
        sources = sorted(Path(SAMPLE, "images").glob("*.png"))
        (work / "images").mkdir()
        copies = [(sources[i % len(sources)], f"x{i:06d}.png") for i in range(args.images)]
        for source, name in copies:
            shutil.copy(source, work / "images" / name)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda c: client.upload_file(str(c[0]), "bench", f"in/{c[1]}"), copies))
        model = args.model or str(work / "model.keras")
        if args.model is None:
            build_unet().save(model)

        ray.init(include_dashboard=False, log_to_driver=False)
        inputs = {"local": str(work / "images"), "s3": "s3://bench/in"}
        rates: dict[str, list[float]] = {"local": [], "s3": []}
        for round_ in range(args.rounds):
            for name, uri in inputs.items():
                output = str(work / f"out-{name}") if name == "local" else "s3://bench/out"
                started = time.perf_counter()
                result = run_segmentation(
                    SegmentConfig(model=model, input=uri, output=output, s3_endpoint=endpoint)
                )
                seconds = time.perf_counter() - started
                assert result.images == args.images and result.failed == 0, result
                rates[name].append(args.images / seconds)
                rate = rates[name][-1]
                print(f"round {round_ + 1} {name:5s}: {seconds:6.1f} s, {rate:5.1f} img/s")
        local, s3 = max(rates["local"]), max(rates["s3"])
        print(f"best of {args.rounds}: local {local:.1f} img/s, s3 {s3:.1f} img/s")
        print(f"ratio s3/local: {s3 / local:.2f}")
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
