#!/usr/bin/env bash
# Installs what building and testing fedmesh needs on Debian, if missing:
# protobuf-compiler and libprotobuf-dev (protoc and its well-known types,
# for etcd-client's build and our proto bootstrap test), etcd-server (a real etcd for the registry tests), etcd-client
# (etcdctl, used by tests to write "by hand"), openssl (s_client through the
# gateway), dnsmasq-base (a real DNS server for the gateway's resolver
# test), iproute2, iptables, curl and python3 (the agent's transparent-capture test:
# REDIRECT inside a network namespace it creates), buildah, skopeo and
# busybox-static (the container images, scripts/images.sh, and their tests:
# buildah builds and mounts them, skopeo reads the OCI archives, busybox is
# the agent image's shell for the capture init container). Idempotent.
set -euo pipefail

need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto, imported by etcd's
# protos) are in libprotobuf-dev, only a recommendation of protobuf-compiler.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need+=(iptables)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
# The static busybox (ldd refuses it: "not a dynamic executable").
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)

if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "deps.sh: need root or sudo to install: ${need[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "deps.sh: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian's etcd-server package starts a system etcd on 2379; tests use their own.
  if command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps.sh: cargo not found: install the Rust toolchain (rustup) first" >&2
  exit 1
fi

# rotel: a real OTLP collector for the tracing test (mesh-agent/tests/tracing.rs),
# which prints every span it receives. The binary from PyPI's `rotel` wheel
# is kept at .deps/rotel-agent (the test also honours $ROTEL_AGENT).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rotel="$root/.deps/rotel-agent"
if [ ! -x "$rotel" ]; then
  command -v pip >/dev/null 2>&1 || command -v pip3 >/dev/null 2>&1 || { echo "deps.sh: pip is needed to fetch rotel" >&2; exit 1; }
  pip=$(command -v pip || command -v pip3)
  tmp="$(mktemp -d)"
  echo "deps.sh: fetching rotel (OTLP collector) into $rotel" >&2
  "$pip" download --quiet --no-deps rotel -d "$tmp"
  whl=$(ls "$tmp"/rotel-*.whl | head -n1)
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("rotel/rotel-agent", sys.argv[2])' "$whl" "$tmp"
  mkdir -p "$root/.deps"
  install -m 0755 "$tmp/rotel/rotel-agent" "$rotel"
  rm -rf "$tmp"
fi
