"""``make bench``: saliency throughput as ratios to forward-only inference, measured side by side in one run.

Every contestant explains the same batch on the same model; rounds are interleaved (each round times every
contestant once), and the ratio of each round's forward-only time to the contestant's time is reported as the
median over rounds, since these shared machines are noisy. The reference libraries are called the standard way
(their documented usage, parameters left trainable as a user's model is). Writes ``reports/bench/saliency.json``
and prints a table. Usage::

    python -m benchmarks.saliency [--model resnet50] [--size 224] [--batch 16] [--rounds 5] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see README, "Benchmarks"

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

from audit.models.layers import find_target_layer  # noqa: E402
from audit.saliency import SaliencyOptions, build_methods, explain  # noqa: E402

CAM_FAMILY = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam"]
INPUT_METHODS = ["gradient", "gradient_x_input", "guided_backprop", "deconvnet"]


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    contestants: dict[str, Callable[[], object]], reference: str, rounds: int, device: torch.device
) -> dict[str, dict]:
    """Time every contestant once per round (after one warm-up call each); ratios to ``reference`` per round."""
    for fn in contestants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            times[name].append(timed(fn, device))
    out = {}
    for name, values in times.items():
        ratios = [r / t for r, t in zip(times[reference], values, strict=True)]
        out[name] = {
            "seconds": statistics.median(values),
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "rounds": rounds,
            "times": values,
        }
    return out


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """The model as the audit runs it: eval mode, parameters not requiring grad."""
    clone = copy.deepcopy(model).eval()
    clone.requires_grad_(False)
    return clone


def input_gradient_floor(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The floor of every input-gradient method: one forward plus one backward to the input only."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (gradient,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return gradient


def main_table(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    user_model = timm.create_model(args.model, pretrained=False, num_classes=1000).eval().to(device)
    ours = frozen(user_model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    layer = find_target_layer(ours, x[:1])
    layer_module = user_model.get_submodule(layer.name)
    with torch.no_grad():  # not inference_mode: the targets are used in autograd later
        target = ours(x).argmax(1)
    options = SaliencyOptions()
    gradcam = build_methods(["gradcam"], ours, layer, options)
    cams = build_methods(CAM_FAMILY, ours, layer, options)
    contestants: dict[str, Callable[[], object]] = {}

    def forward() -> None:
        with torch.inference_mode():
            ours(x)

    contestants["forward only (inference_mode)"] = forward
    contestants["floor: forward + backward to the input"] = lambda: input_gradient_floor(ours, x, target)
    contestants["ours: gradcam"] = lambda: explain(gradcam, x)
    contestants["ours: all 7 CAM variants together"] = lambda: explain(cams, x)
    try:
        import pytorch_grad_cam

        def pgc_gradcam() -> None:
            with pytorch_grad_cam.GradCAM(model=user_model, target_layers=[layer_module]) as cam:
                cam(input_tensor=x, targets=None)

        contestants["pytorch-grad-cam: GradCAM"] = pgc_gradcam
    except ImportError:
        print("pytorch-grad-cam is not installed: its rows are skipped (pip install grad-cam)", file=sys.stderr)
    try:
        import captum.attr as ca

        def captum_lgc() -> None:
            attribution = ca.LayerGradCam(user_model, layer_module).attribute(x, target=target)
            ca.LayerAttribution.interpolate(attribution, x.shape[-2:], interpolate_mode="bilinear")

        contestants["captum: LayerGradCam + interpolate"] = captum_lgc
        captum_methods = {
            "gradient": lambda: ca.Saliency(user_model).attribute(x, target=target),
            "gradient_x_input": lambda: ca.InputXGradient(user_model).attribute(
                x.clone().requires_grad_(), target=target
            ),
            "guided_backprop": lambda: ca.GuidedBackprop(user_model).attribute(x, target=target),
            "deconvnet": lambda: ca.Deconvolution(user_model).attribute(x, target=target),
        }
    except ImportError:
        captum_methods = {}
        print("captum is not installed: its rows are skipped (pip install captum)", file=sys.stderr)
    for name in INPUT_METHODS:
        method = build_methods([name], ours, layer, options)
        contestants[f"ours: {name}"] = lambda method=method: explain(method, x, target)
        if name in captum_methods:
            contestants[f"captum: {name}"] = captum_methods[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = interleaved(contestants, "forward only (inference_mode)", args.rounds, device)
    floor = rows["floor: forward + backward to the input"]
    for row in rows.values():
        row["img_per_s"] = args.batch / row["seconds"]
        row["ratio_to_floor"] = paired(floor, row)
    return rows


def expanded_table(args: argparse.Namespace, device: torch.device) -> dict:
    """Integrated Gradients and SmoothGrad (n expanded samples per image) against n × the floor, and Captum."""
    torch.manual_seed(0)
    user_model = timm.create_model(args.model, pretrained=False, num_classes=1000).eval().to(device)
    ours = frozen(user_model)
    batch = max(1, args.batch // 8)
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    with torch.no_grad():  # not inference_mode: the targets are used in autograd later
        target = ours(x).argmax(1)
    steps, samples = 32, 16
    options = SaliencyOptions(ig_steps=steps, smoothgrad_samples=samples, samples_per_batch=16)
    ig = build_methods(["integrated_gradients"], ours, None, options)
    sg = build_methods(["smoothgrad"], ours, None, options)
    # The floor of n expanded samples is n single gradients at the same chunk size (16 samples per pass). It is run
    # as many passes as Integrated Gradients makes (batch · steps / 16), so that each round's floor and contestants
    # take about as long and the paired ratio sees the same load.
    x16 = torch.randn(16, 3, args.size, args.size, device=device)
    t16 = torch.zeros(16, dtype=torch.long, device=device)
    passes = max(1, batch * steps // 16)

    def floor_passes() -> None:
        for _ in range(passes):
            input_gradient_floor(ours, x16, t16)

    contestants: dict[str, Callable[[], object]] = {
        "floor: forward + backward to the input": floor_passes,
        f"ours: integrated_gradients ({steps} steps)": lambda: explain(ig, x, target),
        f"ours: smoothgrad ({samples} samples)": lambda: explain(sg, x, target),
    }
    try:
        import captum.attr as ca

        contestants[f"captum: IntegratedGradients ({steps} steps)"] = lambda: ca.IntegratedGradients(
            user_model
        ).attribute(x, target=target, n_steps=steps, internal_batch_size=16)
        contestants[f"captum: NoiseTunnel(Saliency) ({samples} samples)"] = lambda: ca.NoiseTunnel(
            ca.Saliency(user_model)
        ).attribute(x, target=target, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=16, stdevs=0.15)
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = interleaved(contestants, "floor: forward + backward to the input", max(1, args.rounds - 1), device)
    floor = rows["floor: forward + backward to the input"]
    for name, row in rows.items():
        n = steps if "steps" in name else samples if "samples" in name else 0
        images = batch if n else 16 * passes
        row["img_per_s"] = images / row["seconds"]
        # n · images samples against the floor's 16 · passes, paired round by round.
        row["ratio_to_floor"] = (n * images if n else 16 * passes) / (16 * passes) * paired(floor, row)
        row["batch"] = images
    return rows


def scorecam_table(args: argparse.Namespace, device: torch.device) -> dict:
    """Score-CAM on one image: full (1 + C forwards) and with a channel budget, against its floor."""
    from audit.saliency import perturbation

    torch.manual_seed(0)
    model = frozen(timm.create_model(args.model, pretrained=False, num_classes=1000).eval().to(device))
    x = torch.randn(1, 3, args.size, args.size, device=device)
    layer = find_target_layer(model, x)
    with torch.inference_mode():
        channels = layer.to_spatial(_layer_output(model, layer.name, x)).shape[1]
    # The floor is timed at Score-CAM's own chunk size (what its memory budget allows), on masked copies of the
    # image, and both before and after each Score-CAM run (their mean): a full run takes minutes, over which the
    # load of a shared machine drifts.
    chunk = perturbation._clean_forward(model, x, SaliencyOptions(), input_copies=3)[1]
    xs = x * torch.rand(chunk, 1, args.size, args.size, device=device)

    def forward_chunk() -> None:
        with torch.inference_mode():
            model(xs)

    def per_image() -> float:
        return statistics.median(timed(forward_chunk, device) for _ in range(3)) / chunk

    forward_chunk()
    rows: dict[str, dict] = {}
    maps = {}
    budget = args.scorecam_budget
    floors = []
    for label, k in ((f"ours: scorecam, channel budget {budget}", budget), ("ours: scorecam, all channels", None)):
        if k is None and args.quick:
            continue
        method = build_methods(["scorecam"], model, layer, SaliencyOptions(scorecam_channels=k))
        before = per_image()
        start = time.perf_counter()
        maps[label] = explain(method, x)["scorecam"].maps
        seconds = time.perf_counter() - start
        one = (before + per_image()) / 2
        floors.append(one)
        used = k or channels
        rows[label] = {
            "seconds": seconds,
            "floor_seconds": (1 + used) * one,
            "ratio_to_floor": (1 + used) * one / seconds,
            "channels": used,
            "chunk": chunk,
        }
    floor = (1 + channels) * statistics.mean(floors)
    full_label = "ours: scorecam, all channels"
    if full_label in rows:
        budget_label = f"ours: scorecam, channel budget {budget}"
        rows[budget_label]["speedup_vs_full"] = rows[full_label]["seconds"] / rows[budget_label]["seconds"]
        agreement = getattr(perturbation, "scorecam_agreement", None)
        if agreement is not None:
            rows[budget_label]["rank_correlation_vs_full"] = float(
                agreement(maps[full_label], maps[budget_label]).mean()
            )
    rows["floor (1 + C forwards per image)"] = {"seconds": floor, "channels": channels}
    return rows


def _layer_output(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, o: out.setdefault("y", o))
    model(x)
    handle.remove()
    return out["y"]


def other_perturbation_table(args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds per image of RISE, occlusion and I-GOS (no targets; for planning)."""
    torch.manual_seed(0)
    model = frozen(timm.create_model(args.model, pretrained=False, num_classes=1000).eval().to(device))
    x = torch.randn(1, 3, args.size, args.size, device=device)
    layer = find_target_layer(model, x)
    settings = {
        "rise": SaliencyOptions(rise_masks=250),
        "occlusion": SaliencyOptions(occlusion_window=32, occlusion_stride=16),
        "igos": SaliencyOptions(igos_iterations=5, igos_steps=5),
    }
    rows = {}
    for name, options in settings.items():
        method = build_methods([name], model, layer, options)
        start = time.perf_counter()
        explain(method, x)
        rows[f"ours: {name}"] = {
            "seconds_per_image": time.perf_counter() - start,
            "options": {k: v for k, v in vars(options).items() if v != getattr(SaliencyOptions(), k)},
        }
    return rows


MEMORY_SNIPPET = """
import os, sys, json
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import timm, torch
from audit.saliency import SaliencyOptions, build_methods, explain
from audit.models.layers import find_target_layer
method, budget, model_name, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
model = timm.create_model(model_name, pretrained=False, num_classes=1000).eval().requires_grad_(False)
x = torch.randn(2, 3, size, size)
layer = find_target_layer(model, x[:1])
with torch.inference_mode():
    model(x)
def high_water_mb():
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a large parent would report the parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = high_water_mb()
options = SaliencyOptions(memory_budget_mb=budget, scorecam_channels=128, rise_masks=128, smoothgrad_samples=16,
                          ig_steps=16, occlusion_window=32, occlusion_stride=32)
explain(build_methods([method], model, layer, options), x)
print(json.dumps({"extra_peak_mb": high_water_mb() - base}))
"""


def memory_table(args: argparse.Namespace) -> dict:
    """Extra peak resident memory of each chunked method under two budgets (one subprocess each, CPU)."""
    rows = {}
    for method in ("scorecam", "rise", "smoothgrad", "integrated_gradients", "occlusion"):
        for budget in (128, 512, 1024):
            result = subprocess.run(
                [sys.executable, "-c", MEMORY_SNIPPET, method, str(budget), args.model, str(args.size)],
                capture_output=True,
                text=True,
                check=False,
            )
            try:
                extra = json.loads(result.stdout.strip().splitlines()[-1])["extra_peak_mb"]
            except (IndexError, json.JSONDecodeError, KeyError):
                extra = None
                print(f"memory run {method} {budget} failed: {result.stderr[-500:]}", file=sys.stderr)
            rows[f"{method} @ {budget} MB budget"] = {
                "method": method,
                "budget_mb": budget,
                "extra_peak_mb": extra,
                "within_budget": extra is not None and extra <= budget,
            }
    return rows


# "No slower than Captum" allows this much: two runs of the same computation (our gradient and Captum's Saliency
# are the same forward and input backward) differ by about this here.
NOISE_TOLERANCE = 0.97


def paired(slow: dict, fast: dict) -> float:
    """Median over rounds of slow's time ÷ fast's time in the same round (robust to load that drifts between
    rounds); falls back to the ratio of medians when per-round times are missing."""
    if slow.get("times") and fast.get("times") and len(slow["times"]) == len(fast["times"]):
        return statistics.median(a / b for a, b in zip(slow["times"], fast["times"], strict=True))
    return slow["seconds"] / fast["seconds"]


def targets(results: dict) -> list[dict]:
    """The issue's performance targets, each with the measured figure and whether it is met."""
    main = results["main"]
    checks = []

    def check(what: str, value: float | None, bar: float) -> None:
        checks.append({"target": what, "measured": value, "bar": bar, "met": value is not None and value >= bar})

    check("gradcam ≥ 0.85× forward-only throughput", main["ours: gradcam"]["ratio"], 0.85)
    if "pytorch-grad-cam: GradCAM" in main:
        check(
            "gradcam ≥ 3× pytorch-grad-cam GradCAM",
            paired(main["pytorch-grad-cam: GradCAM"], main["ours: gradcam"]),
            3.0,
        )
    check("all 7 CAM variants together ≥ 0.8× forward-only", main["ours: all 7 CAM variants together"]["ratio"], 0.8)
    for name in INPUT_METHODS:
        check(f"{name} ≥ 0.9× the forward + input-backward floor", main[f"ours: {name}"]["ratio_to_floor"], 0.9)
        if f"captum: {name}" in main:
            check(
                f"{name} no slower than Captum (speed ratio ≥ {NOISE_TOLERANCE}, the noise band)",
                paired(main[f"captum: {name}"], main[f"ours: {name}"]),
                NOISE_TOLERANCE,
            )
    expanded = results["expanded"]
    for ours, theirs in (("integrated_gradients", "IntegratedGradients"), ("smoothgrad", "NoiseTunnel")):
        mine = next(v for k, v in expanded.items() if k.startswith(f"ours: {ours}"))
        check(f"{ours} ≥ 0.9× n × the floor", mine["ratio_to_floor"], 0.9)
        other = next((v for k, v in expanded.items() if k.startswith(f"captum: {theirs}")), None)
        if other:
            check(
                f"{ours} no slower than Captum (speed ratio ≥ {NOISE_TOLERANCE}, the noise band)",
                paired(other, mine),
                NOISE_TOLERANCE,
            )
    score = results["scorecam"]
    budget_row = next(v for k, v in score.items() if "budget" in k)
    full_row = score.get("ours: scorecam, all channels")
    if full_row:
        check("scorecam ≥ 0.9× its floor (1 + C forwards per image)", full_row["ratio_to_floor"], 0.9)
        check("scorecam with a 64-channel budget ≥ 10× faster than full", budget_row.get("speedup_vs_full"), 10.0)
    return checks


def print_tables(results: dict) -> None:
    print(
        f"\nSaliency benchmark: {results['model']} {results['size']} px, batch {results['batch']}, "
        f"{results['device']}, torch {results['torch']}"
    )
    print(f"{'contestant':58s} {'img/s':>8s} {'× forward':>10s} {'× floor':>8s}")
    for name, row in results["main"].items():
        print(f"{name:58s} {row['img_per_s']:8.2f} {row['ratio']:10.2f} {row['ratio_to_floor']:8.2f}")
    print("\nExpanded methods (IG and SmoothGrad on a few images, the floor on 16):")
    for name, row in results["expanded"].items():
        print(f"{name:58s} {row['img_per_s']:8.3f} {'':10s} {row['ratio_to_floor']:8.2f}")
    print("\nScore-CAM (1 image):")
    for name, row in results["scorecam"].items():
        extra = "".join(f"  {k}={v:.3g}" for k, v in row.items() if k not in ("seconds",) and isinstance(v, float))
        print(f"{name:58s} {row['seconds']:8.1f} s{extra}")
    for name, row in results.get("perturbation", {}).items():
        print(f"{name:58s} {row['seconds_per_image']:8.1f} s per image  {row['options']}")
    if results.get("memory"):
        print("\nExtra peak memory (2 images, MB):")
        for name, row in results["memory"].items():
            print(f"{name:58s} {row['extra_peak_mb'] if row['extra_peak_mb'] is not None else 'failed':>8}")
    print("\nTargets:")
    for t in results["targets"]:
        value = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        print(f"  [{'met' if t['met'] else 'NOT MET'}] {t['target']}: {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scorecam-budget", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="skip full Score-CAM and the memory table")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/saliency.json"))
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    all_results = []
    for device in devices:
        results = {
            "model": args.model,
            "size": args.size,
            "batch": args.batch,
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        }
        results["main"] = main_table(args, device)
        results["expanded"] = expanded_table(args, device)
        results["scorecam"] = scorecam_table(args, device)
        results["perturbation"] = other_perturbation_table(args, device)
        if device.type == "cpu" and not args.quick:
            results["memory"] = memory_table(args)
        results["targets"] = targets(results)
        results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print_tables(results)
        all_results.append(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(all_results if len(all_results) > 1 else all_results[0], indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
