"""`python -m benchmarks.fault`: kill -9 a cache build and an export anywhere; does the next run recover?

Issue 12's fault test. Each phase first runs its command once unkilled (the reference:
its image, its duration T and the time W its first temporary file appeared), then, for
each of --kills seeded random points (half spread over [0, T], half over [W, T], where
the writing happens), starts the command, SIGKILLs its process group at that point, and
checks what the kill left and that the next run recovers:

- cache: in a fresh $SDRT_CACHE_DIR, `engines.build BUNDLE --backend ort-cpu` (CPU-fused
  graphs, cache.store), then `runtime.generate` on ort-cpu (ORT's optimized graphs,
  cache.fetch) and on openvino bf16 (the fp16 IR, cache.fetch; left out where the CPU
  has no bf16), on a copy of the demo bundle. Right after the kill, `engines.cache
  verify` on a copy of the cache must find nothing damaged; the rerun must complete
  without finding a damaged artifact, leave nothing under the cache but complete
  artifacts, lock files and the bundle-check memo, pass `engines.cache verify`, and
  draw the reference's images pixel for pixel.
- export: `python -m export --model demo --out OUT`, to a fresh OUT or (every other
  kill) with --force over a bundle already there. Right after the kill, whatever is at
  OUT must generate the reference image or fail with one line and exit 2; the rerun
  (--force when OUT exists) must succeed, leave nothing beside or inside OUT but the
  bundle, and its bundle must draw the reference image.

Leftovers (the path and size of each) are reported after every kill and recovery;
those over --leftover-bytes after recovery fail, as does anything in the children's
TMPDIR. Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import machine
from runtime import cache, cpu
from runtime.backends.openvino import version as openvino_version

REPO = Path(__file__).resolve().parents[1]
MB = 10**6
PROMPT = "a lighthouse at dusk"
GENERATE = ("--steps", "3", "--seed", "7", "--scheduler", "pndm")  # small and fixed
POLL = 0.005  # seconds between looks for the first temporary file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fault",
                                description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kill points per phase (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill points (default 0)")
    p.add_argument("--phase", choices=("cache", "export", "both"), default="both")
    p.add_argument("--reference-runs", type=int, default=2, help="unkilled runs per phase "
                   "before the kills; the shortest sets the kill points (default 2)")
    # The bound is 1 MB, but the demo's VAE and safety-checker artifacts are
    # 0.25 MB: a leftover temp folder of either must fail too. Stray temp files of atomic
    # sidecar writes (about 1 KB, removed once an hour old) stay under it.
    p.add_argument("--leftover-bytes", type=int, default=100_000,
                   help="a leftover over this size after recovery fails (default 100 KB)")
    p.add_argument("--workdir", type=Path, help="keep the runs' folders here (default: a temp "
                   "folder, removed at the end)")
    p.add_argument("--json", type=Path, help="write every kill's record and the summary here")
    a = p.parse_args(argv)
    if a.kills < 1 or a.reference_runs < 1 or a.leftover_bytes < 0:
        p.error("--kills and --reference-runs must be >= 1, --leftover-bytes >= 0")
    return a


# --- processes ---------------------------------------------------------------------------

def _env(**extra: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(cache.CACHE_ENV, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _script(commands: Sequence[Sequence[str]]) -> list[str]:
    """One process group for a sequence of commands: `sh -c 'a && b && c'`."""
    return ["sh", "-c", " && ".join(shlex.join(c) for c in commands)]


def run(cmd: Sequence[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_timed(cmd: Sequence[str], env: dict[str, str], first_write: Callable[[], bool]
              ) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, seconds, seconds until `first_write()` was first true) of an unkilled run."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                text=True)
        seen = None
        while proc.poll() is None:
            if seen is None and first_write():
                seen = time.perf_counter() - t0
            time.sleep(POLL)
        seconds = time.perf_counter() - t0
        out.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), "")
    return result, seconds, seconds if seen is None else seen


def run_killed(cmd: Sequence[str], env: dict[str, str], delay: float) -> bool:
    """Start `cmd` in its own process group and SIGKILL the group `delay` seconds later;
    False when it exited by itself first."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def kill_points(n: int, seconds: float, writing_from: float, rng: random.Random) -> list[float]:
    """n points: half stratified over [0, seconds], the rest over [writing_from, seconds]."""
    def spread(k: int, lo: float, hi: float) -> list[float]:
        return [lo + (hi - lo) * (i + rng.random()) / k for i in range(k)]

    half = n // 2
    return sorted(spread(half, 0.0, seconds) + spread(n - half, writing_from, seconds))


def building(root: Path) -> Callable[[], bool]:
    """Whether an artifact's temporary folder, `<backend>/.<graph>-<digest>.<random>`, exists."""
    return lambda: any(root.glob("*/.*-*"))


def tail(text: str, n: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-n:])


# --- what is left on disk -------------------------------------------------------------

def nbytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(os.lstat(os.path.join(root, f)).st_size
               for root, _, names in os.walk(path) for f in names)


def cache_leftovers(root: Path) -> list[Path]:
    """Everything under the engine cache that is neither a complete artifact (a folder
    with a valid sidecar, holding only the files it lists), a lock file, nor the
    bundle-check memo (verified/*.json)."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for top in sorted(root.iterdir()):
        if top.is_symlink() or not top.is_dir():
            found.append(top)
        elif top.name == "verified":
            found += [p for p in sorted(top.iterdir())
                      if p.name.startswith(".") or p.suffix != ".json" or not p.is_file()]
        else:
            for p in sorted(top.iterdir()):
                if p.suffix == ".lock" and p.is_file() and not p.is_symlink():
                    continue
                side = None if p.name.startswith(".") or not p.is_dir() else cache._read_sidecar(p)
                if side is None or not isinstance(side.get("files"), dict):
                    found.append(p)
                    continue
                listed = set(side["files"]) | {cache.SIDECAR}
                found += [q for q in sorted(p.iterdir()) if q.name not in listed]
    return found


def export_leftovers(out: Path, reference: Path) -> list[Path]:
    """Entries beside `out` other than it, and files inside it that the reference bundle
    does not have."""
    found = [p for p in sorted(out.parent.iterdir()) if p.name != out.name]
    if out.is_dir():
        want = {p.relative_to(reference) for p in reference.rglob("*")}
        found += [p for p in sorted(out.rglob("*")) if p.relative_to(out) not in want]
    return found


def describe(paths: Sequence[Path], base: Path) -> list[dict]:
    return [{"path": str(p.relative_to(base)), "bytes": nbytes(p)} for p in paths]


def tmpdir_leftovers(tmp: Path, baseline: set[Path]) -> list[Path]:
    """What the children left in their TMPDIR beyond what the unkilled reference run left
    there (torch's compile caches and the like, which every run creates)."""
    return sorted(p for p in tmp.iterdir() if p not in baseline) if tmp.is_dir() else []


# --- images ---------------------------------------------------------------------------

def images(folder: Path) -> list[np.ndarray]:
    """Pixels of every PNG in `folder`, by name (the metadata holds paths: not compared)."""
    out = []
    for p in sorted(folder.glob("*.png")):
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def same_images(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) > 0 and all(x.shape == y.shape and np.array_equal(x, y)
                                        for x, y in zip(a, b, strict=True))


def generate(model: Path, backend: str, out: Path, precision: str = "auto") -> list[str]:
    return [sys.executable, "-m", "runtime.generate", PROMPT, "--model", str(model),
            "--backend", backend, "--precision", precision, "--output-dir", str(out), *GENERATE]


# --- phases ---------------------------------------------------------------------------

class Phase:
    """Shared bookkeeping: one record per kill, failures as one line each."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self.kills: list[dict] = []
        self.notes: list[str] = []
        self.reference_seconds = math.inf
        self.writing_from = math.inf

    def measure(self, cmd: Sequence[str], env: dict[str, str],
                first_write: Callable[[], bool]) -> subprocess.CompletedProcess:
        """Run the unkilled reference; keep the shortest duration and earliest first write."""
        result, seconds, writing = run_timed(cmd, env, first_write)
        self.reference_seconds = min(self.reference_seconds, seconds)
        self.writing_from = min(self.writing_from, writing, self.reference_seconds)
        return result

    def leftovers(self, rec: dict, key: str, paths: Sequence[Path], base: Path,
                  fail: bool) -> None:
        rec[key] = describe(paths, base)
        for item in rec[key]:
            if fail and item["bytes"] > self.limit:
                rec["failures"].append(f"leftover {item['path']} ({item['bytes'] / MB:.2f} MB)")

    def summary(self) -> dict:
        found = [x for k in self.kills for x in k["leftovers"] + k["tmpdir"]]
        return {"reference_seconds": self.reference_seconds, "writing_from": self.writing_from,
                "kills": len(self.kills), "killed": sum(k["killed"] for k in self.kills),
                "leftovers_after_kill": sum(len(k["after_kill"]) for k in self.kills),
                "leftovers_after_recovery": len(found),
                "leftover_bytes_max": max((x["bytes"] for x in found), default=0),
                "failures": sum(bool(k["failures"]) for k in self.kills), "notes": self.notes}


def cache_phase(work: Path, kills: int, runs: int, rng: random.Random, limit: int,
                say: Callable[[str], None]) -> Phase:
    ph = Phase("cache", limit)
    bundle = work / "bundle"
    shutil.copytree(REPO / "runtime" / "demo_bundle", bundle)
    tmp = work / "tmpdir"

    def steps(out: Path, openvino: bool) -> list[list[str]]:
        s = [[sys.executable, "-m", "engines.build", str(bundle), "--backend", "ort-cpu"],
             generate(bundle, "ort-cpu", out / "ort-cpu")]
        return s + [generate(bundle, "openvino", out / "openvino", "bf16")] if openvino else s

    def fresh(name: str) -> tuple[Path, Path, dict[str, str]]:
        root, out = work / name / "cache", work / name / "out"
        shutil.rmtree(work / name, ignore_errors=True)
        root.mkdir(parents=True)
        tmp.mkdir(exist_ok=True)
        return root, out, _env(SDRT_CACHE_DIR=root, TMPDIR=tmp)

    openvino = cpu.has_bf16() and openvino_version() is not None
    if not openvino:
        ph.notes.append("openvino bf16 left out (no openvino, or no bf16 units on this CPU)")
    # the shortest run sets the kill points (the first runs cold)
    want: dict[str, list[np.ndarray]] = {}
    for _ in range(runs):
        root, out, env = fresh("reference")
        ref = ph.measure(_script(steps(out, openvino)), env, building(root))
        if ref.returncode != 0:
            raise RuntimeError(f"the unkilled cache build failed: {tail(ref.stdout)}")
        got = {b: images(out / b) for b in (["ort-cpu", "openvino"] if openvino else ["ort-cpu"])}
        if want and not all(same_images(got[b], want[b]) for b in want):
            raise RuntimeError("two unkilled cache builds drew different images: nothing to compare")
        want = got
    baseline = set(tmp.iterdir())
    say(f"cache: reference build {ph.reference_seconds:.1f} s (first temp folder at "
        f"{ph.writing_from:.1f} s), backends {', '.join(want)}")

    for i, delay in enumerate(kill_points(kills, ph.reference_seconds, ph.writing_from, rng), 1):
        t0 = time.perf_counter()
        root, out, env = fresh("run")
        rec: dict = {"index": i, "delay": round(delay, 3), "failures": []}
        rec["killed"] = run_killed(_script(steps(out, openvino)), env, delay)
        ph.leftovers(rec, "after_kill", cache_leftovers(root), root, fail=False)
        copy = work / "run" / "copy"
        shutil.copytree(root, copy, symlinks=True)
        v = run([sys.executable, "-m", "engines.cache", "verify", "--cache-dir", str(copy)], env)
        if v.returncode != 0:
            rec["failures"].append(f"damaged artifact right after the kill: {tail(v.stdout)}")
        shutil.rmtree(out, ignore_errors=True)
        r = run(_script(steps(out, openvino)), env)
        if r.returncode != 0:
            rec["failures"].append(f"the rerun failed (exit {r.returncode}): {tail(r.stdout + r.stderr)}")
        for word in ("rebuilt", "damaged", "CacheWarning"):
            if word in r.stdout + r.stderr:
                rec["failures"].append(f"the rerun found a damaged artifact ({word!r} in its output)")
                break
        ph.leftovers(rec, "leftovers", cache_leftovers(root), root, fail=True)
        ph.leftovers(rec, "tmpdir", tmpdir_leftovers(tmp, baseline), tmp, fail=True)
        v = run([sys.executable, "-m", "engines.cache", "verify", "--cache-dir", str(root)], env)
        if v.returncode != 0:
            rec["failures"].append(f"engines.cache verify after recovery: {tail(v.stdout)}")
        for backend, pixels in want.items():
            if r.returncode == 0 and not same_images(images(out / backend), pixels):
                rec["failures"].append(f"{backend}: the recovered image differs from the reference")
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        ph.kills.append(rec)
        say(line(ph, rec, kills))
    return ph


def export_phase(work: Path, kills: int, runs: int, rng: random.Random, limit: int,
                 say: Callable[[str], None]) -> Phase:
    ph = Phase("export", limit)
    tmp = work / "tmpdir"
    tmp.mkdir(parents=True)
    env = _env(SDRT_CACHE_DIR=work / "cache", TMPDIR=tmp)  # the generate checks' cache

    def export(out: Path, force: bool) -> list[str]:
        return [sys.executable, "-m", "export", "--model", "demo", "--out", str(out),
                *(["--force"] if force else [])]

    reference = work / "reference" / "bundle"
    reference.parent.mkdir()
    for i in range(runs):  # a new bundle, then replacing it (--force)
        ref = ph.measure(export(reference, i > 0), env,
                         lambda: any(reference.parent.glob(f".{reference.name}.*.tmp")))
        if ref.returncode != 0:
            raise RuntimeError(f"the unkilled export failed: {tail(ref.stdout)}")
    r = run(generate(reference, "ort-cpu", work / "reference" / "images"), env)
    want = images(work / "reference" / "images")
    baseline = set(tmp.iterdir())
    if r.returncode != 0 or not want:
        raise RuntimeError(f"the reference bundle does not generate: {tail(r.stdout + r.stderr)}")
    say(f"export: reference export {ph.reference_seconds:.1f} s (first temp folder at "
        f"{ph.writing_from:.1f} s)")

    for i, delay in enumerate(kill_points(kills, ph.reference_seconds, ph.writing_from, rng), 1):
        t0 = time.perf_counter()
        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        out = run_dir / "parent" / "bundle"
        out.parent.mkdir(parents=True)
        replace = i % 2 == 0
        if replace:
            shutil.copytree(reference, out)
        rec: dict = {"index": i, "delay": round(delay, 3), "mode": "replace" if replace else "new",
                     "failures": []}
        rec["killed"] = run_killed(export(out, replace), env, delay)
        ph.leftovers(rec, "after_kill", export_leftovers(out, reference), out.parent, fail=False)
        rec["out_after_kill"] = "bundle" if out.is_dir() else "none"
        if out.exists():  # what the kill left at OUT: the right image, or one line and exit 2
            g = run(generate(out, "ort-cpu", run_dir / "after-kill"), env)
            if g.returncode == 0:
                if not same_images(images(run_dir / "after-kill"), want):
                    rec["failures"].append("the killed export's OUT loads but draws another image")
            elif g.returncode != 2 or len(g.stderr.strip().splitlines()) != 1:
                rec["failures"].append(f"generate on the killed export's OUT: exit {g.returncode}, "
                                       f"{tail(g.stderr)}")
            else:
                rec["out_after_kill"] = f"refused: {g.stderr.strip()}"
        r = run(export(out, out.exists()), env)
        if r.returncode != 0:
            rec["failures"].append(f"the rerun failed (exit {r.returncode}): {tail(r.stderr)}")
        ph.leftovers(rec, "leftovers", export_leftovers(out, reference), out.parent, fail=True)
        ph.leftovers(rec, "tmpdir", tmpdir_leftovers(tmp, baseline), tmp, fail=True)
        g = run(generate(out, "ort-cpu", run_dir / "recovered"), env)
        if r.returncode == 0 and (g.returncode != 0
                                  or not same_images(images(run_dir / "recovered"), want)):
            rec["failures"].append(f"the recovered bundle does not draw the reference image "
                                   f"(exit {g.returncode}) {tail(g.stderr)}")
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        ph.kills.append(rec)
        say(line(ph, rec, kills))
    return ph


def line(ph: Phase, rec: dict, total: int) -> str:
    def sizes(items: list[dict]) -> str:
        return ", ".join(f"{x['path']} {x['bytes'] / MB:.2f} MB" for x in items) or "none"

    how = "killed" if rec["killed"] else "exited first"
    mode = f" {rec['mode']}" if "mode" in rec else ""
    verdict = "ok" if not rec["failures"] else "FAIL: " + "; ".join(rec["failures"])
    return (f"{ph.name} {rec['index']:2}/{total}{mode} at {rec['delay']:.2f} s ({how}); "
            f"left by the kill: {sizes(rec['after_kill'])}; after recovery: "
            f"{sizes(rec['leftovers'] + rec['tmpdir'])}; {verdict}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rng = random.Random(a.seed)

    def say(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="sdrt-fault-"))
    phases: list[Phase] = []
    try:
        for name, fn in (("cache", cache_phase), ("export", export_phase)):
            if a.phase in (name, "both"):
                folder = work / name
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                phases.append(fn(folder, a.kills, a.reference_runs, rng, a.leftover_bytes, say))
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    failed = sum(p.summary()["failures"] for p in phases)
    for p in phases:
        s = p.summary()
        say(f"{p.name}: {s['kills']} kills ({s['killed']} killed mid-run), "
            f"{s['leftovers_after_kill']} leftovers right after the kills, "
            f"{s['leftovers_after_recovery']} after recovery (largest "
            f"{s['leftover_bytes_max'] / MB:.2f} MB), {s['failures']} failed"
            + "".join(f"; {n}" for n in p.notes))
    say(f"{'FAIL' if failed else 'PASS'}: {failed} failed kills, {seconds:.0f} s "
        f"on {machine.info().get('cpu', '?')}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine.info(), "argv": sys.argv[1:], "seed": a.seed,
            "leftover_bytes": a.leftover_bytes, "seconds": seconds, "passed": not failed,
            "phases": {p.name: {**p.summary(), "records": p.kills} for p in phases}},
            indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
