#!/usr/bin/env bash
# Build the mpcdp images from wheels made on this host (no package index needed inside the
# build, so it works where containers reach no registry).
#
#   docker/build-images.sh [--train] [--no-party] [--base IMAGE]
#
#   --train       also build the training-site image (mpcdp[train], torch)
#   --no-party    skip the party/analyst image
#   --base IMAGE  base image (default: $BASE_IMAGE, else python:3.11-slim); e.g.
#                 mpcdp-base:bookworm from docker/build-base.sh
#
# Environment: MPCDP_IMAGE (default mpcdp:latest), MPCDP_TRAIN_IMAGE (default
# mpcdp-train:latest), TORCH_VERSION (default 2.13.0; on x86_64 the CPU wheel of that release
# lies on this machine's disk and pip takes it), PYTHON (host python with pip, default python3).
#
# Steps: (1) ask the base image for its Python version, glibc and machine, (2) build the mpcdp
# wheel from this checkout, (3) `pip download` every dependency as binary wheels for that
# target into docker/build/{party,train}/wheels/, (4) `docker build` with that folder as the
# context.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
BUILD="$HERE/build"
BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
MPCDP_IMAGE="${MPCDP_IMAGE:-mpcdp:latest}"
MPCDP_TRAIN_IMAGE="${MPCDP_TRAIN_IMAGE:-mpcdp-train:latest}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
party=1
train=0
while [ $# -gt 0 ]; do
  case "$1" in
    --train) train=1 ;;
    --no-party) party=0 ;;
    --base) BASE_IMAGE="$2"; shift ;;
    --base=*) BASE_IMAGE="${1#--base=}" ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[build-images] %s\n' "$*" >&2; }
now() { date +%s; }

# (1) The target: Python X.Y, glibc and machine of the base image.
read -r PY_VERSION GLIBC MACHINE < <(docker run --rm --entrypoint python3 "$BASE_IMAGE" -c \
  'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.libc_ver()[1] or "2.17", platform.machine())')
log "base $BASE_IMAGE: python $PY_VERSION, glibc $GLIBC, $MACHINE"
PY_TAG="cp${PY_VERSION/./}"
glibc_minor="${GLIBC#2.}"; glibc_minor="${glibc_minor%%.*}"
pip_target=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
  --abi "$PY_TAG" --abi abi3 --abi none)
# Old pips do not expand manylinux_2_X to the older tags it accepts: list them all.
for ((v = glibc_minor; v >= 17; v--)); do pip_target+=(--platform "manylinux_2_${v}_${MACHINE}"); done
pip_target+=(--platform "manylinux2014_${MACHINE}")
if [ "$MACHINE" = x86_64 ]; then
  pip_target+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)
fi

pip_q() { "$PYTHON" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

# (2) The mpcdp wheel from this checkout.
t0=$(now)
rm -rf "$BUILD/dist"
mkdir -p "$BUILD/dist"
pip_q wheel --no-deps --wheel-dir "$BUILD/dist" "$REPO"
WHEEL="$(ls "$BUILD"/dist/mpcdp-*.whl)"
log "built $(basename "$WHEEL") in $(($(now) - t0))s"

# (3) + (4)
build_one() {  # name dockerfile tag requirement...
  local name="$1" dockerfile="$2" tag="$3"; shift 3
  local ctx="$BUILD/$name" t
  t=$(now)
  rm -rf "$ctx"
  mkdir -p "$ctx/wheels"
  cp "$WHEEL" "$ctx/wheels/"
  pip_q download --dest "$ctx/wheels" "${pip_target[@]}" "$@"
  log "$name: $(ls "$ctx/wheels" | wc -l) wheels, $(du -sh "$ctx/wheels" | cut -f1), in $(($(now) - t))s"
  t=$(now)
  docker build --file "$HERE/$dockerfile" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --tag "$tag" "$ctx" >"$ctx.log" 2>&1 \
    || { tail -n 40 "$ctx.log" >&2; log "$name: docker build failed (whole log: $ctx.log)"; exit 1; }
  log "$name: built $tag in $(($(now) - t))s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

if [ "$party" = 1 ]; then
  build_one party Dockerfile "$MPCDP_IMAGE" "$WHEEL"
fi
if [ "$train" = 1 ]; then
  build_one train Dockerfile.train "$MPCDP_TRAIN_IMAGE" "${WHEEL}[train]" "torch==$TORCH_VERSION"
fi
