#!/usr/bin/env bash
# End-to-end smoke test of federated training across containers: three training-site
# containers and a coordinator container (compose profile "train"), mTLS between them.
#
#   docker/smoke-train.sh [--keep]        (docker/smoke.sh runs it last, unless --no-train)
#
# As root, with a running Docker engine and compose (docker/smoke.sh installs them):
#   1. builds mpcdp-base:bookworm (unless BASE_IMAGE names another) and mpcdp-train:latest
#      (docker/build-images.sh --train); SKIP_BUILD=1 uses the image as it is;
#   2. starts site-alice, site-bob, site-carlos (the train-certs and train-data jobs run
#      first) and waits until each reports SERVING over mTLS; checks that each site sees only
#      its own examples, read-only;
#   3. starts the coordinator (mpcdp train: MLP 64-32-10, epsilon 2, 4 epochs, checkpoint
#      every epoch); as soon as the first checkpoint appears it freezes site-bob
#      (docker pause) and restarts it (docker restart: the process dies mid-step), and checks
#      that the coordinator's run failed with the checkpoint short of the last step;
#   4. waits until site-bob serves again and reruns the coordinator: it must resume the same
#      run from the checkpoint ("resuming run ... at step ..."), finish every step, and its
#      metrics (JSON on stdout and /train/metrics.json in the train-run volume) must cover
#      every epoch with a final test accuracy above MIN_ACCURACY (default 0.5; chance 0.1);
#   5. checks every site's ledger (`mpcdp budget --json` inside the site container): the run
#      was charged at each site, in two sessions, for at least the run's epsilon;
#   6. tears everything down (`down -v`), also on failure (--keep leaves it up).
# Exits non-zero on any failure; prints the elapsed time at the end.
#
# Environment: BASE_IMAGE, MPCDP_TRAIN_IMAGE, SKIP_BUILD=1, SMOKE_TRAIN_PROJECT (compose
# project, default mpcdp-smoke-train), HEALTH_TIMEOUT (s, default 180), MIN_ACCURACY.
set -euo pipefail

SECONDS=0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

keep=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    -h|--help) sed -n '2,28p' "$HERE/smoke-train.sh"; exit 0 ;;
    *) echo "smoke-train: unknown argument $arg" >&2; exit 2 ;;
  esac
done

export BASE_IMAGE="${BASE_IMAGE:-mpcdp-base:bookworm}"
export MPCDP_TRAIN_IMAGE="${MPCDP_TRAIN_IMAGE:-mpcdp-train:latest}"
PROJECT="${SMOKE_TRAIN_PROJECT:-mpcdp-smoke-train}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-180}"
MIN_ACCURACY="${MIN_ACCURACY:-0.5}"
SITES=(site-alice site-bob site-carlos)
RESTARTED=site-bob
export MIN_ACCURACY RESTARTED

step_t=0
step() { step_t=$SECONDS; printf '\n[smoke-train %4ds] == %s\n' "$SECONDS" "$*" >&2; }
log() { printf '[smoke-train %4ds] %s\n' "$SECONDS" "$*" >&2; }
done_step() { log "ok ($((SECONDS - step_t))s)"; }
die() { printf '[smoke-train %4ds] FAIL: %s\n' "$SECONDS" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- engine, compose
docker info >/dev/null 2>&1 || die "no Docker engine (docker/smoke.sh installs and starts one)"
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  die "neither 'docker compose' nor docker-compose (docker/smoke.sh installs one)"
fi
dc() { "${COMPOSE[@]}" --project-name "$PROJECT" --file "$HERE/compose.yaml" --profile train "$@"; }

# ---------------------------------------------------------------- 1. image
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  step "image (SKIP_BUILD=1: using $MPCDP_TRAIN_IMAGE as it is)"
  docker image inspect "$MPCDP_TRAIN_IMAGE" >/dev/null || die "no image $MPCDP_TRAIN_IMAGE"
else
  if [ "$BASE_IMAGE" = mpcdp-base:bookworm ]; then
    step "base image $BASE_IMAGE (debootstrap, skipped if present)"
    "$HERE/build-base.sh" "$BASE_IMAGE"
    done_step
  fi
  step "training-site image $MPCDP_TRAIN_IMAGE (torch, base $BASE_IMAGE)"
  "$HERE/build-images.sh" --no-party --train --base "$BASE_IMAGE"
fi
done_step

# ---------------------------------------------------------------- teardown (also on failure)
on_exit() {
  rc=$?
  trap - EXIT INT TERM
  rm -f "${SMOKE_TMP:-/nonexistent}"/* 2>/dev/null; rmdir "${SMOKE_TMP:-/nonexistent}" 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    printf '\n[smoke-train %4ds] failed (exit %s); container logs:\n' "$SECONDS" "$rc" >&2
    docker unpause "$(dc ps -q "$RESTARTED" 2>/dev/null)" >/dev/null 2>&1 || true
    dc logs --no-color --tail 40 >&2 2>&1 || true
  fi
  if [ "$keep" = 1 ]; then
    log "--keep: leaving project $PROJECT up (docker compose -p $PROJECT -f $HERE/compose.yaml --profile train down -v)"
  else
    printf '\n[smoke-train %4ds] == teardown: down -v\n' "$SECONDS" >&2
    dc down -v --remove-orphans >/dev/null 2>&1 || dc down -v --remove-orphans >&2 || true
  fi
  if [ "$rc" = 0 ]; then
    printf '[smoke-train] PASS in %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60)) >&2
  else
    printf '[smoke-train] FAIL after %dm%02ds\n' $((SECONDS / 60)) $((SECONDS % 60)) >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM
SMOKE_TMP="$(mktemp -d /tmp/mpcdp-smoke-train.XXXXXX)"

# check NAME <<'EOF' ... EOF: runs the Python on stdin with `docs` = the JSON documents in
# the files named by SMOKE_DOCS (name=path, space-separated; for each, the whole file, else
# its last line that starts with '{'), `env` = os.environ and `say`; a failed assert (or any
# exception) fails the smoke test.
CHECK_PRELUDE='
import json, math, os, sys
def load(path):
    raw = open(path).read()
    try:
        return json.loads(raw)
    except ValueError:
        lines = [l for l in raw.splitlines() if l.lstrip().startswith("{")]
        if not lines:
            sys.exit(f"no JSON in {path}:\n" + raw[-2000:])
        return json.loads(lines[-1])
docs = {k: load(v) for k, v in (kv.split("=", 1) for kv in os.environ["SMOKE_DOCS"].split())}
env = os.environ
def say(msg):
    print("[smoke-train] " + msg, file=sys.stderr)
'
check() {  # name name=path...
  local name="$1"; shift
  SMOKE_DOCS="$*" python3 -c "$CHECK_PRELUDE$(cat)" || die "check failed: $name"
}

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
        running/*|restarting/*) pending+=("$s") ;;
        *) docker logs --tail 30 "$id" >&2; die "$s is $state" ;;
      esac
    done
    [ ${#pending[@]} = 0 ] && return 0
    if [ "$SECONDS" -ge "$deadline" ]; then
      for s in "${pending[@]}"; do docker logs --tail 30 "$(container "$s")" >&2; done
      die "not healthy after ${HEALTH_TIMEOUT}s: ${pending[*]}"
    fi
    sleep 1
  done
}
# a file in the coordinator's train-run volume: read on the host when the volume's folder is
# readable here (the local driver, as root: no delay), else through a container
RUN_DIR="$(docker volume inspect -f '{{.Mountpoint}}' "${PROJECT}_train-run" 2>/dev/null || true)"
run_file_exists() {  # name
  if [ -n "$RUN_DIR" ] && [ -r "$RUN_DIR" ]; then
    [ -f "$RUN_DIR/$1" ]
  else
    dc run --rm --no-deps -T --entrypoint test coordinator -f "/train/$1" >/dev/null 2>&1
  fi
}
# the checkpoint's run id, step and plan (torch's weights-only loader, as the coordinator)
read_checkpoint() {
  dc run --rm --no-deps -T --entrypoint python coordinator -c '
import json, torch
s = torch.load("/train/checkpoint.pt", weights_only=True, map_location="cpu")
p = s["plan"]
print(json.dumps({"run_id": s["run_id"], "step": int(s["step"]), "steps": int(p["steps"]),
                  "steps_per_epoch": int(p["steps_per_epoch"]),
                  "epochs": [r["epoch"] for r in s["history"]]}))'
}

# ---------------------------------------------------------------- 2. sites up
step "clean slate for project $PROJECT"
dc down -v --remove-orphans >/dev/null 2>&1 || true
done_step

step "create each ledger once, on purpose (mpcdp party init, in its own ledger volume)"
# `party serve` never creates a ledger: a missing or empty one stops the node
for p in "${SITES[@]}"; do
  dc run --rm --no-deps -T "$p" party init --config /config/party.toml >&2 \
    || die "mpcdp party init in $p"
done
done_step

step "start ${SITES[*]} (after the train-certs and train-data jobs) and wait for SERVING over mTLS"
dc up -d "${SITES[@]}" >&2
RUN_DIR="$(docker volume inspect -f '{{.Mountpoint}}' "${PROJECT}_train-run" 2>/dev/null || true)"
[ -n "$RUN_DIR" ] || {
  dc run --rm --no-deps -T --entrypoint true coordinator >/dev/null 2>&1 || true  # creates it
  RUN_DIR="$(docker volume inspect -f '{{.Mountpoint}}' "${PROJECT}_train-run" 2>/dev/null || true)"
}
wait_healthy "${SITES[@]}"
dc ps >&2
done_step

step "each site sees its own examples only, read-only"
for s in "${SITES[@]}"; do
  files="$(dc exec -T "$s" sh -c 'cd /data && ls -A')" || die "ls /data in $s"
  [ "$files" = digits.npz ] || die "$s: /data holds '$files', expected digits.npz alone"
  if dc exec -T "$s" sh -c 'touch /data/x' >/dev/null 2>&1; then die "$s can write to /data"; fi
  n="$(dc exec -T "$s" python -c 'import numpy as np; d = np.load("/data/digits.npz"); print(len(d["y"]), d["x"].shape[1], int(d["y"].max()) + 1)')"
  log "$s: /data/digits.npz (read-only): examples, features, classes = $n"
done
done_step

# ---------------------------------------------------------------- 3. run 1, restart mid-run
step "coordinator run 1; restart $RESTARTED as soon as the first checkpoint is written"
run1="$(dc run -d coordinator)" || die "could not start the coordinator"
run1="$(printf '%s\n' "$run1" | tail -n 1)"
log "coordinator container: $run1 (run files in ${RUN_DIR:-the train-run volume})"
deadline=$((SECONDS + 300))
bob_id="$(container "$RESTARTED")"
i=0
until run_file_exists checkpoint.pt; do
  if [ $((i++ % 20)) = 0 ]; then  # about once a second: a docker call takes a while
    [ "$(docker inspect -f '{{.State.Running}}' "$run1")" = true ] \
      || { docker logs --tail 30 "$run1" >&2; die "the coordinator exited before its first checkpoint"; }
    [ "$SECONDS" -lt "$deadline" ] || die "no checkpoint after 300s"
  fi
  sleep 0.05
done
t_seen="$(date +%s.%N)"
docker pause "$bob_id" >/dev/null  # frozen at once: the run cannot finish past it
log "first checkpoint seen; $RESTARTED frozen $(python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.2f}')" "$t_seen")s later"
still="$(docker inspect -f '{{.State.Running}}' "$run1")"
started_before="$(docker inspect -f '{{.State.StartedAt}}' "$bob_id")"
[ "$still" = true ] \
  || die "the coordinator had finished before $RESTARTED was frozen (the run is too short to restart a site mid-run)"
log "checkpoint written; $RESTARTED frozen while the coordinator is training; restarting it"
docker restart -t 15 "$bob_id" >/dev/null
started_after="$(docker inspect -f '{{.State.StartedAt}}' "$bob_id")"
[ "$started_after" != "$started_before" ] || die "$RESTARTED was not restarted"
log "$RESTARTED restarted (started $started_before -> $started_after)"
rc1="$(timeout 180 docker wait "$run1")" || die "the coordinator did not stop within 180s of the restart"
docker logs "$run1" >"$SMOKE_TMP/run1.out" 2>"$SMOKE_TMP/run1.err" || true
docker rm "$run1" >/dev/null 2>&1 || true
log "coordinator run 1 exited with $rc1: $(grep -i 'error' "$SMOKE_TMP/run1.err" | tail -n 1)"
[ "$rc1" != 0 ] || die "the coordinator finished although $RESTARTED restarted mid-run"
read_checkpoint >"$SMOKE_TMP/ckpt.json" || die "cannot read the checkpoint"
log "checkpoint after run 1: $(cat "$SMOKE_TMP/ckpt.json")"
check "the checkpoint is mid-run" ckpt="$SMOKE_TMP/ckpt.json" <<'EOF'
c = docs["ckpt"]
assert 0 < c["step"] < c["steps"], f"checkpoint at step {c['step']} of {c['steps']}: not mid-run"
assert c["step"] % c["steps_per_epoch"] == 0, c
say(f"run {c['run_id']} stopped with its checkpoint at step {c['step']} of {c['steps']} "
    f"(epochs {c['epochs']})")
EOF
done_step

# ---------------------------------------------------------------- 4. run 2 resumes
step "wait for $RESTARTED, then rerun the coordinator: it resumes from the checkpoint"
wait_healthy "${SITES[@]}"
dc run --rm -T coordinator >"$SMOKE_TMP/run2.out" 2>"$SMOKE_TMP/run2.err" \
  || { tail -n 30 "$SMOKE_TMP/run2.err" >&2; die "coordinator run 2 failed"; }
grep -E 'resuming run' "$SMOKE_TMP/run2.err" >&2 || { tail -n 30 "$SMOKE_TMP/run2.err" >&2; die "run 2 did not log a resume"; }
grep -E '^epoch' "$SMOKE_TMP/run2.err" "$SMOKE_TMP/run2.out" >&2 || true
dc run --rm --no-deps -T --entrypoint cat coordinator /train/metrics.json >"$SMOKE_TMP/metrics.json" \
  || die "no /train/metrics.json in the train-run volume"
dc run --rm --no-deps -T --entrypoint test coordinator -s /train/metrics.png \
  || die "no /train/metrics.png in the train-run volume"
export RUN2_ERR="$SMOKE_TMP/run2.err"
check "run 2 resumed and finished" ckpt="$SMOKE_TMP/ckpt.json" out="$SMOKE_TMP/run2.out" \
  metrics="$SMOKE_TMP/metrics.json" <<'EOF'
import re
c, r, m = docs["ckpt"], docs["out"], docs["metrics"]
# "resuming run RUN from PATH at step N of M" (mpcdp train) or, with -v, the log line
# "resuming run RUN at step N of M"
resumed = re.findall(r"resuming run (\S+)(?: from \S+)? at step (\d+)", open(env["RUN2_ERR"]).read())
assert resumed, "run 2 printed no 'resuming run ...'"
assert set(resumed) == {(c["run_id"], str(c["step"]))}, (resumed, c)
for name, d in (("stdout", r), ("metrics.json", m)):
    assert d["run_id"] == c["run_id"], f"{name}: run {d['run_id']}, checkpoint {c['run_id']}"
    p = d["plan"]
    assert d["steps_done"] == p["steps"] == c["steps"], f"{name}: {d['steps_done']} steps"
    epochs = [h["epoch"] for h in d["history"]]
    n = p["steps"] // p["steps_per_epoch"]
    assert epochs == list(range(1, n + 1)), f"{name}: history covers epochs {epochs}"
    assert [h["step"] for h in d["history"]] == [e * p["steps_per_epoch"] for e in epochs]
    assert d["epsilon"] <= p["target_epsilon"] + 1e-9, d["epsilon"]
    acc = d["final_accuracy"]
    assert acc > float(env["MIN_ACCURACY"]), f"{name}: final test accuracy {acc}"
assert m["history"] == r["history"], "metrics.json and the printed result differ"
hist = ", ".join(f"{h['test_accuracy']:.3f}" for h in m["history"])
say(f"resumed run {c['run_id']} at step {c['step']}; {m['steps_done']} steps, "
    f"epsilon {m['epsilon']:.3f}; test accuracy per epoch {hist} "
    f"(> {env['MIN_ACCURACY']}, chance 0.1)")
EOF
done_step

# ---------------------------------------------------------------- 5. ledgers
step "every site's ledger was charged for the run (mpcdp budget inside each site)"
docs=(ckpt="$SMOKE_TMP/ckpt.json" out="$SMOKE_TMP/run2.out")
for s in "${SITES[@]}"; do
  dc exec -T "$s" mpcdp budget --config /config/party.toml --json >"$SMOKE_TMP/$s.json" \
    || die "mpcdp budget in $s"
  docs+=("$s=$SMOKE_TMP/$s.json")
done
export SITE_NAMES="${SITES[*]}"
check "ledgers" "${docs[@]}" <<'EOF'
c, r = docs["ckpt"], docs["out"]
run = c["run_id"]
blocks_needed = r["plan"]["steps"] // r["plan"]["steps_per_epoch"]
for s in env["SITE_NAMES"].split():
    d = docs[s]
    assert d["party"] == s, d["party"]
    g = d["datasets"]["digits"]
    entries = [e for e in g["entries"] if e.get("run_id") == run]
    sessions = {e["query_id"].split("/")[1] for e in entries}
    blocks = g["training_blocks"].get(run, 0)
    spent = float(g["spent_epsilon"])
    # the first session's blocks up to the restart, and the resumed session's from the
    # checkpoint on: at least one per epoch (a block is charged before its first step)
    assert blocks >= blocks_needed, f"{s}: {blocks} blocks charged for {run}"
    assert len(sessions) == 2, f"{s}: sessions {sessions}: expected the first and the resumed one"
    assert spent >= float(r["epsilon"]) - 1e-6, f"{s}: spent {spent} < the run's {r['epsilon']}"
    assert spent <= float(g["budget_epsilon"]) + 1e-9, g
    say(f"{s}: {blocks} blocks of run {run} in {len(sessions)} sessions, spent "
        f"{spent:.3f} of {g['budget_epsilon']} (the run is epsilon {r['epsilon']:.3f}; "
        f"the redone steps are paid again)")
EOF
done_step
