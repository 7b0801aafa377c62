"""Quality against steps: the shapes score of N samples of a built-in-shapes model for DDIM and DPM-Solver++ at
several step counts, with DDPM's full chain as the reference, and the sampling time of each (docs/sampling.md).

$ OMP_NUM_THREADS=1 nice -n 15 python benchmarks/sampling_quality.py /work/trials/quickstart \
      --output_json /work/trials/sampling_quality.json --plot docs/sampling-quality.png

Every setting draws its N samples from the same noise seed, in batches of --batch_size, with generate (so the
deterministic samplers start from the same x_T). A setting is a sampler (ddpm, ddim, dpm: ddpm.sampling.SAMPLERS)
built from the folder's scheduler config as diffusers' from_config builds it, options on top (--spacings gives
each fast sampler a timestep_spacing, or the folder's own: "folder"), and a step count. --extra adds settings,
SAMPLER/STEPS,STEPS/KEY=VALUE,KEY=VALUE (values read as JSON where they parse: true, 3), e.g.
dpm/10,20/timestep_spacing=trailing,algorithm_type=sde-dpmsolver++. The time is the wall time of sampling alone,
the score's fit excluded. Results go to --output_json after each setting; a run started again skips the settings
already there.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm.pipeline_io import load_pipeline
from ddpm.sampling import generate_in_batches, sampling_scheduler
from ddpm.shapes_score import shapes_score


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="DDPMPipeline folder of a model of the built-in shapes (RGB)")
    parser.add_argument("--num_images", type=int, default=256, help="samples per setting (default: %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100],
                        help="step counts for ddim and dpm (default: %(default)s)")
    parser.add_argument("--reference_steps", type=int, nargs="+", default=[1000, 100],
                        help="step counts for ddpm, the reference first (default: %(default)s)")
    parser.add_argument("--spacings", nargs="+", default=["folder", "trailing"],
                        help="timestep_spacing of ddim and dpm: 'folder' (the config's own), linspace, leading or "
                             "trailing (default: %(default)s)")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="more settings, SAMPLER/STEPS,STEPS/KEY=VALUE,KEY=VALUE (default: none)")
    parser.add_argument("--seed", type=int, default=1, help="noise seed of every setting (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=256, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--output_json", required=True, help="results, one entry per setting, written as they come")
    parser.add_argument("--plot", default=None, help="write the valid fraction and TV against steps there (PNG)")
    return parser.parse_args()


def parse_value(text: str):
    """A --extra option's value: JSON where it parses (true, 3, 0.5), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def settings(args: argparse.Namespace) -> list[tuple[str, int, dict]]:
    """(sampler, steps, scheduler options) of every measurement, the reference first."""
    reference = [("ddpm", steps, {}) for steps in args.reference_steps]
    fast = [(sampler, steps, {} if spacing == "folder" else {"timestep_spacing": spacing})
            for spacing in args.spacings for sampler in ("ddim", "dpm") for steps in args.steps]
    extra = []
    for text in args.extra:
        sampler, steps, options = (text.split("/") + [""])[:3]
        pairs = [item.split("=", 1) for item in options.split(",") if item]
        extra += [(sampler, int(n), {key: parse_value(value) for key, value in pairs}) for n in steps.split(",")]
    return reference + fast + extra


def label(sampler: str, options: dict) -> str:
    """A setting's name in the table and the plot, its step count aside."""
    name = {"ddpm": "DDPM", "ddim": "DDIM", "dpm": "DPM-Solver++"}[sampler]
    return ", ".join([name] + [f"{key}={value}" for key, value in sorted(options.items())])


def measure(unet, config: dict, sampler: str, steps: int, options: dict, args: argparse.Namespace) -> dict:
    """Draw the samples of one setting, time it, and score them."""
    scheduler = sampling_scheduler(sampler, {**config, **options})
    start = time.perf_counter()
    images = generate_in_batches(unet, scheduler, args.num_images, torch.Generator().manual_seed(args.seed), steps,
                                 args.batch_size)
    seconds = time.perf_counter() - start
    result = shapes_score(images)
    return {"sampler": sampler, "options": options, "label": label(sampler, options),
            "spacing": scheduler.config["timestep_spacing"], "steps": steps, "seconds": seconds,
            "valid_fraction": result.valid_fraction, "classes_covered": result.classes_covered,
            "tv_to_uniform": result.tv_to_uniform, "median_rmse": result.median_rmse,
            "num_images": result.num_images, "summary": str(result)}


def plot(results: list[dict], path: str) -> None:
    """Valid fraction and TV to uniform against steps, one line per setting, the first (DDPM's full chain) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 6), layout="constrained")
    reference = results[0]
    lines = list(dict.fromkeys(r["label"] for r in results[1:]))
    for axis, key, label in [(axes[0], "valid_fraction", "valid fraction"), (axes[1], "tv_to_uniform",
                                                                             "TV to uniform (lower is better)")]:
        for name in lines:
            points = sorted((r["steps"], r[key]) for r in results[1:] if r["label"] == name)
            axis.plot(*zip(*points), marker="o", label=name)
        axis.axhline(reference[key], color="black", linestyle="--", label=f"DDPM, {reference['steps']} steps")
        axis.set(xscale="log", xlabel="denoising steps (UNet evaluations)", ylabel=label)
        steps = sorted({r["steps"] for r in results[1:]})
        axis.set_xticks(steps, [str(n) for n in steps])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    figure.suptitle(f"shapes score of {reference['num_images']} samples against steps")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    unet, scheduler = load_pipeline(args.model_dir)
    unet.eval()
    config = dict(scheduler.config)
    output = Path(args.output_json)
    results = json.loads(output.read_text()) if output.exists() else []
    done = {(r["label"], r["steps"]) for r in results}
    for sampler, steps, options in settings(args):
        if (label(sampler, options), steps) in done:
            continue
        result = measure(unet, config, sampler, steps, options, args)
        results.append(result)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{result['label']} ({result['spacing']} spacing), {steps} steps: {result['summary']}, sampling "
              f"{result['seconds']:.1f} s", flush=True)
    print("| sampler | spacing | steps | valid fraction | TV to uniform | median RMSE | sampling time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['spacing']} | {r['steps']} | {r['valid_fraction']:.3f} | "
              f"{r['tv_to_uniform']:.3f} | {r['median_rmse']:.1f} | {r['seconds']:.1f} |")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
