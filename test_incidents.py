"""Tests for incidents.py: the spec of the HTTP API, its storage and its behaviour under load."""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from werkzeug.datastructures import MultiDict

import incidents

HERE = Path(__file__).resolve().parent
TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "incidents.db"


@pytest.fixture
def app(db_path):
    return incidents.create_app({"DATABASE": str(db_path), "TESTING": True})


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


def test_create_names_server_fields_as_server_set(client):
    response = client.post("/incidents", json={"description": "x", "source": "operator", "updated_at": "x"})
    assert "set by the server" in response.json["errors"][0]["message"]


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


def test_create_rejects_body_over_64_kib_with_413(client, db_path):
    body = json.dumps({"description": "x" * (64 * 1024), "source": "operator"})
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
                                  "/incidents/99999999999999999999999", "/nowhere"])
def test_get_unknown_incident_or_route_is_404_problem(client, path):
    assert_problem(client.get(path), 404)


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
        ("limit=10&limit=20", "limit"),
        ("since=yesterday", "since"),
        ("since=2026-13-01T00:00:00Z", "since"),
        ("since=2026-01-01T25:00:00Z", "since"),
        ("since=9999-12-31T23:59:59.9999Z", "since"),
        ("until=2026-01-01T00:00:00+25:00", "until"),
        ("until=1700000000", "until"),
        ("since=2026-01-02&until=2026-01-01", "until"),
        ("cursor=garbage", "cursor"),
        ("cursor=WyJ4IiwgIjEiXQ", "cursor"),
        ("cursor=WzFd", "cursor"),
        ("cursor=%FF%FE", "cursor"),
    ],
)
def test_list_rejects_bad_query_parameters_with_422(client, params, field):
    create(client)
    assert field in error_fields(client.get(f"/incidents?{params}"))


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
    event = events(client, incident["id"])["items"][-1]
    assert event == {"id": event["id"], "at": updated["updated_at"], "type": "status_changed",
                     "from_status": "new", "to_status": "in_progress", "note": "Выехал техник", "actor": "ivan"}


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


@pytest.mark.parametrize("params", ["limit=0", "limit=x", "cursor=bad", "cursor=WyJhIl0", "status=new"])
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
def token_client(db_path):
    return incidents.create_app({"DATABASE": str(db_path), "TESTING": True, "API_TOKEN": "s3cret"}).test_client()


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


def test_migration_of_version_1_file_keeps_incidents_and_fills_new_fields(db_path, monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(incidents, "MIGRATIONS", incidents.MIGRATIONS[:1])
        incidents.create_app({"DATABASE": str(db_path)})
    insert_rows(db_path, [("Старый инцидент", "resolved", "partner", "2025-05-01T08:00:00.000Z"),
                          ("Open one", "new", "operator", "2025-05-02T08:00:00.000Z")])
    assert query(db_path, "PRAGMA user_version") == [(1,)]
    client = incidents.create_app({"DATABASE": str(db_path), "TESTING": True}).test_client()
    assert query(db_path, "PRAGMA user_version") == [(len(incidents.MIGRATIONS),)]
    first = client.get("/incidents/1").json
    assert first == {"id": 1, "description": "Старый инцидент", "status": "resolved", "source": "partner",
                     "dedup_key": None, "occurrences": 1, "last_seen_at": "2025-05-01T08:00:00.000Z",
                     "created_at": "2025-05-01T08:00:00.000Z", "updated_at": "2025-05-01T08:00:00.000Z"}
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
    with pytest.raises(RuntimeError, match="newer"):
        incidents.create_app({"DATABASE": str(db_path), "TESTING": True})


# ---------------------------------------------------------------------------
# Real server processes: restarts, concurrency, kill -9
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(db_path, log_path=None):
    """`flask --app incidents run` on a free port, as a user would start it; yields (url, process)."""
    port = free_port()
    log = open(log_path or f"{db_path}.{port}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "incidents", "run", "--port", str(port), "--no-reload"],
        cwd=HERE, env={**os.environ, "INCIDENTS_DB": str(db_path)}, stdout=log, stderr=log,
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
                time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)
        log.close()


def post(url, description):
    request = urllib.request.Request(
        url + "/incidents", data=json.dumps({"description": description, "source": "monitoring"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


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


def test_sigkill_mid_load_loses_no_acknowledged_incident(db_path):
    acknowledged, stop = [], threading.Event()

    def writer(url, name):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                status, incident = post(url, f"{name}-{i}")
            except OSError:
                return
            if status == 201:
                acknowledged.append((incident["id"], incident["description"]))

    with server(db_path) as (url, process):
        threads = [threading.Thread(target=writer, args=(url, f"w{t}")) for t in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.8)
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        stop.set()
        for thread in threads:
            thread.join()
    assert len(acknowledged) > 50
    stored = dict(query(db_path, "SELECT id, description FROM incidents"))
    assert [pair for pair in acknowledged if stored.get(pair[0]) != pair[1]] == []
