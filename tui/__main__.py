"""`python -m tui [--url URL]`: the dashboard without the `anyway` CLI (same as `anyway tui`).
Keys from the environment only (ANYWAY_API_KEY, ANYWAY_ADMIN_KEY): never on a command line."""

from __future__ import annotations

import argparse
import os
import sys

from .app import run_dashboard


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tui", description="Anyway's terminal dashboard")
    p.add_argument("--url", default=os.environ.get("ANYWAY_URL", "http://127.0.0.1:8080"), help="the head's API")
    args = p.parse_args(argv)
    return run_dashboard(url=args.url, api_key=os.environ.get("ANYWAY_API_KEY") or None,
                         admin_key=os.environ.get("ANYWAY_ADMIN_KEY") or None)


if __name__ == "__main__":
    sys.exit(main())
