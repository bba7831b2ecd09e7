"""MPyC baseline for the secure sum: n parties, each with a private vector of d fixed-point numbers.

Run (from the repository root, with the ``bench`` extra installed, which provides ``mpyc``):

    python -m benchmarks.mpyc_sum --parties N --size D [--timeout S]

What it does: launches N MPyC parties as N separate local processes, party I being
``python -m benchmarks.mpyc_sum --party I ... -P 127.0.0.1:PORT_0 ... -P 127.0.0.1:PORT_N-1 -I I``
(MPyC's own multi-party command line: one process per party, all connected over loopback TCP on
free ports). Party i holds ``numpy.random.default_rng(seed=i).uniform(-1, 1, D)``. Every party
runs, with MPyC secure arrays (``mpc.SecFxp().array``, default 32-bit fixed point with 16
fractional bits, Shamir sharing with MPyC's default threshold t = (N-1)//2):

    xs = mpc.input(secfxp.array(x_i))      # each party secret-shares its own vector
    s = xs[0] + xs[1] + ... + xs[N-1]      # local, vectorised addition of shares
    y = await mpc.output(s)                 # revealed to every party

(x_i is rounded to fixed point with vectorised numpy and handed to ``secfxp.array`` as a field
array: the same values as ``secfxp.array(x_i)``, which rounds element by element in Python.)

Measured:
- ``wall_s``: at party 0, seconds from just before encoding its input (after all parties are
  connected and have passed a one-message synchronisation round) to the revealed sum being
  available as a float numpy array; excludes process start-up, imports and data generation.
- ``total_s``: the whole run as seen by this launcher, including process launch and teardown.
- ``bytes_sent_per_party``: the maximum over parties of the payload+header bytes that MPyC's
  own counters (``peer.protocol.nbytes_sent``) record for the input and output (the
  synchronisation round is subtracted); ``bytes_sent_by_party`` lists all of them.
- ``peak_rss_mb_per_party``: the maximum over parties of VmHWM (peak resident set size, MiB)
  read by each party from /proc/self/status after the output; ``peak_rss_mb_by_party`` lists
  all of them.
- ``cpu_s_by_party``: each party's process CPU time over the same span (when there are fewer
  cores than parties, wall_s is bounded below by sum(cpu_s_by_party) / cores).
- ``ok``: party 0's revealed sum agrees with the plaintext sum of all N vectors to within the
  fixed-point rounding (N * 2**-(f+1), plus float slack) and every party exited cleanly.

The last line on stdout is one JSON object; progress and party logs go to stderr. mpyc is
imported only in the party processes (``--party``), never at import time of this module.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def _log(msg: str) -> None:
    print(f"[mpyc_sum] {msg}", file=sys.stderr, flush=True)


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _party_input(index: int, size: int):
    import numpy as np

    return np.random.default_rng(seed=index).uniform(-1.0, 1.0, size)


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:
        return None


def _bytes_sent(mpc) -> int:
    return sum(
        p.protocol.nbytes_sent for p in mpc.parties if p.pid != mpc.pid and p.protocol is not None
    )


async def _party_protocol(args: argparse.Namespace, result: dict) -> None:
    import mpyc
    import numpy as np
    from mpyc.runtime import mpc

    result["mpyc_version"] = mpyc.__version__
    n, d, me = args.parties, args.size, args.party
    secfxp = mpc.SecFxp()  # MPyC defaults: l = 32 bits, f = 16 fractional bits
    f = secfxp.frac_length
    x = _party_input(me, d)

    await mpc.start()
    if len(mpc.parties) != n:
        raise RuntimeError(f"MPyC runtime has {len(mpc.parties)} parties, expected {n}")
    await mpc.transfer(me)  # all-to-all round: every party is connected and ready
    bytes0 = _bytes_sent(mpc)

    t0, c0 = time.perf_counter(), time.process_time()
    # Encode to fixed point with vectorised numpy (same result as secfxp.array(x), which rounds
    # element by element in Python), then wrap the field array as a secure fixed-point array.
    xa = secfxp.array(secfxp.field.array(np.rint(x * (1 << f)).astype(np.int64)), integral=False)
    xs = mpc.input(xa)  # list of n secure arrays, xs[i] = party i's vector
    s = xs[0]
    for a in xs[1:]:
        s = s + a
    y = await mpc.output(s)
    t1, c1 = time.perf_counter(), time.process_time()

    result["wall_s"] = t1 - t0
    result["cpu_s"] = c1 - c0
    result["bytes_sent"] = _bytes_sent(mpc) - bytes0
    if me == 0:
        expected = np.zeros(d)
        for i in range(n):
            expected += _party_input(i, d)
        y = np.asarray(y, dtype=float)
        err = float(np.max(np.abs(y - expected))) if d else 0.0
        tol = n * 2.0 ** -(f + 1) + 1e-9 * n
        result["max_abs_err"] = err
        result["ok"] = bool(y.shape == (d,) and err <= tol)
        if not result["ok"]:
            result["error"] = f"wrong sum: max abs error {err:g} > tolerance {tol:g}"
    else:
        result["ok"] = True
    result["peak_rss_mb"] = _peak_rss_mb()
    await mpc.shutdown()


def _party_main(args: argparse.Namespace) -> int:
    """One MPyC party (its own process). MPyC reads -P/-I etc. from sys.argv at import."""
    result: dict = {"party": args.party, "ok": False, "error": None}
    rc = 0
    try:
        from mpyc.runtime import mpc

        mpc.run(_party_protocol(args, result))
    except BaseException as exc:  # report any failure back to the launcher
        result["ok"] = False
        result["error"] = f"party {args.party}: {type(exc).__name__}: {exc}"
        rc = 1
    with open(args.result, "w") as fh:
        json.dump(result, fh)
    return rc


def _tail(path: str, nbytes: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - nbytes))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _mpyc_version_fallback() -> str | None:
    try:
        from importlib.metadata import version

        return version("mpyc")
    except Exception:
        return None


def _launch(args: argparse.Namespace) -> dict:
    n, d = args.parties, args.size
    out: dict = {
        "parties": n,
        "size": d,
        "wall_s": None,
        "total_s": None,
        "bytes_sent_per_party": None,
        "peak_rss_mb_per_party": None,
        "ok": False,
        "error": None,
        "mpyc_version": None,
    }
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = repo_root + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.setdefault("PYTHONUNBUFFERED", "1")

    with tempfile.TemporaryDirectory(prefix="mpyc_sum_") as tmp:
        ports = _free_ports(n)
        addrs = [arg for p in ports for arg in ("-P", f"127.0.0.1:{p}")]
        procs: list[subprocess.Popen] = []
        logs, results = [], []
        t_start = time.perf_counter()
        _log(f"launching {n} MPyC parties on ports {ports} (d={d})")
        try:
            for i in range(n):
                res = os.path.join(tmp, f"party{i}.json")
                log = os.path.join(tmp, f"party{i}.log")
                ours = [*f"--party {i} --parties {n} --size {d} --result".split(), res]
                cmd = [sys.executable, "-m", "benchmarks.mpyc_sum", *ours, *addrs, "-I", str(i)]
                with open(log, "wb") as lf:
                    procs.append(
                        subprocess.Popen(
                            cmd,
                            cwd=repo_root,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=lf,
                            stderr=subprocess.STDOUT,
                        )
                    )
                logs.append(log)
                results.append(res)
            deadline = t_start + args.timeout
            while any(p.poll() is None for p in procs):
                if time.perf_counter() > deadline:
                    out["error"] = "timeout"
                    break
                failed = [i for i, p in enumerate(procs) if p.poll()]
                if failed:  # the others would wait for it forever
                    rc = procs[failed[0]].returncode
                    out["error"] = f"party {failed[0]} exited with code {rc}"
                    break
                time.sleep(0.01)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        out["total_s"] = time.perf_counter() - t_start

        party_res: list[dict | None] = []
        for res in results:
            try:
                with open(res) as fh:
                    party_res.append(json.load(fh))
            except (OSError, ValueError):
                party_res.append(None)
        for i, log in enumerate(logs):
            if i == 0 or out["error"] or procs[i].returncode or not (party_res[i] or {}).get("ok"):
                _log(f"--- party {i} log (rc={procs[i].returncode}) ---\n{_tail(log).rstrip()}")

    r0 = party_res[0] if party_res else None
    if r0:
        out["wall_s"] = r0.get("wall_s")
        out["mpyc_version"] = r0.get("mpyc_version")
        out["max_abs_err"] = r0.get("max_abs_err")
    if out["mpyc_version"] is None:
        out["mpyc_version"] = _mpyc_version_fallback()
    sent = [r.get("bytes_sent") if r else None for r in party_res]
    rss = [r.get("peak_rss_mb") if r else None for r in party_res]
    if sent and all(v is not None for v in sent):
        out["bytes_sent_per_party"] = max(sent)
    out["bytes_sent_by_party"] = sent
    if rss and any(v is not None for v in rss):
        out["peak_rss_mb_per_party"] = round(max(v for v in rss if v is not None), 1)
    out["peak_rss_mb_by_party"] = [None if v is None else round(v, 1) for v in rss]
    cpu = [r.get("cpu_s") if r else None for r in party_res]
    out["cpu_s_by_party"] = [None if v is None else round(v, 3) for v in cpu]

    errors = [out["error"]] if out["error"] else []
    errors += [r["error"] for r in party_res if r and r.get("error")]
    if not errors:
        missing = [i for i, r in enumerate(party_res) if r is None]
        bad_rc = [i for i, p in enumerate(procs) if p.returncode]
        if missing or bad_rc:
            errors.append(f"parties failed: no result from {missing}, nonzero exit from {bad_rc}")
    out["error"] = "; ".join(errors) if errors else None
    out["ok"] = bool(out["error"] is None and all(r is not None and r.get("ok") for r in party_res))
    if not out["ok"] and out["error"] is None:
        out["error"] = "verification failed"
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="MPyC secure-sum baseline (n local party processes over loopback TCP).",
        allow_abbrev=False,
    )
    ap.add_argument("--parties", type=int, required=True, help="number of parties n (>= 1)")
    ap.add_argument("--size", type=int, required=True, help="vector length d per party")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    # internal: run one party (MPyC's own options such as -P/-I follow and are parsed by MPyC)
    ap.add_argument("--party", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=str, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args, unknown = ap.parse_known_args(argv)
    if args.party is not None:
        return _party_main(args)
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.parties < 1 or args.size < 0:
        ap.error("--parties must be >= 1 and --size >= 0")
    out = _launch(args)
    _log(
        f"n={out['parties']} d={out['size']} ok={out['ok']} wall_s={out['wall_s']} "
        f"total_s={out['total_s']:.3f} error={out['error']}"
    )
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
