"""``make bench-pipeline``: the whole audit against the saliency engine, its memory, resume and Dask, in one run.

Four sections, each recorded on its own (a failing section leaves an error string in the JSON and loses no other
figure):

1. ``throughput``: a user model (timm, random weights, 2 classes, saved as a state dict) audited by
   :func:`audit.pipeline.run_pipeline` (LocalRunner, as ``audit run --no-prefect``; Grad-CAM, discovery and the
   sanity check at their defaults) with the region cache warm and cold, the counterfactual test on and off, and
   with 2 and 1 workers, each into a fresh folder. Each run's images per second (whole call, and its shard stages
   ``ingest_shard`` + ``explain_shard`` alone) is divided by the engine's: Grad-CAM through
   ``explain(build_methods(["gradcam"], ...))`` over the same images already decoded and resized in memory, timed
   right before and right after the run (their mean, to pair each run against the machine's load).
2. ``memory``: peak resident memory of the probe audit of two demo dataset sizes, each in a fresh subprocess,
   with the resident set sampled every 0.2 s and tagged with the stage running at the time.
3. ``rerun``: the smaller audit again into the same folder: every shard must be reused.
4. ``dask``: a tiny audit through ``run_flow`` on a local Dask cluster and through ``run_pipeline`` in-process;
   every table compared.
5. ``decode``: :func:`audit.data.decode.read_image` on the real CR radiograph in ``../shared/data/cxr-real``
   (DICOM, JPEG 2000, 15-bit, 1955 × 1841) against the same pixels stored as 16-bit PNG, 8-bit PNG and JPEG,
   rounds interleaved: milliseconds per image and the ratio to the 8-bit PNG.

Writes ``reports/bench/pipeline.json`` and prints a table. Usage::

    python -m benchmarks.pipeline [--quick] [--out reports/bench/pipeline.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, "Benchmarks"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from audit.config import build_config  # noqa: E402
from audit.data.decode import decode_image  # noqa: E402
from audit.data.demo import write_demo  # noqa: E402
from audit.data.manifest import build_manifest, safe_join  # noqa: E402
from audit.models.layers import find_target_layer  # noqa: E402
from audit.models.loading import load_user_model  # noqa: E402
from audit.models.preprocessing import InputSpec  # noqa: E402
from audit.pipeline import LocalRunner, run_pipeline  # noqa: E402
from audit.saliency import SaliencyOptions, build_methods, explain  # noqa: E402

SHARD_STAGES = ("ingest_shard", "explain_shard")


class StageRunner(LocalRunner):
    """:class:`LocalRunner` (the same threads, the same order) that adds up the wall seconds of each stage."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.seconds: dict[str, float] = {}

    def _add(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple], on_result: Callable[[Any], None] | None = None
    ) -> list[Any]:
        start = time.perf_counter()
        try:
            return super().map(fn, items, on_result)
        finally:
            self._add(fn.__name__, start)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().call(fn, *args)
        finally:
            self._add(fn.__name__, start)


def error_string(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"


def machine_info() -> dict:
    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "device": "cpu",  # the audit's device is 'auto'; these figures are CPU unless CUDA is present
        "cuda": torch.cuda.is_available(),
    }


# ----------------------------------------------------------------------------------------------------------------
# 1. Throughput of the whole audit against the saliency engine


def decoded_inputs(data: Path, spec: InputSpec) -> torch.Tensor:
    """uint8 [N, C, S, S]: every image of the dataset decoded and resized as the audit's ingest does."""
    manifest = build_manifest(data, None)
    arrays = []
    for entry in manifest.entries:
        raw = safe_join(manifest.root, entry.path).read_bytes()
        arrays.append(spec.resize(decode_image(raw, entry.path)))
    return torch.from_numpy(np.stack(arrays))


def throughput_section(args: argparse.Namespace, tmp: Path, results: dict) -> None:
    section: dict[str, Any] = {
        "model": args.model,
        "size": args.size,
        "batch": args.batch,
        "images": args.images,
        "shard_size": args.shard_size,
        "demo_size": 256,
        "workers": args.workers,
        "runs": [],
        "engine_runs": [],
    }
    results["throughput"] = section
    torch.manual_seed(0)
    user = timm.create_model(args.model, pretrained=False, num_classes=2)
    model_path = tmp / "user-model.pt"
    torch.save(user.state_dict(), model_path)
    del user
    data = tmp / "throughput-data"
    write_demo(data, n=args.images, shortcut_rate=0.9, seed=0, size=256)

    # The engine: the model loaded the way the audit loads it, on the images already in memory.
    model, spec = load_user_model(model_path, args.model, 2)
    spec = InputSpec(args.size, spec.channels, spec.mean, spec.std)  # as model.image_size does in the audit
    x_all = decoded_inputs(data, spec)
    layer = find_target_layer(model, spec.normalise(x_all[:1]))
    gradcam = build_methods(["gradcam"], model, layer, SaliencyOptions())
    section["target_layer"] = layer.name

    def engine_pass() -> float:
        start = time.perf_counter()
        for i in range(0, len(x_all), args.batch):
            explain(gradcam, spec.normalise(x_all[i : i + args.batch]), None)
        return len(x_all) / (time.perf_counter() - start)

    def engine() -> float:
        rate = engine_pass()
        section["engine_runs"].append({"img_per_s": rate, "load_average": os.getloadavg()})
        print(f"  engine: {rate:.2f} img/s", flush=True)
        return rate

    def config(out: Path, workers: int, counterfactual: bool) -> Any:
        return build_config(
            data=data,
            out=out,
            methods="gradcam",
            batch_size=args.batch,
            workers=workers,
            shard_size=args.shard_size,
            **{
                "model.path": model_path,
                "model.arch": args.model,
                "model.image_size": args.size,
                "counterfactual.enabled": counterfactual,
            },
        )

    # Warm-up, untimed: the engine once, and one audit that fills the region cache used by the cached runs.
    explain(gradcam, spec.normalise(x_all[: args.batch]), None)
    warm_cache = tmp / "xdg-warm"
    os.environ["XDG_CACHE_HOME"] = str(warm_cache)
    start = time.perf_counter()
    run_pipeline(config(tmp / "out-warm", max(args.workers), True))
    section["warm_up_seconds"] = time.perf_counter() - start
    print(f"  warm-up audit: {section['warm_up_seconds']:.1f} s", flush=True)

    before = engine()
    n_run = 0
    for workers in args.workers:
        for cached in (True, False):
            for counterfactual in (True, False):
                n_run += 1
                label = (
                    f"{'cached' if cached else 'uncached'} regions, counterfactual "
                    f"{'on' if counterfactual else 'off'}, {workers} worker{'s' if workers > 1 else ''}"
                )
                row: dict[str, Any] = {
                    "label": label,
                    "workers": workers,
                    "regions_cached": cached,
                    "counterfactual": counterfactual,
                }
                try:
                    cache_home = warm_cache if cached else tmp / f"xdg-cold-{n_run}"
                    os.environ["XDG_CACHE_HOME"] = str(cache_home)
                    runner = StageRunner(workers)
                    row["load_average_before"] = os.getloadavg()
                    start = time.perf_counter()
                    summary = run_pipeline(config(tmp / f"out-{n_run}", workers, counterfactual), runner)
                    seconds = time.perf_counter() - start
                    shard_seconds = sum(runner.seconds.get(name, 0.0) for name in SHARD_STAGES)
                    images = summary["counts"]["images"]
                    row.update(
                        seconds=seconds,
                        duration_seconds=summary["duration_seconds"],
                        images=images,
                        img_per_s=images / seconds,
                        shard_stage_seconds=shard_seconds,
                        shard_img_per_s=images / shard_seconds,
                        stage_seconds=runner.seconds,
                        work=summary["work"],
                    )
                    print(f"  {label}: {seconds:.1f} s ({images / seconds:.2f} img/s)", flush=True)
                except Exception as exc:
                    row["error"] = error_string(exc)
                    print(f"  {label}: failed: {exc}", flush=True)
                after = engine()
                row["engine_img_per_s"] = (before + after) / 2
                row["engine_before_after"] = [before, after]
                if "img_per_s" in row:
                    row["ratio_to_engine"] = row["img_per_s"] / row["engine_img_per_s"]
                    row["shard_ratio_to_engine"] = row["shard_img_per_s"] / row["engine_img_per_s"]
                section["runs"].append(row)
                before = after
                shutil.rmtree(tmp / f"out-{n_run}", ignore_errors=True)
    engines = [r["img_per_s"] for r in section["engine_runs"]]
    section["engine_img_per_s_median"] = statistics.median(engines)


# ----------------------------------------------------------------------------------------------------------------
# 2 and 3. Peak memory and the re-run of a finished audit (fresh subprocesses)

MEMORY_SNIPPET = r"""
import json, os, resource, sys, threading, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from audit.config import build_config
from audit.pipeline import LocalRunner, run_pipeline

data, out, workers, shard_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

stage = ["imports"]
peaks, seconds = {}, {}
stop = threading.Event()

def sample():
    while True:
        value, name = status("VmRSS"), stage[0]
        peaks[name] = max(peaks.get(name, 0.0), value)
        if stop.wait(0.2):
            return

class StageRunner(LocalRunner):
    def _run(self, name, fn):
        stage[0] = name
        start = time.perf_counter()
        try:
            return fn()
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            stage[0] = "between stages"

    def map(self, fn, items, on_result=None):
        return self._run(fn.__name__, lambda: LocalRunner.map(self, fn, items, on_result))

    def call(self, fn, *args):
        return self._run(fn.__name__, lambda: fn(*args))

baseline = status("VmRSS")
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
config = build_config(
    data=data, out=out, workers=workers, shard_size=shard_size, **{"probe.image_size": 64, "probe.epochs": 2}
)
start = time.perf_counter()
summary = run_pipeline(config, StageRunner(workers))
run_seconds = time.perf_counter() - start
stop.set()
sampler.join()
peak_stage = max(peaks, key=peaks.get)
print(json.dumps({
    "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "vm_hwm_mb": status("VmHWM"),
    "rss_after_imports_mb": baseline,
    "run_pipeline_seconds": run_seconds,
    "duration_seconds": summary["duration_seconds"],
    "images": summary["counts"]["images"],
    "work": summary["work"],
    "stage_seconds": seconds,
    "stage_peak_rss_mb": peaks,
    "peak_stage": peak_stage,
}))
"""


def audit_subprocess(data: Path, out: Path, cache_home: Path, timeout: float) -> dict:
    """One probe audit in a fresh interpreter; its JSON line, plus the wall time seen from here."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SNIPPET, str(data), str(out), "2", "256"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"audit subprocess exited with {result.returncode}: {result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["wall_seconds"] = wall
    return row


def memory_sections(args: argparse.Namespace, tmp: Path, results: dict) -> None:
    small, large = args.memory_sizes
    memory: dict[str, Any] = {"sizes": [small, large], "demo_size": 128, "runs": {}}
    results["memory"] = memory
    for n in (small, large):
        key = str(n)
        try:
            data = tmp / f"memory-data-{n}"
            start = time.perf_counter()
            write_demo(data, n=n, shortcut_rate=0.9, seed=0, size=128)
            demo_seconds = time.perf_counter() - start
            row = audit_subprocess(data, tmp / f"memory-out-{n}", tmp / f"xdg-memory-{n}", args.timeout)
            row["demo_seconds"] = demo_seconds
            # VmHWM is this process's own high-water mark; ru_maxrss can carry the parent's over exec (a vfork'd
            # child's exec folds the parent's peak into the child's), so the peak reported is VmHWM.
            row["peak_mb"] = row["vm_hwm_mb"]
            memory["runs"][key] = row
            print(
                f"  memory {n} images: peak {row['peak_mb']:.0f} MB (in {row['peak_stage']}), "
                f"{row['wall_seconds']:.1f} s",
                flush=True,
            )
        except Exception as exc:
            memory["runs"][key] = {"error": error_string(exc)}
            print(f"  memory {n} images: failed: {exc}", flush=True)
            continue
        if n == small:
            results["rerun"] = rerun_section(args, tmp, n)
        shutil.rmtree(data, ignore_errors=True)
        if n == large:
            shutil.rmtree(tmp / f"memory-out-{n}", ignore_errors=True)
    runs = memory["runs"]
    if all("peak_mb" in runs.get(str(n), {}) for n in (small, large)):
        memory["peak_ratio"] = runs[str(large)]["peak_mb"] / runs[str(small)]["peak_mb"]
        memory["images_ratio"] = large / small


def rerun_section(args: argparse.Namespace, tmp: Path, n: int) -> dict:
    """The finished audit of ``n`` images run again into the same folder (and the same region cache)."""
    try:
        row = audit_subprocess(tmp / f"memory-data-{n}", tmp / f"memory-out-{n}", tmp / f"xdg-memory-{n}", args.timeout)
        work = row["work"]
        row["images"] = n
        row["all_reused"] = work["ingested"] == 0 and work["explained"] == 0 and work["detector_calls"] == 0
        print(f"  re-run {n} images: {row['wall_seconds']:.1f} s, work {work}", flush=True)
        return row
    except Exception as exc:
        print(f"  re-run: failed: {exc}", flush=True)
        return {"error": error_string(exc)}
    finally:
        shutil.rmtree(tmp / f"memory-out-{n}", ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# 4. Dask against the in-process runner

DASK_SNIPPET = r"""
import json, os, sys, time, traceback
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from audit.config import build_config
from audit.data.demo import write_demo

root = Path(sys.argv[1])
write_demo(root / "data", n=24, shortcut_rate=0.9, seed=0, size=128)
settings = {"shard_size": 10, "workers": 2, "probe.image_size": 64, "probe.epochs": 2}

def run(name):
    os.environ["XDG_CACHE_HOME"] = str(root / f"xdg-{name}")  # each run detects its regions itself
    row = {"name": name}
    try:
        start = time.perf_counter()
        if name == "dask":
            from flows.audit_flow import run_flow
            summary = run_flow(build_config(data=root / "data", out=root / name, runner="dask", **settings))
        else:
            from audit.pipeline import run_pipeline
            summary = run_pipeline(build_config(data=root / "data", out=root / name, **settings))
        row.update(seconds=time.perf_counter() - start, work=summary["work"], verdict=summary["verdict"])
    except BaseException as exc:
        row["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
    print(json.dumps(row), flush=True)
    return "error" not in row

local_ok = run("local")
dask_ok = run("dask")
if local_ok and dask_ok:
    from audit.store.parquet import read_table
    from audit.store.schemas import TABLES

    def canonical(row):
        return json.dumps(row, sort_keys=True, default=repr)

    def order(row):  # the exact columns first, so rows that differ only in floats still line up
        exact = {k: v for k, v in row.items() if not isinstance(v, float)}
        return (canonical(exact), canonical(row))

    tables = {}
    for table in TABLES:
        a = sorted(read_table(root / "dask", table).to_pylist(), key=order)
        b = sorted(read_table(root / "local", table).to_pylist(), key=order)
        same = [canonical(r) for r in a] == [canonical(r) for r in b]
        entry = {"rows_dask": len(a), "rows_local": len(b), "identical": same}
        if not entry["identical"] and len(a) == len(b):
            differing, max_diff, columns = 0, 0.0, set()
            for ra, rb in zip(a, b):
                if canonical(ra) != canonical(rb):
                    differing += 1
                    for k in ra:
                        if canonical(ra[k]) != canonical(rb.get(k)):
                            columns.add(k)
                            if isinstance(ra[k], float) and isinstance(rb.get(k), float):
                                max_diff = max(max_diff, abs(ra[k] - rb[k]))
            entry.update(rows_differing=differing, columns_differing=sorted(columns), max_abs_float_diff=max_diff)
        tables[table] = entry
    print(json.dumps({"name": "tables", "tables": tables}), flush=True)
"""


def dask_section(args: argparse.Namespace, tmp: Path) -> dict:
    root = tmp / "dask"
    root.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    env.pop("PREFECT_API_URL", None)  # the flow starts its own temporary server, as on a bare machine
    section: dict[str, Any] = {"images": 24, "shard_size": 10, "workers": 2}
    start = time.perf_counter()
    try:
        result = subprocess.run(
            [sys.executable, "-c", DASK_SNIPPET, str(root)],
            capture_output=True,
            text=True,
            env=env,
            timeout=args.timeout,
            check=False,
        )
        stdout, stderr, code = result.stdout, result.stderr, result.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        code = f"timed out after {args.timeout} s"
    section["subprocess_seconds"] = time.perf_counter() - start
    for line in stdout.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "name" in row:
            section[row.pop("name")] = row
    if code != 0:
        section["error"] = f"subprocess exit {code}: {stderr[-3000:]}"
    elif "tables" in section:
        section["all_identical"] = all(t["identical"] for t in section["tables"]["tables"].values())
    return section


# ----------------------------------------------------------------------------------------------------------------
# Output


RG1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-real" / "dicom" / "RG1_J2KI.dcm"


def decode_section(rounds: int) -> dict:
    """Decode time per image of one radiograph in four encodings (see the module docstring, section 5)."""
    import io as _io

    import pydicom
    from PIL import Image

    from audit.data.decode import read_image

    if not RG1.is_file():
        return {"error": f"{RG1} not found (the cxr-real data sits beside the project)"}
    dicom = RG1.read_bytes()
    stored = pydicom.dcmread(_io.BytesIO(dicom)).pixel_array  # uint16 as stored
    shown = read_image(dicom, "RG1").pixels

    def encoded(image: Image.Image, fmt: str) -> bytes:
        buffer = _io.BytesIO()
        image.save(buffer, fmt)
        return buffer.getvalue()

    files = {
        "DICOM JPEG 2000 15-bit": dicom,
        "PNG 16-bit": encoded(Image.fromarray(stored.astype(np.uint16)), "PNG"),
        "PNG 8-bit": encoded(Image.fromarray(shown), "PNG"),
        "JPEG 8-bit": encoded(Image.fromarray(shown), "JPEG"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(rounds):
        for name, data in files.items():  # interleaved, so each encoding sees the same machine load
            start = time.perf_counter()
            read_image(data, name)
            seconds[name].append(time.perf_counter() - start)
    base = float(np.median(seconds["PNG 8-bit"]))
    return {
        "shape": list(shown.shape),
        "rounds": rounds,
        "rows": [
            {
                "encoding": name,
                "bytes": len(files[name]),
                "ms": 1000 * float(np.median(t)),
                "ratio": float(np.median(t)) / base,
            }
            for name, t in seconds.items()
        ],
    }


def short_error(value: Any) -> str:
    return str(value).strip().splitlines()[0][:150] if value else ""


def print_tables(results: dict) -> None:
    m = results["machine"]
    print(
        f"\nPipeline benchmark: torch {m['torch']}, {m['cpus']} cores, {m['threads']} torch threads, "
        f"load average {results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} after"
    )
    t = results.get("throughput", {})
    if t:
        print(
            f"\n1. Throughput: {t['model']} {t['size']} px, batch {t['batch']}, {t['images']} demo images, "
            f"shard size {t['shard_size']} (engine = Grad-CAM on the images in memory)"
        )
        if t.get("error"):
            print(f"  error: {short_error(t['error'])}")
        if t.get("engine_runs"):
            rates = ", ".join(f"{r['img_per_s']:.1f}" for r in t["engine_runs"])
            print(f"  engine img/s per run: {rates}")
        header = f"  {'run':52s} {'img/s':>7s} {'×engine':>8s} {'shard img/s':>12s} {'×engine':>8s} {'det.calls':>9s}"
        print(header)
        for row in t.get("runs", []):
            if "error" in row:
                print(f"  {row['label']:52s} error: {short_error(row['error'])}")
                continue
            print(
                f"  {row['label']:52s} {row['img_per_s']:7.2f} {row['ratio_to_engine']:8.2f} "
                f"{row['shard_img_per_s']:12.2f} {row['shard_ratio_to_engine']:8.2f} {row['work']['detector_calls']:9d}"
            )
        for row in t.get("runs", [])[:1]:
            if "stage_seconds" in row:
                stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stage_seconds"].items())
                print(f"  stage seconds of the first run: {stages}")
    memory = results.get("memory", {})
    if memory:
        print(f"\n2. Peak resident memory (probe audit, demo {memory.get('demo_size')} px, subprocess each):")
        if memory.get("error"):
            print(f"  error: {short_error(memory['error'])}")
        for n, row in memory.get("runs", {}).items():
            if "error" in row:
                print(f"  {n:>6s} images: error: {short_error(row['error'])}")
                continue
            print(
                f"  {n:>6s} images: peak {row['peak_mb']:7.0f} MB (ru_maxrss {row['ru_maxrss_mb']:.0f} MB), "
                f"highest in {row['peak_stage']}; wall {row['wall_seconds']:.1f} s (run_pipeline "
                f"{row['run_pipeline_seconds']:.1f} s)"
            )
        if "peak_ratio" in memory:
            print(f"  peak ratio {memory['peak_ratio']:.2f} for {memory['images_ratio']:.0f}× the images")
    rerun = results.get("rerun")
    if rerun:
        print("\n3. Re-run of the finished smaller audit into the same folder:")
        if "error" in rerun:
            print(f"  error: {short_error(rerun['error'])}")
        else:
            print(
                f"  wall {rerun['wall_seconds']:.1f} s (run_pipeline {rerun['run_pipeline_seconds']:.1f} s), "
                f"work {rerun['work']}: {'all reused' if rerun['all_reused'] else 'NOT all reused'}"
            )
    dask = results.get("dask")
    if dask:
        print("\n4. Dask (run_flow, runner dask, 2 workers) against run_pipeline in-process, 24 images:")
        for name in ("local", "dask"):
            row = dask.get(name)
            if row is None:
                continue
            if "error" in row:
                print(f"  {name}: error: {short_error(row['error'])}")
            else:
                print(f"  {name}: {row['seconds']:.1f} s, work {row['work']}")
        for table, entry in dask.get("tables", {}).get("tables", {}).items():
            extra = ""
            if not entry["identical"]:
                extra = f"  ({entry.get('rows_differing', '?')} rows differ: {entry.get('columns_differing', '')})"
            print(f"  {table:16s} {'identical' if entry['identical'] else 'DIFFERENT'}{extra}")
        if dask.get("error"):
            print(f"  error: {short_error(dask['error'])}")
    decode = results.get("decode")
    if decode:
        print("\n5. Decoding one radiograph (read_image, median of interleaved rounds):")
        if decode.get("error"):
            print(f"  error: {short_error(decode['error'])}")
        for row in decode.get("rows", []):
            size, ms, ratio = row["bytes"], row["ms"], row["ratio"]
            print(f"  {row['encoding']:24s} {size:>10,d} bytes {ms:8.1f} ms  {ratio:5.1f}× PNG 8-bit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18, 128 px, 64 images; 200 and 2,000 for memory")
    parser.add_argument("--model", default=None, help="timm name (default resnet50; --quick: resnet18)")
    parser.add_argument("--size", type=int, default=None, help="input size (default 224; --quick: 128)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=None, help="throughput images (default 512; --quick: 64)")
    parser.add_argument("--shard-size", type=int, default=None, help="throughput shard size (default 256; --quick: 32)")
    parser.add_argument("--workers", default="2,1", help="worker counts of the throughput runs, comma-separated")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for each subprocess")
    parser.add_argument("--sections", default="throughput,memory,dask,decode", help="sections to run, comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/pipeline.json"))
    # Unknown options are ignored, so that ``make bench BENCH_ARGS=...`` can pass the saliency benchmark's own
    # (``--rounds``, ``--scorecam-budget``) to both benchmarks.
    args, ignored = parser.parse_known_args()
    if ignored:
        print(f"ignored (not options of this benchmark): {' '.join(ignored)}", file=sys.stderr)
    args.model = args.model or ("resnet18" if args.quick else "resnet50")
    args.size = args.size or (128 if args.quick else 224)
    args.images = args.images or (64 if args.quick else 512)
    args.shard_size = args.shard_size or (32 if args.quick else 256)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.memory_sizes = (200, 2000) if args.quick else (2000, 20000)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    known = {"throughput", "memory", "dask", "decode"}
    if sections - known:
        parser.error(f"unknown section(s) {sorted(sections - known)}; known: {', '.join(sorted(known))}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Expected of a model with random weights, once per run: not worth a line in the benchmark's output.
    logging.getLogger("audit.pipeline").addFilter(
        lambda record: not record.getMessage().startswith("the model is no better than chance")
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "xdg")  # never the user's region cache
    results: dict[str, Any] = {
        "quick": args.quick,
        "machine": machine_info(),
        "load_average_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    start = time.perf_counter()
    try:
        planned = [
            ("throughput", "1. throughput", lambda: throughput_section(args, tmp, results)),
            ("memory", "2-3. memory and re-run", lambda: memory_sections(args, tmp, results)),
            ("dask", "4. dask", lambda: results.__setitem__("dask", dask_section(args, tmp))),
            ("decode", "5. decode", lambda: results.__setitem__("decode", decode_section(5 if args.quick else 15))),
        ]
        for key, title, run in planned:
            if key not in sections:
                continue
            print(title, flush=True)
            try:  # one section's failure loses no other figure
                run()
            except Exception as exc:
                results.setdefault(key, {})["error"] = error_string(exc)
                print(f"  failed: {exc}", flush=True)
    finally:
        results["load_average_after"] = os.getloadavg()
        results["seconds"] = time.perf_counter() - start
        results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_tables(results)
    print(f"\n{results['seconds']:.0f} s in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
