#!/usr/bin/env bash
# Create the key material of deploy/compose.yaml with `umeml-server certs` (docs/security.md):
#   ca.crt / ca.key          the federation's private CA (ca.key: keep it offline)
#   server.pem / server.key  the SuperLink's certificate, also used by the reverse proxy; it names
#                            PUBLIC_HOST (what the sites dial), the coordinator's internal service
#                            name (what the proxy dials) and loopback
#   sites/<site>{,.pub}      one OpenSSH EC P-384 key pair per site (the .pub is registered)
# Private keys are written with mode 0600. Existing material is never replaced without --force.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/make-pki.sh [options] PUBLIC_HOST

  PUBLIC_HOST            the host name (or IP address) sites dial to reach the reverse proxy,
                         e.g. fl.example.org (FL_PUBLIC_HOST in deploy/compose.yaml)
options:
  --out DIR              where to write (default: deploy/pki next to this script)
  --sites A,B,...        site ids, one key pair each (default: hospA,hospB,hospC)
  --internal-name NAME   the coordinator's name on the internal network (default: coordinator)
  --force                replace existing key material (a new CA: every site needs the new ca.crt)
  -h, --help             this help

Needs `umeml-server` (pip install umeml) on PATH, or its path in UMEML_SERVER.
EOF
}

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
out="$script_dir/pki"
sites="hospA,hospB,hospC"
internal="coordinator"
force=0
public=""

while (($# > 0)); do
    case "$1" in
        --out) out=${2:?--out needs a folder}; shift ;;
        --out=*) out=${1#--out=} ;;
        --sites) sites=${2:?--sites needs a comma-separated list}; shift ;;
        --sites=*) sites=${1#--sites=} ;;
        --internal-name) internal=${2:?--internal-name needs a name}; shift ;;
        --internal-name=*) internal=${1#--internal-name=} ;;
        --force) force=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n "$public" ]]; then
                echo "error: one PUBLIC_HOST only (got '$public' and '$1')" >&2
                exit 2
            fi
            public=$1
            ;;
    esac
    shift
done

if [[ -z "$public" ]]; then
    echo "error: PUBLIC_HOST missing" >&2
    usage >&2
    exit 2
fi

umeml_server=${UMEML_SERVER:-umeml-server}
if ! command -v "$umeml_server" >/dev/null 2>&1; then
    echo "error: $umeml_server not found: activate the environment where umeml is installed" >&2
    exit 2
fi

existing=()
for f in ca.crt ca.key server.pem server.key; do
    if [[ -e "$out/$f" ]]; then
        existing+=("$out/$f")
    fi
done
if [[ -d "$out/sites" ]] && [[ -n "$(ls -A -- "$out/sites")" ]]; then
    existing+=("$out/sites/")
fi
if ((${#existing[@]} > 0 && force == 0)); then
    echo "error: refusing to overwrite existing key material (pass --force to replace it): ${existing[*]}" >&2
    exit 1
fi

# files and folders readable by their owner only; umeml-server certs makes ca.crt, server.pem and
# the .pub files 0644 itself
umask 077
args=(certs --out "$out" --sites "$sites" --host "$public" --host "$internal")
if ((force == 1)); then
    args+=(--force)
fi
"$umeml_server" "${args[@]}"

cat <<EOF

Next:
  - coordinator host: deploy/compose.yaml mounts $out (server.pem/.key, ca.crt, sites/*.pub);
    move ca.key offline (it is needed only to issue a new server certificate).
  - each site gets ca.crt and its own sites/<site> private key, nothing else.
  - the site containers run as UMEML_UID: build the images with UMEML_UID=\$(id -u) UMEML_GID=\$(id -g)
    so the 0600 keys stay readable to them (docs/deployment.md).
EOF
