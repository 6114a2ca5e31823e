"""The `make run` gateway's pages: `/` (the functions and where the docs are) and `/docs` (Swagger UI).

Swagger UI's files come from the `flask-swagger-ui` wheel (requirements-dev.txt), which ships the
upstream `swagger-ui-dist` build as package data: nothing is fetched from a CDN, so the docs work
offline. Only the files that wheel ships under `dist/` are served, by exact name.

The spec is `openapi.yaml` with one change: its `servers` entry is replaced by the gateway the page
was loaded from (the request's own `Host`), so "Try it out" calls this gateway on the same origin
whatever `DYLEN_DEV_PORT` is. Dev auth (`X-Dylen-User`, the spec's `devUser` scheme) is prefilled.
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi.yaml"
DEV_USER = "demo"
SPEC_URL = "/docs/openapi.json"

# Assets by exact name (no path from the request ever reaches the file system).
_ASSET_TYPES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
# A Host header we echo into the spec: a name or address and an optional port, nothing else.
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

MISSING_ASSETS = (
    "Swagger UI's files are missing: install the development requirements "
    "(`make run` does: .venv/bin/python -m pip install -r requirements-dev.txt).\n"
)


def asset(name: str) -> tuple[bytes, str] | None:
    """A Swagger UI file by name, with its content type; None for anything else or when absent."""
    content_type = _ASSET_TYPES.get(name)
    if content_type is None:
        return None
    try:
        data = (resources.files("flask_swagger_ui") / "dist" / name).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return data, content_type


def assets_available() -> bool:
    return asset("swagger-ui-bundle.js") is not None


def gateway_origin(host_header: str | None, fallback: str) -> str:
    """The origin a browser used to reach the gateway, from its Host header when that looks sane."""
    if host_header and _HOST.match(host_header):
        return f"http://{host_header}"
    return fallback


def spec_json(origin: str) -> bytes:
    """openapi.yaml as JSON, its servers pointing at this gateway."""
    import yaml

    spec = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    spec["servers"] = [{"url": origin, "description": "this `make run` gateway (dev auth)"}]
    return json.dumps(spec, default=str).encode()


def docs_html() -> bytes:
    config = {
        "url": SPEC_URL,
        "dom_id": "#swagger-ui",
        "deepLinking": True,
        "tryItOutEnabled": True,
        "displayRequestDuration": True,
    }
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>dylen-jobs API (make run)</title>
  <link rel="stylesheet" type="text/css" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="/docs/favicon-16x16.png" sizes="16x16">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    const config = {json.dumps(config)};
    config.presets = [SwaggerUIBundle.presets.apis];
    config.layout = "BaseLayout";
    // Dev auth: the gateway's functions trust any X-Dylen-User (DYLEN_AUTH_MODE=dev).
    config.onComplete = () => window.ui.preauthorizeApiKey("devUser", {json.dumps(DEV_USER)});
    window.ui = SwaggerUIBundle(config);
  </script>
</body>
</html>
"""
    return page.encode()


def index_html(functions: dict[str, int], origin: str) -> bytes:
    rows = "\n".join(
        f"    <li><code>{html.escape(origin)}/{html.escape(name)}</code>"
        f" (direct: <code>http://127.0.0.1:{port}/</code>)</li>"
        for name, port in functions.items()
    )
    docs = (
        '<p><a href="/docs">API docs (Swagger UI)</a>: try every user function in the browser, '
        f"signed in as <code>{DEV_USER}</code> through dev auth.</p>"
        if assets_available()
        else f"<p>API docs unavailable: {html.escape(MISSING_ASSETS)}</p>"
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="UTF-8"><title>dylen-jobs (make run)</title></head>
<body>
  <h1>dylen-jobs, running locally</h1>
  {docs}
  <p>The spec: <a href="{SPEC_URL}">{SPEC_URL}</a> (openapi.yaml, servers set to this gateway).</p>
  <p>Functions (dev auth: send any <code>X-Dylen-User: &lt;uid&gt;</code>):</p>
  <ul>
{rows}
  </ul>
</body>
</html>
"""
    return page.encode()
