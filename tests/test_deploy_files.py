"""The container deployment in ``deploy/`` (compose file, Dockerfiles, site files, the Fleet-only
reverse proxy, the PKI script), checked without a Docker engine:

- ``deploy/compose.yaml`` parses; every build names an existing Dockerfile; the coordinator and
  the sites sit only on internal networks and only the proxy publishes a port; sites mount their
  data read-only; every command in it (and every Dockerfile's ENTRYPOINT + CMD) is accepted by
  the real ``umeml-server`` / ``umeml-client`` argument parsers, and the paths it names are mounted.
- the Dockerfiles run ``umeml-server`` / ``umeml-client`` as a non-root user with Flower's runtime
  dependency installation, telemetry and update check off, at the version in pyproject.toml.
- ``deploy/nginx/fleet-proxy.conf`` passes ``nginx -t`` and, run for real in front of a stand-in
  SuperLink, forwards ``POST /v1/fleet/<method>`` with the site-authentication headers unchanged
  and refuses everything else (Control, Runtime, health, docs, path tricks) with 403. These tests
  skip when nginx is not installed, except under ``CI`` where they fail. One test puts it in front
  of a real SuperLink (TLS, site authentication) and has Flower's own SuperNode go online through
  it, while the Control API that answers on the SuperLink's port answers 403 through the proxy.
- ``deploy/make-pki.sh`` is valid bash, writes the CA, the server certificate and the site keys
  (private keys 0600) and refuses to overwrite them without ``--force``.
"""

from __future__ import annotations

import fnmatch
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from umeml.client.cli import build_parser as client_parser
from umeml.config import load_site_config
from umeml.flower.processes import free_port, stop_process, wait_for_port
from umeml.server.certs import certificate_names, create_certs, names_host
from umeml.server.cli import build_parser as server_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROXY_CONF = DEPLOY / "nginx" / "fleet-proxy.conf"
MAKE_PKI = DEPLOY / "make-pki.sh"
BIN = Path(sys.executable).parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SITES = ("hospA", "hospB", "hospC")
DOCKERFILES = {"coordinator.Dockerfile": "umeml-server", "site.Dockerfile": "umeml-client",
               "site-cuda.Dockerfile": "umeml-client"}
NGINX_APT = "apt-get install -y --no-install-recommends nginx-light"


# ------------------------------------------------------------------------------ helpers
def interpolate(text: str) -> str:
    """Compose variable interpolation with every variable unset: ``${X:-d}`` / ``${X-d}`` -> d."""
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", "", text)
    return text.replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services(compose: dict) -> dict:
    return compose["services"]


def site_services(compose: dict) -> dict:
    return {name: svc for name, svc in services(compose).items() if svc.get("image", "").startswith("umeml-site")}


def volumes(svc: dict) -> list[tuple[str, str, list[str]]]:
    """(source, target, options) of a service's short-syntax volumes, variables at their defaults."""
    out = []
    for spec in svc.get("volumes", []):
        assert isinstance(spec, str), f"long volume syntax not expected here: {spec}"
        parts = interpolate(spec).split(":")
        out.append((parts[0], parts[1], parts[2].split(",") if len(parts) > 2 else []))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def mounted(svc: dict, path: str) -> tuple[str, str, list[str]] | None:
    """The volume through which ``path`` exists in the container (the deepest one), or None."""
    best = None
    for source, target, opts in volumes(svc):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > len(best[1]):
                best = (source, target, opts)
    return best


def command(svc: dict) -> list[str]:
    cmd = svc["command"]
    return [interpolate(str(c)) for c in (shlex.split(cmd) if isinstance(cmd, str) else cmd)]


def parse(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as err:  # argparse's way of refusing an unknown flag or a bad value
        raise AssertionError(f"{parser.prog} refuses {argv} (exit {err.code})") from None


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (DEPLOY / name).read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def docker_args(name: str) -> dict[str, str]:
    args = {}
    for instr, rest in dockerfile(name):
        if instr == "ARG":
            key, _, value = shlex.split(rest)[0].partition("=")
            args[key] = value
    return args


def docker_env(name: str) -> dict[str, str]:
    env = {}
    for instr, rest in dockerfile(name):
        if instr == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(name: str, instr: str) -> list[str]:
    values = [rest for i, rest in dockerfile(name) if i == instr]
    assert len(values) == 1, f"{name}: expected one {instr}, found {len(values)}"
    parsed = yaml.safe_load(values[0])  # exec form is a JSON array
    assert isinstance(parsed, list), f"{name}: {instr} must use the exec form (a JSON array)"
    return parsed


# ------------------------------------------------------------------------------ compose
def test_compose_has_a_coordinator_a_proxy_and_three_sites(compose):
    assert set(services(compose)) == {"coordinator", "fleet-proxy", *SITES}
    assert set(site_services(compose)) == set(SITES)


def test_every_build_names_an_existing_dockerfile_at_the_project_version(compose):
    for name, svc in services(compose).items():
        if "build" not in svc:
            assert svc.get("image"), f"{name}: neither build nor image"
            continue
        build = svc["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert (context / "pyproject.toml").is_file(), f"{name}: build context {context} is not the repository"
        file = context / build.get("dockerfile", "Dockerfile")
        assert file.is_file(), f"{name}: {file} does not exist"
        assert file.parent == DEPLOY and file.name in DOCKERFILES, name
        assert interpolate(str(build["args"]["UMEML_VERSION"])) == VERSION, name
        assert interpolate(svc["image"]).endswith(f":{VERSION}"), f"{name}: image tag is not the version"
    for name in DOCKERFILES:
        assert docker_args(name)["UMEML_VERSION"] == VERSION, f"{name}: UMEML_VERSION default != pyproject"


def test_only_the_proxy_is_on_an_external_network_and_publishes_ports(compose):
    nets = compose["networks"]
    internal = {n for n, spec in nets.items() if (spec or {}).get("internal") is True}
    assert internal, "no internal network"
    for name, svc in services(compose).items():
        assert "network_mode" not in svc, f"{name}: network_mode bypasses the networks"
        joined = set(svc["networks"])
        assert joined <= set(nets), name
        if name == "fleet-proxy":
            assert joined - internal, "the proxy must be on the external network"
            assert svc.get("ports"), "the proxy publishes the Fleet port"
        else:
            assert joined <= internal, f"{name} is on a non-internal network: {sorted(joined - internal)}"
            assert not svc.get("ports"), f"{name} publishes ports"
    # the sites cannot reach the coordinator (and its Control API) except through the proxy
    coordinator_nets = set(services(compose)["coordinator"]["networks"])
    for name, svc in site_services(compose).items():
        assert not coordinator_nets & set(svc["networks"]), f"{name} shares a network with the coordinator"


def test_site_files_load_and_match_their_services(compose):
    files = sorted((DEPLOY / "sites").glob("*.yaml"))
    assert [f.stem for f in files] == sorted(SITES)
    for f in files:
        site = load_site_config(f)
        assert site.site_id == f.stem
        assert Path(site.data_dir).is_absolute() and Path(site.state_dir).is_absolute(), f
    for name, svc in site_services(compose).items():
        args = parse(client_parser(), command(svc))
        source, _, opts = mounted(svc, str(args.site))
        assert (DEPLOY / source).resolve() == DEPLOY / "sites" / f"{name}.yaml" and "ro" in opts, name


def test_sites_mount_data_read_only_and_state_on_a_volume(compose):
    for name, svc in site_services(compose).items():
        site = load_site_config(DEPLOY / "sites" / f"{name}.yaml")
        data = mounted(svc, site.data_dir)
        assert data is not None and data[1] == site.data_dir, f"{name}: {site.data_dir} not mounted"
        assert "ro" in data[2], f"{name}: data mounted writable"
        state = mounted(svc, site.state_dir)
        assert state is not None and not is_bind(state[0]) and state[0] in compose["volumes"], \
            f"{name}: state_dir (privacy.json) must be on a named volume"
        assert "ro" not in state[2]
        for source, target, opts in volumes(svc):  # everything but the state is read-only
            if target != site.state_dir:
                assert "ro" in opts, f"{name}: {source}:{target} writable"


def test_compose_commands_are_accepted_by_the_real_parsers(compose):
    svc = services(compose)["coordinator"]
    args = parse(server_parser(), command(svc))
    assert args.command == "start" and args.func.__name__ == "_cmd_start"
    assert args.sites == len(SITES) and args.held_out in SITES
    assert args.tls_dir is not None and args.site_keys, "TLS and site authentication must be on"
    for path in (args.config, args.out, *(args.tls_dir / f for f in ("ca.crt", "server.pem", "server.key"))):
        assert mounted(svc, str(path)), f"coordinator: {path} is not mounted"
    assert not is_bind(mounted(svc, str(args.out))[0]), "the run dir belongs on a named volume"
    assert not any(t.endswith("ca.key") or "/sites/hosp" in s and not s.endswith(".pub")
                   for s, t, _ in volumes(svc)), "the coordinator gets neither ca.key nor site private keys"
    # exactly the sites' public keys are registered
    (keydir,) = args.site_keys
    pubs = {Path(t).name: s for s, t, _ in volumes(svc) if t.startswith(str(keydir) + "/")}
    assert pubs == {f"{s}.pub": f"./pki/sites/{s}.pub" for s in SITES}

    for name, svc in site_services(compose).items():
        args = parse(client_parser(), command(svc))
        assert args.command == "start" and args.func.__name__ == "_cmd_start", name
        assert args.root_certificates is not None and args.auth_key is not None, f"{name}: TLS/auth off"
        assert mounted(svc, str(args.root_certificates))[0] == "./pki/ca.crt", name
        assert mounted(svc, str(args.auth_key))[0] == f"./pki/sites/{name}", f"{name}: another site's key"


def test_sites_dial_the_proxy_which_dials_the_coordinator(compose):
    conf = PROXY_CONF.read_text()
    coordinator = parse(server_parser(), command(services(compose)["coordinator"]))
    proxy = services(compose)["fleet-proxy"]
    (listen,) = re.findall(r"^\s*listen\s+(\d+)\s+ssl\s*;", conf, re.M)
    published = [interpolate(str(p)).rsplit(":", 1)[-1] for p in proxy["ports"]]
    assert published == [listen], "the proxy publishes exactly its TLS listener"
    (upstream,) = re.findall(r"set \$superlink ([^;]+);", conf)
    assert upstream == f"coordinator:{coordinator.port}", "the proxy must dial the coordinator's --port"
    assert re.search(r"proxy_ssl_name coordinator;", conf) and re.search(r"proxy_ssl_verify on;", conf)
    assert is_bind(mounted(proxy, "/etc/nginx/conf.d/default.conf")[0])
    for name, svc in site_services(compose).items():
        host, port = parse(client_parser(), command(svc)).server.rsplit(":", 1)
        assert port == listen, name
        shared = set(svc["networks"]) & set(proxy["networks"])
        aliases = {interpolate(a) for n in shared for a in (proxy["networks"][n] or {}).get("aliases", [])}
        assert host in aliases, f"{name} dials {host}, which is not the proxy"


def test_dockerignore_keeps_the_sources_and_drops_local_state():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").strip("/")
            pat = pat.replace("**/", "*/") if pat.startswith("**/") else pat
            for i in range(1, len(parts) + 1):  # a matching folder excludes what is below it
                prefix = "/".join(parts[:i])
                if fnmatch.fnmatchcase(prefix, pat) or (pattern.lstrip("!").startswith("**/")
                                                        and fnmatch.fnmatchcase(parts[i - 1], pat[2:])):
                    result = not negate
                    break
        return result

    needed = ["pyproject.toml", "README.md"] + [
        p.relative_to(ROOT).as_posix() for d in ("umeml", "server", "client", "flower", "simulation")
        for p in (ROOT / d).rglob("*.py")
        if "__pycache__" not in p.parts]
    assert "umeml/data/__init__.py" in needed
    kept_out = [p for p in needed if ignored(p)]
    assert not kept_out, f".dockerignore drops files the build needs: {kept_out[:5]}"
    for local in ("runs/x/resume.pt", ".venv/bin/python", "data/table.csv", "umeml/__pycache__/x.pyc",
                  "deploy/pki/ca.key", "deploy/pki/sites/hospA", "deploy/data/hospA/table.csv", "pki/ca.key"):
        assert ignored(local), f".dockerignore lets {local} into the build context"


# ------------------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_runs_the_tested_cli_as_non_root_without_runtime_installs(name):
    entry = exec_form(name, "ENTRYPOINT")
    assert entry == [DOCKERFILES[name]], f"{name}: ENTRYPOINT {entry}"
    cmd = exec_form(name, "CMD")
    parser = server_parser() if entry == ["umeml-server"] else client_parser()
    args = parse(parser, cmd)
    assert args.command == "start"

    env = docker_env(name)
    assert env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", name
    assert env.get("FLWR_TELEMETRY_ENABLED") == "0" and env.get("FLWR_DISABLE_UPDATE_CHECK") == "1", name

    arg_defaults = docker_args(name)
    users = [rest for i, rest in dockerfile(name) if i == "USER"]
    assert users, f"{name}: no USER (runs as root)"
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults.get(m.group(1), m.group(0)), users[-1])
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and "$" not in uid, f"{name}: USER {users[-1]} -> {user}"
    last_instr = [i for i, _ in dockerfile(name)]
    assert max(i for i, x in enumerate(last_instr) if x == "USER") > max(
        i for i, x in enumerate(last_instr) if x == "RUN"), f"{name}: a RUN after USER would run as root"

    runs = " ".join(rest for i, rest in dockerfile(name) if i == "RUN")
    wanted = r'"/src\[extract\]"' if entry == ["umeml-client"] else r"/src\s"
    assert re.search(r"pip install [^&]*" + wanted, runs), f"{name}: does not install umeml from the copied repository"
    assert "UMEML_VERSION" in runs and "umeml.__version__" in runs, f"{name}: version pin not checked"
    index = arg_defaults["TORCH_INDEX_URL"]
    assert "--index-url \"${TORCH_INDEX_URL}\"" in runs
    if "cuda" in name:
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    else:
        assert index == "https://download.pytorch.org/whl/cpu", f"{name}: {index}"


# ------------------------------------------------------------------------------ make-pki.sh
def _run_make_pki(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", str(MAKE_PKI), *args], capture_output=True, text=True, env=env, timeout=120)


def test_make_pki_is_valid_bash():
    res = subprocess.run(["bash", "-n", str(MAKE_PKI)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = MAKE_PKI.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(MAKE_PKI, os.X_OK), "deploy/make-pki.sh is not executable"


def test_make_pki_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed: CI must install it (apt-get install shellcheck)")
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    res = subprocess.run(["shellcheck", str(MAKE_PKI)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_make_pki_writes_the_key_material_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "pki"
    res = _run_make_pki("--out", str(out), "fl.test.example")
    assert res.returncode == 0, res.stdout + res.stderr
    private = [out / "ca.key", out / "server.key", *(out / "sites" / s for s in SITES)]
    public = [out / "ca.crt", out / "server.pem", *(out / "sites" / f"{s}.pub" for s in SITES)]
    for path in private:
        assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path}: {oct(path.stat().st_mode)}"
    for path in public:
        assert path.is_file(), path
    names = certificate_names(out / "server.pem")
    assert {"fl.test.example", "coordinator"} <= set(names), names
    assert names_host(names, "0.0.0.0"), "umeml-server start --host 0.0.0.0 would refuse this certificate"
    # what compose mounts exists under these names
    assert (out / "sites" / "hospA.pub").read_text().startswith("ecdsa-sha2-nistp384 ")

    before = {p: p.read_bytes() for p in private + public}
    res = _run_make_pki("--out", str(out), "fl.test.example")
    assert res.returncode != 0 and "--force" in res.stderr, res.stdout + res.stderr
    assert all(p.read_bytes() == b for p, b in before.items()), "a refused run changed the key material"

    res = _run_make_pki("--out", str(out), "--force", "other.example")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "ca.key").read_bytes() != before[out / "ca.key"]
    assert "other.example" in certificate_names(out / "server.pem")
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_make_pki_without_a_host_is_a_usage_error(tmp_path):
    res = _run_make_pki("--out", str(tmp_path / "pki"))
    assert res.returncode == 2 and "PUBLIC_HOST" in res.stderr
    assert not (tmp_path / "pki").exists()


# ------------------------------------------------------------------------------ nginx
def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"nginx is not installed: CI must install it ({NGINX_APT}) to check the proxy config")
    pytest.skip(f"nginx is not installed ({NGINX_APT}); the reverse-proxy config is not checked")


def proxy_config(tmp: Path, pki: Path, listen_port: int, upstream_port: int) -> Path:
    """The repository's server block with this test's paths and ports, inside a wrapper nginx.conf."""
    conf = PROXY_CONF.read_text()
    for old, new in (("/etc/nginx/pki/", f"{pki}/"), ("set $superlink coordinator:9092;",
                                                      f"set $superlink 127.0.0.1:{upstream_port};"),
                     ("listen 443 ssl;", f"listen 127.0.0.1:{listen_port} ssl;")):
        assert old in conf, f"fleet-proxy.conf no longer contains {old!r}"
        conf = conf.replace(old, new)
    (tmp / "fleet-proxy.conf").write_text(conf)
    wrapper = tmp / "nginx.conf"
    wrapper.write_text(f"""\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    include {tmp}/fleet-proxy.conf;
}}
""")
    return wrapper


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_certs(out, ["hospA"], ["fl.test.example", "coordinator"])
    return out


def test_proxy_config_passes_nginx_t(tmp_path, pki):
    nginx = nginx_binary()
    wrapper = proxy_config(tmp_path, pki, free_port(), free_port())
    res = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(wrapper), "-e", str(tmp_path / "error.log")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test is successful" in res.stderr


class _Upstream(http.server.ThreadingHTTPServer):
    """A stand-in SuperLink: HTTPS with a given certificate, records what reaches it."""

    daemon_threads = True

    def __init__(self, cert: Path, key: Path):
        self.seen: list[tuple[str, str, dict, bytes]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                self.server.seen.append((self.command, self.path, dict(self.headers.items()), body))
                reply = b"superlink"
                self.send_response(200)
                self.send_header("content-type", "application/protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_POST = do_GET = do_PUT = _answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.socket = ctx.wrap_socket(self.socket, server_side=True)


@contextmanager
def running_proxy(tmp: Path, pki: Path, upstream_pki: Path):
    nginx = nginx_binary()
    upstream = _Upstream(upstream_pki / "server.pem", upstream_pki / "server.key")
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    port = free_port()
    wrapper = proxy_config(tmp, pki, port, upstream.server_address[1])
    proc = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(wrapper), "-e", str(tmp / "error.log"),
                             "-g", "daemon off; master_process off;"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, 30, proc)
        yield port, upstream
    finally:
        stop_process(proc, grace=5)
        upstream.shutdown()
        upstream.server_close()


def _request(port: int, ca: Path, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


AUTH_HEADERS = {"content-type": "application/protobuf", "accept": "application/protobuf",
                "flwr-public-key": "BASE64PUBLICKEY==", "flwr-timestamp": "2026-11-27T10:00:00.000000+00:00",
                "flwr-signature": "BASE64SIGNATURE=="}
REFUSED = [
    ("GET", "/v1/fleet/pull-messages"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/control/register-node"),
    ("POST", "/v1/control/stop-run"),
    ("POST", "/v1/runtime/pull-messages"),
    ("GET", "/health"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/fleet/"),
    ("POST", "/v1/fleet/pull-messages?x=1"),
    ("POST", "/v1/fleet/../control/start-run"),
    ("POST", "/v1/fleet/%2e%2e/control/start-run"),
    ("POST", "/v1/fleet/%2E%2E%2Fcontrol%2Fstart-run"),
    ("POST", "//v1/fleet/pull-messages"),
    ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
]


def test_proxy_forwards_fleet_calls_only(tmp_path, pki):
    with running_proxy(tmp_path, pki, pki) as (port, upstream):
        body = b"\x0a\x02\x08\x01"
        status, reply = _request(port, pki / "ca.crt", "POST", "/v1/fleet/pull-messages", body, AUTH_HEADERS)
        assert (status, reply) == (200, b"superlink")
        method, path, headers, got = upstream.seen[-1]
        assert (method, path, got) == ("POST", "/v1/fleet/pull-messages", body)
        lower = {k.lower(): v for k, v in headers.items()}
        for key, value in AUTH_HEADERS.items():
            assert lower.get(key) == value, f"{key} not forwarded unchanged"
        for method, path in REFUSED:
            status, _ = _request(port, pki / "ca.crt", method, path, b"x" if method == "POST" else b"")
            assert status == 403, f"{method} {path} -> {status}"
        assert len(upstream.seen) == 1, f"refused requests reached the SuperLink: {upstream.seen[1:]}"


def test_proxy_refuses_an_upstream_not_signed_by_the_federation_ca(tmp_path, pki):
    rogue = tmp_path / "rogue"
    create_certs(rogue, [], ["coordinator"])
    (tmp_path / "proxy").mkdir()
    with running_proxy(tmp_path / "proxy", pki, rogue) as (port, upstream):
        status, _ = _request(port, pki / "ca.crt", "POST", "/v1/fleet/pull-messages", b"x", AUTH_HEADERS)
        assert status == 502 and upstream.seen == []


@pytest.mark.slow  # a real SuperLink and SuperNode behind nginx
@pytest.mark.timeout(180)
def test_a_real_supernode_joins_through_the_proxy_and_control_stays_closed(tmp_path, pki):
    """Flower's own SuperNode (TLS + site key) goes online through the proxy; the Control API,
    open to anyone on the SuperLink's port, answers 403 through it."""
    from umeml.flower.processes import flower_env
    from umeml.flower.supernode import supernode_command
    from umeml.server.deploy import SuperLink, TLSFiles

    nginx = nginx_binary()
    link = SuperLink("127.0.0.1", free_port(), tmp_path / "flower", tmp_path / "superlink.log",
                     tls=TLSFiles(pki / "ca.crt", pki / "server.pem", pki / "server.key"), node_auth=True)
    (tmp_path / "nginx").mkdir()
    proxy_port = free_port()
    wrapper = proxy_config(tmp_path / "nginx", pki, proxy_port, link.port)
    (tmp_path / "site.yaml").write_text("site_id: hospA\n")
    procs = []
    try:
        link.start(site_keys=[pki / "sites" / "hospA.pub"])
        procs.append(subprocess.Popen([nginx, "-p", str(tmp_path / "nginx"), "-c", str(wrapper), "-e",
                                       str(tmp_path / "nginx" / "error.log"), "-g", "daemon off; master_process off;"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for_port("127.0.0.1", proxy_port, 30, procs[-1])
        cmd = supernode_command(f"127.0.0.1:{proxy_port}", free_port(), tmp_path / "site.yaml", pki / "ca.crt",
                                pki / "sites" / "hospA")
        procs.append(subprocess.Popen(cmd, env=flower_env(tmp_path / "supernode"), stdout=(tmp_path / "sn.log").open("wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        status = None
        for _ in range(60):
            res = link.flwr("supernode", "list", link.connection, "--format", "json")
            try:
                status = json.loads(res.stdout[res.stdout.index("{"):])["nodes"][0]["status"]
            except (ValueError, KeyError, IndexError):
                status = None
            if status == "online":
                break
            time.sleep(1)
        assert status == "online", (tmp_path / "sn.log").read_text()[-2000:]
        direct, _ = _request(link.port, pki / "ca.crt", "POST", "/v1/control/list-nodes", b"",
                             {"content-type": "application/protobuf"})
        assert direct == 200, "the SuperLink's Control API now checks callers: revisit docs/security.md section 4"
        proxied, _ = _request(proxy_port, pki / "ca.crt", "POST", "/v1/control/list-nodes", b"",
                              {"content-type": "application/protobuf"})
        assert proxied == 403
        log = (tmp_path / "nginx" / "access.log").read_text()
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in log, log
    finally:
        for proc in reversed(procs):
            stop_process(proc, grace=5)
        link.stop()
