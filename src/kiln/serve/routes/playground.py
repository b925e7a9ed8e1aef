"""GET /: the playground page (one static HTML file that talks to the API below it)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def playground():
    return HTMLResponse((resources.files("kiln.serve") / "static" / "index.html").read_text(encoding="utf-8"))


@router.get("/favicon.ico")
async def favicon():
    return Response(status_code=204)  # browsers ask for one; a 404 would only clutter their console
