"""incidents: an HTTP API where operators and monitoring report problems.

One Flask module over one SQLite file. Run it with

    flask --app incidents run

and in production (README.md, Production) with

    granian --interface wsgi --factory --workers 4 --blocking-threads 8 --workers-kill-timeout 30 incidents:create_app

The database file is created, or migrated to the current schema, when the app starts. GET / says
where to begin, and GET /openapi.json describes every route.

Alerts from Prometheus Alertmanager and Grafana come in through POST /integrations/alertmanager, and
PagerDuty Events API v2 events from any tool that sends them through POST /integrations/pagerduty;
Prometheus scrapes GET /metrics. Heartbeats (PUT /heartbeats/NAME) check in at /heartbeats/NAME/ping
(or /fail, or an exit status), and each process's clock opens an incident for one that falls silent.
A consistent copy of the live database, checked:

    flask --app incidents backup PATH [--force]

Telegram reports come in through the webhook POST /telegram/webhook, or, where Telegram cannot
reach the server, by long polling:

    flask --app incidents telegram-poll

and notifications and reminders go out, beside a webhook deployment, by

    flask --app incidents telegram-notify

Environment (README.md says more):
    INCIDENTS_DB                path of the SQLite file (default: incidents.db in the working directory)
    INCIDENTS_API_TOKEN         when set, every route but /, /openapi.json, /health, the webhook and the
                                PagerDuty intake needs "Authorization: Bearer <token>"
    INCIDENTS_PING_TOKEN        when set (only with INCIDENTS_API_TOKEN), check-ins take it as well (and nothing else)
    INCIDENTS_BUSY_TIMEOUT      seconds a write waits for its turn before a 503 (default 5)
    INCIDENTS_REOPEN_WINDOW     seconds after an alert's incident resolves in which the alert firing
                                again reopens it (default 900; 0 turns reopening off)
    INCIDENTS_PAGERDUTY_ROUTING_KEY
                                enables POST /integrations/pagerduty; tools send it as the event's routing_key
    INCIDENTS_REMIND_AFTER      seconds an incident may stay new before a reminder, and between them
                                (default 600; 0 turns reminders off)
    INCIDENTS_REMIND_MAX        reminders before the incident is escalated (default 3)
    INCIDENTS_STORM_THRESHOLD   more incidents than this of one group, opened within INCIDENTS_STORM_WINDOW seconds
    INCIDENTS_STORM_WINDOW      (defaults 5 and 60; 0 turns storms off), are one message in the chats: a storm
    INCIDENTS_LANGUAGE          en (default) or ru: the language of the chats and of the service's own notes
    INCIDENTS_TIMEZONE          the IANA zone (Europe/Moscow) of every time those texts show (default UTC)
    TELEGRAM_WEBHOOK_SECRET     enables the webhook; Telegram sends it in X-Telegram-Bot-Api-Secret-Token
    TELEGRAM_BOT_TOKEN          the bot's token from BotFather, for telegram-poll and telegram-notify
    TELEGRAM_API_URL            the Bot API's address (default: https://api.telegram.org)
    TELEGRAM_ALLOWED_CHAT_IDS   chats (ids, separated by commas) whose messages and taps the bot acts on
    TELEGRAM_NOTIFY_CHAT_IDS    chats that see every incident, kept current, and its reminders
    TELEGRAM_ESCALATE_CHAT_IDS  chats that get an incident nobody took after the last reminder
    TELEGRAM_LIMIT_WINDOW       seconds Telegram's limits count in (default 60; tests shrink it)
"""
import collections
import contextlib
import contextvars
import copy
import errno
import fcntl
import functools
import hashlib
import hmac
import html
import json
import logging
import os
import queue
import re
import sqlite3
import stat
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
import zoneinfo
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import click
from flask import Flask, Response, current_app, g, jsonify, request
from flask.cli import FlaskGroup, with_appcontext
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import BaseConverter

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

SERVICE = "incidents"
VERSION = "2.0.0"  # of the API: GET / and the OpenAPI document say it
STATUSES = ("new", "in_progress", "resolved", "closed")
OPEN_STATUSES = ("new", "in_progress")  # an open incident holds its dedup_key
SOURCES = ("operator", "monitoring", "partner")
EVENT_TYPES = ("created", "status_changed", "description_changed", "repeated", "note", "assigned", "reminded",
               "escalated")
DEFAULT_STATUS = "new"
DESCRIPTION_MAX = 10_000
DEDUP_KEY_MAX = 255
GROUP_MAX = 100  # a group names what fails together: a cell, a router, an Alertmanager group
NOTE_MAX = 2_000
ACTOR_MAX = 255
PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 200
SEARCH_MAX = 200  # characters of q, after trimming
SEARCH_WORD_MIN = 3  # the trigram index cannot look up anything shorter
MAX_BODY_BYTES = 1024 * 1024  # the largest valid body, every character escaped as \\uXXXX, fits several times
MAX_ID = 2**63 - 1  # SQLite's largest INTEGER; larger ids cannot exist
DRAIN_MAX_BYTES = 16 * 1024 * 1024  # of a body over its limit, read and dropped before the 413 (see drain_body)
BUSY_TIMEOUT_S = 5.0
IDLE_CONNECTIONS = 16
WRITE_BATCH_MAX = 16  # blocks that share one COMMIT, at most
BULK_BUDGET_S = 0.02  # a transaction takes further slices of large payloads while younger than this
CHECKPOINT_IDLE_S = 1.0  # the writer copies the WAL back once idle, at most this often
CHECKPOINT_FORCE_S = 4.0  # and at the latest this long after a write, idle or not
CLOCK_TICK_S = 0.5  # how often each process's clock looks for deadlines that passed
HEALTH_PROBE_S = 1.0  # /health writes a row of its own when this process has not written for this long
SERVER_FIELDS = ("id", "created_at", "updated_at", "occurrences", "last_seen_at", "acknowledged_at", "resolved_at")
TELEGRAM_API_URL = "https://api.telegram.org"
TELEGRAM_POLL_TIMEOUT_S = 30  # how long one getUpdates call waits for news
TELEGRAM_CALL_TIMEOUT_S = TELEGRAM_POLL_TIMEOUT_S + 10  # how long any Bot API call may take
TELEGRAM_BACKOFF_S = (1, 60)  # first and longest wait after a network error
TELEGRAM_LIST_MAX = 10
TELEGRAM_UPDATES = ["message", "callback_query"]  # what the bot asks Telegram for (an edit means nothing here)
ALERTS_MAX = 1000  # alerts in one payload (Alertmanager's max_alerts)
ALERT_BODY_MAX = 4 * 1024 * 1024  # room for ALERTS_MAX alerts of 4 KiB; every other route keeps MAX_BODY_BYTES
ALERT_CHUNK = 10  # alerts per transaction: no other write waits behind more than these
ALERT_STATUSES = ("firing", "resolved")
ALERT_KEY_PREFIX = "alertmanager:"
PAGERDUTY_ACTIONS = ("trigger", "acknowledge", "resolve")
PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
PAGERDUTY_KEY_PREFIX = "pagerduty:"
PAGERDUTY_BODY_MAX = 512 * 1024  # what PagerDuty takes
PAGERDUTY_TEXT_MAX = 1024  # a summary, as PagerDuty limits it, and every other text of an event
PAGERDUTY_DETAILS_MAX = 1000  # characters of custom_details the first note shows
HEARTBEAT_STATUSES = ("up", "late", "down", "paused")
HEARTBEAT_SECONDS_MAX = 31 * 24 * 3600  # the longest period, and the longest grace
HEARTBEAT_DEFAULTS = {"grace": 60, "source": "monitoring", "paused": False, "group": None}
HEARTBEAT_SERVER_FIELDS = ("name", "status", "last_ping_at", "next_due_at", "incident_id", "created_at", "updated_at")
HEARTBEATS_DUE_BATCH = 100  # heartbeats the clock reads at a time
REOPEN_WINDOW_S = 900  # a resolved alert that fires again this soon reopens its incident
REMIND_AFTER_S = 600  # an incident still new this long after it became new is called for again
REMIND_MAX = 3  # reminders before the incident is escalated
STORM_THRESHOLD = 5  # more incidents of one group than this, opened within STORM_WINDOW_S, are a storm
STORM_WINDOW_S = 60
REMIND_BATCH = 100  # due reminders handled in one transaction
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 14400, 86400)  # seconds, for the time to acknowledge and resolve
NOTIFY_REPEAT_INTERVAL_S = 60  # a change is shown at once; repeats alone at most once per interval
NOTIFY_POLL_S = 0.5  # how often the sender looks for news in the outbox
NOTIFY_DESCRIPTION_LINES = 10
TELEGRAM_WINDOW_S = 60  # Telegram's minute, which its limits count in (see Pace); tests shrink it
GROUP_CALLS_PER_MINUTE = 20  # sends and edits in one group or channel
RESERVED_FIRST = 4  # of those, kept for first messages: edits and replies wait instead
CALLS_PER_SECOND = 30  # in all chats together
PACE_MARGIN = 1.05  # the sender keeps this much clear of each limit, as a clock's jitter may not
TELEGRAM_TEXT_MAX = 4096  # a message's length, in UTF-16 code units as Telegram counts them
CALLBACK_ANSWER_MAX = 200  # the same, of the answer to a button
STORED_TIMESTAMP = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z"
EARLIEST, LATEST = "0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"  # the stored format's range
LIST_CURSOR = STORED_TIMESTAMP + r"_[1-9][0-9]{0,18}"  # where a list page ends: created_at and id
EVENTS_CURSOR = r"[1-9][0-9]{0,18}"  # where a page of events ends: an event's id
DATETIME_PATTERN = re.compile(  # ASCII digits: \d would take ٢ and ２ too
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:([Tt ][0-9]{2}:[0-9]{2})(?::([0-9]{2})(\.[0-9]+)?)?([Zz]|[+-][0-9]{2}:[0-9]{2})?)?"
)


def sql_list(values):
    """Constant values as an SQL list literal, for the schema (never for request data)."""
    return ", ".join(f"'{value}'" for value in values)


def placeholders(values):
    """One ? per value, for values bound as parameters."""
    return ", ".join("?" * len(values))


# Literal, not parameters, so that SQLite sees the partial index's own condition and uses it.
IS_OPEN = f"status IN ({sql_list(OPEN_STATUSES)})"


# ---------------------------------------------------------------------------
# Schema and migrations
# ---------------------------------------------------------------------------

# MIGRATIONS[n] takes a file from user_version n to n + 1. Each step is frozen text, written out in
# full (no constants): files in the field have run it as it is, and a new file must get the same
# schema. Append a step, never edit one; a test pins the text of each.
MIGRATIONS = (
    (
        """CREATE TABLE incidents (
            id INTEGER PRIMARY KEY,
            description TEXT NOT NULL CHECK (length(description) BETWEEN 1 AND 10000),
            status TEXT NOT NULL CHECK (status IN ('new', 'in_progress', 'resolved', 'closed')),
            source TEXT NOT NULL CHECK (source IN ('operator', 'monitoring', 'partner')),
            created_at TEXT NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            updated_at TEXT NOT NULL CHECK (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')
        ) STRICT""",
        # Every list query is a union of (status, source) streams read newest first from here.
        "CREATE INDEX incidents_by_status_source ON incidents (status, source, created_at)",
    ),
    (
        # Repeated reports fold into one open incident per dedup_key, counted.
        "ALTER TABLE incidents ADD COLUMN dedup_key TEXT CHECK (length(dedup_key) BETWEEN 1 AND 255)",
        "ALTER TABLE incidents ADD COLUMN occurrences INTEGER NOT NULL DEFAULT 1 CHECK (occurrences >= 1)",
        # ADD COLUMN ... NOT NULL needs a default; every existing row gets its created_at at once.
        """ALTER TABLE incidents ADD COLUMN last_seen_at TEXT NOT NULL DEFAULT '1970-01-01T00:00:00.000Z'
            CHECK (last_seen_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')""",
        "UPDATE incidents SET last_seen_at = created_at",
        "CREATE UNIQUE INDEX incidents_open_dedup_key ON incidents (dedup_key) WHERE dedup_key IS NOT NULL AND status IN ('new', 'in_progress')",
        "CREATE INDEX incidents_by_dedup_key ON incidents (dedup_key, created_at) WHERE dedup_key IS NOT NULL",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            incident_id INTEGER NOT NULL REFERENCES incidents (id),
            at TEXT NOT NULL CHECK (at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            type TEXT NOT NULL CHECK (type IN ('created', 'status_changed', 'description_changed', 'repeated', 'note')),
            from_status TEXT CHECK (from_status IN ('new', 'in_progress', 'resolved', 'closed')),
            to_status TEXT CHECK (to_status IN ('new', 'in_progress', 'resolved', 'closed')),
            note TEXT CHECK (length(note) BETWEEN 1 AND 2000),
            actor TEXT CHECK (length(actor) BETWEEN 1 AND 255),
            count INTEGER CHECK (count >= 1),
            last_at TEXT CHECK (last_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')
        ) STRICT""",
        "CREATE INDEX events_by_incident ON events (incident_id)",
        # Incidents from before the timeline get their creation; their first status is unknown.
        "INSERT INTO events (incident_id, at, type) SELECT id, created_at, 'created' FROM incidents",
    ),
    (
        # Where telegram-poll goes on after a restart, per bot (update ids are a bot's own).
        """CREATE TABLE telegram_offsets (
            bot_id INTEGER PRIMARY KEY,
            next_update_id INTEGER NOT NULL CHECK (next_update_id >= 0)
        ) STRICT""",
    ),
    (
        # Full-text search: every 3-character sequence of each description, case folded, with ё as е.
        # Contentless (the text stays in incidents alone) and without per-row sizes (no ranking).
        # rowid is -id: FTS5 reads its doclists fastest in ascending order, which is then newest first.
        """CREATE VIRTUAL TABLE incidents_search USING fts5(
            body, content='', tokenize='trigram case_sensitive 0', detail=full, columnsize=0)""",
        # Triggers keep the index in the transaction of every write of a description, whatever the path.
        """CREATE TRIGGER incidents_search_insert AFTER INSERT ON incidents BEGIN
            INSERT INTO incidents_search (rowid, body) VALUES (-new.id, replace(replace(new.description, 'ё', 'е'), 'Ё', 'Е'));
        END""",
        """CREATE TRIGGER incidents_search_update AFTER UPDATE OF description ON incidents BEGIN
            INSERT INTO incidents_search (incidents_search, rowid, body)
                VALUES ('delete', -old.id, replace(replace(old.description, 'ё', 'е'), 'Ё', 'Е'));
            INSERT INTO incidents_search (rowid, body) VALUES (-new.id, replace(replace(new.description, 'ё', 'е'), 'Ё', 'Е'));
        END""",
        """CREATE TRIGGER incidents_search_delete AFTER DELETE ON incidents BEGIN
            INSERT INTO incidents_search (incidents_search, rowid, body)
                VALUES ('delete', -old.id, replace(replace(old.description, 'ё', 'е'), 'Ё', 'Е'));
        END""",
        "INSERT INTO incidents_search (rowid, body) SELECT -id, replace(replace(description, 'ё', 'е'), 'Ё', 'Е') FROM incidents",
    ),
    (
        # Counts for /metrics, kept by triggers so that a scrape reads a dozen rows, not the table:
        # incidents per (status, source) now, and ever created and folded (summed per source).
        """CREATE TABLE incident_counts (
            status TEXT NOT NULL CHECK (status IN ('new', 'in_progress', 'resolved', 'closed')),
            source TEXT NOT NULL CHECK (source IN ('operator', 'monitoring', 'partner')),
            current INTEGER NOT NULL CHECK (current >= 0),
            created INTEGER NOT NULL CHECK (created >= 0),
            folded INTEGER NOT NULL CHECK (folded >= 0),
            PRIMARY KEY (status, source)
        ) STRICT, WITHOUT ROWID""",
        """INSERT INTO incident_counts (status, source, current, created, folded)
            SELECT statuses.value, sources.value, count(incidents.id), count(incidents.id),
                   coalesce(sum(incidents.occurrences - 1), 0)
            FROM json_each('["new", "in_progress", "resolved", "closed"]') AS statuses, json_each('["operator", "monitoring", "partner"]') AS sources
            LEFT JOIN incidents ON incidents.status = statuses.value AND incidents.source = sources.value
            GROUP BY statuses.value, sources.value""",
        """CREATE TRIGGER incident_counts_insert AFTER INSERT ON incidents BEGIN
            UPDATE incident_counts SET current = current + 1, created = created + 1, folded = folded + new.occurrences - 1
            WHERE status = new.status AND source = new.source;
        END""",
        """CREATE TRIGGER incident_counts_update AFTER UPDATE OF status, source, occurrences ON incidents BEGIN
            UPDATE incident_counts SET current = current - 1 WHERE status = old.status AND source = old.source;
            UPDATE incident_counts SET current = current + 1, folded = folded + max(new.occurrences - old.occurrences, 0)
            WHERE status = new.status AND source = new.source;
        END""",
        """CREATE TRIGGER incident_counts_delete AFTER DELETE ON incidents BEGIN
            UPDATE incident_counts SET current = current - 1 WHERE status = old.status AND source = old.source;
        END""",
    ),
    (
        # Notifications: what each notify chat's message of an incident must catch up with, written in
        # the transaction of the change. One row per (incident, chat, kind); a later change bumps seq,
        # so the sender removes only what it has shown. queued_at is when the row was first queued.
        """CREATE TABLE notify_outbox (
            incident_id INTEGER NOT NULL REFERENCES incidents (id),
            chat_id INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('change', 'repeat')),
            seq INTEGER NOT NULL CHECK (seq >= 1),
            queued_at TEXT NOT NULL CHECK (queued_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            PRIMARY KEY (incident_id, chat_id, kind)
        ) STRICT, WITHOUT ROWID""",
        # The message that later edits go to, and when it was last brought up to date.
        """CREATE TABLE notify_messages (
            incident_id INTEGER NOT NULL REFERENCES incidents (id),
            chat_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            shown_at TEXT NOT NULL CHECK (shown_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            PRIMARY KEY (incident_id, chat_id)
        ) STRICT, WITHOUT ROWID""",
        # Chats the bot was removed from: nothing more is queued for them.
        """CREATE TABLE notify_chats_gone (
            chat_id INTEGER PRIMARY KEY,
            reason TEXT NOT NULL,
            at TEXT NOT NULL CHECK (at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')
        ) STRICT""",
    ),
    (
        # What waits in the outbox, for /metrics without reading it (it grows while no sender runs):
        # a count kept by triggers, and the oldest entry at one end of an index.
        "CREATE INDEX notify_outbox_by_age ON notify_outbox (queued_at)",
        "CREATE TABLE notify_counts (pending INTEGER NOT NULL CHECK (pending >= 0)) STRICT",
        "INSERT INTO notify_counts (pending) SELECT count(*) FROM notify_outbox",
        """CREATE TRIGGER notify_counts_insert AFTER INSERT ON notify_outbox BEGIN
            UPDATE notify_counts SET pending = pending + 1;
        END""",
        """CREATE TRIGGER notify_counts_delete AFTER DELETE ON notify_outbox BEGIN
            UPDATE notify_counts SET pending = pending - 1;
        END""",
    ),
    (
        # A group that became a supergroup is gone under its old id: notifications go to moved_to.
        "ALTER TABLE notify_chats_gone ADD COLUMN moved_to INTEGER",
        # Each bot's @username as getMe told it to a bot command, so that the webhook knows it too.
        """CREATE TABLE telegram_bots (
            bot_id INTEGER PRIMARY KEY,
            username TEXT NOT NULL CHECK (length(username) BETWEEN 1 AND 255)
        ) STRICT""",
    ),
    (
        # Who took an incident, when it first left new and when it was resolved; when it was last opened
        # (created, reopened, or put back to new), which the waits are counted from; reminders while it
        # stays new (remind_at is when the next is due, found by an index) and its escalation.
        "ALTER TABLE incidents ADD COLUMN assignee TEXT CHECK (length(assignee) BETWEEN 1 AND 255)",
        "ALTER TABLE incidents ADD COLUMN acknowledged_at TEXT CHECK (acknowledged_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')",
        "ALTER TABLE incidents ADD COLUMN resolved_at TEXT CHECK (resolved_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')",
        "ALTER TABLE incidents ADD COLUMN remind_at TEXT CHECK (remind_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')",
        "ALTER TABLE incidents ADD COLUMN reminders INTEGER NOT NULL DEFAULT 0 CHECK (reminders >= 0)",
        "ALTER TABLE incidents ADD COLUMN escalated_at TEXT CHECK (escalated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')",
        "ALTER TABLE incidents ADD COLUMN opened_at TEXT CHECK (opened_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')",
        "CREATE INDEX incidents_by_assignee ON incidents (assignee, created_at) WHERE assignee IS NOT NULL",
        "CREATE INDEX incidents_reminders_due ON incidents (remind_at) WHERE remind_at IS NOT NULL",
        # Filled from the timeline; an incident from before it has only its last update to go by.
        """UPDATE incidents SET acknowledged_at = coalesce((SELECT max(at) FROM events WHERE incident_id = incidents.id
                AND (type = 'status_changed' AND from_status = 'new' OR type = 'created' AND to_status != 'new')),
                updated_at)
            WHERE status != 'new'""",
        """UPDATE incidents SET resolved_at = coalesce((SELECT max(at) FROM events WHERE incident_id = incidents.id
                AND (type = 'status_changed' AND from_status IN ('new', 'in_progress') OR type = 'created')
                AND to_status IN ('resolved', 'closed')), updated_at)
            WHERE status IN ('resolved', 'closed')""",
        """UPDATE incidents SET assignee = (SELECT CASE WHEN instr(actor, ' (Telegram user ') > 1
                                                       THEN substr(actor, 1, instr(actor, ' (Telegram user ') - 1)
                                                       ELSE actor END
                FROM events WHERE incident_id = incidents.id AND type = 'status_changed' AND to_status = 'in_progress'
                AND actor IS NOT NULL ORDER BY id LIMIT 1)
            WHERE status != 'new'""",
        """UPDATE incidents SET opened_at = coalesce((SELECT max(at) FROM events WHERE incident_id = incidents.id
                AND type = 'status_changed' AND (to_status = 'new' OR from_status IN ('resolved', 'closed')
                                                 AND to_status = 'in_progress')), created_at)""",
        # The timeline gains assignments, reminders and escalations: a CHECK changes only with a new table.
        """CREATE TABLE events_new (
            id INTEGER PRIMARY KEY,
            incident_id INTEGER NOT NULL REFERENCES incidents (id),
            at TEXT NOT NULL CHECK (at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            type TEXT NOT NULL CHECK (type IN ('created', 'status_changed', 'description_changed', 'repeated', 'note',
                                               'assigned', 'reminded', 'escalated')),
            from_status TEXT CHECK (from_status IN ('new', 'in_progress', 'resolved', 'closed')),
            to_status TEXT CHECK (to_status IN ('new', 'in_progress', 'resolved', 'closed')),
            note TEXT CHECK (length(note) BETWEEN 1 AND 2000),
            actor TEXT CHECK (length(actor) BETWEEN 1 AND 255),
            count INTEGER CHECK (count >= 1),
            last_at TEXT CHECK (last_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            from_assignee TEXT CHECK (length(from_assignee) BETWEEN 1 AND 255),
            to_assignee TEXT CHECK (length(to_assignee) BETWEEN 1 AND 255)
        ) STRICT""",
        """INSERT INTO events_new (id, incident_id, at, type, from_status, to_status, note, actor, count, last_at)
            SELECT id, incident_id, at, type, from_status, to_status, note, actor, count, last_at FROM events""",
        "DROP TABLE events",
        "ALTER TABLE events_new RENAME TO events",
        "CREATE INDEX events_by_incident ON events (incident_id)",
        # Reminders in each chat: due (to send), sent (its message id), stale (to delete: the incident was
        # taken). number counts the reminders since the incident was last opened; past REMIND_MAX, it is an
        # escalation's call in a chat that already shows the incident.
        """CREATE TABLE notify_reminders (
            id INTEGER PRIMARY KEY,
            incident_id INTEGER NOT NULL REFERENCES incidents (id),
            chat_id INTEGER NOT NULL,
            number INTEGER NOT NULL CHECK (number >= 1),
            state TEXT NOT NULL CHECK (state IN ('due', 'sent', 'stale')),
            message_id INTEGER,
            queued_at TEXT NOT NULL CHECK (queued_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')
        ) STRICT""",
        "CREATE INDEX notify_reminders_by_incident ON notify_reminders (incident_id, state)",
        "CREATE INDEX notify_reminders_to_do ON notify_reminders (queued_at) WHERE state != 'sent'",
        # Histograms of the time to acknowledge and to resolve, per source, kept by triggers like the counts:
        # cumulative buckets (le_N counts the observations of N seconds or less), their count and sum.
        # Each wait is counted from when the incident was last opened; a clock that stepped back counts as 0.
        """CREATE TABLE incident_durations (
            metric TEXT NOT NULL CHECK (metric IN ('acknowledge', 'resolve')),
            source TEXT NOT NULL CHECK (source IN ('operator', 'monitoring', 'partner')),
            le_60 INTEGER NOT NULL DEFAULT 0 CHECK (le_60 >= 0),
            le_300 INTEGER NOT NULL DEFAULT 0 CHECK (le_300 >= 0),
            le_900 INTEGER NOT NULL DEFAULT 0 CHECK (le_900 >= 0),
            le_1800 INTEGER NOT NULL DEFAULT 0 CHECK (le_1800 >= 0),
            le_3600 INTEGER NOT NULL DEFAULT 0 CHECK (le_3600 >= 0),
            le_14400 INTEGER NOT NULL DEFAULT 0 CHECK (le_14400 >= 0),
            le_86400 INTEGER NOT NULL DEFAULT 0 CHECK (le_86400 >= 0),
            count INTEGER NOT NULL DEFAULT 0 CHECK (count >= 0),
            sum REAL NOT NULL DEFAULT 0 CHECK (sum >= 0),
            PRIMARY KEY (metric, source)
        ) STRICT, WITHOUT ROWID""",
        """INSERT INTO incident_durations (metric, source)
            SELECT metrics.value, sources.value FROM json_each('["acknowledge", "resolve"]') AS metrics,
                                                     json_each('["operator", "monitoring", "partner"]') AS sources""",
        # One place counts an observation: an insert into this view, from the migration and the triggers.
        """CREATE VIEW incident_waits (metric, source, started_at, ended_at) AS
            SELECT metric, source, NULL, NULL FROM incident_durations WHERE 0""",
        """CREATE TRIGGER incident_waits_observe INSTEAD OF INSERT ON incident_waits BEGIN
            UPDATE incident_durations SET le_60 = le_60 + (seconds <= 60), le_300 = le_300 + (seconds <= 300),
                le_900 = le_900 + (seconds <= 900), le_1800 = le_1800 + (seconds <= 1800),
                le_3600 = le_3600 + (seconds <= 3600), le_14400 = le_14400 + (seconds <= 14400),
                le_86400 = le_86400 + (seconds <= 86400), count = count + 1, sum = sum + seconds
            FROM (SELECT max(round((julianday(new.ended_at) - julianday(new.started_at)) * 86400, 3), 0) AS seconds)
            WHERE metric = new.metric AND source = new.source;
        END""",
        """INSERT INTO incident_waits SELECT 'acknowledge', source, coalesce(opened_at, created_at), acknowledged_at
            FROM incidents WHERE acknowledged_at IS NOT NULL""",
        """INSERT INTO incident_waits SELECT 'resolve', source, coalesce(opened_at, created_at), resolved_at
            FROM incidents WHERE resolved_at IS NOT NULL""",
        """CREATE TRIGGER incident_durations_insert AFTER INSERT ON incidents BEGIN
            INSERT INTO incident_waits SELECT 'acknowledge', new.source, coalesce(new.opened_at, new.created_at),
                                              new.acknowledged_at
                WHERE new.acknowledged_at IS NOT NULL;
            INSERT INTO incident_waits SELECT 'resolve', new.source, coalesce(new.opened_at, new.created_at),
                                              new.resolved_at
                WHERE new.resolved_at IS NOT NULL;
        END""",
        """CREATE TRIGGER incident_durations_acknowledged AFTER UPDATE OF acknowledged_at ON incidents
            WHEN old.acknowledged_at IS NULL AND new.acknowledged_at IS NOT NULL BEGIN
            INSERT INTO incident_waits VALUES ('acknowledge', new.source, coalesce(new.opened_at, new.created_at),
                                               new.acknowledged_at);
        END""",
        """CREATE TRIGGER incident_durations_resolved AFTER UPDATE OF resolved_at ON incidents
            WHEN old.resolved_at IS NULL AND new.resolved_at IS NOT NULL BEGIN
            INSERT INTO incident_waits VALUES ('resolve', new.source, coalesce(new.opened_at, new.created_at),
                                               new.resolved_at);
        END""",
    ),
    (
        # A row /health writes to learn, without a client's write, whether writes work.
        """CREATE TABLE write_checks (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            at TEXT NOT NULL CHECK (at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z')
        ) STRICT""",
    ),
    (
        # Heartbeats: things that check in on a schedule. late_at is when the period is over, next_due_at when
        # the grace is too (both null while paused); down once its silence or a failure opened incident_id.
        """CREATE TABLE heartbeats (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100 AND name NOT GLOB '*[^A-Za-z0-9._-]*'
                                             AND trim(name, '.') != ''),
            description TEXT NOT NULL CHECK (length(description) BETWEEN 1 AND 10000),
            period INTEGER NOT NULL CHECK (period BETWEEN 1 AND 2678400),
            grace INTEGER NOT NULL CHECK (grace BETWEEN 0 AND 2678400),
            source TEXT NOT NULL CHECK (source IN ('operator', 'monitoring', 'partner')),
            paused INTEGER NOT NULL CHECK (paused IN (0, 1)),
            down INTEGER NOT NULL CHECK (down IN (0, 1)),
            last_ping_at TEXT CHECK (last_ping_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            late_at TEXT CHECK (late_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            next_due_at TEXT CHECK (next_due_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            incident_id INTEGER REFERENCES incidents (id),
            created_at TEXT NOT NULL CHECK (created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            updated_at TEXT NOT NULL CHECK (updated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            CHECK ((paused = 1) = (next_due_at IS NULL) AND (late_at IS NULL) = (next_due_at IS NULL))
        ) STRICT""",
        # The clock finds the deadlines that passed at one end of this index; a status filter reads one each.
        "CREATE INDEX heartbeats_due ON heartbeats (next_due_at) WHERE down = 0",
        "CREATE INDEX heartbeats_late ON heartbeats (late_at) WHERE down = 0",
        "CREATE INDEX heartbeats_down ON heartbeats (name) WHERE down = 1 AND paused = 0",
        "CREATE INDEX heartbeats_paused ON heartbeats (name) WHERE paused = 1",
        # For /metrics: how many there are, and the check-ins received, kept as they happen.
        """CREATE TABLE heartbeat_counts (
            heartbeats INTEGER NOT NULL CHECK (heartbeats >= 0),
            pings INTEGER NOT NULL CHECK (pings >= 0),
            failures INTEGER NOT NULL CHECK (failures >= 0)
        ) STRICT""",
        "INSERT INTO heartbeat_counts (heartbeats, pings, failures) VALUES (0, 0, 0)",
        """CREATE TRIGGER heartbeat_counts_insert AFTER INSERT ON heartbeats BEGIN
            UPDATE heartbeat_counts SET heartbeats = heartbeats + 1;
        END""",
        """CREATE TRIGGER heartbeat_counts_delete AFTER DELETE ON heartbeats BEGIN
            UPDATE heartbeat_counts SET heartbeats = heartbeats - 1;
        END""",
        # A check-in sets last_ping_at, and nothing else does: down after it, it reported a failure.
        """CREATE TRIGGER heartbeat_counts_check_in AFTER UPDATE OF last_ping_at ON heartbeats BEGIN
            UPDATE heartbeat_counts SET pings = pings + (new.down = 0), failures = failures + (new.down = 1);
        END""",
    ),
    (
        # Groups: what fails together (a cell, a router, an Alertmanager group), on incidents and heartbeats.
        "ALTER TABLE incidents ADD COLUMN group_name TEXT CHECK (length(group_name) BETWEEN 1 AND 100)",
        "ALTER TABLE heartbeats ADD COLUMN group_name TEXT CHECK (length(group_name) BETWEEN 1 AND 100)",
        "CREATE INDEX incidents_by_group ON incidents (group_name, status, source, created_at) WHERE group_name IS NOT NULL",
        # Storms: many incidents of one group (or, without a group, one source) opened together, shown in the
        # chats by one message; last_at is when its latest incident opened. Reminded and escalated as one:
        # remind_at, reminders and escalated_at as for an incident.
        """CREATE TABLE storms (
            id INTEGER PRIMARY KEY,
            group_name TEXT CHECK (length(group_name) BETWEEN 1 AND 100),
            source TEXT CHECK (source IN ('operator', 'monitoring', 'partner')),
            started_at TEXT NOT NULL CHECK (started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            last_at TEXT NOT NULL CHECK (last_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            remind_at TEXT CHECK (remind_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            reminders INTEGER NOT NULL DEFAULT 0 CHECK (reminders >= 0),
            escalated_at TEXT CHECK (escalated_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            CHECK ((group_name IS NULL) != (source IS NULL))
        ) STRICT""",
        "CREATE INDEX storms_by_group ON storms (group_name, source, id)",
        "CREATE INDEX storms_reminders_due ON storms (remind_at) WHERE remind_at IS NOT NULL",
        "ALTER TABLE incidents ADD COLUMN storm_id INTEGER REFERENCES storms (id)",
        "CREATE INDEX incidents_by_storm ON incidents (storm_id, status) WHERE storm_id IS NOT NULL",
        # What each chat's message of a storm must catch up with (change), and reminders to send (a reply to it);
        # the message itself, as for incidents.
        """CREATE TABLE storm_outbox (
            storm_id INTEGER NOT NULL REFERENCES storms (id),
            chat_id INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('change', 'remind')),
            seq INTEGER NOT NULL CHECK (seq >= 1),
            queued_at TEXT NOT NULL CHECK (queued_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            PRIMARY KEY (storm_id, chat_id, kind)
        ) STRICT, WITHOUT ROWID""",
        """CREATE TABLE storm_messages (
            storm_id INTEGER NOT NULL REFERENCES storms (id),
            chat_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            shown_at TEXT NOT NULL CHECK (shown_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
            PRIMARY KEY (storm_id, chat_id)
        ) STRICT, WITHOUT ROWID""",
        # The senders' Bot API calls, by method and outcome, for /metrics.
        """CREATE TABLE telegram_calls (
            method TEXT NOT NULL CHECK (length(method) BETWEEN 1 AND 100),
            outcome TEXT NOT NULL CHECK (outcome IN ('sent', 'throttled', 'failed')),
            count INTEGER NOT NULL CHECK (count >= 0),
            PRIMARY KEY (method, outcome)
        ) STRICT, WITHOUT ROWID""",
    ),
    (
        # For /metrics: the PagerDuty events taken, by action, counted by each event's own write.
        """CREATE TABLE pagerduty_counts (
            action TEXT PRIMARY KEY CHECK (action IN ('trigger', 'acknowledge', 'resolve')),
            events INTEGER NOT NULL CHECK (events >= 0)
        ) STRICT, WITHOUT ROWID""",
        "INSERT INTO pagerduty_counts (action, events) VALUES ('trigger', 0), ('acknowledge', 0), ('resolve', 0)",
    ),
    (
        # A deleted heartbeat's open incident gives up its dedup_key, so that a heartbeat made again under the name
        # opens its own: here, each open one that no heartbeat holds (its heartbeat was deleted).
        """UPDATE incidents SET dedup_key = NULL
            WHERE dedup_key GLOB 'heartbeat:*' AND status IN ('new', 'in_progress')
            AND id NOT IN (SELECT incident_id FROM heartbeats WHERE incident_id IS NOT NULL)""",
    ),
)

INCIDENT_JSON = """json_object(
    'id', id, 'description', description, 'status', status, 'source', source,
    'dedup_key', dedup_key, 'occurrences', occurrences, 'last_seen_at', last_seen_at,
    'assignee', assignee, 'acknowledged_at', acknowledged_at, 'resolved_at', resolved_at,
    'group', group_name, 'created_at', created_at, 'updated_at', updated_at)"""

# json_patch drops the keys whose value is null: each event shows only the fields of its type. An
# assignment shows both of its values, null for nobody.
EVENT_JSON = """json_patch(CASE type WHEN 'assigned'
        THEN json_object('id', id, 'at', at, 'type', type, 'from_assignee', from_assignee, 'to_assignee', to_assignee)
        ELSE json_object('id', id, 'at', at, 'type', type) END,
    json_object('from_status', from_status, 'to_status', to_status, 'note', note, 'actor', actor,
                'count', count, 'last_at', last_at))"""

# ---------------------------------------------------------------------------
# Database helpers
# ---------------------------------------------------------------------------


# Failures of storage that a write cannot get past until someone acts; reads go on meanwhile.
STORAGE_PROBLEMS = {
    sqlite3.SQLITE_FULL: "The disk that holds the database is full, so nothing can be written; "
                         "free space on it and retry (no restart needed). Reads still work.",
    sqlite3.SQLITE_READONLY: "The database file is read-only for the server, so nothing can be written; "
                             "make it writable and retry. Reads still work.",
}
# Every write the database refuses for now, with what to tell the client.
WRITE_REFUSALS = {**dict.fromkeys((sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED), "The database is busy; retry shortly."),
                  sqlite3.SQLITE_IOERR: "The storage failed to write (an I/O error, or a lock the kernel refused); "
                                        "retry shortly.",
                  **STORAGE_PROBLEMS}


def sqlite_error_code(error):
    """The primary SQLite result code of an exception (0 for anything that is not an SQLite error)."""
    return (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF


def busy_error(detail):
    """The error of a write whose turn did not come in time: a busy database, answered 503."""
    error = sqlite3.OperationalError(detail)
    error.sqlite_errorcode = sqlite3.SQLITE_BUSY
    return error


def open_private(path, flags=os.O_RDWR | os.O_CREAT):
    """A file descriptor; a file it creates is readable and writable by its owner only."""
    return os.open(path, flags, 0o600)


def open_lock_file(path):
    """A lock file beside the database, for its owner only: a plain file, used as it is (never truncated nor
    replaced, since another process may hold its lock), and never opened through a link planted at its name
    (OSError, as for anything else that is no plain file: the start stops, see lock_file_refused)."""
    try:
        fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link, which is never followed", path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "no plain file", path)
    return fd


def lock_file_refused(error, path):
    """The one line that stops a start whose lock file cannot be used."""
    return (f"the lock file {error.filename or path} beside the database cannot be used ({error.strerror}); "
            "remove it, or let the server's user write there")


def connect(path, timeout):
    """Open a connection in autocommit mode; transactions are begun explicitly."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = FULL")  # a COMMIT returns once the WAL is on disk
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA wal_autocheckpoint = 0")  # no COMMIT copies the WAL back: the writer does, after it
    db.row_factory = sqlite3.Row
    return db


NO_TURN = ("Writes get no turn within INCIDENTS_BUSY_TIMEOUT: another process, or a sqlite3 shell, holds the "
           "database; they are answered 503 meanwhile.")


def write_failure(error):
    """What a failed write says about storage, for /health: None when the write itself was at fault."""
    if not (isinstance(error, (sqlite3.OperationalError, OSError)) or type(error) is sqlite3.DatabaseError):
        return None
    code = sqlite_error_code(error)
    if code in STORAGE_PROBLEMS:
        return STORAGE_PROBLEMS[code]
    return NO_TURN if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) else f"Writes fail: {error}."


WRITER_LOCKS = ("-writer-line.lock", "-writer.lock")  # beside the database: the line, and the turn


class Turns:
    """This process's turn to write, among the processes that share the database: a kernel lock (flock) on a
    file beside it, which the kernel drops for a process that dies holding it.

    Taken in line: a writer holds a second lock while it waits for the turn, so that a process that
    has just written lines up behind one that waits, instead of taking the turn again at once.
    """

    def __init__(self, base):
        self.line, self.turn = (open_lock_file(f"{base}{suffix}") for suffix in WRITER_LOCKS)

    def take(self):
        fcntl.flock(self.line, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.turn, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self.line, fcntl.LOCK_UN)

    def give(self):
        fcntl.flock(self.turn, fcntl.LOCK_UN)

    def wanted(self):
        """Whether another process waits for the turn (it holds the line lock meanwhile)."""
        try:
            fcntl.flock(self.line, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.line, fcntl.LOCK_UN)
        return False

    def close(self):
        os.close(self.line)
        os.close(self.turn)


class WriteJob:
    """A function handed to the writer, and what became of it; `after` is the job it must follow."""

    def __init__(self, work, bulk, after):
        self.work, self.bulk, self.after = work, bulk, after
        self.context = contextvars.copy_context()  # the caller's, so that work sees current_app
        self.state = "queued"  # then "running" (the writer took it) or "dropped" (its caller gave up)
        self.result = self.error = None
        self.wrote = False
        self.done = threading.Event()

    def finish(self, error=None):
        self.error = error
        self.done.set()

    def blocked(self):
        """Whether the job it follows failed or was given up: then this one never runs."""
        return self.after is not None and (self.after.error is not None or self.after.state == "dropped")


class Writer:
    """The one thread of a process that writes, and the connection it owns.

    Request threads queue functions (jobs) and wait. In this process's turn (Turns), the writer runs
    what is queued in one BEGIN IMMEDIATE transaction, each function in a SAVEPOINT so that a
    failing one is rolled back alone, COMMITs once, and then wakes each caller with its result or
    its exception: nothing is acknowledged before it is on disk, and one fsync serves many jobs. A
    caller whose function has not started within `timeout` takes it back and gets a busy error.

    Bulk jobs (the slices of a large payload) wait while any other job does: a transaction takes
    them only while it holds no other job, is younger than BULK_BUDGET_S and no other process
    waits for the turn, so a write, here or in another process, waits for one slice at most.

    After a COMMIT, and in the same turn, the writer copies the WAL back into the database file (a
    checkpoint) once it is idle (nothing queued, no other process waiting for the turn), or at the
    latest CHECKPOINT_FORCE_S after it wrote: no caller waits for a checkpoint inside its COMMIT.

    The thread never ends for a failure: a lock, a BEGIN or a COMMIT that fails answers the jobs it
    concerns and the next turn tries again. `failing` says why writes fail until a write commits.
    """

    def __init__(self, path, lock_base, timeout):
        self.path, self.timeout = path, timeout
        self.turns = Turns(lock_base)
        self.close_turns = weakref.finalize(self, self.turns.close)
        self.queues = {False: collections.deque(), True: collections.deque()}  # jobs, and bulk jobs
        self.arrived = threading.Condition()  # guards the queues and every job's state
        self.closing = False
        self.db = None  # opened by the writer thread, used by it alone
        self.failing, self.learned_at = None, 0.0  # what the last write said (see learn), and when
        self.unsaved = False  # whether the WAL holds commits of this process not yet checkpointed
        self.checkpointed = time.monotonic()
        self.thread = threading.Thread(target=Writer.serve, args=(weakref.ref(self),), name="incidents-writer",
                                       daemon=True)
        self.thread.start()

    def submit(self, works, bulk=False):
        """The result of each work(db) once its transaction is committed, in order, or the first exception.

        Each job runs only after the one before it succeeded: after a failure, the rest never run.
        """
        jobs, after = [], None
        for work in works:
            jobs.append(after := WriteJob(work, bulk, after))
        with self.arrived:
            self.queues[bulk].extend(jobs)
            self.arrived.notify()
        try:
            return [self.outcome(job, self.timeout) for job in jobs]
        finally:
            for job in jobs:
                self.move(job, "dropped")  # what has not started never will: answered, or interrupted (Ctrl-C)

    def outcome(self, job, timeout):
        """A job's result once done; a busy error if it has not started within `timeout`."""
        if not job.done.wait(timeout) and self.move(job, "dropped"):
            self.learn(NO_TURN)
            raise busy_error(f"database is locked: no turn to write came within {timeout:g} s")
        job.done.wait()  # the writer runs it: its transaction ends soon
        if job.error is not None:
            raise job.error
        return job.result

    def move(self, job, state):
        """Move a queued job to `state`; False when it has left the queue already."""
        with self.arrived:
            if job.state != "queued":
                return False
            job.state = state
            return True

    def take(self, bulk=True):
        """The next job to run, others before bulk ones (those only if `bulk`), moved to running; or None."""
        with self.arrived:
            for jobs in (self.queues[False], self.queues[True]) if bulk else (self.queues[False],):
                while jobs:
                    job = jobs.popleft()
                    if job.state == "queued":
                        job.state = "running"
                        if not job.blocked():
                            return job
                        job.finish(job.after.error or busy_error("The write before it was given up; retry."))
        return None

    def take_all(self):
        """Every job still queued, moved to running (to be answered without running)."""
        jobs = []
        while (job := self.take()) is not None:
            jobs.append(job)
        return jobs

    @staticmethod
    def serve(ref):
        """The writer thread, until its Writer is closed or no longer in use (a weak reference lets it go)."""
        writer = None
        try:
            while (writer := ref()) is not None and writer.serve_once():
                writer = None
        except BaseException as error:  # only what no failure handling expects (an exit raised in this thread)
            logging.getLogger(__name__).error("the writer thread ended: %r", error)
            writer.abandon(error)

    def serve_once(self):
        """One turn: a transaction of what is queued, or a checkpoint once idle; False once closed."""
        with self.arrived:
            waiting = self.arrived.wait_for(lambda: self.closing or any(self.queues.values()), self.idle_wait())
            if self.closing and not any(self.queues.values()):
                self.shut()
                return False
        if waiting or self.checkpoint_due(idle=lambda: True):
            try:
                self.take_turn(waiting)
            except Exception as error:  # nothing else expects it (the lock's release failed): the next turn tries
                self.learn(write_failure(error) or f"Writes fail: {error}; see the server's log.")
        return True

    def idle_wait(self):
        """How long to wait for jobs: until a checkpoint is due once idle, else a second (to notice a close)."""
        return max(0.0, CHECKPOINT_IDLE_S - (time.monotonic() - self.checkpointed)) if self.unsaved else 1.0

    def take_turn(self, waiting):
        """In this process's turn: the queued jobs' transaction, then a checkpoint if one is due."""
        try:
            self.turns.take()
        except OSError as error:  # the kernel refused the lock (ENOLCK on a network file system)
            self.checkpointed = time.monotonic()  # a checkpoint due waits an idle interval, not a loop, to try again
            self.fail(self.take_all(), lock_error(error))
            return
        try:
            if waiting:
                self.transact()
            if self.checkpoint_due(idle=lambda: not waiting or not self.queues[False] and not self.turns.wanted()):
                self.checkpoint()
        finally:
            self.turns.give()

    def transact(self):
        """BEGIN, each job in a SAVEPOINT (up to WRITE_BATCH_MAX of them), COMMIT; then wake the callers."""
        try:
            self.db = self.db or connect(self.path, self.timeout)
            self.db.execute("BEGIN IMMEDIATE")  # waits up to the timeout for a writer outside the app
        except Exception as error:
            self.fail(self.take_all(), error)
            return
        ran, began = [], time.monotonic()  # jobs are taken once the transaction is theirs: a caller waits
        try:                                # for the turn no longer than its timeout
            while len(ran) < WRITE_BATCH_MAX and (job := self.take(self.bulk_fits(ran, began))) is not None:
                ran.append(job)
                self.run(job)
            self.db.execute("COMMIT")
        except BaseException as error:
            self.abort([job for job in ran if not job.done.is_set()], error)
            return
        if any(job.wrote for job in ran):
            self.unsaved = True
            self.learn(None)
        for job in ran:
            job.done.set()

    def bulk_fits(self, ran, began):
        """Whether the transaction may take a bulk job: it is empty, or it holds no other kind, began under
        BULK_BUDGET_S ago, and no other process waits for the turn."""
        return not ran or (all(job.bulk for job in ran) and time.monotonic() - began < BULK_BUDGET_S
                           and not self.turns.wanted())

    def run(self, job):
        """Run one job in a SAVEPOINT; a failing one is rolled back alone and answered at once."""
        changes = self.db.total_changes
        self.db.execute("SAVEPOINT job")
        try:
            job.result = job.context.run(job.work, self.db)
            self.db.execute("RELEASE job")
        except BaseException as error:
            self.fail([job], error)
            try:
                self.db.execute("ROLLBACK TO job")
                self.db.execute("RELEASE job")
            except sqlite3.Error:
                raise error from None  # SQLite ended the transaction (disk full), or cannot undo the job
            return
        job.wrote = self.db.total_changes > changes

    def abort(self, jobs, error):
        """Undo a transaction that failed as a whole: its jobs fail with the storage problem, else as busy."""
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            self.db, db, self.unsaved = None, self.db, False  # the next commit asks for a checkpoint again
            db.close()  # closing rolls back; the next transaction opens a new connection
        if sqlite_error_code(error) not in WRITE_REFUSALS:
            error = busy_error("The write was undone with its transaction, which another write broke; retry.")
        self.fail(jobs, error)

    def fail(self, jobs, error):
        """Answer each job with its own copy of `error`; note for /health a failure that is not the client's."""
        if (why := write_failure(error)) is not None:
            self.learn(why)
        for job in jobs:
            job.finish(copy.copy(error) if len(jobs) > 1 else error)

    def learn(self, why):
        """What a write said of the storage, for /health: why writes fail (a reason not the client's), or None
        once one committed."""
        self.failing, self.learned_at = why, time.monotonic()

    def checkpoint_due(self, idle):
        """Whether to copy the WAL back now: after this process wrote, once idle() or at the latest when forced."""
        waited = time.monotonic() - self.checkpointed
        return self.unsaved and self.db is not None and waited >= CHECKPOINT_IDLE_S and (
            waited >= CHECKPOINT_FORCE_S or idle())

    def checkpoint(self):
        """A PASSIVE checkpoint: it waits for no reader and blocks no one, Litestream included. Taken in this
        process's turn, no other writer of the service appends meanwhile, so it can catch up with the WAL and
        the next transaction starts it over: the WAL stays small under any steady load."""
        self.unsaved, self.checkpointed = False, time.monotonic()
        with contextlib.suppress(sqlite3.Error):  # a reader or Litestream holds part of it: the next one goes on
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self):
        """Close the connection and the lock files once what is queued is done; return when the thread has."""
        with self.arrived:
            self.closing = True
            self.arrived.notify()
        self.thread.join()

    def shut(self):
        if self.db is not None:
            self.db.close()
        self.close_turns()

    def abandon(self, error):
        """The thread ends unexpectedly: whatever it holds is let go and every job waiting is answered busy."""
        with contextlib.suppress(Exception):
            self.shut()
        self.learn(f"The writer stopped ({type(error).__name__}); it starts again on the next write.")
        for job in self.take_all():  # told before they wake, so that /health says so
            job.finish(busy_error("The writer stopped; retry."))


def lock_error(error):
    """A lock the kernel refused, as a write that failed for want of storage (503)."""
    refused = sqlite3.OperationalError(f"the writers' lock could not be taken: {error}")
    refused.sqlite_errorcode = sqlite3.SQLITE_IOERR
    return refused


class Clock:
    """work() every CLOCK_TICK_S, in a thread of its own and in the app's context, until stopped."""

    def __init__(self, app, work):
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=Clock.run, args=(weakref.ref(app), work, self.stopped),
                                       name="incidents-clock", daemon=True)
        self.thread.start()

    @staticmethod
    def run(app_ref, work, stopped):
        """Tick until stopped or until the app is no longer in use (a weak reference lets it go)."""
        while not stopped.wait(CLOCK_TICK_S) and (app := app_ref()) is not None:
            with app.app_context():
                try:
                    work()
                except sqlite3.Error as error:  # busy, or storage that fails: the next tick tries again
                    app.logger.warning("clock: %s; trying again in %s s", error, CLOCK_TICK_S)
                except Exception:
                    app.logger.exception("clock: unexpected error; trying again in %s s", CLOCK_TICK_S)
            del app

    def stop(self):
        self.stopped.set()
        self.thread.join()


class Database:
    """The app's SQLite file: reusable connections for reads, this process's writer, and its clock.

    Opening a connection costs more than Flask's own work for a request, so connections are kept
    and handed to one request at a time. Nothing is opened until first used. Each server process
    builds its own app (granian's workers each call create_app), so each has its own connections,
    writer and clock; none of them may be used across a fork (SQLite forbids it for a connection,
    and a lock file shared with a parent would let both hold the writers' lock at once).
    """

    def __init__(self, path, timeout=BUSY_TIMEOUT_S):
        self.path, self.timeout = path, timeout
        self.lock_base = os.path.realpath(path)  # one set of locks for every name of the file (a link, ../x)
        self.idle = queue.LifoQueue(IDLE_CONNECTIONS)
        self.writer, self.clock = None, None
        self.probing = threading.Lock()
        self.opening = threading.Lock()

    def start_clock(self, app, work):
        """Run work() on the clock (see Clock) from now on, in this process."""
        self.clock = Clock(app, work)

    def stop_clock(self):
        if self.clock is not None:
            self.clock.stop()
            self.clock = None

    def close(self):
        """Stop the clock, close every connection and the writer while nothing else uses them; they reopen on
        first use.

        The app's start does so once the file is migrated, so that a worker that migrated it opens its
        writer on its first write, as every other worker does.
        """
        self.stop_clock()
        with self.opening:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        self.close_idle()

    def close_idle(self):
        with contextlib.suppress(queue.Empty):
            while True:
                self.idle.get_nowait().close()

    def acquire(self):
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            return connect(self.path, self.timeout)

    def release(self, db):
        try:
            self.idle.put_nowait(db)
        except queue.Full:
            db.close()

    def check_lock_files(self):
        """Open the writers' lock files once, a link planted at their names replaced (see open_lock_file), or
        stop in one line."""
        for suffix in WRITER_LOCKS:
            try:
                os.close(open_lock_file(f"{self.lock_base}{suffix}"))
            except OSError as error:
                stop_startup(lock_file_refused(error, f"{self.lock_base}{suffix}"))

    def write(self, work, bulk=False):
        """work(db) run by this process's writer in a transaction: its result once committed, or its error."""
        return self.write_all([work], bulk)[0]

    def write_all(self, works, bulk=False):
        """Each work(db) in turn, each after the one before succeeded (see Writer.submit): their results."""
        return self.running_writer().submit(works, bulk)

    def running_writer(self):
        """This process's writer, started on first use and again if its thread ended."""
        writer = self.writer
        if writer is None or not writer.thread.is_alive():
            with self.opening:
                if self.writer is None or not self.writer.thread.is_alive():
                    try:
                        self.writer = Writer(self.path, self.lock_base, self.timeout)
                    except OSError as error:  # a lock file that cannot be opened
                        raise lock_error(error) from None
                writer = self.writer
        return writer

    def write_problem(self):
        """Why writes fail, or None while they work, as this process's last write said (see Writer.learn); once
        that is HEALTH_PROBE_S old, a real write of its own (write_checks) says it anew. So every process, whether
        clients write through it or not, finds within HEALTH_PROBE_S that the storage fails, or works again."""
        with self.probing:  # one try at a time: the others wait for its outcome
            try:
                if time.monotonic() - self.running_writer().learned_at >= HEALTH_PROBE_S:
                    self.write(record_write_check)  # waits for the turn as a write does
            except sqlite3.Error as error:  # the writer noted why, unless it could not start (its lock files)
                return (self.writer and self.writer.failing) or write_failure(error)
            return self.writer.failing

    def announce_upgrade(self, db, current):
        """Say so before upgrading a file that holds incidents: a step may take a while on a large one."""
        if 0 < current < len(MIGRATIONS):
            count = db.execute("SELECT max(id) FROM incidents").fetchone()[0] or 0
            click.echo(f"Upgrading {self.path} from schema version {current} to {len(MIGRATIONS)} "
                       f"(about {count} incidents; a step takes up to a minute a million)...", err=True)

    def migrate(self, current):
        """Create the file (for its owner only) or bring it from version `current` to the newest schema, one
        transaction per step.

        The version is read inside each step's transaction, so servers starting together
        on one file apply every step exactly once.
        """
        try:
            os.close(open_private(self.path))
        except OSError as error:
            stop_startup(f"INCIDENTS_DB names {self.path}, which cannot be opened ({error.strerror}); set it to the "
                         "database file's path")
        db = self.acquire()
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")  # a new file, or one restored from a backup's copy
            if current == len(MIGRATIONS):
                return  # up to date: no write, so a start never waits for a writer
            self.announce_upgrade(db, current)
            for version, statements in enumerate(MIGRATIONS, start=1):
                self.write(lambda step: self.upgrade(step, version, statements))
        finally:
            self.release(db)

    def schema_version(self):
        """The file's schema version (0 while there is no file), or a stop in one line for a file that is no SQLite
        database or one newer than this code: checked before anything is made beside the file."""
        if not os.path.exists(self.path):
            return 0
        try:
            with contextlib.closing(connect(self.path, self.timeout)) as db:  # closed: nothing stays open on a stop
                current = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as error:
            stop_startup(not_a_database(self.path, error))
        check_not_newer(self.path, current)
        return current

    def upgrade(self, db, version, statements):
        """Take the file to `version`, unless another process has already."""
        current = db.execute("PRAGMA user_version").fetchone()[0]
        check_not_newer(self.path, current)
        if current < version:
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version:d}")  # PRAGMA takes no parameters


def check_not_newer(path, version):
    """Stop in one line at a schema newer than this code's (a later release wrote the file)."""
    if version > len(MIGRATIONS):
        stop_startup(f"{path} has schema version {version}, newer than this code's {len(MIGRATIONS)}; upgrade the code")


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


def write(work):
    """work(db) in the app's shared write transaction; see Writer."""
    return current_app.extensions["incidents"].write(work)


def write_in_slices(work, items, bulk):
    """work(db, part) for each part of ALERT_CHUNK items, each after the one before succeeded (see
    Writer.submit), as bulk jobs if `bulk`: the results, in order."""
    parts = [items[start:start + ALERT_CHUNK] for start in range(0, len(items), ALERT_CHUNK)]
    return current_app.extensions["incidents"].write_all([lambda db, part=part: work(db, part) for part in parts], bulk)


def record_write_check(db):
    """A write of its own, for /health to learn whether writes work: when it last did."""
    db.execute("INSERT INTO write_checks (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
               (now(),))


def utc_timestamp(moment):
    """RFC 3339 UTC with milliseconds and Z, the one format stored and compared as text."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stored_time(moment, round_up=False, leap=False):
    """A moment as the stored format, held within its range (years 1 to 9999 in UTC); optionally rounded up to
    a millisecond, or a second on for a leap second."""
    try:
        return utc_timestamp(moment + timedelta(microseconds=-moment.microsecond % 1000 if round_up else 0,
                                                seconds=1 if leap else 0))
    except OverflowError:  # past either end of the range once in UTC
        return EARLIEST if moment.year == 1 else LATEST


def now():
    return utc_timestamp(datetime.now(timezone.utc))


def age_seconds(timestamp):
    """Seconds since a stored timestamp, or 0 for None."""
    if timestamp is None:
        return 0
    return round((datetime.now(timezone.utc) - datetime.fromisoformat(timestamp)).total_seconds(), 3)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ApiError(Exception):
    """A problem the client can fix, answered as application/problem+json.

    `extensions` become extra members of the problem, such as `errors` for invalid fields.
    """

    def __init__(self, status, detail, headers=None, **extensions):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.extensions = extensions


def not_a_database(path, error):
    return (f"INCIDENTS_DB names {path}, which is not an SQLite database ({error}); set it to the service's "
            "database file, or to a new path")


def stop_startup(message):
    """End startup with one line that says what to fix; a traceback would only bury it."""
    raise SystemExit(f"incidents: {message}")


def problem(status, title, detail, headers=None, **extensions):
    """An RFC 9457 problem details response."""
    response = jsonify({"type": "about:blank", "title": title, "status": status, "detail": detail, **extensions})
    response.status_code = status
    response.mimetype = "application/problem+json"
    response.headers.extend(headers or {})
    return response


def handle_api_error(error):
    return problem(error.status, HTTP_TITLES[error.status], error.detail, error.headers, **error.extensions)


def handle_http_exception(error):
    """Every HTTP error Flask or Werkzeug raises (404, 405, 413, ...) as a problem, titled as ours are."""
    headers = [(name, value) for name, value in error.get_headers() if name != "Content-Type"]  # Allow on 405
    return problem(error.code, HTTP_TITLES.get(error.code, error.name), error.description, headers)


def handle_database_error(error):
    """A write the database could not take now (busy, disk full, read-only): 503, saying why."""
    detail = WRITE_REFUSALS.get(sqlite_error_code(error))
    if detail is None:
        return handle_unexpected(error)
    current_app.logger.warning("write refused: %s", error)
    return problem(503, HTTP_TITLES[503], detail, RETRY_SOON)


RETRY_SOON = {"Retry-After": "1"}  # every 503 says when to try again


def handle_unexpected(error):
    """Log the traceback on the server; tell the client only that it failed."""
    current_app.logger.exception("unhandled error on %s %s", request.method, request.path)
    return problem(500, "Internal Server Error", "The server failed to answer; the error is logged.")


HTTP_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    503: "Service Unavailable",
}

# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


# The characters Python counts as spaces (str.isspace, str.strip, str.split), as a regex class.
SPACES = r"\t-\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Control characters that are not spaces.
CONTROL_CHARACTERS = r"\u0000-\u0008\u000e-\u001b\u007f-\u0084\u0086-\u009f"
# What clean_text accepts, as a pattern for the OpenAPI document: no NUL, and a character that is
# neither a space nor a control character.
VISIBLE_TEXT = rf"^[^\u0000]*[^{SPACES}{CONTROL_CHARACTERS}][^\u0000]*$"


def clean_text(value, limit):
    """A string of at most `limit` characters that shows something, trimmed; else ValueError saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters")
    if not has_visible_text(value):
        raise ValueError(TEXTS["en"]["text_invisible"])  # the API speaks English; Telegram's reply, the language
    return check_storable(value.strip())


def check_storable(value):
    """Text SQLite stores as given: no NUL, no lone surrogates (which UTF-8 cannot encode)."""
    if "\x00" in value:
        raise ValueError(TEXTS["en"]["text_nul"])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(TEXTS["en"]["text_unicode"]) from None
    return value


def has_visible_text(value):
    """Whether a text holds a character that is neither a space nor a control character (VISIBLE_TEXT)."""
    return any(not char.isspace() and unicodedata.category(char) != "Cc" for char in value)


def clean_whole(value, least, most):
    """A whole number from least to most: what JSON Schema calls an integer, 60 or 60.0 (the same number in JSON);
    not 1.5, not "60", not true."""
    if type(value) is float and value.is_integer() and least <= value <= most:
        value = int(value)
    if type(value) is not int or not least <= value <= most:
        raise ValueError(f"must be a whole number (a JSON integer) from {least} to {most}")
    return value


def clean_flag(value):
    if type(value) is not bool:
        raise ValueError("must be true or false")
    return value


def clean_choice(value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"must be one of: {', '.join(choices)}")
    return value


FIELD_RULES = {
    "description": lambda value: clean_text(value, DESCRIPTION_MAX),
    "status": lambda value: clean_choice(value, STATUSES),
    "source": lambda value: clean_choice(value, SOURCES),
    "dedup_key": lambda value: clean_text(value, DEDUP_KEY_MAX),
    "group": lambda value: None if value is None else clean_text(value, GROUP_MAX),
    "note": lambda value: clean_text(value, NOTE_MAX),
    "actor": lambda value: clean_text(value, ACTOR_MAX),
    "assignee": lambda value: None if value is None else clean_text(value, ACTOR_MAX),
    "period": lambda value: clean_whole(value, 1, HEARTBEAT_SECONDS_MAX),
    "grace": lambda value: clean_whole(value, 0, HEARTBEAT_SECONDS_MAX),
    "paused": lambda value: clean_flag(value),
}


def read_body(limit, too_large):
    """The raw body, or 413 when it is over `limit` bytes, with a Content-Length or chunked alike."""
    request.max_content_length = limit + 1  # a chunked body is cut off there: a byte more means too large
    try:
        data = request.get_data()
    except RequestEntityTooLarge:  # its Content-Length says so
        data = None
    except Exception as error:  # a broken chunked encoding, a client gone halfway: whatever the server raises
        raise ApiError(400, f"The body could not be read ({type(error).__name__}); send it again.") from None
    if data is None or len(data) > limit:
        drain_body(len(data or b""))
        raise ApiError(413, too_large or f"The body is over {limit} bytes; send less (a description holds up "
                                          f"to {DESCRIPTION_MAX} characters).")
    return data


def drain_body(taken):
    """Read and drop the rest of a body over its limit, up to DRAIN_MAX_BYTES in all, before the 413.

    granian closes a connection whose request body is left unread: a client that sends its whole body
    before it reads the answer (Python's http.client and urllib do) then finds the connection reset
    instead of the 413. A body declared with a length is never read past it.
    """
    left = min(request.content_length or DRAIN_MAX_BYTES, DRAIN_MAX_BYTES) - taken
    with contextlib.suppress(Exception):  # a client gone halfway: nobody to answer
        while left > 0 and (chunk := request.environ["wsgi.input"].read(min(left, 65536))):
            left -= len(chunk)


def read_json_object(limit=MAX_BODY_BYTES, too_large=None):
    """The request body as a dict: 415 unless it is declared JSON, 413 when too large, 400 unless an object."""
    if not request.is_json:
        raise ApiError(
            415,
            "Send the body as JSON with the header Content-Type: application/json, e.g. "
            "curl -H 'Content-Type: application/json' -d '{\"description\": \"...\", \"source\": \"operator\"}'.",
        )
    try:
        body = json.loads(read_body(limit, too_large), parse_int=json_integer)
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"The body is not valid JSON: {error}.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object, e.g. {\"description\": \"...\"}.")
    return body


def json_integer(text):
    """A JSON integer, as int() reads it, but for thousands of digits, which it refuses in words of its own."""
    if len(text) > sys.get_int_max_str_digits():
        raise ApiError(400, f"The body holds a whole number of {len(text)} digits, more than any field takes.")
    return int(text)


def invalid(what, errors):
    return ApiError(422, f"Some {what} are invalid; see errors.", errors=errors)


def validate_fields(body, required, optional, server_fields=SERVER_FIELDS):
    """Clean values for the fields of `body`, or 422 listing every problem."""
    allowed = required + optional
    errors = [
        {"field": field, "message": f"{'is set by the server' if field in server_fields else 'is not a known field'}; "
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
        raise invalid("fields", errors)
    return values


def rfc3339_moment(date_time, fraction, offset):
    """An aware datetime from the parts of an RFC 3339 time: digits past microseconds cut, Z read as +00:00."""
    try:
        return datetime.fromisoformat(f"{date_time}{(fraction or '')[:7]}{offset.upper().replace('Z', '+00:00')}")
    except ValueError:
        raise ValueError("is no date and time of the calendar (a month of 12, a day of its month, 24 hours, 60 "
                         "minutes, an offset of less than a day)") from None


def parse_datetime(text):
    """An RFC 3339 date-time (a date alone is midnight; no offset means UTC) as the stored format.

    Fractions past microseconds are cut, a leap second is the next minute's first, and the time is
    rounded up to a millisecond, which keeps both bounds exact: stored times have milliseconds, so
    created_at >= 10.1235 is created_at >= 10.124, and created_at < 10.1235 is created_at < 10.124.
    """
    match = DATETIME_PATTERN.fullmatch(text)
    if not match:
        raise ValueError("must be an RFC 3339 date-time such as 2026-11-22T10:15:30Z")
    date, minutes, seconds, fraction, offset = match.groups()
    leap = seconds == "60"
    moment = rfc3339_moment(f"{date}T{(minutes or 'T00:00')[1:]}:{'59' if leap else seconds or '00'}", fraction,
                            offset or "Z")
    return stored_time(moment, round_up=True, leap=leap)


def whole_number(text, least, most):
    """A whole number written in ASCII digits (a minus sign only where least < 0), from least to most; else
    None. Other digits (١, ２) are no number here, and a long text is never converted (Python refuses 4,300
    digits and more, in words of its own)."""
    if not re.fullmatch(r"-?[0-9]{1,19}" if least < 0 else r"[0-9]{1,19}", text):
        return None
    number = int(text)
    return number if least <= number <= most else None


def parse_limit(text):
    if (number := whole_number(text, 1, PAGE_LIMIT_MAX)) is None:
        raise ValueError(f"must be a whole number from 1 to {PAGE_LIMIT_MAX}")
    return number


def encode_cursor(position):
    """The cursor of a keyset position: its values joined by "_" (LIST_CURSOR, EVENTS_CURSOR)."""
    return "_".join(map(str, position))


def decode_cursor(text, pattern):
    """The keyset position a cursor stands for: [created_at, id] or [id]; ValueError for any other text."""
    if not re.fullmatch(pattern, text):
        raise ValueError("is not a cursor this server returned; start again without it")
    *timestamp, number = text.split("_")
    return [*timestamp, min(int(number), MAX_ID)]  # a larger id bounds nothing more


def parse_choices(values, choices):
    """Repeated and/or comma-separated values, each one of `choices`, in their canonical order."""
    given = {value.strip() for item in values for value in item.split(",")}
    unknown = given - set(choices)
    if unknown:
        raise ValueError(f"unknown value {', '.join(sorted(unknown))!r}; use one or more of: {', '.join(choices)}")
    return [choice for choice in choices if choice in given]


SEARCH_TERM = re.compile(r'"([^"]*)"|([^\s"]+)')
# What parse_search accepts, as a pattern for the OpenAPI document: words and "quoted phrases" of
# SEARCH_WORD_MIN characters or more (a phrase counted with its spaces collapsed), no control
# character but spaces. Spaces are spelled out: \s means other characters in other regex engines.
SEARCH_WORD = rf'[^{SPACES}"{CONTROL_CHARACTERS}]{{{SEARCH_WORD_MIN},}}'
SEARCH_PHRASE = (rf'"[{SPACES}]*(?:[^{SPACES}"{CONTROL_CHARACTERS}][^"{CONTROL_CHARACTERS}]*[{SPACES}]'
                 rf'[^"{CONTROL_CHARACTERS}]*[^{SPACES}"{CONTROL_CHARACTERS}]|{SEARCH_WORD})[{SPACES}]*"')
SEARCH_PATTERN = rf'^[{SPACES}]*(?:(?:{SEARCH_WORD}|{SEARCH_PHRASE})[{SPACES}]*)+$'


def parse_search(text):
    """q as an FTS5 query: each word and "quoted phrase" a literal string, every one required.

    Quoting every term makes the engine's own syntax (AND, NEAR, *, col:) plain text.
    """
    text = clean_text(text, SEARCH_MAX)
    if re.search(f"[{CONTROL_CHARACTERS}]", text):
        raise ValueError("must not contain control characters")
    if text.count('"') % 2:
        raise ValueError('has a " without its closing partner; close the phrase or leave the quote out')
    terms = [" ".join(match[1].split()) if match[1] is not None else match[2] for match in SEARCH_TERM.finditer(text)]
    short = [term for term in terms if len(term) < SEARCH_WORD_MIN]
    if short:
        raise ValueError(
            f"has words shorter than {SEARCH_WORD_MIN} characters ({', '.join(repr(term) for term in short)}), "
            f"which the index cannot look up; leave them out or quote them with a neighbour, e.g. \"точка на\"")
    return " ".join(f'"{term}"' for term in terms).replace("ё", "е").replace("Ё", "Е")


# Query parameters: name -> (parser, repeatable). A repeatable parser gets the list of values.
LIST_QUERY = {
    "status": (lambda values: parse_choices(values, STATUSES), True),
    "source": (lambda values: parse_choices(values, SOURCES), True),
    "dedup_key": (FIELD_RULES["dedup_key"], False),
    "group": (lambda text: clean_text(text, GROUP_MAX), False),
    "assignee": (lambda text: clean_text(text, ACTOR_MAX), False),
    "since": (parse_datetime, False),
    "until": (parse_datetime, False),
    "limit": (parse_limit, False),
    "cursor": (lambda text: decode_cursor(text, LIST_CURSOR), False),
    "q": (parse_search, False),
}
EVENTS_QUERY = {
    "limit": (parse_limit, False),
    "cursor": (lambda text: decode_cursor(text, EVENTS_CURSOR), False),
}


def parse_query(args, parsers):
    """The parsed query parameters, or 422 naming each unknown or bad one."""
    errors = [
        {"field": name, "message": f"is not a known query parameter; use {', '.join(parsers)}"}
        for name in args.keys()
        if name not in parsers
    ]
    query = {}
    for name, (parse, repeatable) in parsers.items():
        values = args.getlist(name)
        if not values:
            continue
        if len(values) > 1 and not repeatable:
            errors.append({"field": name, "message": "give it at most once"})
            continue
        try:
            query[name] = parse(values if repeatable else values[0])
        except ValueError as error:
            errors.append({"field": name, "message": str(error)})
    if errors:
        raise invalid("query parameters", errors)
    return query


# ---------------------------------------------------------------------------
# Incidents and their timeline (inside the caller's write transaction)
# ---------------------------------------------------------------------------


def no_such_incident(incident_id):
    return ApiError(404, f"There is no incident {incident_id}.")


def fetch_incident_json(db, incident_id):
    """The incident as JSON text built by SQLite, or 404 when there is none."""
    row = db.execute(f"SELECT {INCIDENT_JSON} FROM incidents WHERE id = ?", (incident_id,)).fetchone()
    if row is None:
        raise no_such_incident(incident_id)
    return row[0]


def add_event(db, incident_id, at, event_type, **columns):
    """Append an event to an incident's timeline; `columns` names come from code, never requests."""
    names = ("incident_id", "at", "type", *columns)
    db.execute(
        f"INSERT INTO events ({', '.join(names)}) VALUES ({placeholders(names)})",
        (incident_id, at, event_type, *columns.values()),
    )


def add_repeat_event(db, incident_id, at):
    """Count a folded report: a run of repeats is one event with a count, not a row each."""
    counted = db.execute(
        """UPDATE events SET count = count + 1, last_at = ?
           WHERE id = (SELECT max(id) FROM events WHERE incident_id = ?) AND type = 'repeated'""",
        (at, incident_id),
    ).rowcount
    if not counted:
        add_event(db, incident_id, at, "repeated", count=1, last_at=at)


# The chats to reach of a list of chat ids (a JSON parameter): one that became a supergroup at its
# new id, one the bot was removed from not at all.
REACHABLE_CHATS = """SELECT coalesce(gone.moved_to, chats.value) AS chat_id
    FROM json_each(:chats) AS chats LEFT JOIN notify_chats_gone AS gone ON gone.chat_id = chats.value
    WHERE gone.chat_id IS NULL OR gone.moved_to NOT IN (SELECT chat_id FROM notify_chats_gone)"""


def shown_chats(escalated_at):
    """The chats that show an incident or a storm: the notify chats, and the escalation chats once it was
    escalated."""
    config = current_app.config
    return [*config["TELEGRAM_NOTIFY_CHAT_IDS"], *(config["TELEGRAM_ESCALATE_CHAT_IDS"] if escalated_at else ())]


def queue_notification(db, incident_id, kind, chats=None):
    """Record, in the transaction of a change, that the incident's message in each chat must catch up. An
    incident of a storm has its own message only where it had one before the storm (see Storms): elsewhere the
    storm's message shows its changes."""
    if not current_app.config["TELEGRAM_NOTIFY_CHAT_IDS"]:
        return
    incident = db.execute("SELECT escalated_at, storm_id FROM incidents WHERE id = ?", (incident_id,)).fetchone()
    db.execute(f"""INSERT INTO notify_outbox (incident_id, chat_id, kind, seq, queued_at)
                   SELECT :id, chat_id, :kind, 1, :at FROM ({REACHABLE_CHATS})
                   WHERE :storm IS NULL OR chat_id IN (SELECT chat_id FROM notify_messages WHERE incident_id = :id
                                                       UNION SELECT chat_id FROM notify_outbox WHERE incident_id = :id)
                   ON CONFLICT (incident_id, chat_id, kind) DO UPDATE SET seq = seq + 1""",
               {"id": incident_id, "kind": kind, "at": now(), "storm": incident["storm_id"],
                "chats": json.dumps(shown_chats(incident["escalated_at"]) if chats is None else chats)})
    if incident["storm_id"] is not None and kind == "change":
        queue_storm(db, incident["storm_id"], "change")


def fold_report(db, dedup_key, at):
    """Count a repeat on the open incident that holds dedup_key: (id, incident JSON), or None."""
    folded = db.execute(
        f"""UPDATE incidents SET occurrences = occurrences + 1, last_seen_at = ?, updated_at = ?
            WHERE dedup_key = ? AND {IS_OPEN} RETURNING id, {INCIDENT_JSON}""",
        (at, at, dedup_key),
    ).fetchone()
    if folded:
        add_repeat_event(db, folded[0], at)
        queue_notification(db, folded[0], "repeat")
    return folded


def shifted(timestamp, seconds):
    """A stored timestamp moved by `seconds`: later, or earlier for a negative number."""
    return utc_timestamp(datetime.fromisoformat(timestamp) + timedelta(seconds=seconds))


def status_clock(current, status, at):
    """The columns a change of status moves: when it was opened, acknowledged and resolved, and when to remind.

    Becoming new opens it afresh: both cleared, the reminders started again. Leaving new acknowledges
    it (once) and stops them; leaving the open statuses resolves it, and reopening clears that again.
    """
    if status == "new":  # an incident of a storm is reminded of with its storm
        after, chats = current_app.config["REMIND_AFTER"], current_app.config["TELEGRAM_NOTIFY_CHAT_IDS"]
        return {"acknowledged_at": None, "resolved_at": None, "opened_at": at, "reminders": 0,
                "remind_at": shifted(at, after) if after and chats and current["storm_id"] is None else None}
    clock = {"acknowledged_at": current["acknowledged_at"] or at, "remind_at": None}
    if status in OPEN_STATUSES:
        clock["resolved_at"] = None
        if current["status"] not in OPEN_STATUSES:
            clock["opened_at"] = at
    elif current["status"] in OPEN_STATUSES:
        clock["resolved_at"] = at
    return clock


def insert_incident(db, values, at, note=None, actor=None):
    """A new incident and its `created` event: (id, incident JSON)."""
    status = values.get("status", DEFAULT_STATUS)
    clock = status_clock({"status": "new", "acknowledged_at": None, "storm_id": None}, status, at)
    incident_id, body = db.execute(
        f"""INSERT INTO incidents (description, status, source, dedup_key, group_name, created_at, updated_at,
                                   last_seen_at, opened_at, acknowledged_at, resolved_at, remind_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id, {INCIDENT_JSON}""",
        (values["description"], status, values["source"], values.get("dedup_key"), values.get("group"), at, at, at,
         at, clock["acknowledged_at"], clock.get("resolved_at"), clock["remind_at"]),
    ).fetchone()
    add_event(db, incident_id, at, "created", to_status=status, note=note, actor=actor)
    join_storm(db, incident_id, values, at)
    queue_notification(db, incident_id, "change")
    return incident_id, body


def report_incident(db, values, note=None, actor=None):
    """Fold a report into the open incident with its dedup_key, or create a new incident.

    Returns (id, incident JSON, whether it was created).
    """
    at = now()
    folded = "dedup_key" in values and fold_report(db, values["dedup_key"], at)
    if folded:
        return folded[0], folded[1], False
    return (*insert_incident(db, values, at, note, actor), True)


def check_dedup_key_free(db, incident_id, dedup_key):
    """409 when another open incident holds the key that reopening this one would take back."""
    holder = db.execute(
        f"SELECT id FROM incidents WHERE dedup_key = ? AND {IS_OPEN} AND id != ?", (dedup_key, incident_id)
    ).fetchone()
    if holder:
        raise ApiError(
            409,
            f"Incident {holder['id']} is open with the same dedup_key {dedup_key!r}; "
            f"resolve or close it before reopening this one, or work on incident {holder['id']}.",
            open_incident_id=holder["id"],
        )


def change_incident(db, incident_id, values, note=None, actor=None, taken_by=None):
    """Apply changes of status, description and assignee, each on the timeline; returns the incident JSON.

    A change to in_progress is a take: it assigns the incident to `taken_by` (else the actor), unless
    someone is assigned already or the change names the assignee. Going back to new leaves it nobody's
    (unless the change names someone). updated_at moves only when a value really changes; a note
    alone is a `note` event.
    """
    current = db.execute("""SELECT status, description, dedup_key, assignee, acknowledged_at, storm_id FROM incidents
                            WHERE id = ?""", (incident_id,)).fetchone()
    if current is None:
        raise no_such_incident(incident_id)
    if values.get("status") == "in_progress" != current["status"] and current["assignee"] is None:
        values = {"assignee": taken_by or actor, **values}
    if values.get("status") == "new" != current["status"]:
        values = {"assignee": None, **values}
    changed = {field: value for field, value in values.items() if value != current[field]}
    reopening = changed.get("status") in OPEN_STATUSES and current["status"] not in OPEN_STATUSES
    if reopening and current["dedup_key"] is not None:
        check_dedup_key_free(db, incident_id, current["dedup_key"])
    at = now()
    if reopening and current["storm_id"] is not None and not storm_raging(db, current["storm_id"], at):
        current, changed = {**current, "storm_id": None}, {**changed, "storm_id": None}  # shown and called for alone
    if changed:
        columns = {**changed, **(status_clock(current, changed["status"], at) if "status" in changed else {})}
        assignments = ", ".join(f"{column} = ?" for column in columns)  # names from code: FIELD_RULES, status_clock
        db.execute(f"UPDATE incidents SET {assignments}, updated_at = ? WHERE id = ?", (*columns.values(), at, incident_id))
        if current["status"] == "new" and "status" in changed:  # reminders already sent call for nothing now
            db.execute("UPDATE notify_reminders SET state = 'stale' WHERE incident_id = ?", (incident_id,))
        queue_notification(db, incident_id, "change")
    record_changes(db, incident_id, current, changed, at, note, actor)
    return fetch_incident_json(db, incident_id)


def record_changes(db, incident_id, current, changed, at, note, actor):
    """The timeline's events for one change, the note on the first of them (or on a `note` event alone)."""
    events = []
    if "status" in changed:
        events.append(("status_changed", {"from_status": current["status"], "to_status": changed["status"]}))
    if "description" in changed:
        events.append(("description_changed", {}))
    if "assignee" in changed:
        events.append(("assigned", {"from_assignee": current["assignee"], "to_assignee": changed["assignee"]}))
    if note and not events:
        events.append(("note", {}))
    for position, (event_type, columns) in enumerate(events):
        add_event(db, incident_id, at, event_type, note=None if position else note, actor=actor, **columns)


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

class IdConverter(BaseConverter):
    """An id in a URL: ASCII digits (Werkzeug's int takes any Unicode digit: ١ would be 1), anything else
    matching no route, a 404. More than 19 digits are never converted (Python refuses thousands): they stay
    text, and check_incident_id answers 404 for them as for the numbers past SQLite's largest integer."""

    regex = "[0-9]+"

    def to_python(self, value):
        return int(value) if len(value) <= 19 else value

    def to_url(self, value):
        return str(value)


INCIDENT_URL = "/incidents/<id:incident_id>"


def check_incident_id():
    """An id past SQLite's largest integer is no incident, on every route that takes one."""
    incident_id = (request.view_args or {}).get("incident_id", 0)
    if isinstance(incident_id, str) or incident_id > MAX_ID:
        raise no_such_incident(incident_id)


def json_response(text, status=200, headers=None):
    """A response whose JSON body SQLite or the caller already built."""
    return Response(text, status, headers, mimetype="application/json")


def page_response(rows, limit, position):
    """`{"items", "next_cursor"}` from up to limit + 1 rows whose last column is an item's JSON."""
    page = rows[:limit]
    next_cursor = encode_cursor(position(page[-1])) if len(rows) > limit else None
    items = ",".join(row[-1] for row in page)
    return json_response(f'{{"items":[{items}],"next_cursor":{json.dumps(next_cursor)}}}')


def accepted_tokens():
    """The bearer tokens the request's route takes: none on the PUBLIC_ENDPOINTS (the webhook has its own
    secret), the API token everywhere else, and the ping token too on a check-in."""
    config = current_app.config
    if request.endpoint in PUBLIC_ENDPOINTS:
        return []
    tokens = [config["API_TOKEN"], config["PING_TOKEN"]] if request.endpoint == "check_in" else [config["API_TOKEN"]]
    return [token for token in tokens if token]


def check_token():
    """Require a bearer token that the route takes, where one is set; every token is compared in full."""
    tokens = accepted_tokens()
    if not tokens:
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    matches = [hmac.compare_digest(given.strip().encode(), token.encode()) for token in tokens]
    if scheme.lower() != "bearer" or not any(matches):
        raise ApiError(
            401,
            "Send the API token as the header Authorization: Bearer <token>.",
            {"WWW-Authenticate": 'Bearer realm="incidents"'},
        )


def no_content(response):
    """The response as a 204: no body, of no type."""
    response.status_code = 204
    del response.headers["Content-Type"]
    return response


def answer_options(app):
    """OPTIONS on any route: 204 with Allow (Flask's own answer is a 200 of text/html, empty)."""
    return no_content(Flask.make_default_options_response(app))


def health():
    """Whether the database answers and takes writes: 200, or 503 saying what is wrong."""
    try:
        get_db().execute("SELECT 1 FROM incidents LIMIT 1").fetchall()
    except sqlite3.Error as error:
        current_app.logger.error("health check failed: %s", error)
        return problem(503, HTTP_TITLES[503], "The database does not answer.", RETRY_SOON)
    write_problem = current_app.extensions["incidents"].write_problem()
    if write_problem:
        return problem(503, HTTP_TITLES[503], write_problem, RETRY_SOON, reads="ok", writes="failing")
    return jsonify(status="ok")


def create_incident():
    """Record a report: 201 and Location for a new incident, 200 when it folds into an open one."""
    values = validate_fields(read_json_object(), ["description", "source"], ["status", "dedup_key", "group"])
    if values.get("dedup_key", "").startswith(PAGERDUTY_KEY_PREFIX):  # PagerDuty's keys meet no other intake's
        raise invalid("fields", [{"field": "dedup_key", "message": f"must not begin with {PAGERDUTY_KEY_PREFIX}, "
                                                                   "which is kept for PagerDuty events"}])
    incident_id, body, created = write(lambda db: report_incident(db, values))
    if created:
        return json_response(body, 201, {"Location": f"/incidents/{incident_id}"})
    return json_response(body, 200, {"Content-Location": f"/incidents/{incident_id}"})


def get_incident(incident_id):
    """One incident, or 404."""
    return json_response(fetch_incident_json(get_db(), incident_id))


# One incident's row in the search index, probed for the few rows a dedup_key stream reads.
SEARCH_ROW = "EXISTS (SELECT 1 FROM incidents_search WHERE incidents_search MATCH ? AND rowid = -incidents.id)"


# Filters with an index of their own, led by the filter's column and ordered by created_at: name -> column.
KEY_FILTERS = {"dedup_key": "dedup_key", "assignee": "assignee", "group": "group_name"}


def list_streams(query):
    """The WHERE conditions and values of each ordered stream that a list page merges.

    Without a key filter, or with a group alone (which may hold a storm of many): one stream per
    (status, source) pair, each an equality prefix of the (status, source, created_at) index, or of
    (group_name, status, source, created_at). With dedup_key or assignee: one stream on the first
    one's own index, where unary + keeps SQLite from preferring the status index for the few rows a
    key has. A search probes the search index for each row a stream reads.
    """
    statuses, sources = query.get("status", STATUSES), query.get("source", SOURCES)
    keys = [name for name in KEY_FILTERS if name in query]
    search = ([SEARCH_ROW], [query["q"]]) if "q" in query else ([], [])
    if keys and keys != ["group"]:  # columns from KEY_FILTERS only
        conditions = [f"{KEY_FILTERS[keys[0]]} = ?", *(f"+{KEY_FILTERS[name]} = ?" for name in keys[1:]),
                      f"+status IN ({placeholders(statuses)})", f"+source IN ({placeholders(sources)})"]
        return [(conditions + search[0], [*(query[name] for name in keys), *statuses, *sources, *search[1]])]
    group = (["group_name = ?"], [query["group"]]) if keys else ([], [])
    return [([*group[0], "status = ?", "source = ?", *search[0]], [*group[1], status, source, *search[1]])
            for status in statuses for source in sources]


def list_page_sql(streams):
    """SQL for one page: the newest rows of each stream (a list of WHERE conditions), merged.

    Each stream is read from an index already in order and stops after LIMIT rows, so a page costs
    the same at any table size and for any mix of filters, where one `status IN (...)` query
    would sort every matching row.
    """
    selects = [
        f"""SELECT * FROM (SELECT id, created_at FROM incidents WHERE {' AND '.join(conditions)}
            ORDER BY created_at DESC, id DESC LIMIT ?)"""
        for conditions in streams
    ]
    return f"""SELECT id, created_at, {INCIDENT_JSON} FROM incidents
               WHERE id IN (SELECT id FROM ({' UNION ALL '.join(selects)}
                            ORDER BY created_at DESC, id DESC LIMIT ?))
               ORDER BY created_at DESC, id DESC"""


def time_bounds(query):
    """The since/until conditions of a list or search page, with their values."""
    return [(condition, [query[name]]) for condition, name in (("created_at >= ?", "since"), ("created_at < ?", "until"))
            if name in query]


def search_sql(query):
    """SQL for one page of matches, read from the search index newest first (its rowid is -id).

    The filters are checked on each match in index order until the page is full, so no match
    is ever sorted; the cursor's id is where the next page starts.
    """
    conditions, params = ["incidents_search MATCH ?"], [query["q"]]
    for name in ("status", "source"):
        if name in query:
            conditions.append(f"{name} IN ({placeholders(query[name])})")
            params += query[name]
    for condition, values in time_bounds(query) + ([("incidents_search.rowid > ?", [-query["cursor"][1]])]
                                                   if "cursor" in query else []):
        conditions.append(condition)
        params += values
    return f"""SELECT incidents.id, created_at, {INCIDENT_JSON}
               FROM incidents_search JOIN incidents ON incidents.id = -incidents_search.rowid
               WHERE {' AND '.join(conditions)} ORDER BY incidents_search.rowid LIMIT ?""", params


def list_sql(query):
    """The SQL and parameters of one list page for the parsed query parameters."""
    fetch = query.get("limit", PAGE_LIMIT_DEFAULT) + 1  # one more than a page tells whether another follows
    if "q" in query and not any(name in query for name in KEY_FILTERS):
        sql, params = search_sql(query)
        return sql, [*params, fetch]
    bounds = time_bounds(query) + ([("(created_at, id) < (?, ?)", query["cursor"])] if "cursor" in query else [])
    streams, params = [], []
    for conditions, values in list_streams(query):
        streams.append(conditions + [condition for condition, _ in bounds])
        params += [*values, *(value for _, bound in bounds for value in bound), fetch]
    return list_page_sql(streams), [*params, fetch]


def list_incidents():
    """Incidents newest first, filtered, one keyset page at a time."""
    query = parse_query(request.args, LIST_QUERY)
    rows = get_db().execute(*list_sql(query)).fetchall()
    return page_response(rows, query.get("limit", PAGE_LIMIT_DEFAULT), lambda row: [row["created_at"], row["id"]])


def update_incident(incident_id):
    """Change status, description and/or assignee, or add a note; every change goes on the timeline."""
    values = validate_fields(read_json_object(), [], ["status", "description", "assignee", "note", "actor"])
    note, actor = values.pop("note", None), values.pop("actor", None)
    if not values and note is None:
        raise invalid("fields", [{"field": "status", "message": "send status, description, assignee and/or note"}])
    return json_response(write(lambda db: change_incident(db, incident_id, values, note, actor)))


def list_events(incident_id):
    """An incident's timeline, oldest first, one keyset page at a time; 404 for no such incident."""
    query = parse_query(request.args, EVENTS_QUERY)
    limit = query.get("limit", PAGE_LIMIT_DEFAULT)
    db = get_db()
    if db.execute("SELECT 1 FROM incidents WHERE id = ?", (incident_id,)).fetchone() is None:
        raise no_such_incident(incident_id)
    after = query.get("cursor", [0])[0]
    rows = db.execute(
        f"SELECT id, {EVENT_JSON} FROM events WHERE incident_id = ? AND id > ? ORDER BY id LIMIT ?",
        (incident_id, after, limit + 1),
    ).fetchall()
    return page_response(rows, limit, lambda row: [row["id"]])


# ---------------------------------------------------------------------------
# Texts people read: every word the service writes in the chats and on timelines, in each language
# ---------------------------------------------------------------------------

# One catalog: key -> text, with {placeholders}; every language has every key and the same placeholders (a test
# holds this). A count reads as plural(count, noun), with each language's plural forms of the noun. The API stays
# English: clients parse it, and a script's author reads the README.
TEXTS = {
    "en": {
        "time": "{at:%Y-%m-%d %H:%M %Z}",
        "hours_minutes": "{hours} {minutes}",
        "whole_hours": "{hours} 0 min",
        "someone": "someone",
        "actor_heartbeat": "heartbeat",
        "telegram_actor": "{name} (Telegram user {id})",
        "status_new": "new",
        "status_in_progress": "in progress",
        "status_resolved": "resolved",
        "status_closed": "closed",
        "source_operator": "operator",
        "source_monitoring": "monitoring",
        "source_partner": "partner",
        "button_take": "Take",
        "button_resolve": "Resolve",
        "button_reopen": "Reopen",
        "incident_header": "<b>Incident #{id}</b> · {status} · {source}",
        "reported": "Reported {at}",
        "repeated": "Repeated {times}, last {at}",
        "taken_by": "Taken by {actor}, {at}",
        "now_status": "Now {status}: by {actor}, {at}",
        "assigned": "Assigned to {assignee}",
        "reminder": "⏰ <b>Incident #{id}</b> has waited {waited} and {nobody} (reminder {number} of {most})",
        "escalated": "⚠️ Escalated: <b>incident #{id}</b> has waited {waited} and {nobody}",
        "nobody": "nobody has taken it",
        "nobody_assigned": "nobody has taken it (assigned to {assignee})",
        "reminder_taken_back": "Incident #{id} is {status} now.",
        "escalation_note": "Nobody took it after the last reminder: announced to the escalation chats",
        "command_incident": "report a problem",
        "command_incidents": "the newest unresolved incidents",
        "command_heartbeats": "the heartbeats that are late or down",
        "command_take": "take an incident (in_progress)",
        "command_resolve": "resolve an incident",
        "command_help": "what the bot does, and this chat's id",
        "help": "Send me a problem and I register it as an incident.\n"
                "In a private chat, any text is a report. In a group: /incident <text>.\n"
                "/incidents - {incidents}\n/heartbeats - {heartbeats}\n/take <id> - {take}\n/resolve <id> - {resolve}",
        "help_acts_here": "{help}\n\nThis chat's id is {chat_id}; the bot acts here.",
        "help_not_here": "{help}\n\nThis chat's id is {chat_id}; the bot does not act here. "
                         "To allow it, add {chat_id} to TELEGRAM_ALLOWED_CHAT_IDS.",
        "chat_not_allowed": "This chat ({chat_id}) may not use this bot. To allow it, add {chat_id} to "
                            "TELEGRAM_ALLOWED_CHAT_IDS.",
        "only_text": "I only understand text. /help",
        "describe": "Describe the problem: /incident <text>",
        "send_number": "Send the incident number, e.g. /{command} 17",
        "registered": "Incident #{id} registered",
        "registered_name_cleaned": "Incident #{id} registered (your name is shown without characters that cannot "
                                   "be stored)",
        "not_registered": "Nothing was registered: the text {reason}.",
        "text_nul": "must not contain NUL characters",
        "text_invisible": "must contain a visible character, not only spaces or control characters",
        "text_unicode": "must be valid Unicode (no lone surrogates)",
        "report_note": "Reported in Telegram by {actor} in {where} (chat {chat}, message {message})",
        "private_chat": "a private chat",
        "group_chat": "chat {title!r}",
        "no_open_incidents": "No unresolved incidents.",
        "open_new": "new",  # in /incidents: the status as the API names it
        "open_in_progress": "in_progress",
        "tap_not_allowed": "Not allowed in this chat",
        "tap_unknown": "Unknown action",
        "no_incident": "There is no incident #{id}",
        "already": "Incident #{id} is already {status}",
        "done_take": "Incident #{id} taken by {name}{still}",
        "done_resolve": "Incident #{id} resolved by {name}{still}",
        "done_reopen": "Incident #{id} reopened by {name}{still}",
        "still_assigned": " (assigned to {assignee})",
        "reopen_held": "Incident {holder} is open with the same dedup_key {dedup_key!r}; resolve or close it before "
                       "reopening this one, or work on incident {holder}.",
        "heartbeat_late": "late",
        "heartbeat_down": "down",
        "heartbeats_on_time": "Every heartbeat checks in on time.",
        "heartbeat_line": "{name} [{status}] last check-in {last}{incident}",
        "heartbeat_never": "never",
        "heartbeat_incident": ", incident #{id}",
        "heartbeats_more": "… and more: GET /heartbeats?status=late,down",
        "silent": "No check-in since {at}; expected every {period} with {grace} of grace",
        "silent_since_created": "No check-in since it was created, {at}; expected every {period} with {grace} of grace",
        "back": "Checked in again after {silence} of silence",
        "heartbeat_deleted": "Its heartbeat {name} was deleted: no check-in will resolve this incident now, and its "
                             "dedup_key {dedup_key} is released",
        "check_in_failed": "The check-in reported a failure",
        "check_in_exit_status": "The check-in reported a failure (exit status {status})",
        "alert_again": "The alert fired again (started {started})",
        "alert_again_unknown": "The alert fired again (started at an unknown time)",
        "alert_from": "Alert from {sender}, firing since {since}",
        "alert_from_unknown": "Alert from {sender}, firing since an unknown time",
        "alert_ended": "The alert ended at {ended}",
        "alert_ended_unknown": "The alert ended at an unknown time",
        "alert_unnamed": "Alert without a name",
        "pagerduty_event": "PagerDuty event from {client}: {facts}",
        "pagerduty_severity": "severity {value}",
        "pagerduty_source": "source {value}",
        "pagerduty_component": "component {value}",
        "pagerduty_class": "class {value}",
        "pagerduty_timestamp": "timestamp {value}",
        "pagerduty_details": "details {value}",
        "pagerduty_links": "links {value}",
        "pagerduty_again": "Triggered again ({severity})",
        "pagerduty_resolved": "Resolved by a PagerDuty event from {actor}",
        "storm_title": "🌩 <b>Storm: {group}</b> · {incidents} since {since}",
        "storm_open": "Open: {open} (new {new}, taken {taken}) · back: {back}",
        "storm_over": "✅ Over {at}: every incident of it resolved; it lasted {lasted}",
        "storm_more": "… and {more} more",
        "storm_of_source": "{source} reports, no group",
        "storm_take_all": "Take all",
        "storm_reminder": "⏰ <b>Storm: {group}</b>: {new} waited {waited} and nobody has taken any "
                          "(reminder {number} of {most})",
        "storm_escalated": "⚠️ Escalated: <b>storm {group}</b>: {new} waited {waited} and nobody has taken any",
        "storm_taken": "{count} of storm {group} taken by {name}",
        "storm_nothing_new": "Nothing of storm {group} is new now",
        "storm_unknown": "There is no storm #{number}",
        "storm_note": "Taken with the whole storm {group} ({count})",
    },
    "ru": {
        "time": "{at:%d.%m.%Y %H:%M %Z}",
        "hours_minutes": "{hours} {minutes}",
        "whole_hours": "{hours}",
        "someone": "кто-то",
        "actor_heartbeat": "пульс",
        "telegram_actor": "{name} (пользователь Telegram {id})",
        "status_new": "новый",
        "status_in_progress": "в работе",
        "status_resolved": "решён",
        "status_closed": "закрыт",
        "source_operator": "оператор",
        "source_monitoring": "мониторинг",
        "source_partner": "партнёр",
        "button_take": "Взять",
        "button_resolve": "Решено",
        "button_reopen": "Открыть снова",
        "incident_header": "<b>Инцидент #{id}</b> · {status} · {source}",
        "reported": "Поступил {at}",
        "repeated": "Повторился {times}, последний раз {at}",
        "taken_by": "Взят: {actor}, {at}",
        "now_status": "Теперь {status}: {actor}, {at}",
        "assigned": "Назначен: {assignee}",
        "reminder": "⏰ <b>Инцидент #{id}</b> ждёт уже {waited}, и {nobody} (напоминание {number} из {most})",
        "escalated": "⚠️ Эскалация: <b>инцидент #{id}</b> ждёт уже {waited}, и {nobody}",
        "nobody": "никто его не взял",
        "nobody_assigned": "никто его не взял (назначен: {assignee})",
        "reminder_taken_back": "Инцидент #{id} теперь {status}.",
        "escalation_note": "Никто не взял его после последнего напоминания: отправлен в чаты эскалации",
        "command_incident": "сообщить о проблеме",
        "command_incidents": "новейшие нерешённые инциденты",
        "command_heartbeats": "пульсы, которые опаздывают или молчат",
        "command_take": "взять инцидент в работу",
        "command_resolve": "отметить инцидент решённым",
        "command_help": "что умеет бот и номер этого чата",
        "help": "Пришлите мне проблему, и я зарегистрирую её как инцидент.\n"
                "В личном чате любой текст — это сообщение о проблеме. В группе: /incident <текст>.\n"
                "/incidents — {incidents}\n/heartbeats — {heartbeats}\n/take <номер> — {take}\n"
                "/resolve <номер> — {resolve}",
        "help_acts_here": "{help}\n\nНомер этого чата: {chat_id}; бот здесь работает.",
        "help_not_here": "{help}\n\nНомер этого чата: {chat_id}; бот здесь не работает. "
                         "Чтобы разрешить, добавьте {chat_id} в TELEGRAM_ALLOWED_CHAT_IDS.",
        "chat_not_allowed": "Этому чату ({chat_id}) нельзя пользоваться ботом. Чтобы разрешить, добавьте {chat_id} в "
                            "TELEGRAM_ALLOWED_CHAT_IDS.",
        "only_text": "Я понимаю только текст. /help",
        "describe": "Опишите проблему: /incident <текст>",
        "send_number": "Пришлите номер инцидента, например: /{command} 17",
        "registered": "Инцидент #{id} зарегистрирован",
        "registered_name_cleaned": "Инцидент #{id} зарегистрирован (ваше имя показано без символов, которые нельзя "
                                   "сохранить)",
        "not_registered": "Ничего не зарегистрировано: текст {reason}.",
        "text_nul": "не должен содержать нулевых символов",
        "text_invisible": "должен содержать видимый символ, а не только пробелы и управляющие символы",
        "text_unicode": "должен быть правильным Юникодом (без одиночных суррогатов)",
        "report_note": "Сообщение в Telegram от {actor} {where} (чат {chat}, сообщение {message})",
        "private_chat": "в личном чате",
        "group_chat": "в чате «{title}»",
        "no_open_incidents": "Нерешённых инцидентов нет.",
        "open_new": "новый",
        "open_in_progress": "в работе",
        "tap_not_allowed": "В этом чате нельзя",
        "tap_unknown": "Неизвестное действие",
        "no_incident": "Инцидента #{id} нет",
        "already": "Инцидент #{id} уже {status}",
        "done_take": "Инцидент #{id} взят: {name}{still}",
        "done_resolve": "Инцидент #{id} решён: {name}{still}",
        "done_reopen": "Инцидент #{id} снова открыт: {name}{still}",
        "still_assigned": " (назначен: {assignee})",
        "reopen_held": "Инцидент #{holder} открыт с тем же ключом {dedup_key!r}; решите или закройте его, прежде чем "
                       "открывать снова этот, или работайте с инцидентом #{holder}.",
        "heartbeat_late": "опаздывает",
        "heartbeat_down": "молчит",
        "heartbeats_on_time": "Все пульсы отмечаются вовремя.",
        "heartbeat_line": "{name} [{status}] последняя отметка: {last}{incident}",
        "heartbeat_never": "не было",
        "heartbeat_incident": ", инцидент #{id}",
        "heartbeats_more": "… и другие: GET /heartbeats?status=late,down",
        "silent": "Нет отметок с {at}; ожидались раз в {period}, с запасом в {grace}",
        "silent_since_created": "Нет отметок с момента создания, {at}; ожидались раз в {period}, с запасом в {grace}",
        "back": "Снова на связи, молчал {silence}",
        "heartbeat_deleted": "Его пульс {name} удалён: теперь ни одна отметка не решит этот инцидент, а его "
                             "ключ {dedup_key} освобождён",
        "check_in_failed": "Отметка сообщила о сбое",
        "check_in_exit_status": "Отметка сообщила о сбое (код завершения {status})",
        "alert_again": "Оповещение сработало снова (началось {started})",
        "alert_again_unknown": "Оповещение сработало снова (началось в неизвестное время)",
        "alert_from": "Оповещение от {sender}, срабатывает с {since}",
        "alert_from_unknown": "Оповещение от {sender}, срабатывает с неизвестного времени",
        "alert_ended": "Оповещение закончилось {ended}",
        "alert_ended_unknown": "Оповещение закончилось в неизвестное время",
        "alert_unnamed": "Оповещение без имени",
        "pagerduty_event": "Событие PagerDuty от {client}: {facts}",
        "pagerduty_severity": "важность {value}",
        "pagerduty_source": "источник {value}",
        "pagerduty_component": "компонент {value}",
        "pagerduty_class": "класс {value}",
        "pagerduty_timestamp": "время {value}",
        "pagerduty_details": "подробности {value}",
        "pagerduty_links": "ссылки {value}",
        "pagerduty_again": "Сработало снова ({severity})",
        "pagerduty_resolved": "Решён событием PagerDuty от {actor}",
        "storm_title": "🌩 <b>Шторм: {group}</b> · {incidents} с {since}",
        "storm_open": "Открыто: {open} (новых {new}, взято {taken}) · вернулось: {back}",
        "storm_over": "✅ Закончился {at}: все его инциденты решены; длился {lasted}",
        "storm_more": "… и ещё {more}",
        "storm_of_source": "{source}, без группы",
        "storm_take_all": "Взять все",
        "storm_reminder": "⏰ <b>Шторм: {group}</b>: новые ждут уже {waited}, и никто не взял ни одного ({new}; "
                          "напоминание {number} из {most})",
        "storm_escalated": "⚠️ Эскалация: <b>шторм {group}</b>: новые ждут уже {waited}, и никто не взял ни одного "
                           "({new})",
        "storm_taken": "{name} берёт из шторма {group}: {count}",
        "storm_nothing_new": "В шторме {group} сейчас нет новых инцидентов",
        "storm_unknown": "Шторма №{number} нет",
        "storm_note": "Взят вместе со всем штормом {group} ({count})",
    },
}
# Each noun's plural forms: English one and other; Russian one (1, 21), few (2-4, 22-24) and many (5-20, 11-14).
# Durations are said as how long something lasted (accusative in Russian: 1 минуту, 21 секунду).
NOUNS = {
    "en": {"incident": ("incident", "incidents"), "time": ("time", "times"), "second": ("s", "s"),
           "minute": ("min", "min"), "hour": ("h", "h")},
    "ru": {"incident": ("инцидент", "инцидента", "инцидентов"), "time": ("раз", "раза", "раз"),
           "second": ("секунду", "секунды", "секунд"), "minute": ("минуту", "минуты", "минут"),
           "hour": ("час", "часа", "часов")},
}


def language():
    return current_app.config["LANGUAGE"]


def say(key, **values):
    """The text of `key` in the configured language, its placeholders filled."""
    return TEXTS[language()][key].format(**values)


def plural(count, noun):
    """A count and its noun, in the form the configured language gives that count: 1 incident, 5 инцидентов."""
    forms = NOUNS[language()][noun]
    if len(forms) == 2:
        return f"{count} {forms[count != 1]}"
    ones, tens = count % 10, count % 100
    form = 0 if ones == 1 and tens != 11 else 1 if 2 <= ones <= 4 and not 12 <= tens <= 14 else 2
    return f"{count} {forms[form]}"


def shown_time(timestamp):
    """A stored timestamp as people read it: in the configured zone, naming it (2026-11-23 07:05 UTC, 23.11.2026
    10:05 MSK); the zone database knows its daylight saving."""
    return say("time", at=datetime.fromisoformat(timestamp).astimezone(current_app.config["TIMEZONE"]))


def shown_actor(actor):
    """Who did something, as the chat reads it: a Telegram user's stored name in the language, no one as someone."""
    telegram = TELEGRAM_ACTOR.fullmatch(actor or "")
    if telegram:
        return say("telegram_actor", name=telegram[1], id=telegram[2])
    return say("actor_heartbeat") if actor == "heartbeat" else actor or say("someone")


def told(reason):
    """An English reason the API gives (a text that cannot be stored), in the configured language."""
    key = next((key for key, text in TEXTS["en"].items() if key.startswith("text_") and text == reason), None)
    return say(key) if key else reason


# ---------------------------------------------------------------------------
# Telegram: the Bot API, one handler for updates, two ways in (webhook and polling)
# ---------------------------------------------------------------------------

BOT_COMMANDS = ("incident", "incidents", "heartbeats", "take", "resolve", "help")  # the menu Telegram shows
NO_PREVIEWS = {"link_preview_options": {"is_disabled": True}}  # a URL in a message does not unfurl


class BotApiError(Exception):
    """A Bot API call that failed; `retry` says whether trying again later can help."""

    def __init__(self, description, retry, code=None, parameters=None):
        super().__init__(description)
        self.retry, self.code = retry, code
        parameters = parameters if isinstance(parameters, dict) else {}
        wait = parameters.get("retry_after")
        self.retry_after = wait if type(wait) is int and 0 < wait <= 3600 else None  # else: our own back-off
        self.migrate_to = telegram_id(parameters.get("migrate_to_chat_id"))  # a group became this supergroup


class Pace:
    """Telegram's limits (its Bot FAQ), kept by the sender itself so that Telegram never has to refuse: about 20
    calls a minute in a group or channel (edits count), one a second in any chat, 30 a second in all. A group
    keeps RESERVED_FIRST of its minute for first messages, so that a new incident is shown within seconds
    whatever edits wait. A 429 that comes anyway holds its chat alone, for as long as Telegram asks.

    `window` is Telegram's minute (TELEGRAM_WINDOW, 60 s): every limit scales with it, so that tests can
    shrink it together with their Bot API stand-in's.
    """

    def __init__(self, window):
        self.scale = window / 60 * PACE_MARGIN  # a second, kept a little longer: Telegram's limits are "about"
        self.calls = collections.defaultdict(collections.deque)  # chat -> when its calls went, the last window
        self.everywhere = collections.deque()  # when every call went, the last second (scaled)
        self.held = {}  # chat -> until when Telegram asked us to wait
        self.lock = threading.RLock()  # the poller and the sender share a bot

    def wait(self, chat_id, first):
        """Seconds before a call to the chat may go (a first message, or an edit or reply): 0 for now."""
        with self.lock:
            return self.waiting(chat_id, first)

    def waiting(self, chat_id, first):
        moment, calls = time.monotonic(), self.calls[chat_id]
        while calls and calls[0] <= moment - 60 * self.scale:
            calls.popleft()
        while self.everywhere and self.everywhere[0] <= moment - self.scale:
            self.everywhere.popleft()
        waits = [self.held.get(chat_id, 0) - moment]
        if calls:
            waits.append(calls[-1] + self.scale - moment)  # one a second in a chat
        room = GROUP_CALLS_PER_MINUTE - (0 if first else RESERVED_FIRST)
        if chat_id < 0 and len(calls) >= room:  # a group or a channel: its minute
            waits.append(calls[len(calls) - room] + 60 * self.scale - moment)
        if len(self.everywhere) >= CALLS_PER_SECOND:
            waits.append(self.everywhere[0] + self.scale - moment)
        return max(0.0, *waits)

    def take_turn(self, chat_id):
        """Wait until a call to the chat may go (a second call of one delivery, a reply to a report), and count it;
        a wait for one chat holds no other."""
        while True:
            with self.lock:
                if not (pause := self.waiting(chat_id, True)):
                    self.calls[chat_id].append(moment := time.monotonic())
                    self.everywhere.append(moment)
                    return
            time.sleep(pause)

    def hold(self, chat_id, seconds):
        with self.lock:
            self.held[chat_id] = time.monotonic() + seconds


class Bot:
    """The configured bot: its Bot API calls and its id.

    The token is part of every call's URL, so nothing said about a call names the URL, and the
    token is cut out of any error text before it is said.
    """

    def __init__(self, token, base_url, window=TELEGRAM_WINDOW_S):
        self.token, self.base_url = token, base_url.rstrip("/")
        self.id = int(token.partition(":")[0])
        self.pace = Pace(window)
        self.counts = collections.Counter()  # (method, outcome) of the calls not yet recorded (see record_calls)
        self.counting = threading.Lock()  # the poller and the sender share a bot

    def call(self, method, payload):
        """POST one Bot API method and return its result, or raise BotApiError; paced by chat, counted by outcome."""
        if telegram_id(payload.get("chat_id")):
            self.pace.take_turn(payload["chat_id"])
        try:
            result = self.attempt(method, payload)
        except BotApiError as error:
            self.count(method, "throttled" if error.code == 429 else "failed")
            raise
        self.count(method, "sent")
        return result

    def count(self, method, outcome, number=1):
        with self.counting:
            self.counts[method, outcome] += number

    def take_counts(self):
        """The calls counted so far, counted afresh from now."""
        with self.counting:
            counts, self.counts = self.counts, collections.Counter()
        return counts

    def attempt(self, method, payload):
        request = urllib.request.Request(f"{self.base_url}/bot{self.token}/{method}", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TELEGRAM_CALL_TIMEOUT_S) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            answer = self.error_answer(error)
        except Exception as error:  # no connection, a timeout, a garbled answer
            raise BotApiError(f"{method}: {self.without_token(error)}", retry=True) from None
        if isinstance(answer, dict) and answer.get("ok"):
            return answer.get("result")
        answer = answer if isinstance(answer, dict) else {}
        code = answer.get("error_code")
        # 401 and 404: a wrong token; 409: a webhook is set or another poller runs. Waiting won't help.
        raise BotApiError(self.without_token(f"{method}: {code} {answer.get('description', '')}".strip()),
                          retry=code not in (401, 404, 409), code=code, parameters=answer.get("parameters"))

    def error_answer(self, error):
        """The JSON Telegram sent with an HTTP error, or its status where the body is something else."""
        try:
            return json.load(error)
        except Exception:  # an HTML error page, a cut-off body
            return {"error_code": error.code, "description": self.without_token(error.reason)}

    def without_token(self, text):
        """The text with the token's secret part cut out (it is URL-safe: no encoding changes it)."""
        return str(text).replace(self.token.partition(":")[2], "<token>")

    def send(self, payload):
        """sendMessage; the id of the message sent."""
        message = self.call("sendMessage", payload)
        if not (isinstance(message, dict) and type(message.get("message_id")) is int):
            raise BotApiError("sendMessage: the answer names no message", retry=True)
        return message["message_id"]


def record_calls(database, bot):
    """Add the Bot API calls counted since the last time to the database's counts, for /metrics; those of a write
    refused stay counted in memory for the next time."""
    if not (counts := bot.take_counts()):
        return
    try:
        database.write(lambda db: db.executemany(
            """INSERT INTO telegram_calls (method, outcome, count) VALUES (?, ?, ?)
               ON CONFLICT (method, outcome) DO UPDATE SET count = count + excluded.count""",
            [(method, outcome, count) for (method, outcome), count in counts.items()]))
    except sqlite3.Error:
        for (method, outcome), number in counts.items():
            bot.count(method, outcome, number)


def learn_username(database, bot):
    """Ask getMe for the bot's @username and record it, so that the poller and the webhook alike ignore
    commands addressed to other bots."""
    try:
        username = bot.call("getMe", {})["username"]
        clean_text(username, ACTOR_MAX)
    except (BotApiError, KeyError, TypeError, ValueError) as error:
        current_app.logger.warning("getMe told no username (%s); commands addressed to any bot count as ours",
                                   bot.without_token(error))
        return
    keep_trying(lambda: database.write(lambda db: db.execute(
        """INSERT INTO telegram_bots (bot_id, username) VALUES (?, ?)
           ON CONFLICT (bot_id) DO UPDATE SET username = excluded.username""", (bot.id, username))),
        "the bot's username not recorded")


def register_commands(bot):
    """setMyCommands: the menu of commands, described in the language; a refusal is logged, nothing more."""
    try:
        bot.call("setMyCommands", {"commands": [{"command": command, "description": say(f"command_{command}")}
                                                for command in BOT_COMMANDS]})
    except BotApiError as error:
        current_app.logger.warning("the bot's commands are not registered (%s); Telegram shows no menu of them",
                                   error)


def telegram_help_text():
    """/help's text: what the bot does and its commands."""
    return say("help", **{command: say(f"command_{command}") for command in ("incidents", "heartbeats", "take",
                                                                              "resolve")})


def telegram_bot():
    """The configured bot, or a usage error that says what to set."""
    token = current_app.config["TELEGRAM_BOT_TOKEN"]
    if not token:
        raise click.UsageError("Set TELEGRAM_BOT_TOKEN to the token BotFather gave you (123456:ABC...).")
    return Bot(token, current_app.config["TELEGRAM_API_URL"], current_app.config["TELEGRAM_WINDOW"])


def retry_delay(error, delay):
    """How long to wait after a failed Bot API call: what Telegram asks, else doubling up to a limit."""
    if not error.retry:
        raise click.ClickException(f"Telegram refused: {error}") from None
    return error.retry_after or min(max(delay * 2, TELEGRAM_BACKOFF_S[0]), TELEGRAM_BACKOFF_S[1])


def keep_trying(work, what):
    """work(), again after a pause for as long as the database refuses it for now (busy, full, read-only,
    an I/O error), each refusal logged in one line."""
    while True:
        try:
            return work()
        except sqlite3.OperationalError as error:
            current_app.logger.warning("%s: %s; trying again in %s s", what, error, TELEGRAM_BACKOFF_S[0])
            time.sleep(TELEGRAM_BACKOFF_S[0])


def telegram_id(value):
    """An id as Telegram gives them (a whole number that fits SQLite), or None for anything else."""
    return value if type(value) is int and -MAX_ID <= value <= MAX_ID and value != 0 else None


def allowed_chats():
    """The chats the bot acts for: the allowed ones, and every chat it notifies (so that their buttons work)."""
    config = current_app.config
    return {*config["TELEGRAM_ALLOWED_CHAT_IDS"], *config["TELEGRAM_NOTIFY_CHAT_IDS"],
            *config["TELEGRAM_ESCALATE_CHAT_IDS"]}


def chat_allowed(db, chat_id):
    """Whether the bot acts on messages and taps from a chat: one of allowed_chats(), or a supergroup one became."""
    allowed = allowed_chats()
    return chat_id in allowed or db.execute(
        "SELECT 1 FROM notify_chats_gone WHERE moved_to = ? AND chat_id IN (SELECT value FROM json_each(?))",
        (chat_id, json.dumps(sorted(allowed)))).fetchone() is not None


def warn_if_no_chat_allowed(tell):
    """Say once, at startup, that the bot acts nowhere: no chat is allowed."""
    if not allowed_chats():
        tell("Telegram: no chat may use the bot, so it acts nowhere; set TELEGRAM_ALLOWED_CHAT_IDS (or "
            "TELEGRAM_NOTIFY_CHAT_IDS) to the chats whose messages it should act on.")


def clean_name(text):
    """A name from Telegram as text to store: lone surrogates and control characters left out."""
    return "".join(char for char in str(text) if unicodedata.category(char) not in ("Cc", "Cs")).strip()


def telegram_user(update_part):
    """The user who sent a message or tapped a button, as Telegram describes them."""
    return update_part.get("from") if isinstance(update_part.get("from"), dict) else {}


def telegram_name(update_part):
    """@username, else the name of who sent a message or tapped a button."""
    user = telegram_user(update_part)
    username = clean_name(user.get("username") or "")
    name = f"@{username}" if username else " ".join(
        clean_name(user[part]) for part in ("first_name", "last_name") if user.get(part)).strip()
    return (name or say("someone"))[:ACTOR_MAX]


TELEGRAM_ACTOR = re.compile(r"(.*) \(Telegram user ([0-9]+|\?)\)", re.DOTALL)  # what telegram_sender stores


def telegram_sender(update_part):
    """Who did it, as shown on the timeline: the name with the Telegram user id."""
    user_id = telegram_user(update_part).get("id")
    return f"{telegram_name(update_part)} (Telegram user {user_id if type(user_id) is int else '?'})"[:ACTOR_MAX]


def telegram_report(db, message, text):
    """Register a report once per Telegram message: a re-delivery finds the incident it made."""
    dedup_key = f"telegram:{message['chat']['id']}:{message['message_id']}"
    known = db.execute("SELECT id FROM incidents WHERE dedup_key = ?", (dedup_key,)).fetchone()
    if known is None:
        chat = message["chat"]
        title = clean_name(chat.get("title", ""))
        where = say("private_chat") if chat.get("type") == "private" else say("group_chat", title=title)
        actor = telegram_sender(message)
        values = {"description": clean_text(text, DESCRIPTION_MAX), "source": "operator", "dedup_key": dedup_key}
        note = say("report_note", actor=shown_actor(actor), where=where, chat=chat["id"], message=message["message_id"])
        known = report_incident(db, values, note[:NOTE_MAX], actor)
    user = telegram_user(message)
    cleaned = any(isinstance(user.get(part), str) and clean_name(user[part]) != user[part].strip()
                  for part in ("username", "first_name", "last_name"))
    return say("registered_name_cleaned" if cleaned else "registered", id=known[0])


def telegram_open_incidents(db):
    """/incidents: the newest unresolved incidents, read like any list page (no sort of the table)."""
    rows = db.execute(*list_sql({"status": OPEN_STATUSES, "limit": TELEGRAM_LIST_MAX})).fetchall()
    items = [json.loads(row[-1]) for row in rows[:TELEGRAM_LIST_MAX]]
    if not items:
        return say("no_open_incidents")
    return "\n".join(f"#{i['id']} [{say('open_' + i['status'])}] {i['description'].splitlines()[0][:100]}"
                     for i in items)


def telegram_set_status(db, message, argument, action):
    """/take and /resolve: the change a button makes, answered as the button is."""
    incident_id = whole_number(argument.removeprefix("#"), 1, MAX_ID)
    if incident_id is None:
        return say("send_number", command=action)
    return telegram_change(db, incident_id, action, message)[0]


def parse_command(db, text):
    """(command, argument) of a message; ("", text) for plain text; None for a command to another bot.

    A command addressed @somebot is ours unless the bots' usernames are known (telegram_bots, recorded
    from getMe by telegram-poll and telegram-notify) and it is none of them.
    """
    if not text.startswith("/"):
        return "", text
    word, argument = (text.split(maxsplit=1) + [""])[:2]  # the argument may start on the next line
    command, _, addressee = word.partition("@")
    known = addressee and [row[0].lower() for row in db.execute("SELECT username FROM telegram_bots")]
    if known and addressee.lower() not in known:
        return None
    return command.lower(), argument


def telegram_command(db, message, command, argument):
    """The reply to a message from a chat that may use the bot; None to stay silent."""
    private = message["chat"].get("type") == "private"
    if not command:
        return telegram_report(db, message, argument) if private else None
    if command == "/incident":
        return telegram_report(db, message, argument) if argument else say("describe")
    if command == "/incidents":
        return telegram_open_incidents(db)
    if command == "/heartbeats":
        return heartbeats_needing_attention(db)
    if command in ("/take", "/resolve"):
        return telegram_set_status(db, message, argument, command[1:])
    return telegram_help_text() if private else None


def telegram_help(db, chat_id):
    """/start and /help, in any chat: what the bot does, and this chat's id for whoever sets it up."""
    return say("help_acts_here" if chat_allowed(db, chat_id) else "help_not_here", help=telegram_help_text(),
               chat_id=chat_id)


def telegram_reply(db, message):
    """The text that answers a message, or None: a command, a report, or a word on why nothing was done."""
    chat_id, private = message["chat"]["id"], message["chat"].get("type") == "private"
    text = message.get("text") or message.get("caption")
    parsed = parse_command(db, text.strip() if isinstance(text, str) else "")
    if parsed is None:
        return None  # a command for another bot in the group
    command, argument = parsed
    if command in ("/start", "/help"):
        return telegram_help(db, chat_id)
    if not chat_allowed(db, chat_id):
        return say("chat_not_allowed", chat_id=chat_id) if private else None
    if not (command or argument):
        return say("only_text") if private else None
    try:
        return telegram_command(db, message, command, argument)
    except ApiError as error:
        return error.detail
    except ValueError as error:  # text that cannot be stored as it is
        return say("not_registered", reason=told(str(error)))


# What a button does: action -> (the status it sets, the statuses it is meant for); it is told by say("done_<action>").
BUTTON_ACTIONS = {
    "take": ("in_progress", ("new",)),
    "resolve": ("resolved", OPEN_STATUSES),
    "reopen": ("new", ("resolved", "closed")),
}
BUTTON_DATA = re.compile(r"(take|resolve|reopen|takeall):([0-9]{1,19})")


def telegram_button(db, callback):
    """A tap on a notification's button: the change it names, answered with what happened.

    A tap on a button the incident has moved past changes nothing and refreshes the message; a tap
    in a chat that may not use the bot changes nothing at all.
    """
    chat = (callback.get("message") or {}).get("chat") if isinstance(callback.get("message"), dict) else None
    if not (isinstance(chat, dict) and telegram_id(chat.get("id")) and chat_allowed(db, chat["id"])):
        return callback_answer(callback, say("tap_not_allowed"))
    data = callback.get("data")
    match = BUTTON_DATA.fullmatch(data) if isinstance(data, str) else None
    if not match or int(match[2]) > MAX_ID:
        return callback_answer(callback, say("tap_unknown"))
    if match[1] == "takeall":
        return callback_answer(callback, take_storm(db, int(match[2]), callback))
    return callback_answer(callback, *telegram_change(db, int(match[2]), match[1], callback))


def telegram_change(db, incident_id, action, update_part):
    """A change of status from Telegram, by a button or a command (take, resolve, reopen): (its answer, whether
    it is an alert). One the incident has moved past changes nothing, says "already", and refreshes its message."""
    status, meant_for = BUTTON_ACTIONS[action]
    current = db.execute("SELECT status, dedup_key FROM incidents WHERE id = ?", (incident_id,)).fetchone()
    if current is None:
        return say("no_incident", id=incident_id), False
    if current["status"] not in meant_for:
        queue_notification(db, incident_id, "change")
        return say("already", id=incident_id, status=say(f"status_{current['status']}")), False
    try:
        change_incident(db, incident_id, {"status": status}, actor=telegram_sender(update_part),
                        taken_by=telegram_name(update_part))
    except ApiError as error:  # reopening while another open incident holds the dedup_key
        return say("reopen_held", holder=error.extensions["open_incident_id"], dedup_key=current["dedup_key"]), True
    assignee = db.execute("SELECT assignee FROM incidents WHERE id = ?", (incident_id,)).fetchone()[0]
    still = say("still_assigned", assignee=assignee) if action == "take" and assignee not in (
        None, telegram_name(update_part)) else ""
    return say(f"done_{action}", id=incident_id, name=telegram_name(update_part), still=still), False


def callback_answer(callback, text, alert=False):
    """answerCallbackQuery with a text cut to what Telegram takes (CALLBACK_ANSWER_MAX UTF-16 units)."""
    cut = longest_prefix(text, lambda prefix: utf16_length(prefix) <= CALLBACK_ANSWER_MAX)
    return {"method": "answerCallbackQuery", "callback_query_id": callback["id"], "text": cut,
            **({"show_alert": True} if alert else {})}


def handle_telegram_update(db, update):
    """Act on one Telegram Update inside the caller's write transaction: all of it is stored, or none.

    Returns the Bot API call that answers the update (sendMessage, or answerCallbackQuery for a
    button), or None when it is ignored (edits, joins, channel posts, a group's chatter, a group that
    may not use the bot, an update whose ids no Telegram chat or message has).
    """
    callback = update.get("callback_query")
    if isinstance(callback, dict) and isinstance(callback.get("id"), str):
        return telegram_button(db, callback)
    message = update.get("message")
    if not (
        isinstance(message, dict)
        and isinstance(message.get("chat"), dict)
        and telegram_id(message["chat"].get("id"))
        and telegram_id(message.get("message_id"))
    ):
        return None
    reply = telegram_reply(db, message)
    if reply is None:
        return None
    return {"method": "sendMessage", "chat_id": message["chat"]["id"],
            "reply_to_message_id": message["message_id"], "text": reply, **NO_PREVIEWS}


def telegram_webhook():
    """Updates pushed by Telegram; answers 200 with the reply as a Bot API call, or {}."""
    secret = current_app.config["TELEGRAM_WEBHOOK_SECRET"]
    if not secret:
        raise ApiError(404, "The Telegram webhook is off; set TELEGRAM_WEBHOOK_SECRET to turn it on.")
    given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise ApiError(401, "X-Telegram-Bot-Api-Secret-Token does not match TELEGRAM_WEBHOOK_SECRET.")
    update = read_json_object()
    return jsonify(write(lambda db: handle_telegram_update(db, update)) or {})


def load_offset(db, bot_id):
    row = db.execute("SELECT next_update_id FROM telegram_offsets WHERE bot_id = ?", (bot_id,)).fetchone()
    return row[0] if row else 0


def store_offset(db, bot, update):
    """Where the next getUpdates begins: after this update."""
    db.execute(
        """INSERT INTO telegram_offsets (bot_id, next_update_id) VALUES (?, ?)
           ON CONFLICT (bot_id) DO UPDATE SET next_update_id = excluded.next_update_id""",
        (bot.id, update["update_id"] + 1),
    )


def take_update(db, update, bot):
    """Act on an update and store the offset after it, in one transaction; the reply to send."""
    reply = handle_telegram_update(db, update)
    store_offset(db, bot, update)
    return reply


def storable_update(update):
    """Whether an update has an id whose next offset the database can hold (0 to MAX_ID)."""
    return isinstance(update, dict) and type(update.get("update_id")) is int and 0 <= update["update_id"] < MAX_ID


def poll_once(database, bot, offset, delay):
    """One getUpdates and what it brought: (the offset to ask from next, how long to wait before it).

    An answer that is no list of updates, or holds none it can use, waits as a network error does
    (after the offset moved past what it held).
    """
    try:
        updates = bot.call("getUpdates", {"offset": offset, "timeout": TELEGRAM_POLL_TIMEOUT_S,
                                          "allowed_updates": TELEGRAM_UPDATES})
        if not isinstance(updates, list):
            raise BotApiError(f"getUpdates: no list of updates in the answer ({str(updates)[:100]})", retry=True)
        offset = take_updates(database, bot, updates, offset)
        if updates and not any(map(storable_update, updates)):
            raise BotApiError("getUpdates: nothing usable in the answer", retry=True)
    except BotApiError as error:
        delay = retry_delay(error, delay)
        current_app.logger.warning("Telegram unreachable (%s); trying again in %s s", error, delay)
        return offset, delay
    return offset, 0


def take_updates(database, bot, updates, offset):
    """Act on each update, storing the offset after it in the same transaction, tried again (never skipped) while
    the database refuses it, so a restart neither loses nor repeats an update; its reply is sent after the
    commit. One whose id no offset can follow is skipped (logged), the offset moved past it in memory.
    Returns the offset to ask from next."""
    for update in updates:
        update_id = update.get("update_id") if isinstance(update, dict) else None
        offset = max(offset, update_id + 1) if type(update_id) is int else offset
        if not storable_update(update):
            current_app.logger.error("update %s skipped: no offset can follow its id", str(update_id)[:30])
            continue
        try:
            reply = keep_trying(lambda: database.write(lambda writer: take_update(writer, update, bot)),
                                f"update {update_id} not stored")
        except sqlite3.Error as error:  # not one that waiting mends: the update cannot be stored as it is
            current_app.logger.error("update %s skipped: %s", update_id, error)
            reply = keep_trying(lambda: database.write(lambda writer: store_offset(writer, bot, update)),
                                f"update {update_id} not skipped")
        if reply:
            try:
                bot.call(reply.pop("method"), reply)
            except BotApiError as error:
                current_app.logger.warning("reply to update %s not sent: %s", update_id, error)
    return offset


def poll_telegram(database, db, bot):
    """Long-poll getUpdates until interrupted, from the offset stored."""
    offset, delay = keep_trying(lambda: load_offset(db, bot.id), "offset not read"), 0
    while True:
        time.sleep(delay)
        offset, delay = poll_once(database, bot, offset, delay)
        record_calls(database, bot)


def until_interrupted(banner, work):
    """Run work(database, db) on a connection of its own until Ctrl-C, then say so."""
    database = current_app.extensions["incidents"]
    db = database.acquire()
    click.echo(banner)
    try:
        work(database, db)
    except KeyboardInterrupt:
        click.echo("Stopped.")
    finally:
        database.release(db)


@click.command("telegram-poll")
@with_appcontext
def telegram_poll_command():
    """Take reports from Telegram by long polling getUpdates (for a server Telegram cannot reach).

    With TELEGRAM_NOTIFY_CHAT_IDS set, it also sends the notifications, from a thread of its own.
    """
    open_database()
    bot = telegram_bot()
    warn_if_no_chat_allowed(lambda line: click.echo(line, err=True))
    learn_username(current_app.extensions["incidents"], bot)
    register_commands(bot)
    with contextlib.ExitStack() as stack:
        if current_app.config["TELEGRAM_NOTIFY_CHAT_IDS"]:
            stack.enter_context(sole_sender(current_app.extensions["incidents"].lock_base, bot.id))
            stack.enter_context(notifications_in_background(bot))
        until_interrupted("Polling Telegram for reports; press Ctrl-C to stop.",
                          lambda database, db: poll_telegram(database, db, bot))


# ---------------------------------------------------------------------------
# Alerts: Prometheus Alertmanager and Grafana webhooks
# ---------------------------------------------------------------------------

ALERT_TIME_PATTERN = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2})(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")


def parse_alert_time(value):
    """An RFC 3339 time as the senders write it (nanoseconds, any offset) in the stored format."""
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time such as 2026-11-23T07:00:00.123Z")
    return parse_alert_text_time(value)


@functools.lru_cache(maxsize=256)
def parse_alert_text_time(value):
    """parse_alert_time for text, remembered: the alerts of one group mostly share their times."""
    match = ALERT_TIME_PATTERN.fullmatch(value)
    if match is None:
        raise ValueError("must be an RFC 3339 date-time such as 2026-11-23T07:00:00.123Z")
    return stored_time(rfc3339_moment(*match.groups()))


def clean_string_map(value):
    """Labels or annotations: an object whose values are all text."""
    if not isinstance(value, dict) or not all(isinstance(text, str) for text in value.values()):
        raise ValueError("must be an object whose values are strings")
    check_storable("".join(value) + "".join(value.values()))  # one pass over all of its text
    return value


def alert_identity(alert):
    """The fingerprint, else a hash of the sorted labels that every Python version computes alike."""
    if "fingerprint" in alert:
        return clean_text(alert["fingerprint"], DEDUP_KEY_MAX - len(ALERT_KEY_PREFIX))
    canonical = json.dumps(sorted(alert["labels"].items()), ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fitted_text(text, limit):
    """A sender's text where a column holds `limit` characters (Alertmanager's groupKey or PagerDuty's group as a
    group, a PagerDuty dedup_key in its namespace): as it is where it fits, else cut and marked with a hash of
    the whole, the same every time; None without one."""
    if not isinstance(text, str) or not has_visible_text(text):
        return None
    with contextlib.suppress(ValueError):
        return clean_text(text, limit)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = clean_name(text)[:limit - len(digest) - 1].strip()
    return f"{head}~{digest}" if head else digest


def alert_description(labels, annotations):
    """What the person on duty reads first: summary, description, then every label."""
    title = next((text.strip() for text in (annotations.get("summary", ""), labels.get("alertname", ""))
                  if has_visible_text(text)), say("alert_unnamed"))
    lines = [title, annotations.get("description", ""),
             " ".join(f"{name}={value}" for name, value in sorted(labels.items()))]
    return "\n".join(line.strip() for line in lines if line.strip())[:DESCRIPTION_MAX].strip()


ALERT_FIELDS = {
    "labels": clean_string_map,
    "annotations": clean_string_map,
    "status": lambda value: clean_choice(value, ALERT_STATUSES),
    "startsAt": parse_alert_time,
    "endsAt": parse_alert_time,
}


def clean_alert(alert, index, errors):
    """One alert's clean values; its problems go into `errors`, each named alerts[i].field."""
    if not isinstance(alert, dict):
        errors.append({"field": f"alerts[{index}]", "message": "must be an object"})
        return None
    values = {"annotations": {}}
    for field, rule in ALERT_FIELDS.items():
        if field in alert or field in ("labels", "status"):
            try:
                values[field] = rule(alert.get(field))
            except ValueError as error:
                errors.append({"field": f"alerts[{index}].{field}", "message": str(error)})
    try:
        values["identity"] = alert_identity(alert) if "labels" in values else None
    except ValueError as error:
        errors.append({"field": f"alerts[{index}].fingerprint", "message": str(error)})
    return values


def clean_alerts(body):
    """The alerts of a webhook payload, checked whole before anything is written; 422 otherwise."""
    alerts = body.get("alerts")
    if not isinstance(alerts, list):
        raise invalid("fields", [{"field": "alerts", "message": "must be a list of alerts"}])
    if len(alerts) > ALERTS_MAX:
        raise invalid("fields", [{"field": "alerts", "message": f"holds {len(alerts)} alerts, more than {ALERTS_MAX}; "
                                  f"set max_alerts: {ALERTS_MAX} or less in the receiver's webhook_configs"}])
    errors = []
    if "status" in body and body["status"] not in ALERT_STATUSES:
        errors.append({"field": "status", "message": f"must be one of: {', '.join(ALERT_STATUSES)}"})
    cleaned = [clean_alert(alert, index, errors) for index, alert in enumerate(alerts)]
    if errors:
        raise invalid("fields", errors)
    group = fitted_text(body.get("groupKey"), GROUP_MAX)
    return [{**alert, "group": group} for alert in cleaned]


def alert_incident(db, dedup_key):
    """The alert's open incident, else its newest one, with when its status last changed; or None."""
    return db.execute(
        f"""SELECT id, status, coalesce((SELECT max(at) FROM events WHERE incident_id = incidents.id
                                          AND type = 'status_changed'), updated_at) AS changed_at
            FROM incidents WHERE dedup_key = ? ORDER BY {IS_OPEN} DESC, created_at DESC, id DESC LIMIT 1""",
        (dedup_key,),
    ).fetchone()


def reopen_after(at):
    """The earliest resolution that an alert firing again at `at` reopens (INCIDENTS_REOPEN_WINDOW); 0 for none."""
    window = current_app.config["REOPEN_WINDOW"]
    return window and shifted(at, -window)


def fire_alert(db, dedup_key, opening, actor, at):
    """A firing alert folds into the open incident of its dedup_key, reopens one resolved within the reopen
    window, or opens one; opening() makes what those two need, (values, notes: on opening and on reopening),
    only then: most alerts that fire fold. (id, action)."""
    latest = alert_incident(db, dedup_key)
    if latest and latest["status"] in OPEN_STATUSES:
        fold_report(db, dedup_key, at)
        return latest["id"], "folded"
    values, notes = opening()
    if latest and latest["status"] == "resolved" and (since := reopen_after(at)) and latest["changed_at"] >= since:
        change_incident(db, latest["id"], {"status": "new"}, notes[1], actor)
        return latest["id"], "reopened"
    return insert_incident(db, values, at, notes[0], actor)[0], "created"


def change_alert_incident(db, dedup_key, statuses, values, note, actor):
    """The change of an alert's incident if its status is one of `statuses`, else none: (id or None, whether
    it changed)."""
    latest = alert_incident(db, dedup_key)
    if latest is None or latest["status"] not in statuses:
        return latest and latest["id"], False
    change_incident(db, latest["id"], values, note, actor)
    return latest["id"], True


def alert_opening(alert, dedup_key, sender):
    """What a firing alert's incident opens or reopens with: (its values, its notes on opening and reopening)."""
    values = {"description": alert_description(alert["labels"], alert["annotations"]), "source": "monitoring",
              "dedup_key": dedup_key, "group": alert["group"]}
    if "startsAt" in alert:
        return values, (say("alert_from", sender=sender, since=alert["startsAt"]),
                        say("alert_again", started=alert["startsAt"]))
    return values, (say("alert_from_unknown", sender=sender), say("alert_again_unknown"))


def handle_alerts(db, alerts, sender):
    """Open, fold, reopen or resolve an incident for each alert: [{"id", "action"}] in their order."""
    at = now()
    results = []
    for alert in alerts:
        dedup_key = ALERT_KEY_PREFIX + alert["identity"]
        if alert["status"] == "firing":
            incident_id, action = fire_alert(db, dedup_key, functools.partial(alert_opening, alert, dedup_key, sender),
                                             sender, at)
        else:
            incident_id, resolved = change_alert_incident(
                db, dedup_key, OPEN_STATUSES, {"status": "resolved"},
                say("alert_ended", ended=alert["endsAt"]) if "endsAt" in alert else say("alert_ended_unknown"), sender)
            action = "resolved" if resolved else "unchanged"
        results.append({"id": incident_id, "action": action})
    return results


def receive_alerts():
    """Alertmanager's or Grafana's webhook: each alert opens, folds, reopens or resolves an incident.

    The payload is checked whole first, then written in slices of ALERT_CHUNK alerts, each after the
    one before it succeeded; the slices of a payload of more than one wait while other writes are
    queued (bulk jobs: see Writer), so that no other write waits behind more than one. A failure
    halfway answers 503 with the earlier slices stored: Alertmanager sends the payload again, and
    those fold.
    """
    body = read_json_object(ALERT_BODY_MAX, f"The payload is over {ALERT_BODY_MAX} bytes; set max_alerts lower in "
                                            "the receiver's webhook_configs so that Alertmanager sends fewer at once.")
    alerts = clean_alerts(body)
    sender = "grafana" if "orgId" in body else "alertmanager"
    results = write_in_slices(lambda db, part: handle_alerts(db, part, sender), alerts, bulk=len(alerts) > ALERT_CHUNK)
    return json_response(json.dumps({"incidents": [result for chunk in results for result in chunk]}))


# ---------------------------------------------------------------------------
# PagerDuty: Events API v2 events, which nearly every monitoring tool can send to a URL of its user's choice
# ---------------------------------------------------------------------------


def optional_text(value, limit):
    """A text an event may leave blank: None then, else as clean_text takes it."""
    if isinstance(value, str) and not has_visible_text(value):
        return None
    return clean_text(value, limit)


def any_text(value):
    """A string, whatever it holds (fitted_text makes it fit)."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def clean_links(value, address, label):
    """links or images: a list of objects, each with its address (href, src) and maybe a label (text, alt), as
    (address, label) pairs."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError(f"must be a list of objects, each with {address}")
    return [(link_part(item, index, address, True), link_part(item, index, label, False))
            for index, item in enumerate(value)]


def link_part(item, index, name, required):
    """One member of a link or an image, named where it is wrong as its place says: [0].href."""
    try:
        return clean_text(item.get(name), PAGERDUTY_TEXT_MAX) if required else \
            optional_text(item.get(name) or "", PAGERDUTY_TEXT_MAX)
    except ValueError as error:
        raise ValueError(f"[{index}].{name} {error}") from None


def clean_details(value):
    """custom_details: an object, kept as the JSON text the first note shows."""
    if not isinstance(value, dict):
        raise ValueError("must be an object")
    return check_storable(json.dumps(value, ensure_ascii=False))


PAGERDUTY_FIELDS = {  # an event's members and their rules; null is as absent
    "event_action": lambda value: clean_choice(value, PAGERDUTY_ACTIONS),
    "dedup_key": lambda value: optional_text(value, DEDUP_KEY_MAX),
    "client": lambda value: optional_text(value, ACTOR_MAX),
    "client_url": lambda value: optional_text(value, PAGERDUTY_TEXT_MAX),
    "links": lambda value: clean_links(value, "href", "text"),
    "images": lambda value: clean_links(value, "src", "alt"),
}
PAGERDUTY_PAYLOAD_FIELDS = {  # and those of a trigger's payload
    "summary": lambda value: clean_text(value, PAGERDUTY_TEXT_MAX),
    "source": lambda value: clean_text(value, PAGERDUTY_TEXT_MAX),
    "severity": lambda value: clean_choice(value, PAGERDUTY_SEVERITIES),
    "timestamp": lambda value: optional_text(value, PAGERDUTY_TEXT_MAX),
    "component": lambda value: optional_text(value, PAGERDUTY_TEXT_MAX),
    "group": lambda value: fitted_text(any_text(value), GROUP_MAX),
    "class": lambda value: optional_text(value, PAGERDUTY_TEXT_MAX),
    "custom_details": clean_details,
}


def clean_members(body, rules, required, errors, prefix=""):
    """The clean values of an object's members by `rules` (null as absent); each problem goes into `errors` as
    PagerDuty writes them, a sentence that starts with the field: "payload.summary is required"."""
    values = {}
    for field, rule in rules.items():
        if body.get(field) is None:
            if field in required:
                errors.append(f"{prefix}{field} is required")
            continue
        try:
            values[field] = rule(body[field])
        except ValueError as error:  # an error about one of its items names it already: links[0].href ...
            errors.append(f"{prefix}{field}{'' if str(error).startswith('[') else ' '}{error}")
    return values


def pagerduty_invalid(errors):
    return ApiError(400, "The event is invalid; see errors.", errors=errors)


def clean_pagerduty_event(body, routing_key):
    """An event's clean values, its dedup_key made when a trigger has none; 400 naming every invalid field, or
    the routing_key alone when it is not INCIDENTS_PAGERDUTY_ROUTING_KEY (compared in constant time)."""
    given = body.get("routing_key")
    if not isinstance(given, str) or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                             routing_key.encode()):
        raise pagerduty_invalid(["routing_key is required" if given is None else
                                 "routing_key is not the key this server takes (INCIDENTS_PAGERDUTY_ROUTING_KEY)"])
    errors = []
    event = clean_members(body, PAGERDUTY_FIELDS, ("event_action",), errors)
    if event.get("event_action") == "trigger":
        payload = body.get("payload")
        if isinstance(payload, dict):
            event["payload"] = clean_members(payload, PAGERDUTY_PAYLOAD_FIELDS, ("summary", "source", "severity"),
                                             errors, "payload.")
        else:
            errors.append("payload is required" if payload is None else "payload must be an object")
    elif event.get("event_action") and not event.get("dedup_key"):
        errors.append(f"dedup_key is required to {event['event_action']}")
    if errors:
        raise pagerduty_invalid(errors)
    return {**event, "dedup_key": event.get("dedup_key") or uuid.uuid4().hex}


def pagerduty_note(event):
    """The first note of a trigger's incident: what the event says beyond its summary, details and links cut."""
    payload = event["payload"]
    facts = ", ".join(say(f"pagerduty_{name}", value=payload[name])
                      for name in ("severity", "source", "component", "class", "timestamp") if payload.get(name))
    parts = [say("pagerduty_event", client=event.get("client") or "pagerduty", facts=facts)]
    if payload.get("custom_details"):
        parts.append(say("pagerduty_details", value=payload["custom_details"][:PAGERDUTY_DETAILS_MAX]))
    if event.get("links"):
        parts.append(say("pagerduty_links", value=", ".join(f"{href} ({text})" if text else href
                                                            for href, text in event["links"])))
    return "; ".join(parts)[:NOTE_MAX]


def handle_pagerduty_event(db, event):
    """One event, counted by its action: it opens, folds, reopens (as an alert does), takes or resolves the
    incident of its dedup_key, in a namespace of its own; to take or resolve none open, it changes nothing."""
    db.execute("UPDATE pagerduty_counts SET events = events + 1 WHERE action = ?", (event["event_action"],))
    dedup_key = PAGERDUTY_KEY_PREFIX + fitted_text(event["dedup_key"], DEDUP_KEY_MAX - len(PAGERDUTY_KEY_PREFIX))
    actor = event.get("client") or "pagerduty"
    if event["event_action"] == "trigger":
        payload = event["payload"]
        values = {"description": payload["summary"], "source": "monitoring", "dedup_key": dedup_key,
                  "group": payload.get("group")}
        fire_alert(db, dedup_key, lambda: (values, (pagerduty_note(event), say("pagerduty_again",
                                                                               severity=payload["severity"]))),
                   actor, now())
    elif event["event_action"] == "acknowledge":
        change_alert_incident(db, dedup_key, ("new",), {"status": "in_progress"}, None, actor)
    else:
        change_alert_incident(db, dedup_key, OPEN_STATUSES, {"status": "resolved"},
                              say("pagerduty_resolved", actor=actor), actor)


def receive_pagerduty_event():
    """A PagerDuty Events API v2 event (trigger, acknowledge, resolve), answered as PagerDuty answers."""
    routing_key = current_app.config["PAGERDUTY_ROUTING_KEY"]
    if not routing_key:
        raise ApiError(404, "The PagerDuty intake is off; set INCIDENTS_PAGERDUTY_ROUTING_KEY to turn it on.")
    try:
        event = clean_pagerduty_event(read_json_object(PAGERDUTY_BODY_MAX, f"The event is over {PAGERDUTY_BODY_MAX} "
                                                       "bytes, which PagerDuty refuses too; send less."), routing_key)
    except ApiError as error:
        if error.status != 400:
            raise
        return json_response(json.dumps({"status": "invalid event", "message": "Event object is invalid",
                                         "errors": error.extensions.get("errors", [error.detail])}), 400)
    write(lambda db: handle_pagerduty_event(db, event))
    answer = {"status": "success", "message": "Event processed", "dedup_key": event["dedup_key"]}
    return json_response(json.dumps(answer), 202)


# ---------------------------------------------------------------------------
# Heartbeats: a device, a point or a job that stops checking in opens an incident by itself
# ---------------------------------------------------------------------------

HEARTBEAT_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,100}")  # . and .. are no name: clients drop them from URLs
CHECK_IN_SIGNAL = re.compile(r"ping|fail|0|[1-9][0-9]{0,2}")  # an exit status, 0 to 255, as $? prints it
HEARTBEAT_KEY_PREFIX = "heartbeat:"
# The status of a heartbeat, from its columns and the time :now.
HEARTBEAT_STATUS_SQL = """CASE WHEN paused THEN 'paused' WHEN down OR next_due_at <= :now THEN 'down'
                               WHEN late_at <= :now THEN 'late' ELSE 'up' END"""
HEARTBEAT_JSON = f"""json_object(
    'name', name, 'description', description, 'period', period, 'grace', grace, 'source', source,
    'group', group_name, 'paused', json(CASE paused WHEN 1 THEN 'true' ELSE 'false' END), 'status', {HEARTBEAT_STATUS_SQL},
    'last_ping_at', last_ping_at, 'next_due_at', next_due_at,
    'incident_id', (SELECT id FROM incidents WHERE id = heartbeats.incident_id AND {IS_OPEN}),
    'created_at', created_at, 'updated_at', updated_at)"""
# Each status as ordered streams (see list_heartbeats_sql): an index for each, named so that SQLite reads the few
# that are late, down or paused from their own index instead of walking every name; those up are most, read by name
# (unary + keeps SQLite from reading the late_at index for them).
HEARTBEAT_STREAMS = {
    "up": [("", ["paused = 0", "down = 0", "+late_at > :now"])],
    "late": [("INDEXED BY heartbeats_late", ["down = 0", "late_at <= :now", "next_due_at > :now"])],
    "down": [("INDEXED BY heartbeats_down", ["down = 1", "paused = 0"]),
             ("INDEXED BY heartbeats_due", ["down = 0", "next_due_at <= :now"])],
    "paused": [("INDEXED BY heartbeats_paused", ["paused = 1"])],
}
DUE_HEARTBEATS_SQL = "SELECT name FROM heartbeats WHERE down = 0 AND next_due_at <= ? ORDER BY next_due_at LIMIT ?"


def heartbeat_name(name, where="the URL"):
    """A heartbeat's name as the URL gives it, or 404 (422 for PUT, which would create it)."""
    if HEARTBEAT_NAME.fullmatch(name):
        return name
    raise invalid("fields", [{"field": "name", "message": "must be 1 to 100 of A-Z a-z 0-9 . _ -, not dots alone "
                                                          "(as in /heartbeats/scooter-4521)"}]) if where == "PUT" else \
        no_such_heartbeat(name)


def no_such_heartbeat(name):
    return ApiError(404, f"There is no heartbeat {name!r}; create it with PUT /heartbeats/<name> (names are "
                         "case-sensitive).")


def seconds_after(moment, seconds):
    """SQL: a stored timestamp `seconds` later (SQLite counts in whole milliseconds, as the stored format)."""
    return f"strftime('%Y-%m-%dT%H:%M:%fZ', {moment}, '+' || ({seconds}) || ' seconds')"


def deadlines_sql(since, period, grace, paused="0"):
    """SQL: when a heartbeat that checked in at `since` goes late (its period over) and down (its grace too);
    neither while paused."""
    return [f"CASE WHEN {paused} THEN NULL ELSE {seconds_after(since, seconds)} END"
            for seconds in (period, f"{period} + {grace}")]


# A check-in: its time moves the deadlines, and resumes a paused heartbeat; the answer is short.
CHECK_IN_SQL = """UPDATE heartbeats SET last_ping_at = :at, late_at = {}, next_due_at = {}, paused = 0, down = :down,
        incident_id = :incident_id, updated_at = :at WHERE name = :name
    RETURNING json_object('name', name, 'status', CASE down WHEN 1 THEN 'down' ELSE 'up' END, 'next_due_at', next_due_at)
    """.format(*deadlines_sql(":at", "period", "grace"))


def heartbeat_json(db, name):
    """A heartbeat as the API shows it, or None."""
    row = db.execute(f"SELECT {HEARTBEAT_JSON} FROM heartbeats WHERE name = :name", {"name": name, "now": now()})
    return (row.fetchone() or [None])[0]


def save_heartbeat(db, name, values):
    """Create or replace a heartbeat: (its JSON, whether new). A replacement keeps the last check-in, its
    incident and whether it is down, and computes the deadlines afresh from that check-in (or the creation), or
    from now for one that resumes from a pause (its clock starts afresh, as at a check-in)."""
    late_at, next_due_at = deadlines_sql("CASE WHEN paused THEN :at ELSE coalesce(last_ping_at, created_at) END",
                                         ":period", ":grace", ":paused")
    replaced = db.execute(f"""UPDATE heartbeats SET description = :description, period = :period, grace = :grace,
                                  source = :source, group_name = :group, paused = :paused, late_at = {late_at},
                                  next_due_at = {next_due_at},
                                  updated_at = :at WHERE name = :name""", {**values, "name": name, "at": now()}).rowcount
    if not replaced:
        late_at, next_due_at = deadlines_sql(":at", ":period", ":grace", ":paused")
        db.execute(f"""INSERT INTO heartbeats (name, description, period, grace, source, group_name, paused, down,
                                               late_at, next_due_at, created_at, updated_at)
                       VALUES (:name, :description, :period, :grace, :source, :group, :paused, 0, {late_at},
                               {next_due_at}, :at, :at)""", {**values, "name": name, "at": now()})
    return heartbeat_json(db, name), not replaced


def open_incident_of(db, heartbeat):
    """The heartbeat's incident while it is open; None once someone resolved or closed it, or if it has none."""
    return heartbeat["incident_id"] and db.execute(
        f"SELECT id FROM incidents WHERE id = ? AND {IS_OPEN}", (heartbeat["incident_id"],)).fetchone() and \
        heartbeat["incident_id"]


def report_silence(db, heartbeat, note):
    """Open the heartbeat's incident (or fold into the open one with its dedup_key), the note on its timeline."""
    values = {"description": heartbeat["description"], "source": heartbeat["source"],
              "dedup_key": HEARTBEAT_KEY_PREFIX + heartbeat["name"], "group": heartbeat["group_name"]}
    incident_id, _, created = report_incident(db, values, note, "heartbeat")
    if not created:
        add_event(db, incident_id, now(), "note", note=note, actor="heartbeat")
    return incident_id


def open_silent(db, name):
    """The clock's write: an incident for a heartbeat whose deadline passed, unless that changed meanwhile
    (a check-in, a pause, another process that opened it first)."""
    at = now()
    heartbeat = db.execute("SELECT * FROM heartbeats WHERE name = ? AND down = 0 AND next_due_at <= ?",
                           (name, at)).fetchone()
    if heartbeat is None:
        return
    last = heartbeat["last_ping_at"]
    note = say("silent" if last else "silent_since_created", at=shown_time(last or heartbeat["created_at"]),
               period=waited(heartbeat["period"]), grace=waited(heartbeat["grace"]))
    incident_id = report_silence(db, heartbeat, note)
    db.execute("UPDATE heartbeats SET down = 1, incident_id = ?, updated_at = ? WHERE id = ?",
               (incident_id, at, heartbeat["id"]))


def record_check_in(db, name, failure):
    """A check-in: a success resolves the open incident (and the heartbeat is up again), a failure (its note,
    or None for a success) opens one at once. Either resumes a paused heartbeat and moves its deadlines."""
    heartbeat = db.execute("SELECT * FROM heartbeats WHERE name = ?", (name,)).fetchone()
    if heartbeat is None:
        raise no_such_heartbeat(name)
    incident_id = open_incident_of(db, heartbeat)
    if failure is not None:
        incident_id = report_silence(db, heartbeat, failure)
    elif incident_id:
        silent = age_seconds(heartbeat["last_ping_at"] or heartbeat["created_at"])
        change_incident(db, incident_id, {"status": "resolved"}, say("back", silence=waited(silent)), "heartbeat")
    return db.execute(CHECK_IN_SQL, {"at": now(), "down": int(failure is not None),
                                     "incident_id": incident_id or None, "name": name}).fetchone()[0]


def remove_heartbeat(db, name):
    """Delete a heartbeat; its incidents stay. An open one is told on its timeline and gives up its dedup_key, so
    that a heartbeat made again under the name opens its own."""
    if not db.execute("DELETE FROM heartbeats WHERE name = ?", (name,)).rowcount:
        raise no_such_heartbeat(name)
    released = db.execute(f"UPDATE incidents SET dedup_key = NULL WHERE dedup_key = ? AND {IS_OPEN} RETURNING id",
                          (HEARTBEAT_KEY_PREFIX + name,)).fetchone()
    if released:
        add_event(db, released[0], now(), "note", actor="heartbeat",
                  note=say("heartbeat_deleted", name=name, dedup_key=HEARTBEAT_KEY_PREFIX + name))


def failure_note(signal):
    """What a failed check-in says: the start of its body as UTF-8 text (bad bytes replaced), cut to a note, never
    refused for its size (a job's whole log is welcome); else its exit status."""
    request.max_content_length = sys.maxsize  # only the start is read, whatever the size
    try:
        head = request.stream.read(4 * NOTE_MAX)  # enough bytes for NOTE_MAX characters of UTF-8 (the document says)
    except Exception:  # a broken chunked encoding, a client gone halfway: the failure stands, without its text
        head = b""
    text = head.decode("utf-8", "replace").replace("\x00", "\ufffd")[:NOTE_MAX].strip()
    if has_visible_text(text):
        return text
    return say("check_in_exit_status", status=signal) if signal.isdigit() else say("check_in_failed")


def list_heartbeats_sql(query):
    """One page of heartbeats by name: the ordered streams of the statuses asked for, merged (as for incidents)."""
    streams = [stream for status in query.get("status", ()) for stream in HEARTBEAT_STREAMS[status]] or [("", [])]
    selects = [f"""SELECT * FROM (SELECT name FROM heartbeats {index} WHERE {' AND '.join([*conditions, 'name > :after'])}
                   ORDER BY name LIMIT :fetch)""" for index, conditions in streams]
    return f"""SELECT name, {HEARTBEAT_JSON} FROM heartbeats
               WHERE name IN (SELECT name FROM ({' UNION ALL '.join(selects)}) ORDER BY name LIMIT :fetch)
               ORDER BY name"""


def open_silent_heartbeats():
    """The clock's work: incidents for the heartbeats whose deadline passed, found by an index (never a scan)
    and opened in slices of ALERT_CHUNK, as bulk jobs, so that no other write waits behind many."""
    while due := [row[0] for row in get_db().execute(DUE_HEARTBEATS_SQL, (now(), HEARTBEATS_DUE_BATCH))]:
        write_in_slices(open_each_silent, due, bulk=True)
        if len(due) < HEARTBEATS_DUE_BATCH:
            return


def open_each_silent(db, names):
    for name in names:
        open_silent(db, name)


def heartbeats_needing_attention(db):
    """/heartbeats in Telegram: those late or down, by name."""
    rows = db.execute(list_heartbeats_sql({"status": ["late", "down"]}),
                      {"after": "", "fetch": TELEGRAM_LIST_MAX + 1, "now": now()}).fetchall()
    if not rows:
        return say("heartbeats_on_time")
    lines = []
    for row in rows[:TELEGRAM_LIST_MAX]:
        heartbeat = json.loads(row[1])
        last = heartbeat["last_ping_at"]
        lines.append(say("heartbeat_line", name=heartbeat["name"], status=say(f"heartbeat_{heartbeat['status']}"),
                         last=shown_time(last) if last else say("heartbeat_never"),
                         incident=say("heartbeat_incident", id=heartbeat["incident_id"]) if heartbeat["incident_id"]
                         else ""))
    return "\n".join(lines + ([say("heartbeats_more")] if len(rows) > TELEGRAM_LIST_MAX else []))


def heartbeat_cursor(text):
    if not HEARTBEAT_NAME.fullmatch(text):
        raise ValueError("is not a cursor this server returned; start again without it")
    return text


HEARTBEAT_QUERY = {
    "status": (lambda values: parse_choices(values, HEARTBEAT_STATUSES), True),
    "limit": (parse_limit, False),
    "cursor": (heartbeat_cursor, False),
}


def put_heartbeat(name):
    """Create or replace a heartbeat: 201 and Location when new, 200 when replaced."""
    name = heartbeat_name(name, "PUT")
    values = {**HEARTBEAT_DEFAULTS, **validate_fields(read_json_object(), ["description", "period"],
                                                      ["grace", "source", "paused", "group"], HEARTBEAT_SERVER_FIELDS)}
    body, created = write(lambda db: save_heartbeat(db, name, values))
    return json_response(body, 201, {"Location": f"/heartbeats/{name}"}) if created else json_response(body)


def get_heartbeat(name):
    """One heartbeat, or 404."""
    if (body := heartbeat_json(get_db(), heartbeat_name(name))) is None:
        raise no_such_heartbeat(name)
    return json_response(body)


def delete_heartbeat(name):
    """Delete a heartbeat: 204; its incidents stay."""
    write(lambda db: remove_heartbeat(db, heartbeat_name(name)))
    return no_content(Response())


def list_heartbeats():
    """Heartbeats by name, filtered by status, one keyset page at a time."""
    query = parse_query(request.args, HEARTBEAT_QUERY)
    limit = query.get("limit", PAGE_LIMIT_DEFAULT)
    rows = get_db().execute(list_heartbeats_sql(query), {"after": query.get("cursor", ""), "fetch": limit + 1,
                                                         "now": now()}).fetchall()
    return page_response(rows, limit, lambda row: [row["name"]])


def check_in(name, signal):
    """A check-in: ping (or exit status 0) records it, fail (or an exit status 1 to 255) reports a failure."""
    name = heartbeat_name(name)
    if not CHECK_IN_SIGNAL.fullmatch(signal) or (signal.isdigit() and int(signal) > 255):
        raise ApiError(404, f"There is no check-in {signal!r}: use /heartbeats/{name}/ping, /fail, or /<exit status "
                            "0 to 255>.")
    failure = None if signal in ("ping", "0") else failure_note(signal)
    return json_response(write(lambda db: record_check_in(db, name, failure)))


# ---------------------------------------------------------------------------
# Notifications: every incident in the duty chats, kept current, with buttons
# ---------------------------------------------------------------------------

# The buttons that fit each status: callback actions, each labelled say("button_<action>").
NOTIFY_BUTTONS = {
    "new": ("take", "resolve"),
    "in_progress": ("resolve",),
    "resolved": ("reopen",),
    "closed": ("reopen",),
}


def utf16_length(text):
    """The length of a text as Telegram counts it: in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def longest_prefix(text, fits):
    """The longest prefix of a text (whole characters) for which fits(prefix) holds."""
    shortest, longest = 0, len(text)
    while shortest < longest:
        middle = (shortest + longest + 1) // 2
        shortest, longest = (middle, longest) if fits(text[:middle]) else (shortest, middle - 1)
    return text[:shortest]


def fit_description(text, room):
    """The first lines of a description, HTML-escaped and cut to `room` UTF-16 units, " …" marking a cut."""
    short = "\n".join(text.splitlines()[:NOTIFY_DESCRIPTION_LINES])
    escaped = html.escape(short, quote=False)
    if short == text and utf16_length(escaped) <= room:
        return escaped
    cut = longest_prefix(short, lambda prefix: utf16_length(html.escape(prefix, quote=False)) <= room - 2)
    return html.escape(cut, quote=False).rstrip() + " …"


def incident_message(db, incident_id):
    """The text (HTML, every value escaped) and buttons of an incident's message, as it is now."""
    incident = json.loads(fetch_incident_json(db, incident_id))
    change, take = (db.execute(f"""SELECT id, actor, at FROM events WHERE incident_id = ? AND type = 'status_changed'
                                   {condition} ORDER BY id DESC LIMIT 1""", (incident_id,)).fetchone()
                    for condition in ("", "AND from_status = 'new'"))
    status = say(f"status_{incident['status']}")
    header = say("incident_header", id=incident_id, status=status, source=say(f"source_{incident['source']}"))
    lines = [say("reported", at=shown_time(incident["created_at"]))]
    if incident["occurrences"] > 1:
        lines.append(say("repeated", times=plural(incident["occurrences"], "time"),
                         at=shown_time(incident["last_seen_at"])))
    taken = take if take and incident["acknowledged_at"] else None  # who took it and when, however it went on
    if taken:
        lines.append(say("taken_by", actor=html.escape(shown_actor(taken["actor"]), quote=False),
                         at=shown_time(taken["at"])))
    if change and change["id"] != (taken and taken["id"]):
        lines.append(say("now_status", status=status, actor=html.escape(shown_actor(change["actor"]), quote=False),
                         at=shown_time(change["at"])))
    if incident["assignee"] and incident["assignee"] != (taken and (taken["actor"] or "").split(" (Telegram user ")[0]):
        lines.append(say("assigned", assignee=html.escape(incident["assignee"], quote=False)))
    room = TELEGRAM_TEXT_MAX - utf16_length("\n".join([header, *lines])) - 1
    buttons = [{"text": say(f"button_{action}"), "callback_data": f"{action}:{incident_id}"}
               for action in NOTIFY_BUTTONS[incident["status"]]]
    return "\n".join([header, fit_description(incident["description"], room), *lines]), {"inline_keyboard": [buttons]}


def pending_notifications(db):
    """Each (incident, chat) the outbox has news for, oldest first, with its message so far."""
    return db.execute(
        """SELECT o.incident_id, o.chat_id, json_group_array(json_array(o.kind, o.seq)) AS entries,
                  min(o.kind = 'repeat') AS repeats_only, min(o.queued_at) AS queued_at, m.message_id, m.shown_at
           FROM notify_outbox AS o LEFT JOIN notify_messages AS m USING (incident_id, chat_id)
           GROUP BY o.incident_id, o.chat_id ORDER BY min(o.queued_at), o.incident_id"""
    ).fetchall()


def seconds_until_due(row, repeat_interval):
    """0 when the entry is due; repeats alone wait until the message is `repeat_interval` old."""
    if not row["repeats_only"] or row["shown_at"] is None:
        return 0
    return max(0.0, repeat_interval - age_seconds(row["shown_at"]))


def show_message(bot, row, render):
    """Send the message render() makes (text, buttons) to the row's chat, or edit the one already shown there;
    returns its message id."""
    text, markup = render()
    message = {"chat_id": row["chat_id"], "text": text, "parse_mode": "HTML", "reply_markup": markup, **NO_PREVIEWS}
    if row["message_id"] is not None:
        try:
            bot.call("editMessageText", {**message, "message_id": row["message_id"]})
            return row["message_id"]
        except BotApiError as error:
            if "message is not modified" in str(error):
                return row["message_id"]
            if not message_refused(error):
                raise
            # Any other refusal is about the message (deleted, too old, MESSAGE_ID_INVALID): show it afresh.
    return bot.send(message)


def chat_is_gone(error):
    """Whether Telegram says the bot can no longer write to the chat (removed, blocked, no such chat)."""
    return error.code == 403 or (error.code == 400 and "chat not found" in str(error))


def message_refused(error):
    """Whether Telegram refuses the call for its message alone (deleted, too old, a bad request), not the chat."""
    return error.code == 400 and not error.migrate_to and not chat_is_gone(error)


def mark_delivered(db, message_id, row):
    """Remember the message (None: none was shown) and drop the entries shown; one changed meanwhile stays."""
    if message_id is not None:
        db.execute(
            """INSERT INTO notify_messages (incident_id, chat_id, message_id, shown_at) VALUES (?, ?, ?, ?)
               ON CONFLICT (incident_id, chat_id) DO UPDATE SET message_id = excluded.message_id,
                                                               shown_at = excluded.shown_at""",
            (row["incident_id"], row["chat_id"], message_id, now()),
        )
    for kind, seq in json.loads(row["entries"]):
        db.execute("DELETE FROM notify_outbox WHERE incident_id = ? AND chat_id = ? AND kind = ? AND seq = ?",
                   (row["incident_id"], row["chat_id"], kind, seq))


def forget_chat(db, chat_id, error):
    """The bot was removed from a chat: drop its queue and queue nothing more for it."""
    db.execute("INSERT OR REPLACE INTO notify_chats_gone (chat_id, reason, at) VALUES (?, ?, ?)",
               (chat_id, str(error)[:NOTE_MAX], now()))
    for table in ("notify_outbox", "notify_reminders", "storm_outbox"):  # names from code
        db.execute(f"DELETE FROM {table} WHERE chat_id = ?", (chat_id,))


def take_chats_back(db, chats):
    """At a sender's start, the chats still in the settings that a refusal dropped are tried again (a 403 may
    have passed: the bot added back, unblocked): each is shown its open incidents afresh, the changes
    from then on, and its reminders."""
    back = [row[0] for row in db.execute("""DELETE FROM notify_chats_gone WHERE moved_to IS NULL
                                            AND chat_id IN (SELECT value FROM json_each(?)) RETURNING chat_id""",
                                         (json.dumps(sorted(chats)),))]
    notify = current_app.config["TELEGRAM_NOTIFY_CHAT_IDS"]
    for chat_id in back:  # an escalation chat shows what was escalated; a storm's incidents, the storm
        values = {"chat": chat_id, "at": now(), "all": chat_id in notify}
        db.execute(f"""INSERT INTO notify_outbox (incident_id, chat_id, kind, seq, queued_at)
                       SELECT id, :chat, 'change', 1, :at FROM incidents
                       WHERE {IS_OPEN} AND storm_id IS NULL AND (:all OR escalated_at IS NOT NULL)
                       ON CONFLICT (incident_id, chat_id, kind) DO UPDATE SET seq = seq + 1""", values)
        db.execute(f"""INSERT INTO storm_outbox (storm_id, chat_id, kind, seq, queued_at)
                       SELECT id, :chat, 'change', 1, :at FROM storms
                       WHERE {STORM_GOING_ON.format('storms.id')} AND (:all OR escalated_at IS NOT NULL)
                       ON CONFLICT (storm_id, chat_id, kind) DO UPDATE SET seq = seq + 1""", values)
    return back


def move_chat(db, chat_id, error):
    """A group became a supergroup: what was queued for it (reminders too), and each open incident and storm shown
    there, go to the new id.

    The old messages cannot be edited in the new chat, so the open incidents and storms are shown there afresh.
    """
    at, new_id = now(), error.migrate_to
    db.execute("INSERT OR REPLACE INTO notify_chats_gone (chat_id, reason, at, moved_to) VALUES (?, ?, ?, ?)",
               (chat_id, str(error)[:NOTE_MAX], at, new_id))
    db.execute(f"""INSERT INTO notify_outbox (incident_id, chat_id, kind, seq, queued_at)
                   SELECT incident_id, ?, 'change', 1, ? FROM notify_messages
                   WHERE chat_id = ? AND EXISTS (SELECT 1 FROM incidents WHERE id = incident_id AND {IS_OPEN})
                   UNION SELECT incident_id, ?, kind, 1, queued_at FROM notify_outbox WHERE chat_id = ?
                   ON CONFLICT (incident_id, chat_id, kind) DO UPDATE SET seq = seq + 1""",
               (new_id, at, chat_id, new_id, chat_id))
    db.execute(f"""INSERT INTO storm_outbox (storm_id, chat_id, kind, seq, queued_at)
                   SELECT storm_id, ?, 'change', 1, ? FROM storm_messages
                   WHERE chat_id = ? AND {STORM_GOING_ON.format('storm_id')}
                   UNION SELECT storm_id, ?, kind, 1, queued_at FROM storm_outbox WHERE chat_id = ?
                   ON CONFLICT (storm_id, chat_id, kind) DO UPDATE SET seq = seq + 1""",
               (new_id, at, chat_id, new_id, chat_id))
    for table in ("notify_outbox", "notify_messages", "storm_outbox", "storm_messages"):  # names from code
        db.execute(f"DELETE FROM {table} WHERE chat_id = ?", (chat_id,))
    db.execute("UPDATE notify_reminders SET chat_id = ? WHERE chat_id = ? AND state = 'due'", (new_id, chat_id))
    db.execute("DELETE FROM notify_reminders WHERE chat_id = ?", (chat_id,))  # those sent stay in the old group


def chat_refused(database, chat_id, error):
    """Handle a refusal that is about the chat, not one message: True for a chat moved or gone (logged)."""
    if error.migrate_to:
        current_app.logger.error("Telegram chat %s is now the supergroup %s, where notifications go from now on; "
                                 "put %s in place of %s in TELEGRAM_NOTIFY_CHAT_IDS", chat_id, error.migrate_to,
                                 error.migrate_to, chat_id)
        database.write(lambda db: move_chat(db, chat_id, error))
        return True
    if chat_is_gone(error):
        current_app.logger.error("Telegram chat %s no longer takes messages (%s); nothing more is queued for it "
                                 "until the sender restarts with it still in the settings", chat_id, error)
        database.write(lambda db: forget_chat(db, chat_id, error))
        return True
    return False


# One message to send or edit, or one reminder: `send()` calls the Bot API, `record(db, result)` remembers what it
# did, `dropped(db, None)` what Telegram refused for good. A first message goes before edits and replies.
Delivery = collections.namedtuple("Delivery", "due_in first queued_at chat_id what send record dropped")


def send_and_record(database, bot, delivery):
    """Send a delivery, then record it before anything else is sent; False if its chat is held, moved or gone.

    The record is tried again, with what Telegram accepted kept in memory, for as long as the
    database refuses it. A 429 holds its chat for what Telegram asks; a network error stops the pass
    (the caller waits); a chat that moved or is gone is dealt with; a call Telegram refuses as a bad
    request is logged and `dropped` recorded instead, since trying it again would hold up the rest.
    """
    record, chat_id = delivery.record, delivery.chat_id
    try:
        result = delivery.send()
    except BotApiError as error:
        if error.code == 429:
            bot.pace.hold(chat_id, error.retry_after or TELEGRAM_BACKOFF_S[1])
            current_app.logger.warning("%s: Telegram asks to wait (%s); the chat waits, the others go on",
                                       delivery.what, error)
            return False
        if chat_refused(database, chat_id, error):
            return False
        if not message_refused(error):
            raise
        current_app.logger.error("%s: not sent (%s)", delivery.what, error)
        record, result = delivery.dropped, None
    keep_trying(lambda: database.write(lambda db: record(db, result)), f"{delivery.what}: sent, not yet recorded")
    return True


def deliver(database, bot, deliveries):
    """Send what is due, first messages before edits and replies, oldest first, within Telegram's limits; returns
    seconds until the next is due."""
    wait, held = NOTIFY_POLL_S, set()
    for delivery in sorted(deliveries, key=lambda delivery: (not delivery.first, delivery.queued_at)):
        if delivery.chat_id in held:  # its rows were moved or dropped with it, or it must wait
            continue
        due_in = delivery.due_in or bot.pace.wait(delivery.chat_id, delivery.first)
        if due_in:
            wait = min(wait, due_in)
        elif not send_and_record(database, bot, delivery):
            held.add(delivery.chat_id)
    return wait


def outbox_deliveries(db, bot):
    """The outbox's incidents to show: a message shows the incident as it is when sent, so a burst of changes is
    one edit."""
    for row in pending_notifications(db):
        record = functools.partial(mark_delivered, row=row)
        yield Delivery(seconds_until_due(row, current_app.config["NOTIFY_REPEAT_INTERVAL"]), row["message_id"] is None,
                       row["queued_at"], row["chat_id"], f"incident {row['incident_id']} in chat {row['chat_id']}",
                       functools.partial(show_message, bot, row, functools.partial(incident_message, db, row["incident_id"])),
                       record, record)


def deliver_notifications(database, db, bot):
    """One pass: reminders that fell due, then the outbox, the storms and the reminders to send or take back;
    returns seconds to wait."""
    schedule_reminders(database, db)
    return deliver(database, bot, pending_deliveries(db, bot))


def pending_deliveries(db, bot):
    """Everything the chats wait for: the outbox's incidents, the storms, the reminders."""
    return [*outbox_deliveries(db, bot), *storm_deliveries(db, bot), *reminder_deliveries(db, bot)]


def notify_once(database, db, bot, delay):
    """One pass over the outbox; returns how long to wait before the next, waiting out outages and a database
    that refuses writes. The Bot API calls it made are counted for /metrics."""
    try:
        return deliver_notifications(database, db, bot)
    except BotApiError as error:
        delay, why = retry_delay(error, delay), error
    except sqlite3.Error as error:
        delay, why = TELEGRAM_BACKOFF_S[0], error
    finally:
        record_calls(database, bot)
    current_app.logger.warning("notifications held (%s); trying again in %s s", why, delay)
    return delay


def send_notifications(database, db, bot, stop):
    """Deliver the outbox until `stop` is set, after trying again the chats a refusal dropped."""
    config = current_app.config
    for chat_id in keep_trying(lambda: database.write(lambda writer: take_chats_back(writer, [
            *config["TELEGRAM_NOTIFY_CHAT_IDS"], *config["TELEGRAM_ESCALATE_CHAT_IDS"]])), "chats not taken back"):
        current_app.logger.warning("Telegram chat %s, dropped after a refusal, is tried again: it is in the settings",
                                   chat_id)
    delay = 0
    while not stop.wait(delay):
        delay = notify_once(database, db, bot, delay)


# ---------------------------------------------------------------------------
# Reminders: an incident nobody takes is called for again, then escalated
# ---------------------------------------------------------------------------


# The incidents whose next reminder (or escalation) is due, read from their own partial index.
DUE_REMINDERS_SQL = "SELECT id FROM incidents WHERE remind_at <= ? ORDER BY remind_at LIMIT ?"


def schedule_reminders(database, db):
    """Turn the reminders and escalations that fell due into messages to send, REMIND_BATCH a transaction.

    Each incident's next due time is in the database (remind_at, found by its own index), so a
    restart neither sends a reminder early nor loses one; one that fell due while no sender ran is
    sent once, and the next comes REMIND_AFTER after it.
    """
    if not current_app.config["REMIND_AFTER"]:
        return
    for sql, work in ((DUE_REMINDERS_SQL, remind), (DUE_STORMS_SQL, remind_storm)):
        while due := [row[0] for row in db.execute(sql, (now(), REMIND_BATCH))]:
            database.write(lambda writer: [work(writer, row_id) for row_id in due])
            if len(due) < REMIND_BATCH:
                break


def remind(db, incident_id):
    """Queue the next reminder of an incident still new in each notify chat, or after the last, escalate it.

    While an earlier call has not gone out (Telegram unreachable), the next is put off an interval:
    the calls do not pile up to arrive all at once.
    """
    incident = db.execute("SELECT status, remind_at, reminders FROM incidents WHERE id = ?", (incident_id,)).fetchone()
    at, config = now(), current_app.config
    if incident["remind_at"] is None or incident["remind_at"] > at:
        return  # taken, or put off, since the pass read it
    if incident["status"] != "new" or (not config["REMIND_MAX"] and not config["TELEGRAM_ESCALATE_CHAT_IDS"]):
        db.execute("UPDATE incidents SET remind_at = NULL WHERE id = ?", (incident_id,))
    elif db.execute("SELECT 1 FROM notify_reminders WHERE incident_id = ? AND state = 'due'",
                    (incident_id,)).fetchone():
        db.execute("UPDATE incidents SET remind_at = ? WHERE id = ?", (shifted(at, config["REMIND_AFTER"]), incident_id))
    elif incident["reminders"] < config["REMIND_MAX"]:
        number = incident["reminders"] + 1
        queue_reminders(db, incident_id, number, config["TELEGRAM_NOTIFY_CHAT_IDS"], at)
        add_event(db, incident_id, at, "reminded", count=number)
        db.execute("UPDATE incidents SET reminders = ?, remind_at = ? WHERE id = ?",
                   (number, shifted(at, config["REMIND_AFTER"]), incident_id))
    else:
        escalate(db, incident_id, incident["reminders"] + 1, at)


def queue_reminders(db, incident_id, number, chats, at, shown_only=False):
    """A reminder to send in each of the chats (reached as they are now); with shown_only, in those that show it."""
    db.execute(f"""INSERT INTO notify_reminders (incident_id, chat_id, number, state, queued_at)
                   SELECT :id, chat_id, :number, 'due', :at FROM ({REACHABLE_CHATS}) AS reachable
                   WHERE NOT :shown_only OR chat_id IN (SELECT chat_id FROM notify_messages WHERE incident_id = :id)""",
               {"id": incident_id, "number": number, "at": at, "chats": json.dumps(chats), "shown_only": shown_only})


def escalate(db, incident_id, number, at):
    """After the last reminder: the incident goes to the escalation chats with its buttons and stays current
    there; a chat that shows it already (it was escalated before) is called with a reply, as for a reminder."""
    chats = current_app.config["TELEGRAM_ESCALATE_CHAT_IDS"]
    db.execute("UPDATE incidents SET remind_at = NULL, reminders = ?, escalated_at = ? WHERE id = ?",
               (number, at if chats else None, incident_id))
    if chats:
        queue_reminders(db, incident_id, number, chats, at, shown_only=True)
        add_event(db, incident_id, at, "escalated", note=say("escalation_note"))
        queue_notification(db, incident_id, "change", chats)


def pending_reminders(db):
    """Reminders to send or to take back, oldest first, each with what its message needs."""
    return db.execute(
        """SELECT r.id, r.incident_id, r.chat_id, r.number, r.state, r.message_id, r.queued_at, i.status, i.description,
                  i.assignee, coalesce(i.opened_at, i.created_at) AS opened_at, m.message_id AS reply_to
           FROM notify_reminders AS r JOIN incidents AS i ON i.id = r.incident_id
           LEFT JOIN notify_messages AS m ON m.incident_id = r.incident_id AND m.chat_id = r.chat_id
           WHERE r.state != 'sent' ORDER BY r.queued_at"""
    ).fetchall()


def waited(seconds):
    """A wait as a person says it: 45 s, 10 min, 2 h 5 min; 1 час 2 минуты."""
    minutes = int(seconds // 60)
    return plural(int(seconds), "second") if minutes == 0 else plural(minutes, "minute") if minutes < 60 else \
        say("hours_minutes" if minutes % 60 else "whole_hours", hours=plural(minutes // 60, "hour"),
            minutes=plural(minutes % 60, "minute"))


def show_reminder(bot, row):
    """Send a reminder, a reply to the incident's message (an edit makes no phone ring); returns its id."""
    remind_max, wait = current_app.config["REMIND_MAX"], waited(age_seconds(row["opened_at"]))
    nobody = say("nobody_assigned", assignee=html.escape(row["assignee"], quote=False)) if row["assignee"] else \
        say("nobody")
    header = say("reminder", id=row["incident_id"], waited=wait, nobody=nobody, number=row["number"], most=remind_max) \
        if row["number"] <= remind_max else say("escalated", id=row["incident_id"], waited=wait, nobody=nobody)
    room = TELEGRAM_TEXT_MAX - utf16_length(header) - 1
    message = {"chat_id": row["chat_id"], "text": f"{header}\n{fit_description(row['description'], room)}",
               "parse_mode": "HTML", **NO_PREVIEWS,
               "reply_markup": {"inline_keyboard": [[{"text": say("button_take"),
                                                      "callback_data": f"take:{row['incident_id']}"}]]}}
    if row["reply_to"] is not None:
        message["reply_parameters"] = {"message_id": row["reply_to"], "allow_sending_without_reply": True}
    return bot.send(message)


def take_back_reminder(bot, row):
    """Delete a reminder the incident no longer needs; one too old to delete loses its button instead."""
    if row["message_id"] is None:
        return
    where = {"chat_id": row["chat_id"], "message_id": row["message_id"]}
    for method, payload in (("deleteMessage", where),
                            ("editMessageText", {**where, "text": say("reminder_taken_back", id=row["incident_id"],
                                                                      status=say(f"status_{row['status']}"))})):
        try:
            bot.call(method, payload)
            return
        except BotApiError as error:
            if not message_refused(error):
                raise


def record_reminder(db, message_id, row):
    """Remember a reminder Telegram accepted: sent, or stale at once if the incident was taken meanwhile."""
    db.execute("""UPDATE notify_reminders SET message_id = ?,
                      state = CASE (SELECT status FROM incidents WHERE id = ?) WHEN 'new' THEN 'sent' ELSE 'stale' END
                  WHERE id = ?""", (message_id, row["incident_id"], row["id"]))


def forget_reminder(db, _, row):
    """Drop a reminder that is done with: taken back, never to be sent, or refused by Telegram."""
    db.execute("DELETE FROM notify_reminders WHERE id = ?", (row["id"],))


def reminder_deliveries(db, bot):
    """Each reminder due while its incident is still new, and each to take back now that it is not."""
    for row in pending_reminders(db):
        forget = functools.partial(forget_reminder, row=row)
        what = f"reminder {row['number']} of incident {row['incident_id']} in chat {row['chat_id']}"
        if row["state"] == "due" and row["status"] == "new":
            yield Delivery(0, False, row["queued_at"], row["chat_id"], what, functools.partial(show_reminder, bot, row),
                           functools.partial(record_reminder, row=row), forget)
        else:
            yield Delivery(0, False, row["queued_at"], row["chat_id"], what,
                           functools.partial(take_back_reminder, bot, row), forget, forget)


@contextmanager
def sole_sender(lock_base, bot_id):
    """Hold the right to send for this bot, or refuse, naming the sender that holds it.

    A kernel lock on a file beside the database: released when its process ends, however it ends.
    """
    try:
        turn = open_lock_file(f"{lock_base}-telegram-sender-{bot_id}.lock")
    except OSError as error:
        raise click.ClickException(lock_file_refused(error, f"{lock_base}-telegram-sender-{bot_id}.lock")) from None
    try:
        try:
            fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(turn, 500, 0).decode(errors="replace").strip() or "another process"
            raise click.ClickException(f"Another sender for this bot is running ({holder}); only one may send "
                                       "per bot: stop it first, or let it send.") from None
        os.ftruncate(turn, 0)
        os.pwrite(turn, f"pid {os.getpid()}: {' '.join(os.path.basename(arg) for arg in sys.argv)}".encode(), 0)
        yield
    finally:
        os.close(turn)


@contextmanager
def notifications_in_background(bot):
    """The sender in a thread beside the poller, whose getUpdates waits up to 30 s at a time."""
    app, stop = current_app._get_current_object(), threading.Event()

    def run():
        with app.app_context():
            try:
                until_interrupted("Sending notifications.",
                                  lambda database, db: send_notifications(database, db, bot, stop))
            except click.ClickException as error:
                app.logger.error("notifications stopped: %s", error.message)
            except Exception:
                app.logger.exception("notifications stopped")

    thread = threading.Thread(target=run, name="telegram-notify", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(TELEGRAM_CALL_TIMEOUT_S + 5)  # a call in flight ends within its timeout


@click.command("telegram-notify")
@with_appcontext
def telegram_notify_command():
    """Show incidents in TELEGRAM_NOTIFY_CHAT_IDS and keep them current (beside a webhook deployment)."""
    open_database()
    bot = telegram_bot()
    if not current_app.config["TELEGRAM_NOTIFY_CHAT_IDS"]:
        raise click.UsageError("Set TELEGRAM_NOTIFY_CHAT_IDS to the chats to notify, ids separated by commas.")
    learn_username(current_app.extensions["incidents"], bot)  # for the webhook beside it
    register_commands(bot)
    with sole_sender(current_app.extensions["incidents"].lock_base, bot.id):
        until_interrupted("Sending notifications; press Ctrl-C to stop.", lambda database, db: send_notifications(
            database, db, bot, threading.Event()))


# ---------------------------------------------------------------------------
# Storms: many incidents of one group at once are one message in the chats
# ---------------------------------------------------------------------------

STORM_LIST_MAX = 10  # incidents a storm's message names: the first ones
STORM_EDIT_S = 10  # a storm's message is edited at most this often (in Telegram's minute: see Pace)
STORM_GOING_ON = f"EXISTS (SELECT 1 FROM incidents WHERE storm_id = {{}} AND {IS_OPEN})"  # of the storm's id column
# The incidents of a group, or of a source without a group, opened since a moment and in no storm yet: each read
# from its own index (by group, or by status and source).
RECENT_OF_GROUP = f"""SELECT id FROM incidents WHERE group_name = :group AND status IN ({sql_list(STATUSES)})
    AND source IN ({sql_list(SOURCES)}) AND created_at >= :since AND storm_id IS NULL"""
RECENT_OF_SOURCE = f"""SELECT id FROM incidents WHERE status IN ({sql_list(STATUSES)}) AND source = :source
    AND created_at >= :since AND group_name IS NULL AND storm_id IS NULL"""
PENDING_STORMS_SQL = """SELECT o.storm_id, o.chat_id, o.kind, o.seq, o.queued_at, m.message_id, m.shown_at
    FROM storm_outbox AS o LEFT JOIN storm_messages AS m USING (storm_id, chat_id) ORDER BY o.queued_at"""
DUE_STORMS_SQL = "SELECT id FROM storms WHERE remind_at <= ? ORDER BY remind_at LIMIT ?"


def join_storm(db, incident_id, values, at):
    """Put a new incident in the storm of its group (of its source, without a group): the one still raging (its
    latest incident opened within STORM_WINDOW), or a new one once more than STORM_THRESHOLD of them opened
    within STORM_WINDOW, which takes them all. Only while incidents are shown in chats."""
    config = current_app.config
    if not (config["STORM_THRESHOLD"] and config["STORM_WINDOW"] and config["TELEGRAM_NOTIFY_CHAT_IDS"]):
        return
    key = {"group": values.get("group"), "source": None if values.get("group") else values["source"],
           "since": shifted(at, -config["STORM_WINDOW"]), "at": at}
    storm = db.execute("""SELECT id, last_at FROM storms WHERE group_name IS :group AND source IS :source
                          ORDER BY id DESC LIMIT 1""", key).fetchone()
    if storm and raging(storm["last_at"], at):
        members, storm_id = [incident_id], storm["id"]
        db.execute("UPDATE storms SET last_at = ? WHERE id = ?", (at, storm_id))
    else:
        members = [row[0] for row in db.execute(RECENT_OF_GROUP if key["group"] else RECENT_OF_SOURCE, key)]
        if len(members) <= config["STORM_THRESHOLD"]:
            return
        storm_id = start_storm(db, key, members)
    db.execute(f"UPDATE incidents SET storm_id = ?, remind_at = NULL WHERE id IN ({placeholders(members)})",
               (storm_id, *members))  # reminded of with the storm, as one


def raging(last_at, at):
    """Whether a storm whose latest incident opened at `last_at` still takes incidents: within STORM_WINDOW."""
    return last_at >= shifted(at, -current_app.config["STORM_WINDOW"])


def storm_raging(db, storm_id, at):
    return raging(db.execute("SELECT last_at FROM storms WHERE id = ?", (storm_id,)).fetchone()[0], at)


def start_storm(db, key, members):
    """A new storm of these incidents, its reminder due REMIND_AFTER after the first of them opened."""
    started = db.execute(f"SELECT min(created_at) FROM incidents WHERE id IN ({placeholders(members)})",
                         members).fetchone()[0]
    after = current_app.config["REMIND_AFTER"]
    return db.execute("""INSERT INTO storms (group_name, source, started_at, last_at, remind_at)
                         VALUES (:group, :source, :started, :at, :remind) RETURNING id""",
                      {**key, "started": started, "remind": shifted(started, after) if after else None}).fetchone()[0]


def queue_storm(db, storm_id, kind, chats=None):
    """Record that the storm's message in each of its chats must catch up (change), or that a reminder is due there
    (remind)."""
    if chats is None:
        chats = shown_chats(db.execute("SELECT escalated_at FROM storms WHERE id = ?", (storm_id,)).fetchone()[0])
    db.execute(f"""INSERT INTO storm_outbox (storm_id, chat_id, kind, seq, queued_at)
                   SELECT :id, chat_id, :kind, 1, :at FROM ({REACHABLE_CHATS}) WHERE true
                   ON CONFLICT (storm_id, chat_id, kind) DO UPDATE SET seq = seq + 1""",
               {"id": storm_id, "kind": kind, "at": now(), "chats": json.dumps(chats)})


def storm_counts(db, storm_id):
    """Its incidents by status, counted from their index."""
    counts = dict.fromkeys(STATUSES, 0)
    counts.update(db.execute("SELECT status, count(*) FROM incidents WHERE storm_id = ? GROUP BY status", (storm_id,)))
    return counts


def storm_name(storm):
    """What a storm is called: its group, or its source's words."""
    return storm["group_name"] or say("storm_of_source", source=say(f"source_{storm['source']}"))


def storm_message(db, storm_id):
    """The text (HTML, every value escaped) and buttons of a storm's message, as it is now: at most
    TELEGRAM_TEXT_MAX, whatever its size."""
    storm, counts = db.execute("SELECT * FROM storms WHERE id = ?", (storm_id,)).fetchone(), storm_counts(db, storm_id)
    total, still = sum(counts.values()), counts["new"] + counts["in_progress"]
    lines = [say("storm_title", group=html.escape(storm_name(storm), quote=False),
                 incidents=plural(total, "incident"), since=shown_time(storm["started_at"])),
             say("storm_open", open=still, new=counts["new"], taken=counts["in_progress"], back=total - still)]
    if not still:
        ended = db.execute("SELECT max(resolved_at) FROM incidents WHERE storm_id = ?", (storm_id,)).fetchone()[0]
        lines.append(say("storm_over", at=shown_time(ended), lasted=waited(seconds_between(storm["started_at"], ended))))
    first = db.execute("SELECT id, description FROM incidents WHERE storm_id = ? ORDER BY id LIMIT ?",
                       (storm_id, STORM_LIST_MAX)).fetchall()
    more = [say("storm_more", more=total - len(first))] if total > len(first) else []
    room = (TELEGRAM_TEXT_MAX - utf16_length("\n".join(lines + more)) - 1) // STORM_LIST_MAX - len(f"#{MAX_ID} \n")
    lines += [f"#{row['id']} {fit_description(row['description'].splitlines()[0], room)}" for row in first] + more
    take_all = [[{"text": say("storm_take_all"), "callback_data": f"takeall:{storm_id}"}]] if counts["new"] else []
    return "\n".join(lines), {"inline_keyboard": take_all}


def seconds_between(earlier, later):
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def storm_deliveries(db, bot):
    """Each storm's message to show or bring up to date (at most once every STORM_EDIT_S while it changes), and
    its reminders to send."""
    edit_every = STORM_EDIT_S * current_app.config["TELEGRAM_WINDOW"] / 60
    for row in db.execute(PENDING_STORMS_SQL):
        what = f"storm {row['storm_id']} in chat {row['chat_id']}"
        if row["kind"] == "change":
            record = functools.partial(mark_storm_shown, row=row)
            due_in = row["shown_at"] and max(0.0, edit_every - age_seconds(row["shown_at"]))
            yield Delivery(due_in, row["message_id"] is None, row["queued_at"], row["chat_id"], what,
                           functools.partial(show_message, bot, row, functools.partial(storm_message, db, row["storm_id"])),
                           record, record)
        else:
            done = functools.partial(forget_storm_entry, row=row)
            yield Delivery(0, False, row["queued_at"], row["chat_id"], f"reminder of {what}",
                           functools.partial(show_storm_reminder, bot, db, row), done, done)


def mark_storm_shown(db, message_id, row):
    """Remember the storm's message (None: none was shown) and drop the entry, unless it changed meanwhile."""
    if message_id is not None:
        db.execute("""INSERT INTO storm_messages (storm_id, chat_id, message_id, shown_at) VALUES (?, ?, ?, ?)
                      ON CONFLICT (storm_id, chat_id) DO UPDATE SET message_id = excluded.message_id,
                                                                   shown_at = excluded.shown_at""",
                   (row["storm_id"], row["chat_id"], message_id, now()))
    forget_storm_entry(db, None, row)


def forget_storm_entry(db, _, row):
    db.execute("DELETE FROM storm_outbox WHERE storm_id = ? AND chat_id = ? AND kind = ? AND seq = ?",
               (row["storm_id"], row["chat_id"], row["kind"], row["seq"]))


def show_storm_reminder(bot, db, row):
    """A storm's reminder or escalation: a reply to its message, with its Take all button; returns its id."""
    storm, counts = db.execute("SELECT * FROM storms WHERE id = ?", (row["storm_id"],)).fetchone(), \
        storm_counts(db, row["storm_id"])
    remind_max = current_app.config["REMIND_MAX"]
    text = say("storm_reminder" if storm["reminders"] <= remind_max else "storm_escalated",
               group=html.escape(storm_name(storm), quote=False), new=plural(counts["new"], "incident"),
               waited=waited(age_seconds(storm["started_at"])), number=storm["reminders"], most=remind_max)
    message = {"chat_id": row["chat_id"], "text": text, "parse_mode": "HTML", **NO_PREVIEWS, "reply_markup": {
        "inline_keyboard": [[{"text": say("storm_take_all"), "callback_data": f"takeall:{row['storm_id']}"}]]}}
    shown = db.execute("SELECT message_id FROM storm_messages WHERE storm_id = ? AND chat_id = ?",
                       (row["storm_id"], row["chat_id"])).fetchone()  # perhaps sent in this very pass
    if shown:
        message["reply_parameters"] = {"message_id": shown[0], "allow_sending_without_reply": True}
    return bot.send(message)


def remind_storm(db, storm_id):
    """A storm's reminder, as one for all of it, while any of it is new and nobody has taken any of it; after
    the last, its escalation: the storm's message in the escalation chats, with a call there."""
    storm, at, config = db.execute("SELECT * FROM storms WHERE id = ?", (storm_id,)).fetchone(), now(), \
        current_app.config
    if storm["remind_at"] is None or storm["remind_at"] > at:
        return
    counts, escalate = storm_counts(db, storm_id), config["TELEGRAM_ESCALATE_CHAT_IDS"]
    if not counts["new"] or counts["in_progress"] or (not config["REMIND_MAX"] and not escalate):
        db.execute("UPDATE storms SET remind_at = NULL WHERE id = ?", (storm_id,))
    elif db.execute("SELECT 1 FROM storm_outbox WHERE storm_id = ? AND kind = 'remind'", (storm_id,)).fetchone():
        db.execute("UPDATE storms SET remind_at = ? WHERE id = ?", (shifted(at, config["REMIND_AFTER"]), storm_id))
    elif storm["reminders"] < config["REMIND_MAX"]:
        db.execute("UPDATE storms SET reminders = reminders + 1, remind_at = ? WHERE id = ?",
                   (shifted(at, config["REMIND_AFTER"]), storm_id))
        queue_storm(db, storm_id, "remind")
    else:
        db.execute("UPDATE storms SET reminders = reminders + 1, remind_at = NULL, escalated_at = ? WHERE id = ?",
                   (at if escalate else None, storm_id))
        if escalate:
            queue_storm(db, storm_id, "change", escalate)
            queue_storm(db, storm_id, "remind", escalate)


def take_storm(db, storm_id, update_part):
    """Take All: every incident of the storm still new, taken by who tapped, each on its timeline as a tap on it
    would; the answer in one line."""
    storm = db.execute("SELECT * FROM storms WHERE id = ?", (storm_id,)).fetchone()
    if storm is None:
        return say("storm_unknown", number=storm_id)
    fresh = [row[0] for row in db.execute("SELECT id FROM incidents WHERE storm_id = ? AND status = 'new' ORDER BY id",
                                          (storm_id,))]
    if not fresh:
        queue_storm(db, storm_id, "change")  # the message shows it
        return say("storm_nothing_new", group=storm_name(storm))
    note = say("storm_note", group=storm_name(storm), count=plural(len(fresh), "incident"))[:NOTE_MAX]
    for incident_id in fresh:
        change_incident(db, incident_id, {"status": "in_progress"}, note, telegram_sender(update_part),
                        telegram_name(update_part))
    return say("storm_taken", count=plural(len(fresh), "incident"), group=storm_name(storm),
               name=telegram_name(update_part))


# ---------------------------------------------------------------------------
# Metrics for Prometheus, and backups
# ---------------------------------------------------------------------------

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The oldest `new` incident: one ordered index seek per source.
OLDEST_NEW_SQL = "SELECT min(at) FROM (" + " UNION ALL ".join(
    f"SELECT min(created_at) AS at FROM incidents WHERE status = 'new' AND source = '{source}'" for source in SOURCES) + ")"



def sample_line(name, labels, value):
    """One sample in the text format: its name, its labels in braces (if any), its value. Labels come written
    (`status="new",source="operator"`): their values are the code's own words, which need no escaping."""
    return f"{name}{{{labels}}} {value}" if labels else f"{name} {value}"


def metric_family(name, kind, help_text, samples):
    """One metric family in the text format: HELP, TYPE, then a line per (labels, value) sample."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
            *(sample_line(name, labels, value) for labels, value in samples)]


def histogram_family(name, help_text, rows):
    """A histogram per source, from incident_durations rows: cumulative buckets, then +Inf, sum and count."""
    lines = metric_family(name, "histogram", help_text, [])
    for row in rows:
        source = f'source="{row["source"]}"'
        lines += [sample_line(f"{name}_bucket", f'{source},le="{bound}"', row[f"le_{bound}"]) for bound in DURATION_BUCKETS]
        lines += [sample_line(f"{name}_bucket", f'{source},le="+Inf"', row["count"]),
                  sample_line(f"{name}_sum", source, row["sum"]), sample_line(f"{name}_count", source, row["count"])]
    return lines


def per_source(counts, column):
    return [(f'source="{source}"', sum(row[column] for row in counts if row["source"] == source)) for source in SOURCES]


def metrics():
    """Counts for Prometheus, read from the database: the same in every worker and after restarts."""
    data = json.loads(get_db().execute(METRICS_SQL, {"now": now()}).fetchone()[0])
    counts, durations = data["counts"], data["durations"]
    lines = [
        *metric_family("incidents_open", "gauge", "Open incidents (new or in_progress), by status and source.",
                       [(f'status="{row["status"]}",source="{row["source"]}"', row["current"])
                        for row in counts if row["status"] in OPEN_STATUSES]),
        *metric_family("incidents_created_total", "counter", "Incidents created, by source.",
                       per_source(counts, "created")),
        *metric_family("incidents_folded_total", "counter",
                       "Reports folded into an open incident with the same dedup_key, by source.",
                       per_source(counts, "folded")),
        *metric_family("incidents_oldest_new_age_seconds", "gauge",
                       "Age of the oldest incident nobody has taken (status new); 0 when there is none.",
                       [("", age_seconds(data["oldest_new"]))]),
        *metric_family("incidents_notifications_pending", "gauge",
                       "Telegram updates waiting to be shown (one per incident, chat and kind: change or repeat).",
                       [("", data["pending"])]),
        *metric_family("incidents_notifications_oldest_age_seconds", "gauge",
                       "Age of the oldest of those; 0 when none waits.", [("", age_seconds(data["oldest_pending"]))]),
        *histogram_family("incidents_time_to_acknowledge_seconds",
                          "Seconds from when an incident was last opened until it left new (taken, resolved or "
                          "closed), by source.",
                          [row for row in durations if row["metric"] == "acknowledge"]),
        *histogram_family("incidents_time_to_resolve_seconds",
                          "Seconds from when an incident was last opened until it was resolved or closed, by source.",
                          [row for row in durations if row["metric"] == "resolve"]),
        *heartbeat_families(data["heartbeats"]), *telegram_families(data), *pagerduty_family(data["pagerduty"]),
    ]
    return Response("\n".join(lines) + "\n", content_type=METRICS_CONTENT_TYPE)


def pagerduty_family(counts):
    """The PagerDuty events taken, by action (a counter)."""
    return metric_family("incidents_pagerduty_events_total", "counter", "PagerDuty events taken, by event_action.",
                         [(f'action="{action}"', counts[action]) for action in PAGERDUTY_ACTIONS])


# Heartbeats by status: the counts kept as they change, and one range of an index for each status but up.
HEARTBEAT_COUNTS_SQL = """SELECT heartbeats, pings, failures,
    (SELECT count(*) FROM heartbeats WHERE paused = 1) AS paused,
    (SELECT count(*) FROM heartbeats WHERE down = 1 AND paused = 0)
        + (SELECT count(*) FROM heartbeats WHERE down = 0 AND next_due_at <= :now) AS down,
    (SELECT count(*) FROM heartbeats WHERE down = 0 AND late_at <= :now AND next_due_at > :now) AS late
    FROM heartbeat_counts"""


def heartbeat_families(counts):
    """Heartbeats by status (a gauge) and the check-ins received (a counter, by kind)."""
    up = counts["heartbeats"] - counts["paused"] - counts["down"] - counts["late"]
    return [*metric_family("incidents_heartbeats", "gauge", "Heartbeats, by status.",
                           [(f'status="{status}"', up if status == "up" else counts[status])
                            for status in HEARTBEAT_STATUSES]),
            *metric_family("incidents_heartbeat_checkins_total", "counter",
                           "Check-ins received, by kind: ping (a success) or fail (a failure reported).",
                           [('kind="ping"', counts["pings"]), ('kind="fail"', counts["failures"])])]


def telegram_families(data):
    """The senders' Bot API calls, by method and outcome, and the storms going on (an incident of them open)."""
    return [*metric_family("incidents_telegram_calls_total", "counter",
                           "Bot API calls of the senders, by method and outcome: sent, throttled (429) or failed.",
                           [(f'method="{method}",outcome="{outcome}"', count) for method, outcome, count in data["calls"]]),
            *metric_family("incidents_storms_open", "gauge", "Storms with an incident still open.",
                           [("", data["storms"])])]


# Everything a scrape shows, in one statement: counts kept by triggers and the ends of indexes, as JSON. One
# statement is one wait for the GIL after SQLite's work, however many request threads are busy.
METRICS_SQL = f"""SELECT json_object(
    'counts', (SELECT json_group_array(json_object('status', status, 'source', source, 'current', current,
                                                   'created', created, 'folded', folded)) FROM incident_counts),
    'oldest_new', ({OLDEST_NEW_SQL}),
    'pending', (SELECT pending FROM notify_counts), 'oldest_pending', (SELECT min(queued_at) FROM notify_outbox),
    'durations', (SELECT json_group_array(json_object('metric', metric, 'source', source,
                                                      {', '.join(f"'le_{bound}', le_{bound}" for bound in DURATION_BUCKETS)},
                                                      'count', count, 'sum', sum))
                  FROM (SELECT * FROM incident_durations ORDER BY metric, source)),
    'heartbeats', (SELECT json_object('heartbeats', heartbeats, 'pings', pings, 'failures', failures, 'paused', paused,
                                      'down', down, 'late', late) FROM ({HEARTBEAT_COUNTS_SQL})),
    'calls', (SELECT json_group_array(json_array(method, outcome, count))
              FROM (SELECT * FROM telegram_calls ORDER BY method, outcome)),
    'storms', (SELECT count(*) FROM storms WHERE {STORM_GOING_ON.format('storms.id')}),
    'pagerduty', (SELECT json_group_object(action, events) FROM pagerduty_counts))"""


# The files SQLite and this service keep beside the database, by the suffix after its name.
BESIDE_DATABASE = re.compile(r"(-wal|-shm|-journal|-writer(-line)?\.lock|-telegram-sender-[0-9]+\.lock)?")


def check_backup_target(database_path, path):
    """Refuse a PATH that names the live database or a file kept beside it (-wal, -shm, locks), however named."""
    live = {os.path.realpath(database_path), os.path.abspath(database_path)}
    beside = [database_path + suffix for suffix in ("", "-wal", "-shm", "-journal")]
    for target in (path, f"{path}.partial"):
        named = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(target))), os.path.basename(target))
        if any(named.startswith(name) and BESIDE_DATABASE.fullmatch(named[len(name):]) for name in live) or any(
                os.path.exists(target) and os.path.exists(other) and os.path.samefile(target, other)
                for other in beside):
            raise click.ClickException(f"{path} is the live database {database_path} or a file SQLite keeps beside "
                                       "it; back up to another path")


@click.command("backup")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
@with_appcontext
def backup_command(path, force):
    """Copy the live database to PATH, check the copy and say what it holds; the database is only read."""
    database_path = current_app.config["DATABASE"]
    check_database_name(database_path)
    if not os.path.isfile(database_path):
        raise click.ClickException(f"there is no database {database_path}; set INCIDENTS_DB to the server's")
    read_only(database_path).close()
    check_backup_target(database_path, path)
    partial = f"{path}.partial"
    for existing in (path, partial):
        if os.path.lexists(existing) and not force:
            raise click.ClickException(f"{existing} exists; pass --force to replace it.")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)  # with --force: left by a failed run, or a link planted there; removed, never followed
        os.close(open_private(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))
        with contextlib.closing(read_only(database_path)) as source, \
                contextlib.closing(sqlite3.connect(partial)) as replica:
            source.backup(replica)  # one step: a snapshot of one moment, while writers go on in the WAL
            replica.execute("PRAGMA journal_mode = DELETE")  # the copy is one file, complete by itself
            summary = describe_backup(replica)
        os.replace(partial, path)
    except (sqlite3.Error, OSError, click.ClickException) as error:
        with contextlib.suppress(OSError):
            os.remove(partial)  # only a checked copy ever takes the name PATH
        raise click.ClickException(f"the backup failed, nothing was written to {path}: {error}") from None
    click.echo(f"Backed up {database_path} to {path}: {summary}.")


def read_only(database_path):
    """The database opened read-only (never created, never migrated); ClickException for a file that is none."""
    source = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(database_path))}?mode=ro", uri=True)
    try:
        source.execute("PRAGMA user_version")
    except sqlite3.DatabaseError as error:
        source.close()
        raise click.ClickException(not_a_database(database_path, error)) from None
    return source


def describe_backup(replica):
    """What a copy holds, after SQLite has checked every page of it (ClickException if damaged)."""
    check = replica.execute("PRAGMA integrity_check").fetchall()
    if check != [("ok",)]:
        raise click.ClickException(f"the copy failed its integrity check: {check[:5]}")
    tables = {row[0] for row in replica.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    incidents, events = (replica.execute(f"SELECT count(*) FROM {table}").fetchone()[0] if table in tables else 0
                         for table in ("incidents", "events"))  # a file of schema version 1 has no timeline
    pages, page_size = (replica.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "page_size"))
    version = replica.execute("PRAGMA user_version").fetchone()[0]
    return (f"{incidents} incidents, {events} events, {pages * page_size} bytes, schema version {version}, "
            "integrity check ok")


# ---------------------------------------------------------------------------
# The API described: GET / and GET /openapi.json
# ---------------------------------------------------------------------------

PUBLIC_ENDPOINTS = ("front_door", "openapi_document", "health", "telegram_webhook",  # no API token asked
                    "receive_pagerduty_event")
ALERT_ACTIONS = ("created", "folded", "reopened", "resolved", "unchanged")
EXAMPLE_INCIDENT = {"description": "Scooter #4521 does not respond", "source": "operator"}
EXAMPLE_ALERTS = {"status": "firing", "alerts": [{
    "status": "firing", "labels": {"alertname": "PointDown", "point": "7"},
    "annotations": {"summary": "Point 7 does not respond"}, "startsAt": "2026-11-23T07:00:00Z",
    "fingerprint": "a1b2c3d4e5f60718"}]}
EXAMPLE_PAGERDUTY = {"routing_key": "change-me-pagerduty", "event_action": "trigger", "dedup_key": "point-7-down",
                     "payload": {"summary": "Point 7 does not respond", "source": "point-7", "severity": "critical",
                                 "group": "cell-12"}, "client": "Uptime Kuma",
                     "links": [{"href": "https://kuma.example.com/dashboard/7", "text": "Uptime Kuma"}],
                     "images": [{"src": "https://kuma.example.com/7.png", "alt": "Point 7"}]}
EXAMPLE_HEARTBEAT = {"description": "Scooter #4521 stopped checking in", "period": 300, "grace": 60}
EXAMPLE_UPDATE = {"update_id": 1, "message": {"message_id": 77, "chat": {"id": 111, "type": "private"},
                                              "from": {"id": 111, "first_name": "Ivan"}, "text": "Point 7 is down"}}


def text_schema(limit):
    return {"type": "string", "minLength": 1, "maxLength": limit, "pattern": VISIBLE_TEXT}


def nullable(schema):
    return {**schema, "type": [schema["type"], "null"]}


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required, properties, **extra):
    """A JSON object schema; `required` names properties, and no other property is allowed unless said."""
    return {"type": "object", "required": list(required), "properties": properties,
            "additionalProperties": False, **extra}


TIMESTAMP_SCHEMA = {"type": "string", "format": "date-time", "pattern": f"^{STORED_TIMESTAMP}$"}


def page_schema(item, cursor):
    return obj(["items", "next_cursor"], {"items": {"type": "array", "items": ref(item)},
                                          "next_cursor": {"type": ["string", "null"], "pattern": f"^{cursor}$"}})


def answer_schemas():
    """The bodies the API sends, its enums and limits read from the module's constants."""
    timestamp, name = TIMESTAMP_SCHEMA, nullable({"type": "string", "maxLength": ACTOR_MAX})
    incident = {
        "id": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
        "description": {"type": "string", "minLength": 1, "maxLength": DESCRIPTION_MAX},
        "status": {"enum": list(STATUSES)}, "source": {"enum": list(SOURCES)},
        "dedup_key": nullable({"type": "string", "maxLength": DEDUP_KEY_MAX}),
        "occurrences": {"type": "integer", "minimum": 1}, "last_seen_at": timestamp, "assignee": name,
        "acknowledged_at": nullable(timestamp), "resolved_at": nullable(timestamp),
        "group": nullable({"type": "string", "maxLength": GROUP_MAX}), "created_at": timestamp, "updated_at": timestamp}
    event = {"id": {"type": "integer", "minimum": 1}, "at": timestamp, "type": {"enum": list(EVENT_TYPES)},
             "from_status": {"enum": list(STATUSES)}, "to_status": {"enum": list(STATUSES)},
             "note": {"type": "string", "maxLength": NOTE_MAX}, "actor": {"type": "string", "maxLength": ACTOR_MAX},
             "count": {"type": "integer", "minimum": 1}, "last_at": timestamp, "from_assignee": name, "to_assignee": name}
    return {
        "Incident": obj(incident, incident), "IncidentPage": page_schema("Incident", LIST_CURSOR),
        "Event": obj(["id", "at", "type"], event), "EventPage": page_schema("Event", EVENTS_CURSOR),
        "AlertResults": obj(["incidents"], {"incidents": {"type": "array", "items": obj(["id", "action"], {
            "id": {"type": ["integer", "null"], "minimum": 1}, "action": {"enum": list(ALERT_ACTIONS)}})}}),
        "Problem": obj(["type", "title", "status", "detail"], {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "open_incident_id": {"type": "integer"},
            "reads": {"enum": ["ok"]}, "writes": {"enum": ["failing"]},
            "errors": {"type": "array", "items": obj(["field", "message"], {
                "field": {"type": "string"}, "message": {"type": "string"}})}}),
        "Health": obj(["status"], {"status": {"enum": ["ok"]}}),
        **heartbeat_schemas(),
        "FrontDoor": obj(["name", "version", "links"], {
            "name": {"type": "string"}, "version": {"type": "string"},
            "links": obj(FRONT_DOOR_LINKS, {link: {"type": "string"} for link in FRONT_DOOR_LINKS})}),
        "TelegramReply": {"type": "object"},
        "PagerDutyAccepted": obj(["status", "message", "dedup_key"], {
            "status": {"enum": ["success"]}, "message": {"enum": ["Event processed"]},
            "dedup_key": {"type": "string", "minLength": 1, "maxLength": DEDUP_KEY_MAX}}),
        "PagerDutyInvalid": obj(["status", "message", "errors"], {
            "status": {"enum": ["invalid event"]}, "message": {"enum": ["Event object is invalid"]},
            "errors": {"type": "array", "minItems": 1, "items": {"type": "string"}}}),
    }


def heartbeat_schemas():
    """A heartbeat, a page of them, and what a check-in answers."""
    timestamp, name = TIMESTAMP_SCHEMA, {"type": "string", "pattern": f"^{HEARTBEAT_NAME.pattern}$"}
    heartbeat = {
        "name": name, "description": {"type": "string", "minLength": 1, "maxLength": DESCRIPTION_MAX},
        "period": {"type": "integer", "minimum": 1, "maximum": HEARTBEAT_SECONDS_MAX},
        "grace": {"type": "integer", "minimum": 0, "maximum": HEARTBEAT_SECONDS_MAX},
        "source": {"enum": list(SOURCES)}, "group": nullable({"type": "string", "maxLength": GROUP_MAX}),
        "paused": {"type": "boolean"}, "status": {"enum": list(HEARTBEAT_STATUSES)},
        "last_ping_at": nullable(timestamp), "next_due_at": nullable(timestamp),
        "incident_id": {"type": ["integer", "null"], "minimum": 1}, "created_at": timestamp, "updated_at": timestamp}
    return {"Heartbeat": obj(heartbeat, heartbeat), "HeartbeatPage": page_schema("Heartbeat", HEARTBEAT_NAME.pattern),
            "CheckIn": obj(["name", "status", "next_due_at"], {
                "name": name, "status": {"enum": list(HEARTBEAT_STATUSES)}, "next_due_at": nullable(timestamp)})}


def request_schemas():
    """The bodies the API takes: exactly what its validation accepts."""
    strings = {"type": "object", "propertyNames": {"pattern": "^[^\\u0000]*$"},
               "additionalProperties": {"type": "string", "pattern": "^[^\\u0000]*$"}}
    alert = obj(["labels", "status"], {
        "labels": strings, "annotations": strings, "status": {"enum": list(ALERT_STATUSES)},
        "startsAt": {"type": "string", "format": "date-time"}, "endsAt": {"type": "string", "format": "date-time"},
        "fingerprint": text_schema(DEDUP_KEY_MAX - len(ALERT_KEY_PREFIX))}, additionalProperties=True)
    return {
        "NewIncident": obj(["description", "source"], {
            "description": text_schema(DESCRIPTION_MAX), "source": {"enum": list(SOURCES)},
            "status": {"enum": list(STATUSES)},
            "dedup_key": {**text_schema(DEDUP_KEY_MAX), "not": {"pattern": f"^{PAGERDUTY_KEY_PREFIX}"}},
            "group": nullable(text_schema(GROUP_MAX))}),
        "IncidentChange": obj([], {
            "status": {"enum": list(STATUSES)}, "description": text_schema(DESCRIPTION_MAX),
            "assignee": nullable(text_schema(ACTOR_MAX)), "note": text_schema(NOTE_MAX), "actor": text_schema(ACTOR_MAX)},
            anyOf=[{"required": [field]} for field in ("status", "description", "assignee", "note")]),
        "AlertPayload": {"type": "object", "required": ["alerts"], "properties": {
            "alerts": {"type": "array", "maxItems": ALERTS_MAX, "items": alert},
            "status": {"enum": list(ALERT_STATUSES)}}},
        "TelegramUpdate": {"type": "object"},
        "PagerDutyEvent": pagerduty_event_schema(),
        "HeartbeatSettings": obj(["description", "period"], {
            "description": text_schema(DESCRIPTION_MAX), "period": {"type": "integer", "minimum": 1,
                                                                   "maximum": HEARTBEAT_SECONDS_MAX},
            "grace": {"type": "integer", "minimum": 0, "maximum": HEARTBEAT_SECONDS_MAX,
                      "default": HEARTBEAT_DEFAULTS["grace"]},
            "source": {"enum": list(SOURCES), "default": HEARTBEAT_DEFAULTS["source"]},
            "group": nullable(text_schema(GROUP_MAX)), "paused": {"type": "boolean", "default": False}}),
    }


def pagerduty_event_schema():
    """A PagerDuty Events API v2 alert event as this server takes it: null, and a blank optional text, as absent;
    other members allowed and unread."""
    def text(limit=PAGERDUTY_TEXT_MAX):
        return {"type": ["string", "null"], "maxLength": limit}

    def links(address, label):
        return {"type": ["array", "null"], "items": obj([address], {address: text_schema(PAGERDUTY_TEXT_MAX),
                                                                     label: text()}, additionalProperties=True)}
    payload = obj(["summary", "source", "severity"], {
        "summary": text_schema(PAGERDUTY_TEXT_MAX), "source": text_schema(PAGERDUTY_TEXT_MAX),
        "severity": {"enum": list(PAGERDUTY_SEVERITIES)}, "timestamp": text(), "component": text(),
        "group": {"type": ["string", "null"], "description": f"Cut to {GROUP_MAX} characters, with a hash of the "
                                                             "whole, where longer."},
        "class": text(), "custom_details": {"type": ["object", "null"]}}, additionalProperties=True)
    return obj(["routing_key", "event_action"], {
        "routing_key": {"type": "string", "description": "INCIDENTS_PAGERDUTY_ROUTING_KEY."},
        "event_action": {"enum": list(PAGERDUTY_ACTIONS)},
        "dedup_key": {**text(DEDUP_KEY_MAX), "description": "Made (and answered) for a trigger without one."},
        "payload": payload, "client": text(ACTOR_MAX), "client_url": text(), "links": links("href", "text"),
        "images": links("src", "alt")}, additionalProperties=True,
        **{"if": {"properties": {"event_action": {"const": "trigger"}}}, "then": {"required": ["payload"]},
           "else": {"required": ["dedup_key"]}})


def query_parameters(specs):
    """Query parameters from (name, schema, description) triples; a list is sent as the name repeated."""
    return [{"name": name, "in": "query", "required": False, "schema": schema, "description": description,
             **({"style": "form", "explode": True} if schema["type"] == "array" else {})}
            for name, schema, description in specs]


INCIDENT_ID = {"name": "incident_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
HEARTBEAT = {"name": "name", "in": "path", "required": True, "description": "Case-sensitive.",
             "schema": {"type": "string", "pattern": f"^{HEARTBEAT_NAME.pattern}$"}}
CHECK_IN = {"name": "signal", "in": "path", "required": True,
            "description": "ping (or 0) for a success; fail (or an exit status 1 to 255) for a failure, whose POST "
                           "body (any type, read as UTF-8, cut to 2000 characters) is its note.",
            "schema": {"type": "string", "pattern": "^(ping|fail|[0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])$"}}
HEARTBEAT_PARAMETERS = (
    ("status", {"type": "array", "items": {"enum": list(HEARTBEAT_STATUSES)}},
     "Only these statuses (or one comma-separated value)."),
    ("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": PAGE_LIMIT_DEFAULT},
     "Heartbeats on a page."),
    ("cursor", {"type": "string", "pattern": f"^{HEARTBEAT_NAME.pattern}$"}, "next_cursor of the page before."),
)
LIST_PARAMETERS = (
    ("status", {"type": "array", "items": {"enum": list(STATUSES)}}, "Only these statuses (or one comma-separated value)."),
    ("source", {"type": "array", "items": {"enum": list(SOURCES)}}, "Only these sources (or one comma-separated value)."),
    ("dedup_key", text_schema(DEDUP_KEY_MAX), "Only the incidents of this key."),
    ("assignee", text_schema(ACTOR_MAX), "Only the incidents assigned to this person."),
    ("group", text_schema(GROUP_MAX), "Only the incidents of this group (exact match)."),
    ("since", {"type": "string", "format": "date-time"}, "Created at or after (a date alone means 00:00 UTC)."),
    ("until", {"type": "string", "format": "date-time"}, "Created before; an empty window is an empty page."),
    ("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": PAGE_LIMIT_DEFAULT},
     "Incidents on a page."),
    ("cursor", {"type": "string", "pattern": f"^{LIST_CURSOR}$"}, "next_cursor of the page before."),
    ("q", {"type": "string", "maxLength": SEARCH_MAX, "pattern": SEARCH_PATTERN},
     f'Words and "quoted phrases", each of {SEARCH_WORD_MIN} characters or more, all required.'),
)
EVENT_PARAMETERS = (
    ("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT_MAX, "default": PAGE_LIMIT_DEFAULT},
     "Events on a page."),
    ("cursor", {"type": "string", "pattern": f"^{EVENTS_CURSOR}$"}, "next_cursor of the page before."),
)
ERROR_RESPONSES = {  # the same meaning on every route that answers them
    400: "The body is not JSON, or not a JSON object, or could not be read.",
    401: "INCIDENTS_API_TOKEN (or, for a check-in, INCIDENTS_PING_TOKEN) is set, and the request lacks "
         "Authorization: Bearer <token>.",
    404: "No such incident, heartbeat or check-in (or, for the webhook, TELEGRAM_WEBHOOK_SECRET is not set; for the "
         "PagerDuty intake, INCIDENTS_PAGERDUTY_ROUTING_KEY).",
    409: "Another open incident holds the dedup_key that reopening this one would take back.",
    413: "The body is larger than the route takes (see x-max-body-bytes).",
    415: "The body is not declared Content-Type: application/json.",
    422: "A field or query parameter is invalid; errors names each and says why.",
    503: "The database takes no writes now: busy past the busy timeout, disk full, or read-only. Retry.",
}
ERROR_HEADERS = {401: "WWW-Authenticate", 503: "Retry-After"}
WRITE_ERRORS = (400, 401, 413, 415, 422, 503)
CREATED_LINKS = {name: {"operationId": operation, "parameters": {"incident_id": "$response.body#/id"}}
                 for name, operation in (("GetIncident", "get_incident"), ("UpdateIncident", "update_incident"),
                                         ("ListEvents", "list_events"))}
API_DOCS = {  # per endpoint: request body (schema, byte limit, example), query parameters, responses
    "front_door": {"responses": {200: ("Where to start: the service, its version and links.", "FrontDoor")}},
    "openapi_document": {"responses": {200: ("This document.", None)}},
    "health": {"responses": {200: ("Reads and writes work.", "Health"), 503: "Problem"}},
    "create_incident": {"body": ("NewIncident", MAX_BODY_BYTES, EXAMPLE_INCIDENT), "responses": {
        201: ("A new incident.", "Incident", "Location"),
        200: ("Folded into the open incident with the same dedup_key.", "Incident", "Content-Location"),
        **dict.fromkeys(WRITE_ERRORS, "Problem")}},
    "list_incidents": {"query": LIST_PARAMETERS, "responses": {
        200: ("A page of incidents, newest first.", "IncidentPage"), 401: "Problem", 422: "Problem"}},
    "get_incident": {"path": [INCIDENT_ID], "responses": {200: ("The incident.", "Incident"), 401: "Problem", 404: "Problem"}},
    "update_incident": {"path": [INCIDENT_ID], "body": ("IncidentChange", MAX_BODY_BYTES,
                                               {"status": "in_progress", "actor": "ivan", "note": "On my way"}),
                        "responses": {200: ("The incident as changed.", "Incident"), 404: "Problem", 409: "Problem",
                                      **dict.fromkeys(WRITE_ERRORS, "Problem")}},
    "list_events": {"path": [INCIDENT_ID], "query": EVENT_PARAMETERS, "responses": {
        200: ("A page of the timeline, oldest first.", "EventPage"), 401: "Problem", 404: "Problem",
        422: "Problem"}},
    "telegram_webhook": {"body": ("TelegramUpdate", MAX_BODY_BYTES, EXAMPLE_UPDATE), "secret": True, "responses": {
        200: ("The reply as a Bot API call, or {}.", "TelegramReply"), 404: "Problem",
        401: ("X-Telegram-Bot-Api-Secret-Token does not match TELEGRAM_WEBHOOK_SECRET.", "Problem"),
        **dict.fromkeys((400, 413, 415, 503), "Problem")}},
    "receive_alerts": {"body": ("AlertPayload", ALERT_BODY_MAX, EXAMPLE_ALERTS), "responses": {
        200: ("What each alert did, in the payload's order.", "AlertResults"), **dict.fromkeys(WRITE_ERRORS, "Problem")}},
    "receive_pagerduty_event": {"body": ("PagerDutyEvent", PAGERDUTY_BODY_MAX, EXAMPLE_PAGERDUTY), "responses": {
        202: ("Processed (or, to acknowledge or resolve a key with no open incident, dropped), as PagerDuty answers.",
              "PagerDutyAccepted"),
        400: ("The event is invalid, or its routing_key is not INCIDENTS_PAGERDUTY_ROUTING_KEY: errors names each "
              "field, as PagerDuty's answer does.", "PagerDutyInvalid"),
        **dict.fromkeys((404, 413, 415, 503), "Problem")}},
    "metrics": {"responses": {200: ("Prometheus' text format, version 0.0.4.", "text"), 401: "Problem"}},
    "list_heartbeats": {"query": HEARTBEAT_PARAMETERS, "responses": {
        200: ("A page of heartbeats, by name.", "HeartbeatPage"), 401: "Problem", 422: "Problem"}},
    "put_heartbeat": {"path": [HEARTBEAT], "body": ("HeartbeatSettings", MAX_BODY_BYTES, EXAMPLE_HEARTBEAT),
                      "responses": {201: ("A new heartbeat.", "Heartbeat", "Location"),
                                    200: ("The heartbeat, replaced.", "Heartbeat"),
                                    **dict.fromkeys(WRITE_ERRORS, "Problem")}},
    "get_heartbeat": {"path": [HEARTBEAT], "responses": {
        200: ("The heartbeat.", "Heartbeat"), 401: "Problem", 404: "Problem"}},
    "delete_heartbeat": {"path": [HEARTBEAT], "responses": {
        204: ("Deleted; its incidents stay.", "empty"), 401: "Problem", 404: "Problem", 503: "Problem"}},
    "check_in": {"path": [HEARTBEAT, CHECK_IN], "body": ("text", 4 * NOTE_MAX, "backup: disk full"), "responses": {
        200: ("The check-in is recorded.", "CheckIn"), **dict.fromkeys((401, 404, 503), "Problem")}},
}


def documented_response(status, spec):
    """One response: its description, media type and schema, and the headers it always carries."""
    if spec == "Problem":
        spec = (ERROR_RESPONSES[status], "Problem", ERROR_HEADERS.get(status))
    description, schema, header = (*spec, None)[:3]
    media, body = {"Problem": ("application/problem+json", ref("Problem")), "text": ("text/plain", {"type": "string"}),
                   None: ("application/json", {"type": "object"})}.get(schema, ("application/json", ref(schema or "")))
    response = {"description": description, **({"content": {media: {"schema": body}}} if schema != "empty" else {})}
    if header:
        response["headers"] = {header: {"required": True, "schema": {"type": "string"}}}
    return response


def operation(endpoint, method):
    """The document of one endpoint and method, from API_DOCS and its view's docstring."""
    docs = API_DOCS[endpoint]
    summary = current_app.view_functions[endpoint].__doc__.strip().splitlines()[0]
    spec = {"operationId": endpoint, "summary": summary, "parameters": [
        *docs.get("path", ()), *query_parameters(docs.get("query", ())),
        *([{"name": "X-Telegram-Bot-Api-Secret-Token", "in": "header", "required": False,
            "schema": {"type": "string"}, "description": "Must equal TELEGRAM_WEBHOOK_SECRET."}]
          if docs.get("secret") else [])]}
    if "body" in docs and method != "GET":
        schema, limit, example = docs["body"]
        spec["requestBody"] = {"required": True, "x-max-body-bytes": limit, "description": f"JSON, at most {limit} bytes.",
                               "content": {"application/json": {"schema": ref(schema), "example": example}}}
        if schema == "text":  # any size: only its start is read
            spec["requestBody"] = {"required": False, "description": f"Any body or none, of any type and size: for a "
                                   f"failure, its first {limit} bytes, read as UTF-8, are the note.",
                                   "content": {"*/*": {"schema": {}, "example": example}}}
    spec["responses"] = {str(status): documented_response(status, response)
                         for status, response in docs["responses"].items()}
    if endpoint == "create_incident":
        spec["responses"]["201"]["links"] = CREATED_LINKS
    if endpoint in PUBLIC_ENDPOINTS:
        spec["security"] = []
    return spec


def openapi_document():
    """The OpenAPI 3.1 document of every route the app serves; it never needs a token."""
    paths = {}
    for rule in current_app.url_map.iter_rules():
        if rule.endpoint != "static":
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                paths.setdefault(path, {})[method.lower()] = operation(rule.endpoint, method)
    return jsonify({
        "openapi": "3.1.0",
        "info": {"title": SERVICE, "version": VERSION,
                 "description": "Report problems, fold repeats, take and resolve them; errors are RFC 9457 problems."},
        "security": [{"bearer": []}, {}],
        "paths": paths,
        "components": {"schemas": {**answer_schemas(), **request_schemas()}, "securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer", "description": "Only when the server sets INCIDENTS_API_TOKEN (a "
                                                               "check-in takes INCIDENTS_PING_TOKEN too)."}}},
    })


FRONT_DOOR_LINKS = {"openapi": "/openapi.json", "health": "/health", "incidents": "/incidents",
                    "heartbeats": "/heartbeats", "metrics": "/metrics"}


def front_door():
    """Where a person or a script starts: the service, its version, and where to go next; no token needed."""
    return jsonify(name=SERVICE, version=VERSION, links=FRONT_DOOR_LINKS)


# ---------------------------------------------------------------------------
# The app factory
# ---------------------------------------------------------------------------


def setting(name, parse, default=None, blank_ok=True):
    """A setting from the environment, trimmed: parse(text) (a ValueError saying what it must be stops the start
    in one line naming the setting); the default when unset or blank. A secret set blank stops the start
    instead (blank_ok=False): a secret mangled to nothing must not open what it guards."""
    text = os.environ.get(name, "").strip()
    if not text and name in os.environ and not blank_ok:
        stop_startup(f"{name} is set but blank; set the secret, or unset the variable to go without")
    if not text:
        return default
    try:
        return parse(text)
    except ValueError as error:
        stop_startup(f"{name} {error}")


def whole_seconds(least, most, unit="seconds"):
    """The parser of a setting that is a whole number of `unit`, ASCII digits, from least to most."""
    def parse(text):
        if (number := whole_number(text, least, most)) is None:
            raise ValueError(f"must be a whole number of {unit} from {least} to {most}, not {text!r}")
        return number
    return parse


def chat_ids(text):
    """Telegram chat ids separated by commas: whole numbers of ASCII digits, not 0, that fit SQLite's integer; no
    item empty (a stray comma may be a chat id lost)."""
    ids = [whole_number(part.strip(), -MAX_ID, MAX_ID) for part in text.split(",")]
    if not all(ids):
        raise ValueError(f"must be Telegram chat ids separated by commas, such as -1001234567890,123456789 (whole "
                         f"numbers of ASCII digits, not 0, of at most 19 digits, no item empty); not {text!r}")
    return tuple(ids)


def http_address(text):
    """An http(s) address: a host, a port from 1 to 65535 if any, a path; nothing else (no user, query or
    fragment, where the Bot API's calls would end up)."""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # raises ValueError for a port that is not a number up to 65535
    except ValueError:  # that, or a broken IPv6 address
        parts = port = None
    if not (parts and parts.scheme in ("http", "https") and parts.hostname and port != 0 and "@" not in parts.netloc
            and not {"?", "#"} & set(text) and text.isascii() and text.isprintable() and " " not in text):
        raise ValueError(f"must be an http:// or https:// address such as {TELEGRAM_API_URL} (a host, a port from 1 "
                         f"to 65535, a path; no user, query or fragment), not {text!r}")
    return text


def secret(pattern, what):
    """The parser of a secret: it must match `pattern`, and is never shown, not even to say it is wrong."""
    def parse(text):
        if not re.fullmatch(pattern, text):
            raise ValueError(f"must be {what}; check it")
        return text
    return parse


api_token = secret(r"[!-~]{1,4096}", "visible ASCII characters, no spaces")  # the tokens and the PagerDuty routing key


def bot_token(text):
    """A bot's token as BotFather gives it: the bot's id (which SQLite stores), a colon, its secret."""
    bot_id, _, _ = secret(r"[0-9]{1,19}:[A-Za-z0-9_-]{1,100}", "the token BotFather gave you, such as "
                                                              "123456:ABC-DEF1234ghIkl")(text).partition(":")
    if whole_number(bot_id, 1, MAX_ID) is None:
        raise ValueError("must be the token BotFather gave you: its bot id is no id Telegram gives; check it")
    return text


def language_name(text):
    """A language the catalog of texts holds: en or ru."""
    if text.lower() not in TEXTS:
        raise ValueError(f"must be one of {', '.join(TEXTS)} (the language of the chats), not {text!r}")
    return text.lower()


def time_zone(text):
    """A zone the IANA database knows (the system's, else the tzdata package's), such as Europe/Moscow."""
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # ValueError: a path, not a name
        raise ValueError(f"must be a time zone of the IANA database, such as Europe/Moscow or UTC, not {text!r}") \
            from None


def check_database_name(path):
    """Stop, in one line naming INCIDENTS_DB, where SQLite could only fail later with an obscure error, or
    where one file would be two databases: what every command that opens the database checks first."""
    if not path.strip() or path == ":memory:" or path.endswith(os.sep):
        stop_startup(f"INCIDENTS_DB is {repr(path) if path.strip() else 'empty'}, which names no file; set it to "
                     "the database file's path, such as /var/lib/incidents/incidents.db")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        stop_startup(f"the folder of the database {path} does not exist; create it (mkdir -p {folder}) "
                     "with the server's user as owner, or set INCIDENTS_DB to a path in an existing folder")
    if os.path.exists(path) and not os.path.isfile(path):
        stop_startup(f"INCIDENTS_DB names {path}, which is {'a folder' if os.path.isdir(path) else 'no plain file'}; "
                     "set it to the database file's path")
    if os.path.exists(path) and (links := os.stat(path).st_nlink) > 1:
        stop_startup(f"INCIDENTS_DB names {path}, a file with {links} hard links: SQLite keeps a "
                     "write-ahead log per name, so each name would be a database of its own; remove the other "
                     "links (a symbolic link is fine)")


def check_database_path(path):
    """check_database_name, and that the server's user can write the file and its folder: the start of every
    command that writes."""
    check_database_name(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        stop_startup(f"the database {path} is read-only for this user; make it readable and writable by the "
                     f"server's user (chown or chmod u+rw {path})")
    if not os.access(folder, os.W_OK | os.X_OK):
        stop_startup(f"the folder {folder} of the database is read-only for this user; SQLite keeps its "
                     "write-ahead log beside the file, so the server's user must be able to write there")


def configuration():
    """The app's settings from the environment, each checked (a bad one stops startup in one line)."""
    config = dict(
        DATABASE=os.environ.get("INCIDENTS_DB", "incidents.db").strip(),  # blank is refused, not the default: see
                                                                           # check_database_name
        BUSY_TIMEOUT=setting("INCIDENTS_BUSY_TIMEOUT", whole_seconds(1, 3600), BUSY_TIMEOUT_S),
        API_TOKEN=setting("INCIDENTS_API_TOKEN", api_token, blank_ok=False),
        PING_TOKEN=setting("INCIDENTS_PING_TOKEN", api_token, blank_ok=False),
        TELEGRAM_WEBHOOK_SECRET=setting("TELEGRAM_WEBHOOK_SECRET", secret(
            r"[A-Za-z0-9_-]{1,256}", "1 to 256 of A-Z, a-z, 0-9, _ and - (what Telegram takes)"), blank_ok=False),
        TELEGRAM_BOT_TOKEN=setting("TELEGRAM_BOT_TOKEN", bot_token, blank_ok=False),
        TELEGRAM_API_URL=setting("TELEGRAM_API_URL", http_address, TELEGRAM_API_URL),
        REOPEN_WINDOW=setting("INCIDENTS_REOPEN_WINDOW", whole_seconds(0, 10**9), REOPEN_WINDOW_S),
        PAGERDUTY_ROUTING_KEY=setting("INCIDENTS_PAGERDUTY_ROUTING_KEY", api_token, blank_ok=False),
        REMIND_AFTER=setting("INCIDENTS_REMIND_AFTER", whole_seconds(0, 10**9), REMIND_AFTER_S),
        REMIND_MAX=setting("INCIDENTS_REMIND_MAX", whole_seconds(0, 10**9, "reminders"), REMIND_MAX),
        STORM_THRESHOLD=setting("INCIDENTS_STORM_THRESHOLD", whole_seconds(0, 10**6, "incidents"), STORM_THRESHOLD),
        STORM_WINDOW=setting("INCIDENTS_STORM_WINDOW", whole_seconds(0, 86400), STORM_WINDOW_S),
        TELEGRAM_WINDOW=setting("TELEGRAM_LIMIT_WINDOW", whole_seconds(1, TELEGRAM_WINDOW_S), TELEGRAM_WINDOW_S),
        TELEGRAM_ALLOWED_CHAT_IDS=setting("TELEGRAM_ALLOWED_CHAT_IDS", chat_ids, ()),
        TELEGRAM_NOTIFY_CHAT_IDS=setting("TELEGRAM_NOTIFY_CHAT_IDS", chat_ids, ()),
        TELEGRAM_ESCALATE_CHAT_IDS=setting("TELEGRAM_ESCALATE_CHAT_IDS", chat_ids, ()),
        NOTIFY_REPEAT_INTERVAL=NOTIFY_REPEAT_INTERVAL_S,
        LANGUAGE=setting("INCIDENTS_LANGUAGE", language_name, "en"),
        TIMEZONE=setting("INCIDENTS_TIMEZONE", time_zone, zoneinfo.ZoneInfo("UTC")),
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    if config["PING_TOKEN"] and not config["API_TOKEN"]:
        stop_startup("INCIDENTS_PING_TOKEN is set without INCIDENTS_API_TOKEN, which would leave every route but "
                     "check-ins open to anyone; set INCIDENTS_API_TOKEN too, or unset INCIDENTS_PING_TOKEN")
    return config


def open_database():
    """Check the database's path and its lock files, then create or migrate the file: the app's start."""
    check_database_path(current_app.config["DATABASE"])
    database = current_app.extensions["incidents"]
    current = database.schema_version()  # a refused file stops the start before lock files are made beside it
    database.check_lock_files()
    database.migrate(current)
    database.close()


def finding_a_command():
    """Whether the flask command loads the app to find one of the app's own commands.

    Those open the database themselves where they need it: backup only reads it, and must not
    create or migrate it.
    """
    context = click.get_current_context(silent=True)
    return context is not None and isinstance(context.command, FlaskGroup)


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON with text as written (no \\u escapes) and keys in their order; a lone surrogate, which
    UTF-8 cannot hold (a client may send one, and an error may name it), goes back as its escape."""

    ensure_ascii = False
    sort_keys = False

    def dumps(self, obj, **kwargs):
        return super().dumps(obj, **kwargs).encode("utf-8", "backslashreplace").decode("utf-8")


def query_as_sent(wsgi_app):
    """A query string sent as raw bytes read as what they say: percent-encoded before Flask reads it.

    Werkzeug's development server decodes raw UTF-8 twice (it reads the request line as Latin-1, then
    encodes the query as UTF-8 and decodes it as Latin-1 once more): that is undone first. Bytes that
    are not UTF-8 become U+FFFD, as in a percent-encoded query, instead of failing the request.
    """
    def app(environ, start_response):
        query = environ.get("QUERY_STRING", "")
        with contextlib.suppress(UnicodeError):
            if not query.isascii() and environ.get("SERVER_SOFTWARE", "").startswith("Werkzeug/"):
                query = query.encode("latin-1").decode("utf-8")
            raw = query.encode("latin-1")
            environ["QUERY_STRING"] = re.sub(rb"[\x80-\xff]", lambda byte: b"%%%02X" % byte[0][0], raw).decode()
        return wsgi_app(environ, start_response)
    return app


def start_server(app):
    """The server's start: the database created or upgraded, a line for what is open to anyone, and the clock."""
    with app.app_context():
        open_database()
        if app.config["TELEGRAM_WEBHOOK_SECRET"]:
            warn_if_no_chat_allowed(app.logger.warning)
        if not app.config["API_TOKEN"]:
            app.logger.warning("INCIDENTS_API_TOKEN is not set: the API is open to anyone who can reach it; "
                               "set it to require a token")
    app.extensions["incidents"].start_clock(app, open_silent_heartbeats)


def add_routes(app):
    """Every route, and the commands of the flask CLI."""
    app.get("/")(front_door)
    app.get("/openapi.json")(openapi_document)
    app.get("/health")(health)
    app.post("/incidents")(create_incident)
    app.get("/incidents")(list_incidents)
    app.get(INCIDENT_URL)(get_incident)
    app.patch(INCIDENT_URL)(update_incident)
    app.get(INCIDENT_URL + "/events")(list_events)
    app.post("/telegram/webhook")(telegram_webhook)
    app.post("/integrations/alertmanager")(receive_alerts)
    app.post("/integrations/pagerduty")(receive_pagerduty_event)
    app.get("/metrics")(metrics)
    app.get("/heartbeats")(list_heartbeats)
    app.put("/heartbeats/<name>")(put_heartbeat)
    app.get("/heartbeats/<name>")(get_heartbeat)
    app.delete("/heartbeats/<name>")(delete_heartbeat)
    app.route("/heartbeats/<name>/<signal>", methods=["GET", "POST"])(check_in)
    app.cli.add_command(telegram_poll_command)
    app.cli.add_command(telegram_notify_command)
    app.cli.add_command(backup_command)


def create_app(test_config=None):
    """Build the app, creating or migrating its database file."""
    app = Flask(__name__, static_folder=None)
    app.config.from_mapping(configuration())
    if test_config:
        app.config.update(test_config)
    app.json = JSONProvider(app)
    app.make_default_options_response = functools.partial(answer_options, app)
    app.url_map.merge_slashes = False  # /heartbeats//ping is no route: a 404, not a redirect to another
    app.url_map.converters["id"] = IdConverter
    app.wsgi_app = query_as_sent(app.wsgi_app)

    app.extensions["incidents"] = Database(app.config["DATABASE"], app.config["BUSY_TIMEOUT"])
    if not finding_a_command():
        start_server(app)
    app.teardown_appcontext(close_db)
    app.before_request(check_token)
    app.before_request(check_incident_id)

    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(sqlite3.OperationalError, handle_database_error)
    app.register_error_handler(Exception, handle_unexpected)
    add_routes(app)
    return app
