"""dashboard: the operators' web pages (GET) and actions (POST forms); IAM + DYLEN_DASHBOARD_OPERATORS."""

import flask
import functions_framework

from common.dashboard import app
from common.platform.http import cold_start

cold_start()


@functions_framework.http
def dashboard(request: flask.Request) -> flask.Response:
    return app.handle(request)
