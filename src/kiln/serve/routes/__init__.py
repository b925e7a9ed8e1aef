"""The routes of `kiln serve`, one module per group; create_app includes their routers in this order."""

from __future__ import annotations

from kiln.serve.routes import audio, chat, classify, completions, models, playground

ROUTERS = [playground.router, models.router, completions.router, chat.router, classify.router, audio.router]
