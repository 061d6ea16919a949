"""The sync engine: pending sessions → the player's PDS, exactly once, within budget.

Runs on the agent's uplink thread (or in ``anisota-agent flush``). Strategy:

* **Fresh sessions** go in ``applyWrites`` batches of ``#create`` (up to 200 a
  request, 3 points each): 1,000 sessions take a handful of requests.
* Before a batch leaves, its sessions are marked *in flight* in the store. A
  timeout, a 5xx, a dropped connection or a crash leaves them marked, and the
  next round **looks before it writes**: what the PDS already holds with the
  same value is marked synced; what is missing is created again; what differs
  (an older mirrored version) is replaced with an idempotent ``putRecord``.
  So a retry can never make a second record, and a re-create's 500 can never
  wedge the queue.
* A record the PDS refuses (400) is isolated (the one write the PDS names,
  else single ``putRecord`` calls) and quarantined with its error; the rest of
  its batch still syncs. Batches also stay under the PDS's body size limit.
* The write budget is read from the ``ratelimit-*`` headers: a batch never
  spends the last ``reserve_points`` of the window, and a 429 waits for
  ``retry-after`` / ``ratelimit-reset``. Until the budget is known, the first
  batch is small.
* Network errors, timeouts and 5xx back off exponentially with jitter; revoked
  credentials stop syncing until new credentials arrive, without retrying. An
  unavailable account (deactivated, taken down, suspended) stops it too, and is
  asked once an hour (one ``getSession``) whether it is back.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .auth import Credentials
from .lexicon import SESSION_NSID
from .records import to_json
from .status import STATUS_META_PREFIX, SYNC_FACTS
from .store import Store, StoredSession
from .xrpc import (
    MAX_APPLY_WRITES,
    AccountUnavailable,
    ExpiredToken,
    Forbidden,
    InvalidRequest,
    InvalidToken,
    PayloadTooLarge,
    RateLimit,
    RateLimited,
    RecordNotFound,
    XrpcClient,
    XrpcError,
    create_write,
)

logger = logging.getLogger("anisota_agent")

__all__ = [
    "ACCOUNT_RECHECK_SECONDS",
    "SyncEngine",
    "SyncStatus",
    "SyncStopped",
    "budget_key",
    "recalled_budget",
    "spare_points",
]

MAX_BATCH = MAX_APPLY_WRITES
#: Sessions a round loads: one full batch. Their parsed records live through the
#: round's requests, long enough to reach the oldest GC generation; a round of
#: 1,000 kept ~6,000 such dicts and lists and decoded them in one 17 ms stretch.
ROUND_ROWS = MAX_BATCH
# The PDS refuses request bodies over 1,000,000 bytes (413): keep a margin.
MAX_BATCH_BYTES = 900_000
BATCH_ENVELOPE_BYTES = 1_000  # {"repo": <did>, "writes": [...]}
WRITE_ENVELOPE_BYTES = 128  # {"$type": "...#create", "collection", "rkey", "value"}
FIRST_BATCH = 10  # until the budget is known
CREATE_POINTS = 3
PUT_POINTS = 2
DEFAULT_RESERVE_POINTS = 1000  # 20% of the PDS's default 5,000 points an hour
BACKOFF_BASE = 2.0
BACKOFF_MAX = 600.0
GET_RECORD_LOOKUPS = 5  # above this many uncertain sessions, page listRecords instead
MAX_LIST_PAGES = 50
REQUEST_TIMEOUT = 15.0  # seconds per request phase, unless a deadline is nearer
#: How long a sync stopped for the account (deactivated, taken down, suspended)
#: waits before it asks the PDS whether the account is back: one request an hour.
ACCOUNT_RECHECK_SECONDS = 3600.0

#: One XRPC call, given the timeout it may take.
Request = Callable[[float], dict[str, Any]]


# -- the write budget (shared with the deletion on the PDS, anisota_agent.remote) -------


def budget_key(did: str) -> str:
    """The store's meta key of the write budget last seen for ``did``."""
    return f"sync.budget.{did}"


def recalled_budget(meta: dict[str, Any], did: str, now: float) -> RateLimit | None:
    """The budget an earlier writer (another run, the CLI) saved, if its window is current."""
    saved = meta.get(budget_key(did))
    if saved and saved.get("reset_at", 0) > now:
        return RateLimit(**saved)
    return None


def spare_points(budget: RateLimit | None, reserve: int, now: float) -> int | None:
    """Points a write may spend above ``reserve`` (may be negative: the reserve is reached).

    None when nothing bounds it: no limit reported, or its window has reset since
    (the next write's answer will tell).
    """
    if budget is None or budget.reset_at <= now:
        return None
    return budget.remaining - reserve


@dataclass
class SyncStatus:
    """What the engine knows, under the names of :class:`~anisota_agent.AgentStatus`.

    The first four are facts of ``status()`` (see :meth:`facts`), also saved
    in the store for the CLI; the rest describe the engine's passes so far.
    """

    auth_problem: str | None = None
    last_sync_at: float | None = None
    sync_error: str | None = None
    next_sync_at: float | None = None
    synced: int = 0
    quarantined: int = 0
    requests: int = 0
    points_spent: int = 0
    budget: RateLimit | None = None

    def facts(self) -> dict[str, Any]:
        """The facts of ``status()`` this engine owns, by their ``AgentStatus`` names."""
        return {name: getattr(self, name) for name in SYNC_FACTS}


@dataclass
class _Plan:
    """What one round will write, after looking at what the PDS holds."""

    creates: list[StoredSession] = field(default_factory=list)
    puts: list[StoredSession] = field(default_factory=list)


class SyncStopped(Exception):
    """The round cannot go on (auth, budget, backoff); the status says why."""


class SyncEngine:
    """Writes one account's pending sessions to its PDS."""

    def __init__(
        self,
        store: Store,
        client: XrpcClient,
        credentials: Credentials,
        *,
        now: Callable[[], float],
        reserve_points: int = DEFAULT_RESERVE_POINTS,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.credentials = credentials
        self.status = SyncStatus()
        self._now = now
        self._reserve = reserve_points
        self._rng = rng or random.Random()
        self._failures = 0
        self._deadline: float | None = None
        self._interrupted: Callable[[], bool] | None = None
        self._wrote = False  # has a write answered yet (so the budget is known)?
        self._validated: set[str] = set()  # final records do not change: check each once
        #: When to ask whether the account that stopped the sync is back (None: not stopped for it).
        self.recheck_at: float | None = None
        self._recall_budget()

    @property
    def did(self) -> str:
        """The account whose sessions this engine writes."""
        return self.credentials.did

    def due(self) -> bool:
        """Whether a round could do anything now (not stopped, not backing off)."""
        if self.status.auth_problem is not None:
            return False
        next_at = self.status.next_sync_at
        return next_at is None or next_at <= self._now()

    def recheck_account(self) -> bool:
        """Once :attr:`recheck_at` has come, ask whether the account is back (one request).

        ``getSession`` answers for a deactivated account too (``active: false``)
        and refuses a taken-down one. An active account lifts the stop: True,
        and the pending sessions sync again. Any other answer, or none, waits
        another :data:`ACCOUNT_RECHECK_SECONDS`; revoked credentials end the
        rechecks (only new ones can help).
        """
        if self.recheck_at is None or self._now() < self.recheck_at:
            return False
        back = self._ask_account()
        self._save_status()
        return back

    def _ask_account(self) -> bool:
        self.status.requests += 1
        try:
            who = self.client.get_session(timeout=REQUEST_TIMEOUT)
        except (ExpiredToken, InvalidToken) as denied:  # revoked meanwhile
            self.recheck_at = self.status.next_sync_at = None
            self.status.auth_problem = f"{type(denied).__name__}: {denied}"
            logger.error("sync stopped for %s: %s", self.did, self.status.auth_problem)
            return False
        except XrpcError as failure:  # taken down (a plain 400 here), or no answer
            still = str(failure)
        else:
            if who.get("active") is not False:
                self.recheck_at = self.status.next_sync_at = None
                self.status.auth_problem = self.status.sync_error = None
                logger.info("account %s is active again: syncing resumes", self.did)
                return True
            still = f"the account is {who.get('status', 'inactive')}"
        self._stopped_for_account()
        logger.info(
            "account %s is still unavailable (%s): next check in %.0f min",
            self.did,
            still,
            ACCOUNT_RECHECK_SECONDS / 60,
        )
        return False

    def retry_now(self) -> None:
        """Drop a network backoff (the network just came back); a budget wait stays."""
        if self._failures:
            self._failures = 0
            self.status.next_sync_at = None
            self.store.clear_backoff(self.did)

    def sync(
        self,
        deadline: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> SyncStatus:
        """Write every due session it can before ``deadline`` (epoch seconds).

        ``progress(done, total)`` is called after each request. ``interrupted()``,
        asked between requests, ends the pass early when it answers True (no
        request is cut short for it, unlike by the deadline). Never raises for
        server, network or auth failures: they land in :attr:`status`.
        """
        total = 0
        done = 0
        self._deadline = deadline
        self._interrupted = interrupted
        if self.due():
            # The wait is over: a next attempt in the past is no time to show or wait for.
            self.status.next_sync_at = None
        try:
            while self.due() and (deadline is None or self._now() < deadline):
                now = self._now()
                rows = self.store.due_for_sync(self.did, now, limit=ROUND_ROWS)
                if not rows:
                    break
                # The total is the whole queue, not this round's rows: one bar for the pass.
                total = max(total, done + self.store.count_due(self.did, now))
                done += self._round(rows, deadline, _reporter(progress, done, total))
        except SyncStopped:
            pass
        self._save_status()
        return self.status

    def mirror(self, rkey: str, record: dict[str, Any]) -> bool:
        """Put a live session's current version (idempotent putRecord), within budget."""
        if not self.due():
            return False
        # Marked before the put, like in_flight: a put whose answer is lost may
        # have landed, and the final write of a mirrored session looks first.
        # (Marked after, a lost answer left a record the final #create collided
        # with: a 500 for its whole batch and a backoff.)
        self.store.mark_mirrored(rkey)
        try:
            self._ensure_budget(PUT_POINTS)
            self._call(self._put_record(rkey, record), write=True)
        except (SyncStopped, InvalidRequest, PayloadTooLarge) as failure:
            reason = self.status.sync_error or failure
            logger.warning("mirroring session %s failed: %s", rkey, reason)
            return False
        self.status.points_spent += PUT_POINTS
        return True

    # -- one round ---------------------------------------------------------------

    def _round(
        self,
        rows: list[StoredSession],
        deadline: float | None,
        progress: Callable[[int], None],
    ) -> int:
        """Write the first batch of ``rows``'s creates and every put; returns how
        many were settled (synced or quarantined).

        The creates past that batch are left to the next round, which loads them
        again with the rows after them: so every batch but a pass's last is full
        (the 200 cap, the body limit or the budget), as if the whole queue had
        been loaded at once, while a round keeps only one batch of records alive.
        """
        before = self.status.synced + self.status.quarantined
        plan = self._plan(self._valid(rows))
        if plan.creates:
            self._create(self._next_batch(plan.creates))
            progress(self.status.synced + self.status.quarantined - before)
            self._check_deadline(deadline)
        for row in plan.puts:
            self._put(row)
            progress(self.status.synced + self.status.quarantined - before)
            self._check_deadline(deadline)
        return self.status.synced + self.status.quarantined - before

    def _check_deadline(self, deadline: float | None) -> None:
        if deadline is not None and self._now() >= deadline:
            raise SyncStopped
        if self._interrupted is not None and self._interrupted():
            raise SyncStopped

    def _valid(self, rows: list[StoredSession]) -> list[StoredSession]:
        """The rows whose records the lexicon accepts; the rest are quarantined.

        The recorder stores what the game recorded without waiting for the
        validator: this is where nothing invalid is ever sent.
        """
        from .lexicon import validate_record

        valid = []
        for row in rows:
            # A round of ~0.2 ms a record: let the recorder (and the game) have
            # the GIL between two, rather than wait out a switch interval each.
            time.sleep(0)
            if row.rkey not in self._validated:
                try:
                    validate_record(row.record)
                except Exception as error:  # RecordValidationError, or text no codec takes
                    self._refuse_locally(row.rkey, f"{type(error).__name__}: {error}")
                    continue
                self._validated.add(row.rkey)
            valid.append(row)
        return valid

    def _refuse_locally(self, rkey: str, error: str) -> None:
        self.store.quarantine(rkey, error)
        self.status.quarantined += 1
        logger.error("session %s is not a valid record, kept locally: %s", rkey, error)

    def _plan(self, rows: list[StoredSession]) -> _Plan:
        """Split rows into creates and puts, looking first where the PDS may hold one."""
        plan = _Plan()
        uncertain = [row for row in rows if row.in_flight or row.mirrored]
        plan.creates = [row for row in rows if not (row.in_flight or row.mirrored)]
        if not uncertain:
            return plan
        held = self._lookup([row.rkey for row in uncertain])
        for row in uncertain:
            remote = held.get(row.rkey)
            if remote is None:
                self.store.settle([row.rkey])
                plan.creates.append(row)
            elif remote["value"] == row.record:
                self._synced(row.rkey, remote["uri"], remote["cid"])
            else:
                plan.puts.append(row)
        plan.creates.sort(key=lambda row: row.rkey)
        return plan

    def _lookup(self, rkeys: list[str]) -> dict[str, dict[str, Any]]:
        """What the PDS holds at these rkeys: ``{rkey: {uri, cid, value}}``."""
        if len(rkeys) <= GET_RECORD_LOOKUPS:
            held = {}
            for rkey in rkeys:
                try:
                    held[rkey] = self._call(self._get_record(rkey))
                except RecordNotFound:
                    continue
            return held
        return self._list_since(min(rkeys), set(rkeys))

    def _list_since(self, oldest: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
        """Page listRecords (newest first) until past ``oldest``."""
        held: dict[str, dict[str, Any]] = {}
        cursor = None
        for _ in range(MAX_LIST_PAGES):
            page = self._call(self._list_page(cursor))
            for item in page.get("records", []):
                rkey = item["uri"].rsplit("/", 1)[-1]
                if rkey in wanted:
                    held[rkey] = item
            cursor = page.get("cursor")
            records = page.get("records", [])
            if not cursor or not records or records[-1]["uri"].rsplit("/", 1)[-1] < oldest:
                return held
        raise self._stop_round("listRecords did not reach the oldest uncertain session")

    def _next_batch(self, rows: list[StoredSession]) -> list[StoredSession]:
        """The first rows, as many as the budget, the 200 cap and the PDS's request
        body limit allow.

        Sized only when it is about to leave, after the previous answer told the
        budget. (Sizing every batch of a round up front sized them all as the first
        one, FIRST_BATCH sessions while the budget was unknown: 100 requests for
        1,000 sessions.) The byte cap keeps 200 large records (up to ~14 KB each)
        from making a 2.8 MB body that the PDS refuses with 413, which sent every
        session of the batch as a single put.
        """
        size = self._affordable(CREATE_POINTS)
        end, body = 0, BATCH_ENVELOPE_BYTES
        while end < len(rows) and end < size:
            body += _write_bytes(rows[end])
            if body > MAX_BATCH_BYTES and end > 0:
                break
            end += 1
        return rows[:end]

    def _affordable(self, points_each: int) -> int:
        """How many writes fit in the budget above the reserve (at least 1)."""
        if not self._wrote:
            return FIRST_BATCH
        spare = spare_points(self.status.budget, self._reserve, self._now())
        if spare is None:
            return MAX_BATCH  # a new window began; the next answer will tell
        return max(1, min(MAX_BATCH, spare // points_each))

    # -- writes ------------------------------------------------------------------

    def _create(self, batch: list[StoredSession]) -> None:
        while batch:
            self._ensure_budget(len(batch) * CREATE_POINTS)
            rkeys = [row.rkey for row in batch]
            writes = [create_write(SESSION_NSID, row.rkey, row.record) for row in batch]
            self.store.mark_in_flight(rkeys)
            try:
                answer = self._call(self._apply_writes(writes), rkeys, write=True)
            except (InvalidRequest, PayloadTooLarge) as refused:
                # One bad record fails the whole batch (nothing was written).
                self.store.settle(rkeys)
                named = _refused_write(refused, len(batch))
                if named is None:  # the answer does not say which: find it with single puts
                    for row in batch:
                        self._put(row)
                    return
                # The PDS named the write it refused ("... at $.writes[3].value.x"):
                # put that one alone (quarantined if refused again, never on a guess)
                # and send the rest as a batch again, instead of one put per session
                # (a 200-session batch cost 200 requests and 400 points that way).
                self._put(batch[named])
                batch = batch[:named] + batch[named + 1 :]
                continue
            self.status.points_spent += CREATE_POINTS * len(batch)
            results = answer.get("results", [])
            marks = [(row.rkey, r["uri"], r["cid"]) for row, r in zip(batch, results, strict=False)]
            self.store.mark_synced_many(marks, self._now())
            self.status.synced += len(marks)
            self.status.last_sync_at = self._now()
            return

    def _put(self, row: StoredSession) -> None:
        self._ensure_budget(PUT_POINTS)
        self.store.mark_in_flight([row.rkey])
        try:
            answer = self._call(self._put_record(row.rkey, row.record), [row.rkey], write=True)
        except (InvalidRequest, PayloadTooLarge) as refused:
            self.store.quarantine(row.rkey, f"{type(refused).__name__}: {refused}")
            self.status.quarantined += 1
            logger.error("the PDS refused session %s: %s", row.rkey, refused)
            return
        self.status.points_spent += PUT_POINTS
        self._synced(row.rkey, answer["uri"], answer["cid"])

    def _synced(self, rkey: str, uri: str, cid: str) -> None:
        self.store.mark_synced(rkey, uri, cid, self._now())
        self.status.synced += 1
        self.status.last_sync_at = self._now()

    def _ensure_budget(self, points: int) -> None:
        budget = self.status.budget
        spare = spare_points(budget, self._reserve, self._now())
        if budget is not None and spare is not None and points > spare:
            self.status.next_sync_at = budget.reset_at
            self.status.sync_error = (
                f"write budget reserve reached ({budget.remaining} of {budget.limit} points"
                f" left, {self._reserve} kept for the game)"
            )
            raise SyncStopped

    # -- calls and their failures ------------------------------------------------------

    def _apply_writes(self, writes: list[dict[str, Any]]) -> Request:
        return lambda timeout: self.client.apply_writes(self.did, writes, timeout=timeout)

    def _put_record(self, rkey: str, record: dict[str, Any]) -> Request:
        return lambda timeout: self.client.put_record(
            self.did, SESSION_NSID, rkey, record, timeout=timeout
        )

    def _get_record(self, rkey: str) -> Request:
        return lambda timeout: self.client.get_record(self.did, SESSION_NSID, rkey, timeout=timeout)

    def _list_page(self, cursor: str | None) -> Request:
        return lambda timeout: self.client.list_records(
            self.did, SESSION_NSID, cursor=cursor, timeout=timeout
        )

    def _call(self, request: Request, rkeys: Sequence[str] = (), write: bool = False) -> Any:
        """Run one XRPC request, turning failures into status, backoff or quarantine.

        Only a write's answer tells the write budget: reads carry other buckets'.
        """
        timeout = REQUEST_TIMEOUT
        if self._deadline is not None:
            timeout = max(0.05, min(timeout, self._deadline - self._now()))
        self.status.requests += 1
        try:
            answer = request(timeout)
        except RecordNotFound:
            raise  # the caller's "absent"
        except (InvalidRequest, PayloadTooLarge) as refused:
            if not write:  # a read refused: not a record's fault
                raise self._read_refused(refused) from refused
            self._note_budget(write)
            raise  # the caller decides: quarantine, or split the batch
        except RateLimited as limited:
            self._note_budget(write)
            self._defer(rkeys, limited, in_flight=False)
            self.status.next_sync_at = limited.retry_at
            raise SyncStopped from limited
        except (ExpiredToken, InvalidToken, AccountUnavailable, Forbidden) as denied:
            self._defer(rkeys, denied, in_flight=False)
            self.status.auth_problem = f"{type(denied).__name__}: {denied}"
            logger.error("sync stopped for %s: %s", self.did, self.status.auth_problem)
            if isinstance(denied, AccountUnavailable):
                self._stopped_for_account()
            raise SyncStopped from denied
        except XrpcError as failure:
            raise self._stop_round(str(failure), rkeys, failure) from failure
        self._note_budget(write)
        self._failures = 0
        self.status.sync_error = None
        return answer

    def _read_refused(self, refused: XrpcError) -> SyncStopped:
        """A lookup the PDS refused (400): its repo may be gone with a deactivated account.

        getRecord/listRecords of such a repo answer "Could not locate record";
        getSession still answers, with ``active: false``. Then stop and say so,
        rather than back off and ask again for as long as the account is off.
        """
        try:
            who = self.client.get_session(timeout=REQUEST_TIMEOUT)
        except XrpcError:
            who = {}
        if who.get("active") is False:
            self.status.auth_problem = (
                f"AccountUnavailable: the account is {who.get('status', 'inactive')}"
            )
            logger.error("sync stopped for %s: %s", self.did, self.status.auth_problem)
            self._stopped_for_account()
            return SyncStopped()
        return self._stop_round(str(refused))

    def _stopped_for_account(self) -> None:
        """The account, not the credentials, stopped the sync: it may come back."""
        self.recheck_at = self._now() + ACCOUNT_RECHECK_SECONDS
        self.status.next_sync_at = self.recheck_at

    def _stop_round(
        self, reason: str, rkeys: Sequence[str] = (), failure: XrpcError | None = None
    ) -> SyncStopped:
        """Back off after a network error, timeout or 5xx (the write may have landed)."""
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (self._failures - 1))
        delay *= self._rng.uniform(0.5, 1.5)
        self.status.next_sync_at = self._now() + delay
        self.status.sync_error = reason
        ambiguous = failure is None or failure.ambiguous
        if rkeys:
            self.store.retry_later(list(rkeys), reason, self._now() + delay, in_flight=ambiguous)
        logger.warning("sync failed (%s); next attempt in %.1f s", reason, delay)
        return SyncStopped()

    def _defer(self, rkeys: Sequence[str], failure: XrpcError, in_flight: bool) -> None:
        self.status.sync_error = f"{type(failure).__name__}: {failure}"
        if rkeys:
            self.store.retry_later(list(rkeys), self.status.sync_error, 0.0, in_flight)

    def _note_budget(self, write: bool) -> None:
        if write:
            self._wrote = True
            self.status.budget = self.client.last_rate_limit

    def _recall_budget(self) -> None:
        """The budget an earlier engine (another run, the CLI) last saw, if still current.

        Without it a new engine's first batch would be blind, and could spend a
        little of the reserve.
        """
        recalled = recalled_budget(self.store.meta(), self.did, self._now())
        if recalled is not None:
            self.status.budget = recalled
            self._wrote = True

    def _save_status(self) -> None:
        status = self.status
        budget = asdict(status.budget) if status.budget is not None else None
        try:
            facts = {f"{STATUS_META_PREFIX}{name}": value for name, value in status.facts().items()}
            self.store.set_meta(facts | {budget_key(self.did): budget})
        except Exception as failure:  # the CLI's view is not worth a lost round
            logger.error("cannot save the sync status: %s", failure)


def _reporter(
    progress: Callable[[int, int], None] | None, done: int, total: int
) -> Callable[[int], None]:
    """Turn a round's own count into the caller's ``progress(done, total)``."""

    def report(settled_in_round: int) -> None:
        if progress is not None:
            progress(done + settled_in_round, total)

    return report


def _write_bytes(row: StoredSession) -> int:
    """About what one ``#create`` of this session adds to an applyWrites body."""
    return len(to_json(row.record).encode()) + WRITE_ENVELOPE_BYTES


_WRITE_INDEX = re.compile(r"\$\.writes\[(\d+)\]")


def _refused_write(refused: XrpcError, count: int) -> int | None:
    """The index of the write a refused ``applyWrites`` names, if it names exactly one.

    The reference PDS says where its input check failed, e.g. "Expected one of
    null, boolean, integer, ... (got 1.5) at $.writes[3].value.x".
    """
    named = {int(index) for index in _WRITE_INDEX.findall(refused.message)}
    if len(named) != 1:
        return None
    index = named.pop()
    return index if index < count else None
