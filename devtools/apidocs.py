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


# What each function answers, for the landing page (the README's "The API at a glance").
PURPOSES = {
    "create_job": "POST a lesson job (202, then it runs)",
    "get_job": "GET /<job_id>: status, progress, result",
    "cancel_job": "POST /<job_id>: cancel a queued or running job",
    "get_lesson": "GET /<lesson_id>: a written lesson",
    "list_lessons": "GET: the caller's lessons, newest first",
    "process_job": "runs one job (Cloud Tasks' target; task auth)",
    "rescue_jobs": "re-dispatches stuck jobs (Cloud Scheduler; task auth)",
    "archive_lessons": "archives lessons over each tier's history (daily; task auth)",
    "dashboard": "the operators' pages",
}

_LANDING_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #111827; background: #f9fafb; }
header { background: #111827; color: #fff; padding: 1.6em 2em 1.4em; }
header h1 { margin: 0 0 .2em; font-size: 1.6em; }
header p { margin: 0; color: #cbd5e1; }
main { max-width: 1080px; padding: 1.5em 2em 3em; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; margin-bottom: 1.8em; }
.card { display: block; background: #fff; border: 1px solid #e5e7eb; border-radius: 10px; padding: 1em 1.2em; color: inherit; text-decoration: none; }
a.card:hover { border-color: #2563eb; box-shadow: 0 1px 6px rgba(37, 99, 235, .15); }
.card h2 { margin: 0 0 .3em; font-size: 1.1em; color: #2563eb; }
.card p { margin: 0; color: #4b5563; font-size: .95em; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #e5e7eb; border-radius: 10px; }
th, td { text-align: left; padding: .45em .8em; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
th { background: #f3f4f6; font-size: .9em; color: #374151; }
code { font: 13px ui-monospace, Menlo, Consolas, monospace; }
.muted { color: #6b7280; }
.note { margin-top: 1.5em; padding: .8em 1em; border-left: 4px solid #f59e0b; background: #fffbeb; }
"""


def index_html(functions: dict[str, int], origin: str, *, auth: str = "dev", generator: str = "") -> bytes:
    """The landing page at `/`: the docs, the dashboard, and every function with its URLs."""
    o = html.escape(origin)
    rows = "\n".join(
        f"<tr><td><b>{html.escape(name)}</b><br><span class='muted'>{html.escape(PURPOSES.get(name, ''))}</span></td>"
        f"<td><code>{o}/{html.escape(name)}{'/' if name == 'dashboard' else ''}</code></td>"
        f"<td><code>http://127.0.0.1:{port}/</code></td></tr>"
        for name, port in functions.items()
    )
    docs = (
        '<a class="card" href="/docs"><h2>API docs &rarr;</h2><p>Swagger UI for openapi.yaml: try every user '
        f"function in the browser, signed in as <code>{DEV_USER}</code> through dev auth.</p></a>"
        if assets_available()
        else f'<div class="card"><h2>API docs</h2><p>Unavailable: {html.escape(MISSING_ASSETS)}</p></div>'
    )
    dashboard = (
        '<a class="card" href="/dashboard/"><h2>Operator dashboard &rarr;</h2><p>Jobs, the queue, failures '
        "and retries, users and their tiers; it updates itself.</p></a>"
        if "dashboard" in functions
        else ""
    )
    who = (
        "Dev auth: any <code>X-Dylen-User: &lt;uid&gt;</code> is trusted, and you are the operator "
        "<code>dev-operator@localhost</code>."
        if auth == "dev"
        else "Firebase auth: send <code>Authorization: Bearer &lt;Firebase ID token&gt;</code>; the dashboard "
        "wants a Google ID token of an e-mail on <code>DYLEN_DASHBOARD_OPERATORS</code>."
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="UTF-8"><title>dylen-jobs (make run)</title><style>{_LANDING_STYLE}</style></head>
<body>
<header><h1>dylen-jobs, running locally</h1><p>{who}</p></header>
<main>
<div class="cards">
  {docs}
  {dashboard}
  <a class="card" href="{SPEC_URL}"><h2>The spec &rarr;</h2><p>openapi.yaml as JSON, its servers set to this
  gateway.</p></a>
</div>
<h2>Functions</h2>
<table>
<thead><tr><th>function</th><th>through this gateway</th><th>direct (loopback only)</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="note">Lesson generator: <code>{html.escape(generator or "the built-in template")}</code>. To make failures
and watch a retry, start with <code>DYLEN_LESSON_GENERATOR=devtools.generators:fanout make run</code> and
create a lesson whose topic starts <code>fail3-section:1</code> (the README's "Make a failure and watch
it").</p>
</main>
</body>
</html>
"""
    return page.encode()
