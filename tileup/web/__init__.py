"""``tileup ui``: a local web page and HTTP API over the engine, on the standard library only.

Modules, one job each: ``config`` (the server's frozen settings), ``catalog`` (the models a
client may name, from the configured folders only), ``validation`` (client JSON → checked
UpscaleSettings, the same SettingsError the CLI gets), ``multipart`` (upload bodies),
``engines`` (engines cached by what needs a reload; planning engines that never load a
checkpoint), ``plan`` (tile grid, seam-fix regions, counts, memory plan, estimate: from the
pipeline's own geometry), ``preview`` (cheap previews), ``jobs`` (the queue behind the one GPU
and its worker thread), ``presets``, ``server`` (routes, auth, limits) and ``static/`` (the page).

Place in the layout: a front end beside ``cli.py`` and ``batch.py``, above the pipeline (it
builds UpscaleSettings / GenerateSettings from client JSON and hands them to engines, as the CLI
does from arguments). The settings stop at the pipeline going down: no stage below it (modes,
vae, sampling, upscalers, ...) imports them, and only ``cli.py`` (``tileup ui``) imports this
package.
"""

from __future__ import annotations

from tileup.web.config import ServerConfig
from tileup.web.server import WebApp, make_server, serve

__all__ = ["ServerConfig", "WebApp", "make_server", "serve"]
