"""`python -m tui.screenshot`: save an SVG of the dashboard's cluster screen (docs/dashboard.svg).

Runs the app headless against a real head for a few polls (so the tokens/s sparkline
has some history), then exports the screen exactly as Textual draws it. Used to
refresh the screenshot in the README:

    anyway up --no-tui --workers 3 --port 18080 &
    python -m tui.screenshot --url http://127.0.0.1:18080 --out docs/dashboard.svg
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from textual.pilot import Pilot

from .app import AnywayApp
from .source import HttpSource


def take(*, url: str, api_key: str | None, out: Path, size: tuple[int, int], seconds: float) -> Path:
    """Run the dashboard for `seconds`, write the cluster screen's SVG to `out`."""
    app = AnywayApp(source=HttpSource(url=url, api_key=api_key), refresh_s=0.5)
    svg: list[str] = []

    async def auto_pilot(pilot: Pilot[object]) -> None:
        await pilot.pause(seconds)
        await pilot.wait_for_scheduled_animations()
        svg.append(app.export_screenshot(title="anyway tui"))
        app.exit(0)

    app.run(headless=True, size=size, auto_pilot=auto_pilot)
    if not svg:
        raise SystemExit("no screenshot taken")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(svg[0], encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tui.screenshot", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--out", type=Path, default=Path("docs/dashboard.svg"))
    p.add_argument("--size", default="100x30", help="terminal size, COLSxROWS")
    p.add_argument("--seconds", type=float, default=8.0, help="how long to poll before the shot")
    args = p.parse_args(argv)
    cols, rows = (int(x) for x in args.size.lower().split("x"))
    path = take(url=args.url, api_key=os.environ.get("ANYWAY_API_KEY") or None, out=args.out, size=(cols, rows), seconds=args.seconds)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
