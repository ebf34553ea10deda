"""`spell serve` without the embedded worker (diagnostic variant for bench/cast_latency.py).

The same create_app(Settings()) as `spell serve`, with Overrides(run_worker=False): casts are
accepted (validated, reserved, written with their outbox row) but never relayed or run, so the
cast API is measured without the background sandbox runs competing for the 2 CPUs.

Usage: python bench/_serve_noworker.py --port P   (configured by the same environment variables)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web

from app.config import Settings
from app.observability.logging import configure_logging
from app.web.app import Overrides, create_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.log_level)
    app = create_app(settings, overrides=Overrides(run_worker=False))
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
