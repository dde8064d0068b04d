"""`meshbridge-ca`: initialise, serve, operate and audit the CA service."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ca_server import cli_views as views
from ca_server.core.errors import CAError
from ca_server.fleetcheck import duration_text as _duration_text
from meshbridge_wire.cliout import Output, emit, fail

if TYPE_CHECKING:
    from ca_server.core.audit import ChainReport
    from ca_server.runtime import CASettings
    from ca_server.storage.repository import SqlStore

EPILOG = """\
examples:
  meshbridge-ca init --data-dir ./.meshbridge
  meshbridge-ca serve --data-dir ./.meshbridge --listen 127.0.0.1:8443
  meshbridge-ca cluster add a --trust-domain a.mesh --data-dir ./.meshbridge
  meshbridge-ca cluster list --data-dir ./.meshbridge
  meshbridge-ca root status --data-dir ./.meshbridge
  meshbridge-ca fleet check --data-dir ./.meshbridge
  meshbridge-ca token create oncall --role viewer --expires-in 30d --data-dir ./.meshbridge
  meshbridge-ca audit verify --data-dir ./.meshbridge
"""


class CLIError(Exception):
    """A message for the operator saying what to fix; exit code 2 unless given. ``extra``: more
    keys for the ``--json`` error object."""

    def __init__(self, message: str, code: int = 2, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra or {}


# ----------------------------------------------------------------------------- init / serve / audit
def cmd_init(args: argparse.Namespace) -> Output:
    from ca_server import datadir, runtime
    from ca_server.core.authority import Authority, Policy
    from ca_server.keys.base import parse_key_type
    from ca_server.keys.file import passphrase_path

    data_dir = Path(args.data_dir)
    if (data_dir / runtime.SETTINGS_FILE).exists() or (data_dir / "root-cert.pem").exists():
        raise CLIError(f"{data_dir} already holds a CA; refusing to overwrite it")
    dir_warning = datadir.make_private_dir(data_dir)
    key_type = parse_key_type(args.key_type)
    settings = runtime.CASettings(
        org=args.org, key_backend=args.key_backend, root_key_type=key_type.value, database_url=args.database_url
    )
    if args.key_backend == "pkcs11":
        if not args.pkcs11_token:
            raise CLIError(
                "--key-backend pkcs11 needs --pkcs11-token LABEL (and the PIN in MESHBRIDGE_PKCS11_PIN "
                "or --pkcs11-pin-file)"
            )
        settings.pkcs11 = {
            "module": args.pkcs11_module,
            "token_label": args.pkcs11_token,
            "pin_file": str(Path(args.pkcs11_pin_file).resolve()) if args.pkcs11_pin_file else None,
        }
    url = runtime.database_url(data_dir, settings, args.database_url)
    datadir.make_private_sqlite(url)
    store = runtime.open_store(url)
    audit_key_path = _init_audit_key(store, data_dir, settings, _path(args.audit_key_file))
    keys = runtime.key_backend(data_dir, settings, passphrase_file=_path(args.passphrase_file), create=True)
    authority = Authority(store, keys, policy=Policy(org=args.org, root_key_type=key_type))
    if args.import_cert:
        if not args.import_key_ref:
            raise CLIError("--import-cert needs --import-key-ref (file:<path> inside the data dir, or pkcs11:…)")
        root, admin = authority.import_root(
            cert_pem=Path(args.import_cert).read_text(),
            chain_pem=Path(args.import_chain).read_text() if args.import_chain else "",
            key_ref=args.import_key_ref,
        )
    else:
        root, admin = authority.init_root(key_type=key_type)
    runtime.write_private(data_dir / runtime.SETTINGS_FILE, settings.to_json())
    runtime.write_private(data_dir / "admin-token", admin + "\n")
    runtime.write_public(data_dir / "root-cert.pem", authority.trust_bundle_from(authority.list_roots()))
    _anchor_init(store, data_dir)
    out = {
        "data_dir": str(data_dir),
        "root_id": root.id,
        "root_cert": str(data_dir / "root-cert.pem"),
        "admin_token_file": str(data_dir / "admin-token"),
        "key": keys.describe(root.key_ref),
        "database": "sqlite (embedded)" if url.startswith("sqlite") else "postgresql",
        "audit_key_file": str(audit_key_path),
    }
    passphrase_file = (
        passphrase_path(data_dir, passphrase_file=args.passphrase_file) if args.key_backend == "file" else None
    )
    if passphrase_file is not None:
        out["passphrase_file"] = str(passphrase_file)
    if dir_warning:
        out["warning"] = dir_warning
        print(f"warning: {dir_warning}", file=sys.stderr)
    return Output(out, views.init_text(out, root.id, key_type.value, data_dir, passphrase_file))


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


def _init_audit_key(store: SqlStore, data_dir: Path, settings: CASettings, given: Path | None) -> Path:
    """Seal the new chain with the audit key at ``given`` (recorded in ca.json), at
    MESHBRIDGE_AUDIT_KEY_FILE, or at D/audit-key; created (0600) when the file is missing."""
    from ca_server import runtime, sealing

    if given is not None:
        settings.audit_key_file = str(given.resolve())
    path = runtime.audit_key_path(data_dir, settings)
    store.audit_key = sealing.read_key(path) or sealing.create_key(path)
    return path


def _anchor_init(store: SqlStore, data_dir: Path) -> None:
    from ca_server import runtime, sealing

    assert store.audit_key is not None
    sealing.anchor_head(store, store.audit_key, runtime.anchor_log(data_dir))


def cmd_serve(args: argparse.Namespace) -> int:
    from ca_server.server import ListenError, serve

    try:
        return serve(args)
    except ListenError as exc:
        raise CLIError(str(exc), code=1) from exc


def cmd_audit_verify(args: argparse.Namespace) -> Output:
    from ca_server import runtime, sealing
    from ca_server.core.audit import ChainReport, is_unkeyed, verify_chain

    data_dir = Path(args.data_dir)
    settings = runtime.load_settings(data_dir)
    store = runtime.open_store(runtime.database_url(data_dir, settings, args.database_url), migrate=False)
    key_path = runtime.audit_key_path(data_dir, settings, _path(args.audit_key_file))
    key = sealing.read_key(key_path)
    own = data_dir / runtime.ANCHORS_FILE
    try:  # the anchors before the head: an anchor is never ahead of the head read after it
        anchors = sealing.read_anchors([*([own] if own.exists() else []), *_existing(args.anchors)])
    except CAError as exc:  # a line that is no anchor: the file was altered
        return _report(ChainReport(False, 0, exc.detail), own)
    if key is None:
        last = store.last_audit_entry()
        if anchors or (last is not None and not is_unkeyed(last)):
            raise CLIError(
                f"no audit key at {key_path}: this chain is sealed with one; give --audit-key-file or "
                "MESHBRIDGE_AUDIT_KEY_FILE"
            )
    return _report(verify_chain(store.iter_audit(), head=store.audit_head(), key=key, anchors=anchors), own)


def _existing(files: list[str]) -> list[Path]:
    for f in files:
        if not Path(f).is_file():
            raise CLIError(f"anchors file {f} does not exist")
    return [Path(f) for f in files]


def _report(report: ChainReport, anchors_file: Path) -> Output:
    """Exit 0 for an intact chain; the default form of a broken one goes to stderr, exit 1."""
    data = {"ok": report.ok, "checked": report.checked, "problem": report.problem}
    if report.ok:
        return Output(data, f"audit chain intact: {report.checked} entries; {_sealing_note(report, anchors_file)}")
    what = "BEHIND ITS ANCHORS" if report.rollback else "BROKEN"
    text = f"audit chain {what} after {report.checked} good entries: {report.problem}"
    return Output(data, text, code=1, text_to_stderr=True)


def _sealing_note(report: ChainReport, anchors_file: Path) -> str:
    sealed = (
        f"sealed with the audit key from entry {report.sealed_from}"
        if report.sealed_from
        else "unkeyed (written before audit keys; `serve` seals it when it starts)"
    )
    anchored = (
        f"{report.anchors} anchor(s) agree"
        if report.anchors
        else f"no anchors ({anchors_file} is missing): a rollback or a deleted tail cannot be seen"
    )
    return f"{sealed}; {anchored}"


# ----------------------------------------------------------------------------- operator client
class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        d = Path(args.data_dir) if getattr(args, "data_dir", None) else None
        url = args.url or os.environ.get("MESHBRIDGE_URL")
        if not url and d and (d / "server-url").exists():
            url = (d / "server-url").read_text().strip()
        if not url:
            raise CLIError("no server: give --url, MESHBRIDGE_URL, or --data-dir of a served CA")
        bundle = args.ca_bundle or (str(d / "root-cert.pem") if d and (d / "root-cert.pem").exists() else None)
        # --token-file, then MESHBRIDGE_ADMIN_TOKEN, then the default D/admin-token (as for the URL)
        token = os.environ.get("MESHBRIDGE_ADMIN_TOKEN")
        token_file = args.token_file or (
            str(d / "admin-token") if not token and d and (d / "admin-token").exists() else None
        )
        if token_file:
            token = Path(token_file).read_text().strip()
        if not token:
            raise CLIError("no admin token: give --token-file, MESHBRIDGE_ADMIN_TOKEN, or --data-dir")
        verify: Any = bundle if bundle else True
        self.http = httpx.Client(base_url=url, verify=verify, timeout=30, headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.request(method, path, body).json()

    def text(self, path: str) -> str:
        """The body of ``GET path`` as text (PEM endpoints)."""
        return self.request("GET", path).text

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise CLIError(
                f"cannot reach the CA service at {self.http.base_url}: {type(exc).__name__}: {exc}", code=3
            ) from exc
        if r.status_code >= 400:
            raise _refusal(r)
        return r


def _refusal(r: httpx.Response) -> CLIError:
    """The CLI error for an error response: a 409 `fleetnotready` as FleetNotReadyError."""
    try:
        p = r.json()
        msg = f"{p.get('title', 'error')} ({r.status_code}): {p.get('detail', '')}"
        lagging = [(str(x["cluster"]), str(x["waiting_for"])) for x in p.get("lagging") or []]
        msg += "".join(f"\n  {name}: waits for {why}" for name, why in lagging)
    except (ValueError, KeyError, TypeError, AttributeError):
        return CLIError(f"HTTP {r.status_code}", code=1)
    if r.status_code == 409 and str(p.get("type", "")).endswith("/fleetnotready"):
        return FleetNotReadyError(msg, lagging)
    return CLIError(msg, code=1, extra={"status": r.status_code})


class FleetNotReadyError(CLIError):
    """A root phase refused (409 `fleetnotready`) with the lagging clusters and what each waits for."""

    def __init__(self, message: str, lagging: list[tuple[str, str]]) -> None:
        extra = {"status": 409, "lagging": [{"cluster": n, "waiting_for": w} for n, w in lagging]}
        super().__init__(message, code=1, extra=extra)
        self.lagging = lagging


def cmd_cluster(args: argparse.Namespace) -> Output:
    c = Client(args)
    op = args.cluster_cmd
    if op == "add":
        out = c.call("POST", "/v1/clusters", _cluster_body(args))
        out, written = _secret_out(out, "bootstrap_token", args.token_out)
        return Output(out, views.bootstrap_text(args.name, out, written_to=written, registered=True))
    if op == "list":
        out = c.call("GET", "/v1/clusters")
        return Output(out, views.cluster_table(out["items"]))
    if op == "show":
        out = c.call("GET", f"/v1/clusters/{args.name}")
        return Output(out, views.cluster_text(out))
    if op == "rotate":
        out = c.call("POST", f"/v1/clusters/{args.name}/rotate", {})
        text = f"cluster {args.name}: rotation requested; its agent renews to generation {out['generation']}"
        return Output(out, text)
    if op == "revoke":
        out = c.call("POST", f"/v1/clusters/{args.name}/revoke", {"reason": args.reason})
        return Output(out, f"cluster {args.name} revoked ({args.reason}): its intermediates are in the CRL")
    if op == "token":
        out = c.call("POST", f"/v1/clusters/{args.name}/bootstrap-token")
        out, written = _secret_out(out, "bootstrap_token", args.token_out)
        return Output(out, views.bootstrap_text(args.name, out, written_to=written, registered=False))
    raise CLIError(f"unknown cluster command {op}")  # pragma: no cover - argparse restricts choices


def _cluster_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name, "trust_domain": args.trust_domain}
    if args.share_trust_domain:
        body["share_trust_domain"] = True
    if args.gateway:
        host, _, port = args.gateway.rpartition(":")
        if not host or not port.isdigit():
            raise CLIError("--gateway must be ADDRESS:PORT, e.g. 203.0.113.10:15443")
        body["gateway"] = {"address": host, "port": int(port)}
    return body


def _secret_out(out: dict[str, Any], key: str, token_out: str | None) -> tuple[dict[str, Any], str | None]:
    """``--token-out F``: the secret ``out[key]`` written to F (0600) and ``<written to F>`` in its
    place, so it is printed nowhere; without F the result is unchanged (printed once by ``emit``)."""
    if not token_out:
        return out, None
    from ca_server.runtime import write_private

    write_private(Path(token_out), out[key] + "\n")
    return {**out, key: f"<written to {token_out}>"}, token_out


def cmd_fleet(args: argparse.Namespace) -> Output:
    """`fleet check`: every check's result, exit 1 if any failed (fleetcheck.py holds the checks)."""
    from ca_server import fleetcheck

    c = Client(args)
    data = fleetcheck.gather(lambda path: c.call("GET", path), c.text)
    limits = fleetcheck.Limits(max_report_age=args.max_report_age, min_days=args.min_days)
    results = fleetcheck.check_fleet(data, now=fleetcheck.now_utc(), limits=limits)
    return Output(fleetcheck.as_data(results), fleetcheck.render(results), code=fleetcheck.exit_code(results))


def cmd_root(args: argparse.Namespace) -> Output:
    c = Client(args)
    op = args.root_cmd
    if op == "list":
        out = c.call("GET", "/v1/roots")
        return Output(out, views.roots_table(out["items"]))
    if op == "status":
        out = c.call("GET", "/v1/roots/status")
        return Output(out, views.root_status_text(out))
    if op == "add":
        out = c.call("POST", "/v1/roots", {"key_type": args.key_type} if args.key_type else {})
    elif op in ("activate", "retire") and args.wait:
        out = phase_waiting(c, op, args.id, timeout=args.timeout.total_seconds(), interval=args.interval)
    elif op in ("activate", "retire"):
        out = c.call("POST", f"/v1/roots/{args.id}/{op}", {"force": True} if args.force else None)
    else:  # pragma: no cover - argparse restricts choices
        raise CLIError(f"unknown root command {op}")
    return Output(out, views.root_text(op, out))


def phase_waiting(
    c: Client,
    op: str,
    root_id: str,
    *,
    timeout: float,
    interval: timedelta,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """`root activate|retire --wait`: the phase, retried every ``interval`` while it is refused with
    409 `fleetnotready`, printing each time (to stderr) which clusters lag and what they wait for;
    a CLIError once ``timeout`` seconds have passed. Any other refusal ends the wait at once."""
    deadline = clock() + timeout
    while True:
        try:
            return c.call("POST", f"/v1/roots/{root_id}/{op}")
        except FleetNotReadyError as exc:
            left = deadline - clock()
            if left <= 0:
                raise CLIError(f"gave up waiting after {_duration_text(timeout)}: {exc}", code=1) from exc
            print(_progress(op, root_id, exc.lagging, left), file=sys.stderr, flush=True)
            sleep(min(interval.total_seconds(), left))


def _progress(op: str, root_id: str, lagging: list[tuple[str, str]], left: float) -> str:
    head = f"waiting to {op} root {root_id}: {len(lagging)} cluster(s) not ready ({_duration_text(left)} left)"
    return head + "".join(f"\n  {name}: waits for {why}" for name, why in lagging)


def cmd_token(args: argparse.Namespace) -> Output:
    """Operator tokens of the admin API: create (the secret printed once), list (no secrets), revoke."""
    c = Client(args)
    op = args.token_cmd
    if op == "create":
        body: dict[str, Any] = {"name": args.name, "role": args.role}
        if args.expires_in is not None:
            body["expires_in_s"] = int(args.expires_in.total_seconds())
        out, written = _secret_out(c.call("POST", "/v1/admin-tokens", body), "token", args.token_out)
        return Output(out, views.token_created_text(out, written_to=written))
    if op == "list":
        out = c.call("GET", "/v1/admin-tokens")
        return Output(out, views.tokens_table(out["items"]))
    if op == "revoke":
        out = c.call("POST", f"/v1/admin-tokens/{args.ref}/revoke", {})
        return Output(out, views.token_revoked_text(out))
    raise CLIError(f"unknown token command {op}")  # pragma: no cover - argparse restricts choices


def parse_duration(text: str) -> timedelta:
    """``serve --workload-cert-lifetime``: e.g. 24h, 90m, 1h30m, 2d, 3600s or 3600 (seconds)."""
    value = parse_any_duration(text)
    if not timedelta(seconds=1) <= value <= MAX_WORKLOAD_CERT_LIFETIME:
        raise argparse.ArgumentTypeError(
            "give a lifetime from 1s to 90d (a workload certificate never outlives its intermediate)"
        )
    return value


def parse_positive_duration(text: str) -> timedelta:
    """A duration of at least one second (``--wait``'s timeout and interval, ``fleet check``'s report age)."""
    value = parse_any_duration(text)
    if value < timedelta(seconds=1):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least 1s")
    return value


def parse_any_duration(text: str) -> timedelta:
    """A duration, e.g. 24h, 90m, 1h30m, 2d, 3600s or 3600 (seconds)."""
    t = text.strip().lower()
    parts = re.findall(r"(\d+)([dhms])", t)
    if t.isdigit():
        value = timedelta(seconds=int(t))
    elif parts and "".join(n + u for n, u in parts) == t:
        value = sum((timedelta(seconds=int(n) * _UNIT[u]) for n, u in parts), timedelta(0))
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: write e.g. 24h, 90m, 1h30m, 2d or 3600s")
    return value


def parse_token_lifetime(text: str) -> timedelta:
    """``token create --expires-in``: a duration from 60s to 3650d (the API's bounds)."""
    value = parse_any_duration(text)
    if not timedelta(seconds=60) <= value <= timedelta(days=3650):
        raise argparse.ArgumentTypeError("give a lifetime from 60s to 3650d, or leave --expires-in out: never expires")
    return value


_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# istiod clamps a workload certificate's notAfter to its intermediate's (genCertTemplateFromCSR,
# security/pkg/pki/util/generate_cert.go), and intermediates live 90 days: a longer lifetime means nothing
MAX_WORKLOAD_CERT_LIFETIME = timedelta(days=90)

ROOT_HELP = """Root rotation in four phases: 1 one root signs; 2 `root add`: a new root joins every trust
bundle, the old one still signs; 3 `root activate NEW`: the new root signs and every cluster
renews under it; 4 `root retire OLD`: the old root leaves the trust bundle.

Phases 3 and 4 are gated on what every active cluster's istiod serves, as its agent observes and
reports it (not on what the agent wrote into cacerts: istiod may not have loaded it):
  activate  refuses (409, listing the clusters) until every active cluster's istiod has served
            a trust bundle (istio-ca-root-cert) holding the new root for the workload
            certificate lifetime plus a 10 % margin (workloads take istiod's bundle only with
            their next certificate);
  retire    refuses while any active cluster still holds an intermediate under the root (never
            overridable), and until every active cluster's istiod has signed under another root
            for the workload certificate lifetime plus a 10 % margin (serve
            --workload-cert-lifetime, default 24h), so no workload certificate under it is left.
--force overrides the istiod part of either gate; the audit entry records `forced` and every
lagging cluster with what it waited for. `root status` shows each gate, cluster by cluster.
"""


FLEET_HELP = """Checks, from the REST API (GET /v1/clusters, /v1/trust-bundle, /v1/crl):
  fleet-wide  ca-crl (each root's CRL: nextUpdate at least --min-days away);
              gateway-reachability (not checked: agents do not report peer reachability)
  per active  agent-report (the CA received its last status within --max-report-age),
  cluster     generation (installed == desired), intermediate (--min-days left),
              istiod-signing (istiod signs with the installed intermediate), trust-bundle
              (istiod serves exactly the CA's trust bundle), istiod-crl (the CRLs istiod publishes:
              nextUpdate at least --min-days away), exports (every consumer registered and active),
              agent-errors (none reported)
A cluster whose agent does not report what istiod serves gets a warning instead of the istiod
checks; a pending cluster a warning; a revoked one is not checked.
Exit status: 0 when nothing failed (warnings alone: 0), 1 when a check failed, 2 bad usage,
3 the CA service cannot be reached. Times are this machine's clock against the CA's receipt times.
"""


# ----------------------------------------------------------------------------- parser
JSON_ERRORS = (
    "Errors: one line on stderr and a non-zero exit; with --json also "
    '{"error", "exit_code", ...} on stdout (docs/api.md, Output).'
)
# what each command prints (its --help epilog); the --json keys are listed in docs/api.md
PRINTS = {
    "init": "Prints where the trust anchor, admin token, key passphrase and audit key are (never the "
    "token itself); --json: {data_dir, root_id, root_cert, admin_token_file, key, database, "
    "audit_key_file[, passphrase_file, warning]}.",
    "serve": "Prints nothing on stdout (its log: JSON lines on stderr). Binds --listen first: an "
    "address it cannot bind is one line on stderr naming it, exit 1; D/server-url is written only "
    "once it listens.",
    "cluster add": "Prints the registration and its one-time bootstrap token once (or where "
    "--token-out wrote it); --json: the API's ClusterCreated.",
    "cluster list": "Prints a table of clusters; --json: the API's {items: [Cluster, ...]}.",
    "cluster show": "Prints the cluster as key: value lines; --json: the API's Cluster.",
    "cluster rotate": "Prints one line with the generation its agent renews to; --json: {generation}.",
    "cluster revoke": "Prints one line; --json: the API's Cluster (status revoked).",
    "cluster token": "Prints the new one-time bootstrap token once (or where --token-out wrote it); "
    "--json: {bootstrap_token, bootstrap_expires_at}.",
    "root list": "Prints a table of roots; --json: the API's {items: [Root, ...]}.",
    "root add": "Prints the new root's id, status and notAfter; --json: the API's Root (with its certificate).",
    "root activate": "Prints the root's id, status and notAfter; --json: the API's Root.",
    "root retire": "Prints the root's id, status and notAfter; --json: the API's Root.",
    "root status": "Prints each gate as a table of clusters; --json: the API's root status.",
    "fleet check": "Prints one line per check and cluster and a verdict; --json: a list of "
    "{cluster, check, status, detail}.",
    "token create": "Prints the token's id, role and expiry and the token itself once (or where "
    "--token-out wrote it); --json: the API's AdminToken plus token.",
    "token list": "Prints a table of tokens (never a secret); --json: the API's {items: [AdminToken, ...]}.",
    "token revoke": "Prints one line; --json: the API's AdminToken (state revoked).",
    "audit verify": "Prints one line: the chain intact (stdout, exit 0) or where it breaks (stderr, "
    "exit 1); --json: {ok, checked, problem}.",
}


def _epilog(command: str) -> str:
    return PRINTS[command] if command == "serve" else f"{PRINTS[command]}\n{JSON_ERRORS}"


def _client_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="CA service URL (default: MESHBRIDGE_URL or D/server-url)")
    p.add_argument("--ca-bundle", help="trust anchor PEM for the CA service (default: D/root-cert.pem)")
    p.add_argument("--token-file", help="admin token file (default: MESHBRIDGE_ADMIN_TOKEN or D/admin-token)")
    p.add_argument("--data-dir", help="a CA data directory to take the three defaults from")
    p.add_argument("--json", action="store_true", help="print what the API returned, as JSON, instead of the summary")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshbridge-ca",
        description="meshbridge CA service: one root of trust for separate Istio meshes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    i = sub.add_parser("init", help="create the root CA, database and admin token", epilog=_epilog("init"))
    i.add_argument("--data-dir", required=True)
    i.add_argument("--key-type", default="ecdsa-p256", help="ecdsa-p256 (default), ecdsa-p384, rsa-3072, rsa-4096")
    i.add_argument("--key-backend", choices=["file", "pkcs11"], default="file")
    i.add_argument("--pkcs11-module", default="/usr/lib/softhsm/libsofthsm2.so")
    i.add_argument("--pkcs11-token", help="token label (PKCS#11 backend)")
    i.add_argument("--pkcs11-pin-file", help="file holding the token PIN (else MESHBRIDGE_PKCS11_PIN)")
    i.add_argument("--org", default="meshbridge", help="organisation in the root's subject")
    i.add_argument("--database-url", help="postgresql+psycopg://… (default: SQLite in the data dir)")
    i.add_argument(
        "--passphrase-file",
        help="root key passphrase file, read if it exists, else generated "
        "there (0600); best outside D, so that a copy of D does not carry it (default: "
        "MESHBRIDGE_CA_KEY_PASSPHRASE, else D/key-passphrase, generated if missing)",
    )
    i.add_argument("--import-cert", help="adopt this existing root or issuing CA certificate instead")
    i.add_argument("--import-chain", help="certificates above --import-cert up to its self-signed root")
    i.add_argument("--import-key-ref", help="key of --import-cert: file:<path relative to D> or pkcs11:…")
    i.add_argument(
        "--audit-key-file",
        help="the key that seals the audit chain (else MESHBRIDGE_AUDIT_KEY_FILE, "
        "else D/audit-key); created (0600) when missing; a given path is recorded in ca.json",
    )
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    i.set_defaults(fn=cmd_init)

    s = sub.add_parser("serve", help="serve the REST API over HTTPS", epilog=_epilog("serve"))
    s.add_argument("--data-dir", required=True)
    s.add_argument("--listen", default="127.0.0.1:8443")
    s.add_argument("--database-url")
    s.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="DNS name for the server certificate (repeatable); the first one goes into D/server-url",
    )
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--passphrase-file")
    s.add_argument("--log-level", default="info")
    s.add_argument(
        "--rate-limit-credential",
        type=int,
        default=300,
        metavar="N",
        help="requests per second per token, shared by all replicas (0: no limit; default 300)",
    )
    s.add_argument(
        "--rate-limit-address",
        type=int,
        default=3000,
        metavar="N",
        help="requests per second per source address, shared by all replicas (0: no limit; default 3000)",
    )
    s.add_argument(
        "--insecure-http",
        action="store_true",
        help="plain HTTP (only for benchmarks behind TLS termination; never in production)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes accepting on the one listening "
        "socket, each a full replica (default 1; about one per core)",
    )
    s.add_argument(
        "--metrics-token-file",
        help="a token (32+ characters) that opens /metrics and nothing else, "
        "for a scraper; the admin token opens it too",
    )
    s.add_argument(
        "--workload-cert-lifetime",
        type=parse_duration,
        default=timedelta(hours=24),
        metavar="DURATION",
        help="the longest workload certificate istiod signs (its DEFAULT_WORKLOAD_CERT_TTL, or more if "
        "workloads ask for more): `root activate` waits this plus 10 %% after every istiod serves the "
        "new root, `root retire` after every istiod signs under another root (default 24h; e.g. 90m, 1h30m, 2d)",
    )
    lim = s.add_argument_group("listener limits", "what a connection may do before the app sees it")
    lim.add_argument(
        "--head-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds from connecting (or a request's first byte) to the end of its head (default 10)",
    )
    lim.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds from the end of a request's head to the end of its body, in total (default 30)",
    )
    lim.add_argument(
        "--max-head-bytes",
        type=int,
        default=16 * 1024,
        metavar="N",
        help="request line and headers together, in bytes; over it: 431 (default 16384)",
    )
    lim.add_argument(
        "--max-connections",
        type=int,
        default=2048,
        metavar="N",
        help="open connections per worker process; a new one over it gets 503 and is closed (default 2048)",
    )
    fast = s.add_argument_group(
        "speed-ups",
        "each relies on framework internals (versions pinned in "
        "constraints.txt); turn one off if an upgrade of that framework breaks it",
    )
    fast.add_argument(
        "--no-agent-shortcut",
        "--no-renewal-shortcut",
        dest="agent_shortcut",
        action="store_false",
        help="answer the agents' renewals, status reports and desired-state long-polls through "
        "FastAPI's routes and middleware stack (the shortcut overrides FastAPI.build_middleware_stack; "
        "--no-renewal-shortcut is its older name)",
    )
    fast.add_argument(
        "--no-joined-writes",
        dest="joined_writes",
        action="store_false",
        help="serve without the joined writes (a subclass of uvicorn's httptools protocol that "
        "sends a response's head and body in one write)",
    )
    fast.add_argument(
        "--no-prepared-statements",
        dest="prepared_statements",
        action="store_false",
        help="run every statement through SQLAlchemy Core (the speed-up runs the renewal's statements "
        "on the DBAPI connection, compiled once with SQLAlchemy's type processors)",
    )
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("cluster", help="register and manage clusters")
    csub = c.add_subparsers(dest="cluster_cmd", required=True)
    for name, helptext in [
        ("add", "register a cluster and print its bootstrap token"),
        ("list", "table of clusters: desired and installed generation, days to expiry"),
        ("show", "one cluster"),
        ("rotate", "ask the cluster's agent to renew now"),
        ("revoke", "revoke the cluster: intermediates into the CRL, token dead"),
        ("token", "a new one-time bootstrap token (re-enrollment)"),
    ]:
        cp = csub.add_parser(name, help=helptext, epilog=_epilog(f"cluster {name}"))
        if name != "list":
            cp.add_argument("name")
        if name == "add":
            cp.add_argument(
                "--trust-domain",
                default="cluster.local",
                help="its Istio meshConfig.trustDomain; one per cluster (default %(default)s)",
            )
            cp.add_argument(
                "--share-trust-domain",
                action="store_true",
                help="allow a trust domain another active cluster holds (each can then mint the "
                "other's identities: only for meshes that already trust each other)",
            )
            cp.add_argument("--gateway", help="ADDRESS:PORT of its ingress gateway")
        if name in ("add", "token"):
            cp.add_argument("--token-out", help="write the bootstrap token to this file (0600) instead of printing")
        if name == "revoke":
            cp.add_argument("--reason", default="cessationOfOperation")
        _client_opts(cp)
        cp.set_defaults(fn=cmd_cluster)

    r = sub.add_parser(
        "root",
        help="root rotation: list, add (phase 2), activate (3), retire (4), status (the gates)",
        description=ROOT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rsub = r.add_subparsers(dest="root_cmd", required=True)
    for name, helptext in [
        ("list", "table of roots"),
        ("add", "phase 2: a new root joins the trust bundle"),
        ("activate", "phase 3: the root signs; refused until every active cluster's istiod has served it long enough"),
        ("retire", "phase 4: the root leaves the bundle; refused until no istiod has signed under it for long enough"),
        ("status", "each trusted root's phase 3 and 4 gates: which clusters are ready, what the others wait for"),
    ]:
        rp = rsub.add_parser(
            name,
            help=helptext,
            description=ROOT_HELP,
            epilog=_epilog(f"root {name}"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name in ("activate", "retire"):
            rp.add_argument("id")
            how = rp.add_mutually_exclusive_group()
            how.add_argument(
                "--force",
                action="store_true",
                help="proceed although some clusters' istiod is not ready (audited with those clusters)",
            )
            how.add_argument(
                "--wait",
                action="store_true",
                help="while refused because clusters are not ready, show them and retry until it goes through",
            )
            rp.add_argument(
                "--timeout",
                type=parse_positive_duration,
                default=timedelta(hours=1),
                metavar="DURATION",
                help="with --wait: give up (exit 1) after this long (default 1h)",
            )
            rp.add_argument(
                "--interval",
                type=parse_positive_duration,
                default=timedelta(seconds=30),
                metavar="DURATION",
                help="with --wait: retry this often (default 30s)",
            )
        if name == "add":
            rp.add_argument("--key-type")
        _client_opts(rp)
        rp.set_defaults(fn=cmd_root)

    f = sub.add_parser("fleet", help="fleet-wide checks")
    fsub = f.add_subparsers(dest="fleet_cmd", required=True)
    fc = fsub.add_parser(
        "check",
        help="one line per check and cluster; exit 1 when any check failed (warnings alone: 0)",
        description=FLEET_HELP,
        epilog=_epilog("fleet check"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fc.add_argument(
        "--max-report-age",
        type=parse_positive_duration,
        default=timedelta(minutes=10),
        metavar="DURATION",
        help="an agent whose last report the CA received longer ago fails (default 10m)",
    )
    fc.add_argument(
        "--min-days",
        type=float,
        default=14.0,
        metavar="DAYS",
        help="an intermediate or CRL expiring (nextUpdate) sooner fails (default 14)",
    )
    _client_opts(fc)
    fc.set_defaults(fn=cmd_fleet)
    t = sub.add_parser("token", help="operator tokens of the admin API: create, list, revoke (roles admin, viewer)")
    tsub = t.add_subparsers(dest="token_cmd", required=True)
    for name, helptext in [
        ("create", "a named token; its secret is printed once (or written with --token-out)"),
        ("list", "table of tokens: id, name, role, state, expiry (never a secret)"),
        ("revoke", "revoke a token by id or name (the last admin token is refused)"),
    ]:
        tp = tsub.add_parser(name, help=helptext, epilog=_epilog(f"token {name}"))
        if name == "create":
            tp.add_argument("name", help="a DNS label, unique among the live tokens, e.g. oncall")
            tp.add_argument(
                "--role",
                choices=["admin", "viewer"],
                required=True,
                help="viewer: the admin API's GET endpoints, /metrics and /openapi.json; admin: everything",
            )
            tp.add_argument(
                "--expires-in", type=parse_token_lifetime, help="e.g. 12h, 30d (60s to 3650d); default: never"
            )
            tp.add_argument("--token-out", help="write the token to this file (0600) instead of printing it")
        if name == "revoke":
            tp.add_argument("ref", help="the token's id or name")
        _client_opts(tp)
        tp.set_defaults(fn=cmd_token)

    a = sub.add_parser("audit", help="audit log")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    av = asub.add_parser(
        "verify", help="check the hash chain straight from the database", epilog=_epilog("audit verify")
    )
    av.add_argument("--data-dir", required=True)
    av.add_argument("--database-url")
    av.add_argument(
        "--audit-key-file",
        help="the audit key (default: MESHBRIDGE_AUDIT_KEY_FILE, ca.json's audit_key_file, or D/audit-key)",
    )
    av.add_argument(
        "--anchors",
        action="append",
        default=[],
        metavar="FILE",
        help="a further anchors file to check against, e.g. a copy kept off this host "
        "(D/audit-anchors is always read); repeatable",
    )
    av.add_argument("--json", action="store_true", help="print the verdict as JSON")
    av.set_defaults(fn=cmd_audit_verify)

    from ca_server import backup

    backup.add_commands(sub)
    return p


PROG = "meshbridge-ca"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: print its result (``--json``: as JSON) and return its exit status; an error
    is one line on stderr (and a JSON error object on stdout with ``--json``), exit 1, 2 or 3."""
    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        result: Output | int = args.fn(args)
    except CLIError as exc:
        return fail(PROG, str(exc), exc.code, as_json=as_json, extra=exc.extra)
    except CAError as exc:
        return fail(PROG, exc.detail, 2, as_json=as_json)
    except FileNotFoundError as exc:
        return fail(PROG, f"file not found: {exc.filename}", 2, as_json=as_json)
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else emit(result, as_json=as_json)


if __name__ == "__main__":
    sys.exit(main())
