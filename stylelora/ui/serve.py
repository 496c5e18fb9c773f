"""Start the UI's server and print where it is."""

from __future__ import annotations

import secrets
from pathlib import Path

from stylelora.errors import UserError
from stylelora.ui.security import LOCAL_NAMES


def serve(host: str, port: int, roots: list[Path], data: Path | None, token: str | None) -> None:
    try:
        import uvicorn

        from stylelora.ui.app import create_app
    except ImportError as exc:
        raise UserError(
            f"the UI needs its extra ({exc.name} is missing): pip install 'stylelora[ui]'"
        ) from None
    local = host in LOCAL_NAMES
    token = token or secrets.token_urlsafe(24)
    app = create_app(roots, data, token=token, local=local)
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/" + ("" if local else f"?token={token}")
    print(f"stylelora ui: open {address}", flush=True)
    if not local:
        print(f"  token: {token} (every request needs it off 127.0.0.1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
