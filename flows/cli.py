"""The ``audit`` command line: ``audit run``, ``audit serve``, ``audit demo``, ``audit sql``.

Exit codes: 0 done (gate passed or not set), 1 the release gate failed (``--fail-on``), 2 bad input or settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads starve shared CPUs

import flows  # noqa: E402,F401  (Prefect settings before Prefect is imported)
from audit.config import AuditConfig, build_config  # noqa: E402
from audit.errors import AuditError  # noqa: E402

EXIT_OK, EXIT_GATE, EXIT_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audit", description="Audit an image dataset and a model for shortcut learning."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the whole audit and write DIR/index.html, summary.json, audit.duckdb")
    _add_audit_arguments(run, no_prefect=True)

    serve = commands.add_parser(
        "serve",
        help="run the audit on a schedule as a Prefect deployment (needs `prefect server start` and PREFECT_API_URL)",
        description="Serve the audit as a Prefect deployment that runs on a schedule, into the same --out folder "
        "each time; each run is kept under OUT/runs/<UTC time>/ (OUT/runs/latest points at the newest) and its "
        "report compares it with the previous run. Needs a Prefect server: `prefect server start`, then "
        "PREFECT_API_URL=http://127.0.0.1:4200/api. Stop with SIGTERM or Ctrl-C (this pauses the schedule).",
    )
    schedule = serve.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--cron", help='cron expression, e.g. "0 2 * * *" (every night at 02:00)')
    schedule.add_argument("--interval", type=float, help="seconds between runs")
    serve.add_argument("--timezone", help="IANA time zone of the schedule, e.g. Europe/Berlin (default UTC)")
    serve.add_argument("--name", default="scheduled-audit", help="deployment name (default scheduled-audit)")
    _add_audit_arguments(serve, no_prefect=False)

    demo = commands.add_parser("demo", help="write the synthetic demo dataset with a planted shortcut")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--shortcut-rate", type=float, default=0.9, help="P(token | class 1) = P(no token | class 0)")
    demo.add_argument("--n", type=int, default=600, help="number of images (half per class)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=256, help="image side, px")
    demo.add_argument(
        "--square-rate",
        type=float,
        default=0.0,
        help="P(hidden bright square | class 1): a shortcut no detector knows, for the discovery step (default 0)",
    )

    evaluate = commands.add_parser("eval-regions", help="measure the region detectors against hand-drawn boxes")
    evaluate.add_argument("--root", type=Path, required=True, help="folder the CSV's paths are relative to")
    evaluate.add_argument("--boxes", type=Path, required=True, help="CSV with path, kind, x0, y0, x1, y1")
    evaluate.add_argument("--detectors", default="text,border", help="comma-separated detector names")
    evaluate.add_argument("--min-iou", type=float, default=0.3)
    evaluate.add_argument("--json", type=Path, help="also write the figures as JSON to this file")

    sql = commands.add_parser("sql", help="run a read-only SQL query against a finished audit")
    sql.add_argument("dir", type=Path, help="the audit's output folder (holding audit.duckdb)")
    sql.add_argument("query", help="for example \"SELECT * FROM findings WHERE verdict = 'shortcut'\"")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    return parser


def _add_audit_arguments(parser: argparse.ArgumentParser, *, no_prefect: bool) -> None:
    """The dataset, model and run settings shared by ``audit run`` and ``audit serve`` (``--no-prefect``: run only)."""
    parser.add_argument("--config", type=Path, help="TOML or YAML file with the settings (flags override it)")
    parser.add_argument("--data", type=Path, help="dataset root: class subfolders, or the root of --manifest's paths")
    parser.add_argument(
        "--manifest", type=Path, help="CSV/Parquet with columns path, label (split, group, patient_id optional)"
    )
    parser.add_argument(
        "--findings",
        help="multi-label manifest: comma-separated findings (its 0/1 columns) to audit, each as its own binary audit",
    )
    parser.add_argument(
        "--outputs",
        help="which model output is which label: 'label=index,...' (default: sorted labels are outputs 0, 1, ...)",
    )
    parser.add_argument("--num-outputs", type=int, help="the model's output count, when it differs from the labels'")
    parser.add_argument(
        "--multilabel", action="store_true", help="the model's outputs are independent sigmoid logits, one per finding"
    )
    parser.add_argument("--model", type=Path, help="checkpoint: a state dict (with --arch) or TorchScript")
    parser.add_argument("--arch", help="architecture of --model: a timm name or torchvision:<name>")
    parser.add_argument(
        "--target-layer", help="module name of the saliency target layer (default: found automatically)"
    )
    parser.add_argument(
        "--methods", help="comma-separated saliency methods (default: gradcam; see README for the list)"
    )
    parser.add_argument("--target", help="class each map explains: predicted (default), label, or a class name")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/audit)")
    parser.add_argument("--fail-on", choices=["watch", "shortcut"], help="exit 1 when a finding reaches this level")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, help="shards processed at once (default 2)")
    parser.add_argument(
        "--runner", choices=["threads", "dask"], help="task runner of the shard tasks (default threads)"
    )
    parser.add_argument(
        "--dask-address",
        help="scheduler of an existing Dask cluster, tcp://host:8786 (implies --runner dask; default: a local cluster "
        "of --workers processes)",
    )
    parser.add_argument("--shard-size", type=int, help="images per shard (default 256)")
    parser.add_argument("--batch-size", type=int, help="images per saliency batch (default 32)")
    parser.add_argument("--probe-epochs", type=int, help="epochs of the probe model (default 30)")
    parser.add_argument("--probe-size", type=int, help="input size of the probe model, px (default 160)")
    parser.add_argument("--user-boxes", type=Path, help="CSV of your own region boxes: path, kind, x0, y0, x1, y1")
    parser.add_argument(
        "--user-masks", type=Path, help="folder of your own region masks: MASKS/<kind>/<image path>.png"
    )
    parser.add_argument("--expected", help="a user region kind (e.g. lung) whose outside is reported as outside_<kind>")
    parser.add_argument("--no-region-cache", action="store_true", help="detect regions again even if cached")
    if no_prefect:
        parser.add_argument("--no-prefect", action="store_true", help="run the stages in this process without Prefect")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the final line")


def _audit_config(args: argparse.Namespace) -> AuditConfig:
    """The audit settings of ``audit run`` / ``audit serve``: the --config file, overridden by the flags."""
    dask_address = args.dask_address or os.environ.get("AUDIT_DASK_ADDRESS") or None
    overrides = {
        "data": args.data,
        "manifest": args.manifest,
        "model.path": args.model,
        "model.arch": args.arch,
        "model.target_layer": args.target_layer,
        "model.outputs": _parse_outputs(args.outputs) if args.outputs else None,
        "model.num_outputs": args.num_outputs,
        "model.multilabel": True if args.multilabel else None,
        "finding_columns": [f.strip() for f in args.findings.split(",") if f.strip()] if args.findings else None,
        "methods": args.methods,
        "target": args.target,
        "out": args.out,
        "fail_on": args.fail_on,
        "device": args.device,
        "workers": args.workers,
        "runner": "dask" if dask_address else args.runner,
        "dask_address": dask_address,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "probe.epochs": args.probe_epochs,
        "probe.image_size": args.probe_size,
        "regions.user_boxes": args.user_boxes,
        "regions.user_masks": args.user_masks,
        "regions.expected": args.expected,
        "regions.cache": False if args.no_region_cache else None,
    }
    if args.config is None and args.data is None:
        raise AuditError(f"audit {args.command} needs --data DIR (or --config FILE that sets data)")
    return build_config(args.config, **overrides)


def _parse_outputs(text: str) -> dict[str, int]:
    """``"covid=1,normal=0"`` → ``{"covid": 1, "normal": 0}`` (a label may contain spaces, not ``=`` or ``,``)."""
    mapping: dict[str, int] = {}
    for item in text.split(","):
        label, sep, index = item.rpartition("=")
        if not sep or not label.strip() or not index.strip().isdigit():
            raise AuditError(f"--outputs: expected 'label=index,...' with whole-number indices, found {item!r}")
        mapping[label.strip()] = int(index)
    return mapping


def _run(args: argparse.Namespace) -> int:
    config = _audit_config(args)
    if args.no_prefect and config.runner == "dask":
        raise AuditError("--runner dask runs through Prefect; drop --no-prefect (or use --runner threads)")
    progress = not args.quiet and sys.stderr.isatty()  # on a terminal; logs and pipes get per-shard lines
    if args.no_prefect:
        from audit.pipeline import run_pipeline

        def run_one(settings: AuditConfig) -> dict:
            return run_pipeline(settings, progress=progress)
    else:
        from flows.audit_flow import run_flow

        def run_one(settings: AuditConfig) -> dict:
            return run_flow(settings, progress)

    if config.finding_columns:
        from audit.multilabel import run_findings

        summary = run_findings(config, run_one)
        for row in summary["findings"]:
            print(f"finding {row['finding']}: {row['verdict']}  ({row['images']} images, {row['errors']} errors)")
    else:
        summary = run_one(config)
    counts = summary["counts"]
    print(
        f"verdict: {summary['verdict']}  ({counts['images']} images, {counts['errors']} errors, "
        f"{counts['findings']} findings: {counts['by_verdict']})"
    )
    print(f"report: {config.out / 'index.html'}")
    gate = summary.get("gate")
    if gate and gate["failed"]:
        print(f"release gate FAILED: a finding reached '{gate['fail_on']}'", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    config = _audit_config(args)
    if config.finding_columns:
        raise AuditError(
            "audit serve does not take --findings yet; serve one deployment per finding, each with a manifest "
            "of path and label (the finding's 0/1 column as the label)"
        )
    serve(config, cron=args.cron, interval=args.interval, name=args.name, timezone=args.timezone)
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from audit.data.demo import write_demo

    info = write_demo(
        args.out,
        n=args.n,
        shortcut_rate=args.shortcut_rate,
        seed=args.seed,
        size=args.size,
        square_rate=args.square_rate,
    )
    print(
        f"demo dataset: {info.n_images} images in {args.out} "
        f"(manifest {info.manifest}, ground truth {info.ground_truth})"
    )
    return EXIT_OK


def _eval_regions(args: argparse.Namespace) -> int:
    from audit.regions.evaluate import evaluate_regions, format_table, write_json

    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    result = evaluate_regions(args.root, args.boxes, detectors, args.min_iou)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return EXIT_OK


def _sql(args: argparse.Namespace) -> int:
    from audit.store.catalog import query

    columns, rows = query(args.dir, args.query)
    if args.format == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=1))
    elif args.format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        cells = [[str(c) for c in columns]] + [
            ["" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r] for r in rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        for j, row in enumerate(cells):
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
            if j == 0:
                print("  ".join("-" * w for w in widths))
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Our progress lines (and Prefect's run lines) at INFO; every other library (httpx, ...) at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    for name in ("audit", "prefect"):
        logging.getLogger(name).setLevel(level)
    try:
        commands = {"run": _run, "serve": _serve, "demo": _demo, "sql": _sql, "eval-regions": _eval_regions}
        return commands[args.command](args)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
