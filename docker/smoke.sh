#!/usr/bin/env bash
# End-to-end smoke test of the containers: a real three-party federation over mTLS in
# Docker, on one machine.
#
#   docker/smoke.sh [--no-train] [--keep]
#
# From a clean clone, as root on a Debian-like machine (no registry needed):
#   1. installs docker.io (and docker-compose v1 when there is no `docker compose`) if
#      missing, and starts dockerd if it is not running (it is left running);
#   2. builds the base image mpcdp-base:bookworm (docker/build-base.sh, debootstrap), unless
#      BASE_IMAGE names another one (e.g. BASE_IMAGE=python:3.11-slim with a registry);
#   3. builds the wheels and the images mpcdp:latest and mpcdp-train:latest
#      (docker/build-images.sh; --no-train skips the torch image and step 8);
#   4. makes the certificates (the compose `certs` job), starts alice, bob and carlos and
#      waits until each reports SERVING over mTLS;
#   5. runs an exact query (--mechanism none) and a DP query (epsilon 1) from the analyst
#      container, and checks the JSON (the exact mean equals the mean of all rows);
#   6. recreates bob's container and checks that its ledger (a named volume) kept the
#      epsilon the DP query charged, then runs one more DP query across all three;
#   7. tears the query federation down (`down -v`), also on failure (--keep leaves it up);
#   8. runs docker/smoke-train.sh: federated training across three training-site containers
#      and a coordinator container (compose profile "train"), a site restarted mid-run, the
#      run resumed from its checkpoint, accuracy and every site's ledger checked, `down -v`.
# Exits non-zero on any failure; prints the elapsed time at the end.
#
# Environment: BASE_IMAGE, MPCDP_IMAGE, MPCDP_TRAIN_IMAGE, SKIP_BUILD=1 (use the images as
# they are), SMOKE_PROJECT (compose project name, default mpcdp-smoke), HEALTH_TIMEOUT (s).
set -euo pipefail

SECONDS=0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

train=1
keep=0
for arg in "$@"; do
  case "$arg" in
    --no-train) train=0 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,27p' "$HERE/smoke.sh"; exit 0 ;;
    *) echo "smoke: unknown argument $arg" >&2; exit 2 ;;
  esac
done

export BASE_IMAGE="${BASE_IMAGE:-mpcdp-base:bookworm}"
export MPCDP_IMAGE="${MPCDP_IMAGE:-mpcdp:latest}"
export MPCDP_TRAIN_IMAGE="${MPCDP_TRAIN_IMAGE:-mpcdp-train:latest}"
PROJECT="${SMOKE_PROJECT:-mpcdp-smoke}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-120}"
PARTIES=(alice bob carlos)
FED=/config/federation.toml

step_t=0
step() { step_t=$SECONDS; printf '\n[smoke %4ds] == %s\n' "$SECONDS" "$*" >&2; }
log() { printf '[smoke %4ds] %s\n' "$SECONDS" "$*" >&2; }
done_step() { log "ok ($((SECONDS - step_t))s)"; }
die() { printf '[smoke %4ds] FAIL: %s\n' "$SECONDS" "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
    || { as_root apt-get update -q >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

# ---------------------------------------------------------------- 1. Docker engine, compose
step "docker engine and compose"
if ! command -v docker >/dev/null 2>&1 || ! { command -v dockerd >/dev/null 2>&1 || docker info >/dev/null 2>&1; }; then
  log "installing docker.io"
  apt_install docker.io
fi
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null 2>&1 || die "no docker daemon and no dockerd to start"
  log "starting dockerd (log: /tmp/mpcdp-dockerd.log)"
  as_root sh -c 'nohup setsid dockerd >/tmp/mpcdp-dockerd.log 2>&1 </dev/null &'
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -n 20 /tmp/mpcdp-dockerd.log >&2; die "dockerd did not come up"; }
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  if ! command -v docker-compose >/dev/null 2>&1; then
    log "installing docker-compose (no compose plugin)"
    apt_install docker-compose
  fi
  COMPOSE=(docker-compose)
fi
dc() { "${COMPOSE[@]}" --project-name "$PROJECT" --file "$HERE/compose.yaml" "$@"; }
log "server $(docker version -f '{{.Server.Version}}'), $("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n 1)"
done_step

# ---------------------------------------------------------------- 2.-3. images
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  step "images (SKIP_BUILD=1: using $MPCDP_IMAGE as it is)"
  docker image inspect "$MPCDP_IMAGE" >/dev/null || die "no image $MPCDP_IMAGE"
else
  if [ "$BASE_IMAGE" = mpcdp-base:bookworm ]; then
    step "base image $BASE_IMAGE (debootstrap, skipped if present)"
    "$HERE/build-base.sh" "$BASE_IMAGE"
    done_step
  fi
  step "wheels and party/analyst image $MPCDP_IMAGE (base $BASE_IMAGE)"
  "$HERE/build-images.sh" --base "$BASE_IMAGE"
  done_step
  if [ "$train" = 1 ]; then
    step "training-site image $MPCDP_TRAIN_IMAGE (torch)"
    "$HERE/build-images.sh" --no-party --train --base "$BASE_IMAGE"
    docker run --rm --entrypoint python "$MPCDP_TRAIN_IMAGE" -c \
      'import torch, mpcdp; x = torch.ones(3); print("[smoke] train image: torch", torch.__version__, "mpcdp", mpcdp.__version__, "sum", float(x.sum()))' >&2
    done_step
  fi
fi
step "image sanity: non-root, no keys inside"
user="$(docker run --rm --entrypoint id "$MPCDP_IMAGE" -u)"
[ "$user" != 0 ] || die "image runs as root"
keys="$(docker run --rm --entrypoint find "$MPCDP_IMAGE" /certs /ledger /config /home/mpcdp \
  -mindepth 1 \( -name '*.key' -o -name '*.pem' -o -name '*.sqlite*' -o -path '/c*' \))"
[ -z "$keys" ] || die "image has keys, certificates, ledgers or config: $keys"
docker run --rm "$MPCDP_IMAGE" --version >&2
done_step

# ---------------------------------------------------------------- teardown (also on failure)
on_exit() {
  rc=$?
  trap - EXIT INT TERM
  rm -f "${SMOKE_STATE:-}"
  if [ "$rc" != 0 ]; then
    printf '\n[smoke %4ds] failed (exit %s); container logs:\n' "$SECONDS" "$rc" >&2
    dc --profile analyst logs --no-color --tail 40 >&2 2>&1 || true
  fi
  if [ "$keep" = 1 ]; then
    log "--keep: leaving project $PROJECT up (docker compose -p $PROJECT -f $HERE/compose.yaml down -v)"
  else
    printf '\n[smoke %4ds] == teardown: down -v\n' "$SECONDS" >&2
    dc --profile analyst down -v --remove-orphans >/dev/null 2>&1 || dc down -v --remove-orphans >&2 || true
  fi
  if [ "$rc" = 0 ]; then
    printf '[smoke] PASS in %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60)) >&2
  else
    printf '[smoke] FAIL after %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60)) >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 4. certs, federation up
step "clean slate for project $PROJECT"
dc --profile analyst down -v --remove-orphans >/dev/null 2>&1 || true
done_step

step "certificates (certs job)"
dc run --rm --no-deps -T certs >&2 || die "certs job failed"
dc run --rm --no-deps -T --entrypoint sh certs -c \
  'cd /certs && ls -l && test -f ca.pem && test -f analyst.key && for p in alice bob carlos; do test -f $p.pem && test -f $p.key || exit 1; done' >&2 \
  || die "certs job did not write ca.pem and a certificate and key per name"
done_step

container() { dc ps -q "$1"; }
wait_healthy() {  # service...
  local deadline=$((SECONDS + HEALTH_TIMEOUT)) s id state health pending
  while :; do
    pending=()
    for s in "$@"; do
      id="$(container "$s")"
      [ -n "$id" ] || die "no container for $s"
      state="$(docker inspect -f '{{.State.Status}}' "$id")"
      health="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")"
      case "$state/$health" in
        running/healthy) ;;
        running/unhealthy) docker logs --tail 30 "$id" >&2; die "$s is unhealthy" ;;
        running/*) pending+=("$s") ;;
        *) docker logs --tail 30 "$id" >&2; die "$s is $state" ;;
      esac
    done
    [ ${#pending[@]} = 0 ] && return 0
    if [ "$SECONDS" -ge "$deadline" ]; then
      for s in "${pending[@]}"; do
        id="$(container "$s")"
        docker inspect -f '{{range .State.Health.Log}}{{.ExitCode}}: {{.Output}}{{end}}' "$id" | tail -n 5 >&2
        docker logs --tail 30 "$id" >&2
      done
      die "not healthy after ${HEALTH_TIMEOUT}s: ${pending[*]}"
    fi
    sleep 1
  done
}

step "create each ledger once, on purpose (mpcdp party init, in its own ledger volume)"
# `party serve` never creates a ledger: a missing or empty one stops the node
for p in "${PARTIES[@]}"; do
  dc run --rm --no-deps -T "$p" party init --config /config/party.toml >&2 \
    || die "mpcdp party init in $p"
done
done_step

step "start ${PARTIES[*]} and wait for SERVING over mTLS"
dc up -d "${PARTIES[@]}" >&2
wait_healthy "${PARTIES[@]}"
dc ps >&2
done_step

# ---------------------------------------------------------------- 5. queries
TRUE_MEAN="$(python3 - "$HERE"/federation/{alice,bob,carlos}/raises.csv <<'EOF'
import csv, sys
rows = [float(r["raise"]) for f in sys.argv[1:] for r in csv.DictReader(open(f))]
print(repr(sum(rows) / len(rows)))
EOF
)"
BUDGET=3.0  # datasets.raises.epsilon in every party.toml
SMOKE_STATE="$(mktemp /tmp/mpcdp-smoke.XXXXXX)"
export TRUE_MEAN BUDGET SMOKE_STATE

analyst() {  # mpcdp arguments; prints what the analyst container wrote to stdout
  local out
  out="$(dc run --rm -T analyst "$@")" || { printf '%s\n' "$out" >&2; die "analyst: mpcdp $*"; }
  printf '%s\n' "$out"
}
# check NAME OUTPUT <<'EOF' ... EOF: runs the Python on stdin with `doc` = the JSON document
# in OUTPUT (the whole of it, else its last line that starts with '{'), `env` = os.environ
# and helpers; a failed assert (or any exception) fails the smoke test.
CHECK_PRELUDE='
import json, math, os, sys
raw = os.environ["SMOKE_DOC"]
try:
    doc = json.loads(raw)
except ValueError:
    lines = [l for l in raw.splitlines() if l.lstrip().startswith("{")]
    if not lines:
        sys.exit("no JSON in the output:\n" + raw)
    doc = json.loads(lines[-1])
def close(a, b, tol=1e-6):
    return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
def n_parties(d):
    p = d["parties"]
    return p if isinstance(p, int) else len(p)
def say(msg):
    print("[smoke] " + msg, file=sys.stderr)
env = os.environ
'
check() {
  local name="$1"
  SMOKE_DOC="$2" python3 -c "$CHECK_PRELUDE$(cat)" || die "check failed: $name"
}

step "exact query (mechanism none) across the containers"
exact="$(analyst query mean --federation "$FED" --dataset raises --column raise --epsilon 1 --mechanism none --json)"
log "result: $exact"
check "exact mean" "$exact" <<'EOF'
true_mean = float(env["TRUE_MEAN"])
assert close(doc["value"], true_mean, 1e-9), f"exact mean {doc['value']} != true mean {true_mean}"
assert close(doc["epsilon_spent"], 0), f"the exact query charged epsilon {doc['epsilon_spent']}"
assert n_parties(doc) == 3, f"parties: {doc['parties']}"
rem = doc["budget_remaining"]
assert sorted(rem) == ["alice", "bob", "carlos"], rem
assert all(close(v, env["BUDGET"]) for v in rem.values()), f"budget_remaining {rem}"
say(f"exact mean {doc['value']} == true mean {true_mean}")
EOF
done_step

step "DP query (distributed discrete Laplace, epsilon 1) across the containers"
dp="$(analyst)"  # the analyst service's own command: query mean ... --epsilon 1 --json
log "result: $dp"
check "DP mean" "$dp" <<'EOF'
v = float(doc["value"])
assert math.isfinite(v), doc
assert close(doc["epsilon_spent"], 1.0), f"epsilon_spent {doc['epsilon_spent']} != 1"
assert float(doc["noise_scale"]) > 0, f"noise_scale {doc['noise_scale']}"
assert n_parties(doc) == 3, f"parties: {doc['parties']}"
rem = doc["budget_remaining"]
left = float(env["BUDGET"]) - float(doc["epsilon_spent"])
assert sorted(rem) == ["alice", "bob", "carlos"], rem
assert all(close(r, left) for r in rem.values()), f"budget_remaining {rem}, expected {left} each"
say(f"DP mean {v:.2f} (true {float(env['TRUE_MEAN']):.2f}, noise scale {float(doc['noise_scale']):.2f}); remaining {rem}")
# for the next steps
print(repr(float(doc["epsilon_spent"])), file=open(env["SMOKE_STATE"], "w"))
EOF
DP_SPENT="$(cat "$SMOKE_STATE")"
export DP_SPENT
done_step

# ---------------------------------------------------------------- 6. restart: budget persists
step "recreate bob's container (same ledger volume) and read its budget"
old_id="$(container bob)"
dc stop bob >&2
dc rm -f bob >&2
dc up -d --no-deps bob >&2
new_id="$(container bob)"
[ -n "$new_id" ] && [ "$new_id" != "$old_id" ] || die "bob was not recreated ($old_id -> $new_id)"
log "bob: container ${old_id:0:12} -> ${new_id:0:12}"
wait_healthy bob
budget="$(dc exec -T bob mpcdp budget --config /config/party.toml --json)" || die "mpcdp budget in bob"
log "bob's ledger: $budget"
check "bob's budget after the restart" "$budget" <<'EOF'
assert doc["party"] == "bob", doc
d = doc["datasets"]["raises"]
spent = float(env["DP_SPENT"])
assert close(d["budget_epsilon"], env["BUDGET"]), d
assert close(d["spent_epsilon"], spent), f"spent {d['spent_epsilon']} != charged {spent}"
assert close(d["remaining_epsilon"], float(env["BUDGET"]) - spent), d
exact = int(d.get("exact_queries", d.get("exact_releases", 0)))  # renamed in mpcdp budget
assert exact >= 1, f"the exact release is not in the ledger: {d}"
say(f"bob after the restart: spent {d['spent_epsilon']} of {d['budget_epsilon']}, "
    f"{d['queries']} queries, {exact} exact release(s)")
EOF
done_step

step "DP query after the restart (epsilon 0.5): the federation works and the ledgers add up"
dp2="$(analyst query mean --federation "$FED" --dataset raises --column raise --epsilon 0.5 --json)"
log "result: $dp2"
check "DP mean after the restart" "$dp2" <<'EOF'
assert close(doc["epsilon_spent"], 0.5), doc
left = float(env["BUDGET"]) - float(env["DP_SPENT"]) - 0.5
rem = doc["budget_remaining"]
assert sorted(rem) == ["alice", "bob", "carlos"], rem
assert all(close(r, left) for r in rem.values()), f"budget_remaining {rem}, expected {left} each"
say(f"remaining after both DP queries: {rem}")
EOF
done_step

# ---------------------------------------------------------------- 7.-8. training across containers
if [ "$train" = 1 ]; then
  step "down -v the query federation, then training across containers (docker/smoke-train.sh)"
  if [ "$keep" = 1 ]; then
    log "--keep: leaving project $PROJECT up"
    train_args=(--keep)
  else
    dc --profile analyst down -v --remove-orphans >/dev/null 2>&1 || true
    train_args=()
  fi
  SKIP_BUILD=1 "$HERE/smoke-train.sh" "${train_args[@]}" || die "docker/smoke-train.sh failed"
  done_step
fi
