"""incidents: an HTTP API where operators and monitoring report problems.

One Flask module over one SQLite file. Run it with

    flask --app incidents run

The database file is created, or migrated to the current schema, when the app starts.

Environment:
    INCIDENTS_DB          path of the SQLite file (default: incidents.db in the working directory)
    INCIDENTS_API_TOKEN   when set, every route but /health needs "Authorization: Bearer <token>"
"""
import base64
import hmac
import json
import os
import queue
import re
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

STATUSES = ("new", "in_progress", "resolved", "closed")
SOURCES = ("operator", "monitoring", "partner")
DEFAULT_STATUS = "new"
DESCRIPTION_MAX = 10_000
PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 200
MAX_BODY_BYTES = 64 * 1024
MAX_ID = 2**63 - 1  # SQLite's largest INTEGER; larger ids cannot exist
BUSY_TIMEOUT_S = 5.0
IDLE_CONNECTIONS = 16
LIST_PARAMETERS = ("status", "source", "since", "until", "limit", "cursor")
SERVER_FIELDS = ("id", "created_at", "updated_at")
TIMESTAMP_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z"
DATETIME_PATTERN = re.compile(
    r"\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?([Zz]|[+-]\d{2}:\d{2})?)?"
)


def sql_list(values):
    """Constant values as an SQL list literal, for CHECK constraints (never for request data)."""
    return ", ".join(f"'{value}'" for value in values)


# ---------------------------------------------------------------------------
# Schema and migrations
# ---------------------------------------------------------------------------

# MIGRATIONS[n] takes a file from user_version n to n + 1. Append, never edit: files in the
# field have already run the old steps.
MIGRATIONS = (
    (
        f"""CREATE TABLE incidents (
            id INTEGER PRIMARY KEY,
            description TEXT NOT NULL CHECK (length(description) BETWEEN 1 AND {DESCRIPTION_MAX}),
            status TEXT NOT NULL CHECK (status IN ({sql_list(STATUSES)})),
            source TEXT NOT NULL CHECK (source IN ({sql_list(SOURCES)})),
            created_at TEXT NOT NULL CHECK (created_at GLOB '{TIMESTAMP_GLOB}'),
            updated_at TEXT NOT NULL CHECK (updated_at GLOB '{TIMESTAMP_GLOB}')
        ) STRICT""",
        # Every list query is a union of (status, source) streams read newest first from here.
        "CREATE INDEX incidents_by_status_source ON incidents (status, source, created_at)",
    ),
)

INCIDENT_JSON = """json_object(
    'id', id, 'description', description, 'status', status, 'source', source,
    'created_at', created_at, 'updated_at', updated_at)"""

# ---------------------------------------------------------------------------
# Database helpers
# ---------------------------------------------------------------------------


def connect(path):
    """Open a connection in autocommit mode; transactions are begun explicitly."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = FULL")  # a COMMIT returns once the WAL is on disk
    db.row_factory = sqlite3.Row
    return db


class Database:
    """The app's SQLite file: reusable connections and the process's write lock.

    Opening a connection costs more than Flask's own work for a request, so connections are
    kept and handed to one request at a time. Writers in this process take turns on a Python
    lock before BEGIN IMMEDIATE: SQLite's busy handler would otherwise put them to sleep for
    up to 100 ms at a time while they wait. Other processes still meet at the busy timeout.
    """

    def __init__(self, path):
        self.path = path
        self.idle = queue.LifoQueue(IDLE_CONNECTIONS)
        self.write_lock = threading.Lock()

    def acquire(self):
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            return connect(self.path)

    def release(self, db):
        if db.in_transaction:
            db.execute("ROLLBACK")
        try:
            self.idle.put_nowait(db)
        except queue.Full:
            db.close()

    @contextmanager
    def write(self, db):
        """Run the block as one BEGIN IMMEDIATE transaction: committed, or rolled back on error."""
        with self.write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def migrate(self):
        """Bring the file to the newest schema, one transaction per step.

        The version is read inside each step's transaction, so servers starting together
        on one file apply every step exactly once.
        """
        db = self.acquire()
        try:
            db.execute("PRAGMA journal_mode = WAL")
            for version, statements in enumerate(MIGRATIONS, start=1):
                with self.write(db):
                    current = db.execute("PRAGMA user_version").fetchone()[0]
                    if current > len(MIGRATIONS):
                        raise RuntimeError(
                            f"{self.path} has schema version {current}, newer than this code's "
                            f"{len(MIGRATIONS)}; upgrade the code"
                        )
                    if current >= version:
                        continue
                    for statement in statements:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {version:d}")  # PRAGMA takes no parameters
        finally:
            self.release(db)


def get_db():
    """The request's connection, taken from the app's Database on first use."""
    if "db" not in g:
        g.db = current_app.extensions["incidents"].acquire()
    return g.db


def close_db(exception=None):
    """Give the request's connection back for the next request."""
    db = g.pop("db", None)
    if db is not None:
        current_app.extensions["incidents"].release(db)


def write_transaction():
    """A BEGIN IMMEDIATE transaction on the request's connection."""
    return current_app.extensions["incidents"].write(get_db())


def utc_timestamp(moment):
    """RFC 3339 UTC with milliseconds and Z, the one format stored and compared as text."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now():
    return utc_timestamp(datetime.now(timezone.utc))


def fetch_incident_json(db, incident_id):
    """The incident as JSON text built by SQLite, or 404 when there is none."""
    row = db.execute(f"SELECT {INCIDENT_JSON} FROM incidents WHERE id = ?", (incident_id,)).fetchone()
    if row is None:
        raise ApiError(404, f"There is no incident {incident_id}.")
    return row[0]


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ApiError(Exception):
    """A problem the client can fix, answered as application/problem+json."""

    def __init__(self, status, detail, errors=None, headers=None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


def problem(status, title, detail, errors=None, headers=None):
    """An RFC 9457 problem details response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    response = jsonify(body)
    response.status_code = status
    response.mimetype = "application/problem+json"
    response.headers.extend(headers or {})
    return response


def handle_api_error(error):
    title = HTTP_TITLES.get(error.status, "Error")
    return problem(error.status, title, error.detail, error.errors, error.headers)


def handle_http_exception(error):
    """Every HTTP error Flask or Werkzeug raises (404, 405, 413, ...) as a problem."""
    headers = [(name, value) for name, value in error.get_headers() if name != "Content-Type"]  # Allow on 405
    return problem(error.code, error.name, error.description, headers=headers)


def handle_database_busy(error):
    """A write that waited out the busy timeout: the client may simply retry."""
    if error.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return handle_unexpected(error)
    current_app.logger.warning("database busy: %s", error)
    return problem(503, "Service Unavailable", "The database is busy; retry shortly.", headers={"Retry-After": "1"})


def handle_unexpected(error):
    """Log the traceback on the server; tell the client only that it failed."""
    current_app.logger.exception("unhandled error on %s %s", request.method, request.path)
    return problem(500, "Internal Server Error", "The server failed to answer; the error is logged.")


HTTP_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    503: "Service Unavailable",
}

# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def clean_text(value, limit):
    """A trimmed string of 1 to `limit` characters, or ValueError saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    value = value.strip()
    if not 1 <= len(value) <= limit:
        raise ValueError(f"must be 1 to {limit} characters after trimming spaces")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def clean_choice(value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"must be one of: {', '.join(choices)}")
    return value


FIELD_RULES = {
    "description": lambda value: clean_text(value, DESCRIPTION_MAX),
    "status": lambda value: clean_choice(value, STATUSES),
    "source": lambda value: clean_choice(value, SOURCES),
}


def read_json_object():
    """The request body as a dict: 415 unless it is declared JSON, 400 unless it is an object."""
    if not request.is_json:
        raise ApiError(
            415,
            "Send the body as JSON with the header Content-Type: application/json, e.g. "
            "curl -H 'Content-Type: application/json' -d '{\"description\": \"...\", \"source\": \"operator\"}'.",
        )
    try:
        body = json.loads(request.get_data())
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"The body is not valid JSON: {error}.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object, e.g. {\"description\": \"...\"}.")
    return body


def validate_fields(body, required, optional):
    """Clean values for the fields of `body`, or 422 listing every problem."""
    allowed = required + optional
    errors = [
        {"field": field, "message": f"{'is set by the server' if field in SERVER_FIELDS else 'is not a known field'}; "
                                    f"send only {', '.join(allowed)}"}
        for field in body
        if field not in allowed
    ]
    values = {}
    for field in allowed:
        if field in body:
            try:
                values[field] = FIELD_RULES[field](body[field])
            except ValueError as error:
                errors.append({"field": field, "message": str(error)})
        elif field in required:
            errors.append({"field": field, "message": "is required"})
    if errors:
        raise ApiError(422, "Some fields are invalid; see errors.", errors)
    return values


def parse_datetime(text):
    """An RFC 3339 date-time (no offset means UTC) as the stored format, rounded up to a millisecond.

    Rounding up keeps both bounds exact: stored times have milliseconds, so
    created_at >= 10.1235 is created_at >= 10.124, and created_at < 10.1235 is created_at < 10.124.
    """
    if not DATETIME_PATTERN.fullmatch(text):
        raise ValueError("must be an RFC 3339 date-time such as 2026-11-22T10:15:30Z")
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return utc_timestamp(moment + timedelta(microseconds=-moment.microsecond % 1000))
    except (ValueError, OverflowError) as error:
        raise ValueError(f"is not a valid date-time: {error}") from None


def parse_limit(text):
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= PAGE_LIMIT_MAX):
        raise ValueError(f"must be a whole number from 1 to {PAGE_LIMIT_MAX}")
    return int(text)


def encode_cursor(created_at, incident_id):
    return base64.urlsafe_b64encode(json.dumps([created_at, incident_id]).encode()).decode().rstrip("=")


def decode_cursor(text):
    """The (created_at, id) position a cursor stands for, or ValueError."""
    message = "is not a cursor this server returned; start again without it"
    try:
        created_at, incident_id = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError):
        raise ValueError(message) from None
    if not (isinstance(created_at, str) and type(incident_id) is int and 0 < incident_id <= MAX_ID):
        raise ValueError(message)
    return created_at, incident_id


def parse_choices(values, choices):
    """Repeated and/or comma-separated values, each one of `choices`, in their canonical order."""
    given = {value.strip() for item in values for value in item.split(",")}
    unknown = given - set(choices)
    if unknown:
        raise ValueError(f"unknown value {', '.join(sorted(unknown))!r}; use one or more of: {', '.join(choices)}")
    return [choice for choice in choices if choice in given]


def parse_list_query(args):
    """The list filters from the query string, or 422 listing every problem."""
    errors = [
        {"field": name, "message": f"is not a known query parameter; use {', '.join(LIST_PARAMETERS)}"}
        for name in args.keys()
        if name not in LIST_PARAMETERS
    ]
    single = {"since": parse_datetime, "until": parse_datetime, "limit": parse_limit, "cursor": decode_cursor}
    query = {"status": list(STATUSES), "source": list(SOURCES), "limit": PAGE_LIMIT_DEFAULT}
    for name, choices in (("status", STATUSES), ("source", SOURCES)):
        if name in args:
            try:
                query[name] = parse_choices(args.getlist(name), choices)
            except ValueError as error:
                errors.append({"field": name, "message": str(error)})
    for name, parse in single.items():
        values = args.getlist(name)
        if len(values) > 1:
            errors.append({"field": name, "message": "give it at most once"})
        elif values:
            try:
                query[name] = parse(values[0])
            except ValueError as error:
                errors.append({"field": name, "message": str(error)})
    if not errors and "since" in query and "until" in query and query["since"] >= query["until"]:
        errors.append({"field": "until", "message": "must be later than since"})
    if errors:
        raise ApiError(422, "Some query parameters are invalid; see errors.", errors)
    return query


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

INCIDENT_URL = f"/incidents/<int(max={MAX_ID}):incident_id>"


def json_response(text, status=200, headers=None):
    """A response whose JSON body SQLite or the caller already built."""
    return Response(text, status, headers, mimetype="application/json")


def check_token():
    """Require the bearer token on every route but /health when INCIDENTS_API_TOKEN is set."""
    token = current_app.config["API_TOKEN"]
    if not token or request.endpoint == "health":
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(
            401,
            "Send the API token as the header Authorization: Bearer <token>.",
            headers={"WWW-Authenticate": 'Bearer realm="incidents"'},
        )


def health():
    """Whether the database answers: 200 or 503."""
    try:
        get_db().execute("SELECT 1 FROM incidents LIMIT 1").fetchall()
    except sqlite3.Error as error:
        current_app.logger.error("health check failed: %s", error)
        return problem(503, "Service Unavailable", "The database does not answer.")
    return jsonify(status="ok")


def create_incident():
    """Record a new incident; 201 with its Location once it is on disk."""
    values = validate_fields(read_json_object(), ["description", "source"], ["status"])
    with write_transaction() as db:
        timestamp = now()
        incident_id, body = db.execute(
            f"""INSERT INTO incidents (description, status, source, created_at, updated_at)
                VALUES (?, ?, ?, ?, ?) RETURNING id, {INCIDENT_JSON}""",
            (values["description"], values.get("status", DEFAULT_STATUS), values["source"], timestamp, timestamp),
        ).fetchone()
    return json_response(body, 201, {"Location": f"/incidents/{incident_id}"})


def get_incident(incident_id):
    """One incident, or 404."""
    return json_response(fetch_incident_json(get_db(), incident_id))


def list_page_sql(streams, conditions):
    """SQL for one page: the newest rows of each (status, source) stream, merged.

    Each stream is an equality prefix of the (status, source, created_at) index, so it is read
    already in order and stops after LIMIT rows; a page costs the same at any table size and for
    any mix of filters, where one `status IN (...)` query would sort every matching row.
    """
    stream = f"""SELECT * FROM (SELECT id, created_at FROM incidents WHERE {' AND '.join(conditions)}
                 ORDER BY created_at DESC, id DESC LIMIT ?)"""
    return f"""SELECT id, created_at, {INCIDENT_JSON} FROM incidents
               WHERE id IN (SELECT id FROM ({' UNION ALL '.join([stream] * streams)}
                            ORDER BY created_at DESC, id DESC LIMIT ?))
               ORDER BY created_at DESC, id DESC"""


def list_incidents():
    """Incidents newest first, filtered, one keyset page at a time."""
    query = parse_list_query(request.args)
    conditions, bounds = ["status = ?", "source = ?"], []
    for condition, name in (("created_at >= ?", "since"), ("created_at < ?", "until"), ("(created_at, id) < (?, ?)", "cursor")):
        if name in query:
            conditions.append(condition)
            bounds += query[name] if name == "cursor" else [query[name]]
    fetch = query["limit"] + 1  # one more than a page tells whether another page follows
    params = [
        value
        for status in query["status"]
        for source in query["source"]
        for value in (status, source, *bounds, fetch)
    ]
    streams = len(query["status"]) * len(query["source"])
    rows = get_db().execute(list_page_sql(streams, conditions), (*params, fetch)).fetchall()
    page = rows[: query["limit"]]
    next_cursor = encode_cursor(page[-1][1], page[-1][0]) if len(rows) > len(page) else None
    items = ",".join(row[2] for row in page)
    return json_response(f'{{"items":[{items}],"next_cursor":{json.dumps(next_cursor)}}}')


def update_incident(incident_id):
    """Change status and/or description; updated_at moves only when something changed."""
    values = validate_fields(read_json_object(), [], ["status", "description"])
    if not values:
        raise ApiError(422, "Send status and/or description to change.", [
            {"field": "status", "message": "send status and/or description"}])
    with write_transaction() as db:
        current = db.execute("SELECT status, description FROM incidents WHERE id = ?", (incident_id,)).fetchone()
        if current is None:
            raise ApiError(404, f"There is no incident {incident_id}.")
        changed = {field: value for field, value in values.items() if value != current[field]}
        if changed:
            assignments = ", ".join(f"{field} = ?" for field in changed)  # names from FIELD_RULES only
            db.execute(
                f"UPDATE incidents SET {assignments}, updated_at = ? WHERE id = ?",
                (*changed.values(), now(), incident_id),
            )
        body = fetch_incident_json(db, incident_id)
    return json_response(body)


# ---------------------------------------------------------------------------
# The app factory
# ---------------------------------------------------------------------------


def create_app(test_config=None):
    """Build the app, creating or migrating its database file."""
    app = Flask(__name__)
    app.config.from_mapping(
        DATABASE=os.environ.get("INCIDENTS_DB", "incidents.db"),
        API_TOKEN=os.environ.get("INCIDENTS_API_TOKEN") or None,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    if test_config:
        app.config.update(test_config)
    app.json.ensure_ascii = False
    app.json.sort_keys = False

    database = Database(app.config["DATABASE"])
    database.migrate()
    app.extensions["incidents"] = database
    app.teardown_appcontext(close_db)
    app.before_request(check_token)

    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(sqlite3.OperationalError, handle_database_busy)
    app.register_error_handler(Exception, handle_unexpected)

    app.get("/health")(health)
    app.post("/incidents")(create_incident)
    app.get("/incidents")(list_incidents)
    app.get(INCIDENT_URL)(get_incident)
    app.patch(INCIDENT_URL)(update_incident)
    return app
