"""Who may talk to the UI: a token off the local machine, and no changes from other sites.

On 127.0.0.1 the UI answers only requests addressed to a local host name (a page elsewhere
that points its own name at 127.0.0.1 gets nothing). On any other address every request needs
the token: in the `X-Stylelora-Token` header, as `?token=` (the printed address carries it; the
page then keeps it in a same-site cookie) or in that cookie. A request that changes anything
needs the token in the header or must come from the UI's own pages (same origin), so another
site open in the same browser cannot start, stop or delete a run.
"""

from __future__ import annotations

import hmac
import re
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = "x-stylelora-token"
COOKIE = "stylelora_token"
LOCAL_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
PORT = re.compile(r"(:[0-9]{1,5})?")


class Guard:
    def __init__(self, app: ASGIApp, token: str, local: bool) -> None:
        self.app, self.token, self.local = app, token, local

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            status, text = refusal
            await JSONResponse({"error": text}, status_code=status)(scope, receive, send)
            return
        query_token = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
        if query_token and self.valid(query_token):
            await self.app(scope, receive, self.setting_cookie(send))
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if self.local and hostname(host) not in LOCAL_NAMES:
            return 403, f"host {host!r} refused: this UI answers on 127.0.0.1 only"
        header_ok = self.valid(headers.get(HEADER, ""))
        if not self.local and not (header_ok or self.valid(self.presented(scope, headers))):
            return 401, "a token is needed: open the address stylelora ui printed"
        if scope["method"] not in SAFE_METHODS and not header_ok:
            origin = headers.get("origin")
            fetch_site = headers.get("sec-fetch-site")
            same = origin is not None and urlsplit(origin).netloc == host
            if not same and fetch_site != "same-origin":
                return 403, (
                    f"cross-origin request refused (origin {origin or 'none'}): changes come "
                    f"from the UI's own pages, or with the {HEADER} header"
                )
        return None

    def presented(self, scope: Scope, headers: dict[str, str]) -> str:
        query = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
        if query:
            return query
        cookie = SimpleCookie(headers.get("cookie", ""))
        return cookie[COOKIE].value if COOKIE in cookie else ""

    def valid(self, token: str) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self.token.encode())

    def setting_cookie(self, send: Send) -> Send:
        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message.setdefault("headers", []).append((b"set-cookie", cookie.encode()))
            await send(message)

        return wrapped


def hostname(host: str) -> str:
    """'127.0.0.1:7870' -> '127.0.0.1'; '[::1]:7870' -> '[::1]'; anything after the name but a
    port number keeps the whole header (`[::1]evil.example` is no local name)."""
    if host.startswith("["):
        name, bracket, rest = host.partition("]")
        name += bracket
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
        rest = f":{port}"
    else:
        name, rest = host, ""
    return name if PORT.fullmatch(rest) else host
