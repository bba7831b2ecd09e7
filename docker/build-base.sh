#!/usr/bin/env bash
# Build a minimal local Debian base image (python3, python3-venv, ca-certificates) with
# debootstrap + `docker import`, for machines that reach Debian's package mirror but no
# container registry. Idempotent: does nothing when the image already exists.
#
#   docker/build-base.sh [TAG]            (default: mpcdp-base:bookworm)
#
# Environment:
#   MIRROR   Debian mirror for debootstrap (default: the one this machine's apt uses,
#            else http://deb.debian.org/debian)
#   SUITE    Debian suite (default: bookworm)
#   FORCE=1  rebuild even if the image exists
#
# Needs root (debootstrap) and a running Docker daemon. Takes about a minute.
set -euo pipefail

TAG="${1:-${BASE_TAG:-mpcdp-base:bookworm}}"
SUITE="${SUITE:-bookworm}"

log() { printf '[build-base] %s\n' "$*" >&2; }

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "image $TAG exists; nothing to do (FORCE=1 rebuilds)"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "debootstrap needs root; run as root (or pull python:3.11-slim and skip this step)"
  exit 1
fi

# The Debian mirror apt uses here: the URL of a Debian (o=Debian,l=Debian) "main" archive in
# `apt-cache policy`, else the first deb.debian.org-style line of the sources, else
# deb.debian.org.
detect_mirror() {
  local uri f
  uri="$(apt-cache policy 2>/dev/null | awk '
    $1 ~ /^[0-9]+$/ && $3 ~ /\/main$/ { url = $2; next }
    url != "" && /release / && /o=Debian,/ && /l=Debian,/ { print url; exit }
    { url = "" }')"
  if [ -z "$uri" ]; then
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -r "$f" ] || continue
      uri="$(sed -n -E \
        -e 's/^[[:space:]]*URIs:[[:space:]]*([^[:space:]]*debian\.org[^[:space:]]*\/debian\/?)([[:space:]].*)?$/\1/p' \
        -e 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]*debian\.org[^[:space:]]*\/debian\/?)[[:space:]].*$/\2/p' \
        "$f" | head -n 1)"
      [ -n "$uri" ] && break
    done
  fi
  uri="${uri:-http://deb.debian.org/debian}"
  printf '%s\n' "${uri%/}"
}
MIRROR="${MIRROR:-$(detect_mirror)}"

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null; }
fi

ROOTFS="$(mktemp -d /tmp/mpcdp-rootfs.XXXXXX)"
cleanup() { rm -rf --one-file-system "$ROOTFS"; }
trap cleanup EXIT

ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
log "debootstrap $SUITE ($ARCH) from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --arch="$ARCH" \
  --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"

# Slim it down: package lists, caches, docs, man pages, locales are not needed at run time.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
  "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/log/*.log \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/tmp/* 2>/dev/null || true
find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true
# apt inside the image keeps using the same mirror (and security updates from Debian).
cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
: >"$ROOTFS/etc/resolv.conf"
printf 'mpcdp-base\n' >"$ROOTFS/etc/hostname"

log "importing as $TAG"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates" \
  - "$TAG" >/dev/null
docker run --rm "$TAG" python3 -c 'import sys, venv, ssl; print("[build-base] python", sys.version.split()[0], "ok")' >&2
docker image ls "$TAG" >&2
