"""``anisota-agent``: inspect what the agent recorded, and play a demo session."""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._version import __version__
from .status import saved_status

if TYPE_CHECKING:
    from .store import Store
    from .tokens import TokenStore
    from .xrpc import XrpcError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C (128 + SIGINT)
PASSWORD_ENV = "ANISOTA_AGENT_PASSWORD"
#: Datetimes in records come from this machine's clock; more skew than this is
#: worth fixing (the PDS's Date header has 1 s resolution).
MAX_CLOCK_SKEW = 30.0


class CliError(Exception):
    """A user mistake or an unmet condition: printed to stderr, no traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as error:
        print(f"anisota-agent: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except sqlite3.Error as error:  # the machine's trouble, not a bug of ours
        print(f"anisota-agent: the store failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"anisota-agent: {where}{_plain(error)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


def _plain(error: BaseException) -> str:
    """The error in words: no class name, no ``[Errno 2]`` (users read these)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return re.sub(r"^\[Errno -?\d+\] ", "", str(error)) or "unknown error"


def _xrpc_reason(error: XrpcError) -> str:
    """What an XRPC call's failure means to a user."""
    from .xrpc import NetworkError

    if isinstance(error, NetworkError):
        # Its message names the httpx exception class (for the log): say what happened.
        cause = error.__cause__
        return f"no answer from the PDS ({_plain(cause) if cause else 'network error'})"
    return str(error)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _seconds_up_to(most: float) -> Callable[[str], float]:
    """An argparse type: seconds from 0 to ``most`` (nan and inf are neither)."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= most:
            raise argparse.ArgumentTypeError(f"must be 0 to {most:g} seconds, not {text!r}")
        return value

    return seconds


def _parser() -> argparse.ArgumentParser:
    from .settings import CONSENT_STATES
    from .store import OUTBOX_STATES

    # On the main parser and every subcommand, so --data-dir goes before or after
    # the command; SUPPRESS leaves it unset where not given, so neither clobbers the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="the agent's data directory (default: the platform's user data dir, "
        "or ANISOTA_AGENT_DATA_DIR)",
    )
    parser = argparse.ArgumentParser(
        prog="anisota-agent",
        description="Inspect the sessions the anisota agent recorded; play a demo session.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], text: str) -> Any:
        sub = commands.add_parser(name, help=text, description=text, parents=[common])
        sub.set_defaults(run=run)
        return sub

    command("status", _status, "store path, queue by state, losses")
    sessions = command("sessions", _sessions, "list recorded sessions, newest first")
    sessions.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    sessions.add_argument(
        "--state",
        choices=OUTBOX_STATES,  # the store's: a new state is listed here at once
        metavar="STATE",
        help=f"only sessions in this outbox state: {', '.join(OUTBOX_STATES)}",
    )
    sessions.add_argument(
        "--limit",
        type=_positive_int,
        default=50,
        metavar="N",
        help="at most N sessions, newest first (default: %(default)s)",
    )
    show = command(
        "show", _show, "print one session's record as JSON (its local-only time behind on stderr)"
    )
    show.add_argument("rkey")
    export = command("export", _export, "every session as JSON lines (record and outbox state)")
    export.add_argument("--output", "-o", type=Path, help="file to write (default: stdout)")
    export.add_argument(
        "--remote",
        action="store_true",
        help="the logged-in account's session records on its PDS instead (uri, cid, value)",
    )
    validate = command("validate", _validate, "validate a record file (JSON, or JSON lines)")
    validate.add_argument("file", type=Path)
    purge = command("purge", _purge, "delete every recorded session and counter")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.add_argument(
        "--remote",
        action="store_true",
        help="delete the logged-in account's session records on its PDS instead;"
        " its local sessions are kept, marked never to be uploaded",
    )
    demo = command("demo", _demo, "play a short simulated game session end to end")
    demo.add_argument(
        "--seconds",
        type=_seconds_up_to(600),
        metavar="N",
        default=2.0,
        help="how long to play, 0 to 600 (default: %(default)g s)",
    )
    login = command("login", _login, "log in with an app password (kept: the refresh token only)")
    login.add_argument("--pds-url", required=True, help="the account's PDS, https://...")
    login.add_argument("--identifier", required=True, help="handle, DID or email")
    command("logout", _logout, "revoke and forget the saved login")
    flush = command("flush", _flush, "sync every pending session now, with progress")
    flush.add_argument(
        "--timeout",
        type=_seconds_up_to(3600),
        metavar="S",
        default=300.0,
        help="give up after this many seconds, 0 to 3600 (default: %(default)g s)",
    )
    command("doctor", _doctor, "check the PDS, the login and the clock skew")
    consent = command(
        "consent", _consent, "show the player's consent to upload, or set it (the player's choice)"
    )
    consent.add_argument(
        "state",
        nargs="?",
        choices=CONSENT_STATES,
        metavar="STATE",
        help=f"{', '.join(CONSENT_STATES)}; none: show it. denied deletes every session"
        " not uploaded",
    )
    return parser


def _data_dir(args: argparse.Namespace) -> Path:
    data_dir: Path | None = getattr(args, "data_dir", None)  # SUPPRESS: absent if not given
    if data_dir is not None:
        return data_dir
    from .store import default_data_dir

    return default_data_dir()


def _store_path(args: argparse.Namespace) -> Path:
    from .store import DB_FILENAME

    return _data_dir(args) / DB_FILENAME


def _open_store(args: argparse.Namespace) -> Store:
    """The data dir's store; an empty one in memory where nothing was recorded yet.

    Nothing recorded is not an error, and inspecting a machine must not create
    the data dir or the file on it.
    """
    from .store import Store

    path = _store_path(args)
    if not path.exists():
        return Store(None)
    try:
        return Store.open(path)
    except (sqlite3.Error, OSError) as error:
        raise CliError(f"cannot open the store at {path}: {_plain(error)}") from error


def _status(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        _print_store_status(store, sys.stdout, _store_path(args))
        _print_sync_status(store, _token_store(args), sys.stdout)
    finally:
        store.close()
    return EXIT_OK


def _print_store_status(store: Store, out: TextIO, path: Path) -> None:
    empty = " (nothing recorded yet)" if store.path is None else ""
    out.write(f"store:    {path}{empty}\n")
    counts = store.outbox_counts()
    out.write("sessions: " + ", ".join(f"{name} {count}" for name, count in counts.items()) + "\n")
    losses = store.counters()
    lost = ", ".join(f"{name} {value}" for name, value in sorted(losses.items())) or "none"
    out.write(f"dropped:  {lost}\n")
    out.write(f"consent:  {_consent_text(store)}\n")


def _stored_consent(store: Store) -> tuple[str, str | None]:
    """The consent in force in ``store`` and who chose it (None: nobody yet)."""
    from .settings import CONSENT_STATES, DEFAULT_CONSENT

    stored = store.consent()
    if stored and stored.get("state") in CONSENT_STATES:
        by = stored.get("by")
        return str(stored["state"]), by if isinstance(by, str) else None
    return DEFAULT_CONSENT, None


def _consent_text(store: Store) -> str:
    state, by = _stored_consent(store)
    chosen = {
        "player": "the player's choice",
        "host": "the game's default: the player has not chosen",
    }.get(by or "", "the default: nothing recorded yet")
    return f"{state} ({chosen})"


def _print_sync_status(store: Store, tokens: TokenStore, out: TextIO) -> None:
    saved = tokens.load()
    account = "not logged in (or the game supplies its own auth)"
    if saved:
        account = f"{saved.get('handle')} ({saved.get('did')}) at {saved.get('pds_url')}"
    saved_facts = saved_status(store.meta())
    next_at = saved_facts["next_sync_at"]
    out.write(f"auth:     {account}\n")
    if saved_facts["auth_problem"]:
        out.write(f"          problem: {saved_facts['auth_problem']}\n")
    out.write(f"network:  {saved_facts['network'] or 'unknown'} (as the agent last saw it)\n")
    out.write(f"synced:   last {_when(saved_facts['last_sync_at'])}\n")
    out.write(f"next:     {_when(next_at) if next_at else 'when due'}\n")
    out.write(f"error:    {saved_facts['sync_error'] or 'none'}\n")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _sessions(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        rows = store.sessions(outbox=args.state, limit=args.limit)
    finally:
        store.close()
    if args.json:
        for row in rows:
            local = {"rkey": row.rkey, "outbox": row.outbox, "backgroundMs": row.background_ms}
            print(json.dumps(_summary(row.record) | local))
        return EXIT_OK
    header = (
        f"{'RKEY':13}  {'STATUS':11}  {'OUTBOX':11}  {'STARTED':24}  {'DURATION':>9}"
        f"  {'BACKGROUND':>10}  EVENTS"
    )
    print(header)
    for row in rows:
        summary = _summary(row.record)
        duration = "" if summary["duration"] is None else f"{summary['duration'] / 1000:.1f}s"
        background = f"{row.background_ms / 1000:.1f}s"
        print(
            f"{row.rkey:13}  {summary['status']:11}  {row.outbox:11}  "
            f"{summary['startedAt']:24}  {duration:>9}  {background:>10}  {summary['totalEvents']}"
        )
    return EXIT_OK


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": record.get("status"),
        "startedAt": record.get("startedAt"),
        "duration": record.get("duration"),
        "endReason": record.get("endReason"),
        "totalEvents": record.get("activitySummary", {}).get("totalEvents", 0),
    }


def _show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        row = store.get(args.rkey)
    finally:
        store.close()
    if row is None:
        raise CliError(f"no session with record key {args.rkey!r}")
    # stdout is the record as it is uploaded (validate takes it); what only this
    # machine keeps goes to stderr, for the person reading.
    print(json.dumps(row.record, indent=2))
    print(
        f"local only, not uploaded: {row.background_ms / 1000:.1f}s in the background",
        file=sys.stderr,
    )
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    if args.remote:
        return _export_remote(args)
    from .data import local_sessions

    _open_store(args).close()  # says so when the file cannot be opened
    out = _output(args)
    try:
        for line in local_sessions(_data_dir(args)):
            out.write(json.dumps(line) + "\n")
    finally:
        if args.output:
            out.close()
    return EXIT_OK


def _output(args: argparse.Namespace) -> TextIO:
    try:
        return args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    except OSError as error:
        raise CliError(f"cannot write {args.output}: {_plain(error)}") from error


def _export_remote(args: argparse.Namespace) -> int:
    from .remote import RemoteError, remote_sessions

    _need_login(args)
    out = _output(args)
    written = 0
    try:
        for record in remote_sessions(_data_dir(args)):
            out.write(json.dumps(record) + "\n")
            written += 1
    except RemoteError as error:
        raise CliError(f"export incomplete ({written} records written): {error}") from error
    finally:
        if args.output:
            out.close()
    return EXIT_OK


def _need_login(args: argparse.Namespace) -> None:
    try:
        saved = _token_store(args).load()
    except OSError as error:
        raise CliError(f"cannot read the saved login: {_plain(error)}") from error
    if saved is None:
        raise CliError("not logged in: run `anisota-agent login` first")


def _validate(args: argparse.Namespace) -> int:
    from .lexicon import RecordValidationError, validate_record

    try:
        text = args.file.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot read {args.file}: {_plain(error)}") from error
    records = _parse_records(text, args.file)
    if not records:  # "0 valid, 0 invalid" would pass a truncated or wrong file
        raise CliError(f"{args.file} holds no record to validate")
    failures = 0
    for number, record in enumerate(records, start=1):
        try:
            validate_record(record)
        except RecordValidationError as error:
            failures += 1
            print(f"{args.file}: record {number}: invalid: {error}", file=sys.stderr)
    print(f"{len(records) - failures} valid, {failures} invalid")
    return EXIT_FAILURE if failures else EXIT_OK


def _parse_records(text: str, path: Path) -> list[Any]:
    """A JSON record, a JSON array of records, or JSON lines (export's ``record`` kept)."""
    try:
        parsed = json.loads(text)
        records = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise CliError(f"{path} is neither JSON nor JSON lines: {error}") from error
    return [r["record"] if isinstance(r, dict) and "record" in r else r for r in records]


def _ask(prompt: str) -> bool:
    """A yes/no question on the terminal; no unless the answer is yes (end of input: no)."""
    try:
        answer = input(prompt)
    except EOFError:
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


def _purge(args: argparse.Namespace) -> int:
    if args.remote:
        return _purge_remote(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError("purge deletes every recorded session: pass --yes to confirm")
        if not _ask("Delete every recorded session? [y/N] "):
            print("nothing deleted")
            return EXIT_OK
    store = _open_store(args)
    try:
        removed = store.purge()
    finally:
        store.close()
    print(f"purged {removed} session(s)")
    return EXIT_OK


def _purge_remote(args: argparse.Namespace) -> int:
    from .remote import RemoteAccount, RemoteError, delete_remote_sessions

    if not args.yes and not sys.stdin.isatty():
        raise CliError(
            "purge --remote deletes every session record on the PDS: pass --yes to confirm"
        )
    _need_login(args)

    def confirm(account: RemoteAccount, records: int) -> bool:
        return _ask(
            f"Delete {records} session record(s) from {account.pds_url} for"
            f" {account.describe()}, and never upload its local sessions? [y/N] "
        )

    bar = _progress_bar(sys.stderr)
    drawing = False  # a bar line is open on stderr

    def progress(done: int, total: int) -> None:
        nonlocal drawing
        drawing = done < total
        bar(done, total)

    try:
        report = delete_remote_sessions(
            _data_dir(args), confirm=None if args.yes else confirm, progress=progress
        )
    except RemoteError as error:
        if drawing:
            sys.stderr.write("\n")  # the message on a line of its own
        raise CliError(str(error)) from error
    if not report.confirmed:
        print("nothing deleted")
        return EXIT_OK
    account = report.account
    print(
        f"deleted {report.deleted} session record(s) from {account.pds_url} for"
        f" {account.describe()}; {report.local_marked} local session(s) marked never to upload"
        f" ({report.requests} requests, {report.points_spent} rate-limit points)"
    )
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import play_demo

    rkey, status = play_demo(_data_dir(args), args.seconds)
    store = _open_store(args)
    try:
        row = store.get(rkey)
        if row is None:
            raise CliError(f"the demo session {rkey} was not stored (store: {status.store_mode})")
        print(json.dumps(row.record, indent=2))
        _print_store_status(store, sys.stdout, _store_path(args))
    finally:
        store.close()
    return EXIT_OK


def _token_store(args: argparse.Namespace) -> TokenStore:
    from .tokens import token_store_for

    return token_store_for(_data_dir(args))


def _read_password(identifier: str) -> str:
    """From ``ANISOTA_AGENT_PASSWORD``, else a prompt that does not echo."""
    import getpass
    import os

    password = os.environ.get(PASSWORD_ENV)
    if password:
        return password
    if not sys.stdin.isatty():
        raise CliError(f"no terminal to ask for the password: set {PASSWORD_ENV}")
    return getpass.getpass(f"App password for {identifier}: ")


def _login(args: argparse.Namespace) -> int:
    from .auth import AppPasswordSession
    from .xrpc import XrpcError

    password = _read_password(args.identifier)
    tokens = _token_store(args)
    try:
        session = AppPasswordSession.login(args.pds_url, args.identifier, password, tokens)
    except XrpcError as error:
        raise CliError(f"login failed: {_xrpc_reason(error)}") from error
    except ValueError as error:
        raise CliError(f"login failed: {error}") from error
    except OSError as error:  # only saving the login touches the disk
        reason = f"cannot save it in {tokens.describe()}: {_plain(error)}"
        raise CliError(f"login failed: {reason}") from error
    print(f"logged in: {session.describe()}")
    session.close()
    return EXIT_OK


def _logout(args: argparse.Namespace) -> int:
    from .auth import AppPasswordSession

    tokens = _token_store(args)
    session = AppPasswordSession.from_store(tokens)
    if session is None:
        tokens.clear()
        print("not logged in")
        return EXIT_OK
    session.logout()
    print(f"logged out {session.handle} ({session.did})")
    return EXIT_OK


def _flush(args: argparse.Namespace) -> int:
    from .uplink import Uplink

    store = _open_store(args)
    state, _ = _stored_consent(store)
    if state != "granted":
        store.close()
        raise CliError(
            f"consent is {state}: nothing is uploaded (`anisota-agent consent granted` allows it)"
        )
    uplink = Uplink(store, _token_store(args))
    try:
        did = uplink.resume()
        if did is None or uplink.engine is None:
            raise CliError("not logged in: run `anisota-agent login` first")
        status = uplink.engine.sync(time.time() + args.timeout, _progress_bar(sys.stderr))
        left = store.count_due(did, float("inf"))
    finally:
        uplink.close()
        store.close()
    print(
        f"synced {status.synced}, quarantined {status.quarantined}, left {left}"
        f" ({status.requests} requests, {status.points_spent} rate-limit points)"
    )
    problem = status.auth_problem or status.sync_error
    if problem:
        print(f"anisota-agent: {problem}", file=sys.stderr)
    return EXIT_OK if left == 0 else EXIT_FAILURE


def _consent(args: argparse.Namespace) -> int:
    if args.state is None:
        store = _open_store(args)
        try:
            print(f"consent: {_consent_text(store)}")
        finally:
            store.close()
        return EXIT_OK
    from .store import Store

    # The player's choice is kept: the store is made for it if need be.
    path = _store_path(args)
    try:
        store = Store.open(path)
    except (sqlite3.Error, OSError) as error:
        raise CliError(f"cannot open the store at {path}: {_plain(error)}") from error
    try:
        store.set_consent(args.state, "player")
        deleted = store.delete_unsynced() if args.state == "denied" else 0
    finally:
        store.close()
    print(f"consent: {args.state} (the player's choice)")
    if args.state == "denied":
        print(
            f"deleted {deleted} session(s) not uploaded; those on the PDS stay there"
            " (`anisota-agent purge --remote` deletes them)"
        )
    return EXIT_OK


def _progress_bar(out: TextIO) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            out.write("\n")
        out.flush()

    return show


def _doctor(args: argparse.Namespace) -> int:
    from .auth import AppPasswordSession
    from .xrpc import XrpcClient, XrpcError

    session = AppPasswordSession.from_store(_token_store(args))
    if session is None:
        raise CliError("not logged in: run `anisota-agent login` first")
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    with XrpcClient(session.pds_url) as anonymous:
        began = time.perf_counter()
        try:
            version = anonymous.health(timeout=10).get("version", "?")
            check(
                "PDS reachable",
                True,
                f"{session.pds_url} (version {version}, "
                f"{(time.perf_counter() - began) * 1000:.0f} ms)",
            )
        except XrpcError as error:
            check("PDS reachable", False, f"{session.pds_url}: {_xrpc_reason(error)}")
        skew = anonymous.clock_skew
    try:
        with session.client() as client:
            who = client.get_session(timeout=10)
        check("credentials", True, f"{who.get('handle')} ({who.get('did')})")
    except XrpcError as error:
        check("credentials", False, _xrpc_reason(error))
    finally:
        session.close()
    if skew is None:
        check("clock skew", False, "the PDS sent no Date header")
    else:
        check("clock skew", abs(skew) <= MAX_CLOCK_SKEW, f"{skew:+.1f} s against the PDS")
    return EXIT_OK if failures == 0 else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
