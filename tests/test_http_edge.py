"""common.platform.http's responses, through a real WSGI call (Werkzeug's test client)."""

from __future__ import annotations

import json

import flask

from common.platform.errors import ValidationFailed
from common.platform.http import json_response, problem_response


def _served(response: flask.Response) -> flask.testing.FlaskClient:
    app = flask.Flask(__name__)
    app.add_url_rule("/", "r", lambda: response)
    return app.test_client()


def test_an_ascii_location_goes_out_as_built_and_stays_on_the_response() -> None:
    location = "https://jobs.example.com/get_job/6f1c2e0a-0000-4000-8000-000000000001?x=%C3%A9"
    response = json_response({"ok": True}, 202, {"Location": location})
    answer = _served(response).get("/")
    assert answer.status_code == 202
    assert answer.headers["Location"] == location
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.get_json() == {"ok": True}
    assert response.headers.getlist("Location") == [location]


def test_a_non_ascii_location_is_still_encoded_by_werkzeug() -> None:
    response = json_response({}, 201, {"Location": "https://bücher.example/élève"})
    assert _served(response).get("/").headers["Location"] == "https://xn--bcher-kva.example/%C3%A9l%C3%A8ve"


def test_a_problem_echoing_text_utf8_cannot_encode_is_still_problem_json() -> None:
    # e.g. google-auth's "wrong audience <aud claim>" with a lone surrogate in the claim
    error = ValidationFailed("Token audience \ud800 is wrong", errors=[{"field": "x\udfff", "message": "m"}])
    answer = _served(problem_response(error)).get("/")
    assert answer.status_code == 422
    assert answer.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(answer.data.decode("utf-8"))
    assert problem["detail"] == "Token audience \\ud800 is wrong"
    assert problem["errors"] == [{"field": "x\\udfff", "message": "m"}]
