"""`python -m console`: serve the console on CONSOLE_PORT (8501) at CONSOLE_ADDRESS
(127.0.0.1), over the gateway at LORAPLEX_URL (http://127.0.0.1:8080)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def command(port: int, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        f"--server.port={port}",
        f"--server.address={address}",
        "--server.headless=true",  # no browser to open, no e-mail prompt
        "--server.fileWatcherType=none",  # no reloading in production
        "--browser.gatherUsageStats=false",
        "--client.showErrorDetails=type",  # a bug shows its type, never a trace or its data
        "--client.toolbarMode=minimal",
    ]


def main() -> None:
    port = int(os.environ.get("CONSOLE_PORT", "8501"))
    address = os.environ.get("CONSOLE_ADDRESS", "127.0.0.1")
    args = command(port, address)
    os.execv(args[0], args)  # streamlit handles SIGTERM itself


if __name__ == "__main__":
    main()
