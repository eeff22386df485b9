"""`kiln review`: a local web server whose page shows a label output's rows, the ones the model is
least sure of first, and saves each decision a person makes as it is made
(kiln.pipelines.review). `--export FILE` writes the final labels instead.

The page (page.html) and any script use the same HTTP API:
- GET  /api/rows?offset=&limit=&predicted=&source=&unreviewed=0: rows in review order (by
  default only those not yet reviewed), with the classes, the sources and the progress;
- GET  /api/thumbs?i=3,4,5: the rows' images, read again from their sources, as data: URIs;
- POST /api/decide {"i": row, "action": "accept"|"correct"|"undo", "label": ...}: one
  decision, saved before the answer;
- GET  /api/progress."""

from __future__ import annotations

import asyncio
import errno
import getpass
import json
import socket
import threading
from importlib import resources

from rich.console import Console

from kiln.options import ReviewOptions
from kiln.pipelines.review import Review, export
from kiln.pipelines.thumbnails import fetch_thumbnails

MAX_PAGE = 200  # rows a request may ask for


def run_review(opts: ReviewOptions, console: Console | None = None) -> dict:
    console = console or Console(highlight=False)
    review = Review(opts.labels, opts.model)
    if opts.export:
        n = export(review, opts.export)
        console.print(f"[bold green]done[/]: {n:,} final labels ({review.progress()['reviewed']:,}"
                      f" reviewed) -> {opts.export}")
        return {"rows": n, "export": opts.export}
    reviewer = opts.reviewer or _user()
    asyncio.run(serve(review, opts.host, opts.port, reviewer, console))
    return review.progress()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


def make_app(review: Review, reviewer: str, hosts: set[str] | None = None):
    """The aiohttp application over one Review. Its methods read and write files, so they run
    in threads, one at a time (a lock), off the event loop; thumbnails, which read the
    sources, without it. `hosts`: the Host header values it answers (guard)."""
    from aiohttp import web

    lock = threading.Lock()
    page = resources.files("kiln.review").joinpath("page.html").read_text(encoding="utf-8")

    async def locked(fn, *args):
        def run():
            with lock:
                return fn(*args)
        return await asyncio.to_thread(run)

    def rows(q) -> dict:
        review.read_decisions()  # another reviewer's decisions too
        predicted, source = q.get("predicted") or None, q.get("source") or None
        unreviewed = q.get("unreviewed", "1") != "0"  # by default, what is left
        offset = max(0, _int(q.get("offset"), 0))
        limit = min(MAX_PAGE, max(1, _int(q.get("limit"), 24)))
        picked = [i for i, r in enumerate(review.rows)
                  if (predicted is None or r["label"] == predicted)
                  and (source is None or r["source"] == source)
                  and not (unreviewed and (r["source"], r["path"]) in review.decisions)]
        return {"rows": [_row(review, i) for i in picked[offset:offset + limit]],
                "total": len(picked), "offset": offset, "classes": review.classes,
                "sources": sorted({r["source"] for r in review.rows}),
                "progress": review.progress(), "reviewer": reviewer,
                "has_truth": review.has_truth}

    def thumbs(ids: list[int]) -> dict:
        keys = {i: (review.rows[i]["source"], review.rows[i]["path"]) for i in ids
                if 0 <= i < len(review.rows)}
        found = fetch_thumbnails(list(keys.values()))
        return {str(i): found.get(k) for i, k in keys.items()}

    def decide(body: dict) -> dict:
        i = _int(body.get("i"), -1)
        review.decide(i, body.get("action"), body.get("label"), reviewer)
        return {"row": _row(review, i), "progress": review.progress()}

    def progress() -> dict:
        review.read_decisions()  # another reviewer's decisions too
        return review.progress()

    async def index(_request):
        return web.Response(text=page, content_type="text/html")

    async def api_rows(request):
        return web.json_response(await locked(rows, request.query))

    async def api_thumbs(request):
        ids = [_int(x, -1) for x in request.query.get("i", "").split(",")[:MAX_PAGE] if x]
        return web.json_response(await asyncio.to_thread(thumbs, ids))  # rows never change

    async def api_decide(request):
        if request.content_type != "application/json":  # a form or a no-cors fetch cannot
            return web.json_response({"error": "a decision is posted as application/json"},
                                     status=415)  # send JSON without asking first (CORS)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "the body is not JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "the body is not a JSON object"}, status=400)
        try:
            return web.json_response(await locked(decide, body))
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)

    async def api_progress(_request):
        return web.json_response(await locked(progress))

    app = web.Application(client_max_size=1 << 16, middlewares=[guard(hosts)])
    app.add_routes([web.get("/", index), web.get("/api/rows", api_rows),
                    web.get("/api/thumbs", api_thumbs), web.post("/api/decide", api_decide),
                    web.get("/api/progress", api_progress)])
    return app


def guard(hosts: set[str] | None):
    """Middleware: answers only requests addressed to this server by a name it was given
    (`hosts`: a web page that rebinds its own name to 127.0.0.1 is refused), from its own
    page or no page (an Origin header, where sent, is this server's), never in a frame; a
    storage error is a JSON answer naming it, as every other error is."""
    from aiohttp import web

    from kiln.pipelines.storage import StorageError

    @web.middleware
    async def check(request, handler):
        if hosts is not None and request.host not in hosts:
            return web.json_response({"error": "unknown Host"}, status=403)
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return web.json_response({"error": "another site's page"}, status=403)
        try:
            response = await handler(request)
        except StorageError as e:
            response = web.json_response({"error": str(e)}, status=503)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        return response

    return check


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host header values a browser sends for this server: the address it was given, and
    this machine's own names where it listens on this machine alone."""
    names = {host, f"[{host}]" if ":" in host else host}
    if host in ("127.0.0.1", "localhost", "::1"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return {f"{n}:{port}" for n in names}


def _int(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _row(review: Review, i: int) -> dict:
    r = review.rows[i]
    d = review.decisions.get((r["source"], r["path"]))
    return {"i": i, "source": r["source"], "path": r["path"], "label": r["label"],
            "confidence": r["confidence"], "top_labels": r["top_labels"],
            "top_scores": r["top_scores"], "truth": r.get("truth"),
            "review": None if d is None else {"label": d.label, "action": d.action,
                                              "reviewer": d.reviewer}}


async def serve(review: Review, host: str, port: int, reviewer: str, console: Console) -> None:
    """Serves until interrupted; prints the address (the port chosen, with --port 0)."""
    from aiohttp import web

    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is 0 to 65535 (0 picks a free one)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use: pass --port another (0 "
                             "picks a free one)") from None
        raise ValueError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    bound = sock.getsockname()[1]
    hosts = None if host in ("0.0.0.0", "::") else allowed_hosts(host, bound)
    runner = web.AppRunner(make_app(review, reviewer, hosts), access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        shown = f"[{host}]" if ":" in host else host
        p = review.progress()
        console.print(f"review: http://{shown}:{bound}/  ({p['rows']:,} rows, "
                      f"{p['reviewed']:,} reviewed; each decision is saved as it is made; "
                      "Ctrl-C stops)", soft_wrap=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        sock.close()
