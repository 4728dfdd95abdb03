"""`python -m tui [--url URL] [--api-key KEY]`: the dashboard without the `anyway` CLI (same as `anyway tui`)."""

from __future__ import annotations

import argparse
import os
import sys

from .app import run_dashboard


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tui", description="Anyway's terminal dashboard")
    p.add_argument("--url", default=os.environ.get("ANYWAY_URL", "http://127.0.0.1:8080"), help="the head's API")
    p.add_argument("--api-key", default=os.environ.get("ANYWAY_API_KEY"))
    args = p.parse_args(argv)
    return run_dashboard(url=args.url, api_key=args.api_key)


if __name__ == "__main__":
    sys.exit(main())
