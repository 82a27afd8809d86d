"""`loraforge webui [--host 127.0.0.1] [--port 7860] [--password ...]`."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket

from ..errors import ConfigError

PASSWORD_ENV = "LORAFORGE_WEBUI_PASSWORD"


def is_loopback(host: str) -> bool:
    """True when only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def check_exposure(host: str, password: str | None) -> str | None:
    """Refuse to serve another address without a password; return the note to print when serving one."""
    if is_loopback(host):
        return None
    if not password:
        raise ConfigError([
            f"--host {host} makes the web UI (which runs training and reads files) reachable from other machines; "
            f"it needs a password: pass --password or set {PASSWORD_ENV}, or keep the default --host 127.0.0.1"])
    return (f"the web UI is reachable on {host}; every request needs the password (any user name). "
            "Traffic is not encrypted: put it behind HTTPS or an SSH tunnel on untrusted networks")


def cmd_webui(args: argparse.Namespace) -> int:
    password = args.password or os.environ.get(PASSWORD_ENV) or None
    note = check_exposure(args.host, password)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as err:
        raise ConfigError([f"the web UI needs {err.name}: pip install 'loraforge[webui]'"]) from None
    app = create_app(os.getcwd(), state_dir=args.state_dir, password=password)
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"loraforge web UI: http://{shown}:{args.port}  (jobs in {app.state.ui.state_dir}; Ctrl-C stops the UI, "
          "not the training jobs)", flush=True)
    if note:
        print(f"note: {note}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "webui", help="Open the whole workflow (data, train, evaluate, chat, export) in a browser.",
        description="Serve the loraforge web UI. It binds 127.0.0.1 (this machine only) unless --host says "
        f"otherwise; any other address needs a password (--password or {PASSWORD_ENV}). Training runs as its "
        "own process: closing the page or stopping the UI does not stop it, and the page reattaches to it.")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1; 0.0.0.0 exposes it "
                   "to the network and needs a password).")
    p.add_argument("--port", type=int, default=7860, help="Port (default 7860).")
    p.add_argument("--password", default=None, help=f"Password for every request (default: ${PASSWORD_ENV}).")
    p.add_argument("--state-dir", default=None, help="Where job folders are kept (default: .loraforge-webui in "
                   "the current folder).")
    p.set_defaults(func=cmd_webui)
