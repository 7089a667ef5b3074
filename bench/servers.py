"""The reference servers: nginx (upstream and upstream-direct), HAProxy, and the plain aiohttp proxy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.system import Process, free_port, pinned, spawn, wait_for_port
from bench.tokens import AUDIENCE, ISSUER

# The upstream's answer to every request: a small fixed JSON body (~60 bytes).
UPSTREAM_BODY = '{"status":"ok","service":"bench-upstream","items":[1,2,3,4,5]}'

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # The default (1000) would make every proxy under test reconnect now and then.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
frontend bench
    bind 127.0.0.1:{port}
{rules}    default_backend upstream
backend upstream
    http-reuse always
    server nginx 127.0.0.1:{upstream}
"""

# RS256 as in HAProxy's own jwt_verify example, plus the iss/aud/exp checks every other target does,
# so the comparison is like for like. jwt_verify itself checks only the signature.
HAPROXY_JWT_RULES = """\
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.jwt_alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request set-var(txn.jwt_iss) var(txn.bearer),jwt_payload_query('$.iss')
    http-request set-var(txn.jwt_aud) var(txn.bearer),jwt_payload_query('$.aud')
    http-request set-var(txn.jwt_exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny deny_status 401 unless {{ var(txn.jwt_alg) -m str RS256 }}
    http-request deny deny_status 401 unless {{ var(txn.jwt_iss) -m str {issuer} }}
    http-request deny deny_status 401 unless {{ var(txn.jwt_aud) -m str {audience} }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.jwt_alg,"{key}") -m int 1 }}
    http-request deny deny_status 401 if {{ var(txn.jwt_exp),sub(txn.now) -m int lt 0 }}
"""


class TargetError(Exception):
    """The target could not be started or does not behave; the rest of the suite goes on."""


class TargetSkipped(TargetError):
    """The target cannot run on this host (e.g. no jwt_verify in the installed HAProxy)."""


def start_nginx(workdir: Path, core: int) -> tuple[Process, int]:
    port = free_port()
    directory = workdir / f"nginx-{port}"
    directory.mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port, body=UPSTREAM_BODY))
    argv = ["nginx", "-e", str(directory / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    process = spawn("nginx", pinned(core, argv), directory / "stdout.log")
    _await_port(process, port)
    return process, port


def haproxy_config(port: int, upstream: int, jwt_key: Path | None) -> str:
    rules = ""
    if jwt_key is not None:
        rules = HAPROXY_JWT_RULES.format(issuer=ISSUER, audience=AUDIENCE, key=jwt_key)
    return HAPROXY_CONF.format(port=port, upstream=upstream, rules=rules)


def check_haproxy_jwt(workdir: Path, public_key: Path) -> None:
    """Raise TargetSkipped, saying why, unless the installed HAProxy can run the jwt_verify config."""
    version = subprocess.run(["haproxy", "-vv"], capture_output=True, text=True, check=False).stdout
    if "+OPENSSL" not in version and "USE_OPENSSL=1" not in version:
        raise TargetSkipped("haproxy is built without OpenSSL, so it has no jwt_verify")
    conf = workdir / "haproxy-check.cfg"
    conf.write_text(haproxy_config(free_port(), free_port(), public_key))
    check = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        first = version.splitlines()[0] if version else "haproxy"
        why = (check.stderr.strip().splitlines() or ["no output"])[0][:300]
        raise TargetSkipped(f"{first} rejects the jwt_verify config (needs 2.5+): {why}")


def start_haproxy(workdir: Path, core: int, upstream: int, jwt_key: Path | None) -> tuple[Process, int]:
    port = free_port()
    conf = workdir / f"haproxy-{port}.cfg"
    conf.write_text(haproxy_config(port, upstream, jwt_key))
    process = spawn("haproxy", pinned(core, ["haproxy", "-db", "-f", str(conf)]), workdir / f"haproxy-{port}.log")
    _await_port(process, port)
    return process, port


def start_plain_proxy(workdir: Path, core: int, upstream: int, public_key: Path) -> tuple[Process, int]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.plain_proxy",
        "--port",
        str(port),
        "--upstream",
        f"http://127.0.0.1:{upstream}",
        "--public-key",
        str(public_key),
    ]
    process = spawn("plain-proxy", pinned(core, argv), workdir / f"plain-{port}.log")
    _await_port(process, port)
    return process, port


def _await_port(process: Process, port: int) -> None:
    try:
        wait_for_port(port, process.popen)
    except RuntimeError as exc:
        process.stop()
        raise TargetError(f"{process.name} did not start: {exc}\n{process.log_tail()}") from exc
