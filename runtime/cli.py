"""``sdxl-export run "PROMPT"``: generate image(s) from an artifact folder and print timings.

Output is printed here only; the library logs. Every failure the user can fix is an
:class:`~sdxl_export.errors.SDXLExportError`, which ``cli.main`` prints as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..artifacts import DEFAULT_ARTIFACTS
from ..errors import OutputDirError
from .backends import backend_help
from .schedulers import scheduler_names

log = logging.getLogger(__name__)


def output_paths(out: Path, n: int) -> list[Path]:
    """``FILE.png`` for the first image, ``FILE-1.png``, ``FILE-2.png``... for the others."""
    return [out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="generate images with base+refiner on the exported/built components",
        description="Text-to-image (or image-to-image with --image) with SDXL base (+ refiner) on an "
        "artifact folder, exact to diffusers' "
        "pipelines for the same seed. Prints per-stage timings.",
    )
    p.add_argument("prompt", help="the prompt (empty string allowed)")
    p.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS, metavar="DIR",
                   help=f"artifact folder written by export/build (default {DEFAULT_ARTIFACTS})")
    p.add_argument("--negative", default=None, metavar="TEXT",
                   help="negative prompt (default: none, i.e. SDXL's zero negative conditioning)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 8 (default: the model's native)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 8 (default: the model's native)")
    p.add_argument("--bucket", action="store_true", help="snap height/width to the nearest SDXL aspect bucket")
    p.add_argument("--steps", type=int, default=None,
                   help="inference steps (default: the model's recorded default, else 30)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (<= 1 turns it off; default: the model's recorded default, else 5.0)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    p.add_argument("--scheduler", default=None, metavar="NAME",
                   help="sampler, optionally with a schedule type: "
                   f"{', '.join(scheduler_names()[:15])}, + _karras/_exponential/_beta/_trailing/_uniform "
                   "(e.g. dpmpp_2m_karras, euler_trailing; default: the model's recorded default, else euler)")
    p.add_argument("--eta", type=float, default=0.0, help="eta for schedulers that take it (DDIM, TCD; default 0)")
    p.add_argument("--timesteps", type=_int_list, default=None, metavar="T,T,...",
                   help="explicit timesteps instead of --steps, e.g. 999,749,499,249 (DMD2 with lcm)")
    p.add_argument("--sigmas", type=_float_list, default=None, metavar="S,S,...",
                   help="explicit sigmas instead of --steps (schedulers that take them, e.g. euler)")
    p.add_argument("--denoising-end", type=float, default=0.8, metavar="F",
                   help="fraction of denoising done by the base before the refiner (default 0.8)")
    p.add_argument("--no-refiner", action="store_true", help="base only")
    p.add_argument("--image", type=Path, default=None, metavar="FILE",
                   help="image-to-image from this PNG/JPEG/WebP (its size, or --height/--width to resize it)")
    p.add_argument("--strength", type=float, default=None, metavar="S",
                   help="img2img: how much of the schedule re-runs, in (0, 1] (default 0.3, diffusers')")
    p.add_argument("--refiner-only", action="store_true",
                   help="img2img with the refiner alone: refine --image (no base)")
    p.add_argument("--mask", type=Path, default=None, metavar="FILE",
                   help="inpaint --image: white = repaint, black = keep (diffusers' inpaint pipeline; "
                   "--strength defaults to 0.9999, 1.0 starts from noise)")
    p.add_argument("--mask-crop", type=int, default=None, metavar="PX",
                   help="inpaint only a crop around the mask with this margin, pasted back (padding_mask_crop)")
    p.add_argument("--hires-scale", type=float, default=None, metavar="S",
                   help="hires fix: a first pass at --height/--width, upscale by S, an img2img pass at that size")
    p.add_argument("--hires-upscaler", default="latent", metavar="NAME",
                   help="hires fix upscaler: latent (bilinear), latent-antialiased, latent-bicubic, "
                   "latent-bicubic-antialiased, latent-nearest, latent-nearest-exact, lanczos, nearest "
                   "(or the web UI's names)")
    p.add_argument("--hires-steps", type=int, default=None, metavar="N",
                   help="hires fix: the second pass's steps (default --steps; it runs int(N x strength))")
    p.add_argument("--hires-strength", type=float, default=None, metavar="S",
                   help="hires fix: the second pass's denoising strength (default 0.7)")
    p.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default 1)")
    p.add_argument("--backend", default="auto", metavar="NAME", help=backend_help())
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", type=Path, default=Path("sdxl.png"), metavar="FILE.png",
                   help="output image (several: FILE.png, FILE-1.png, ...; default sdxl.png)")
    p.add_argument("--json", action="store_true", help="print the timings as JSON instead of a table")
    from ..cli_common import add_lora_option

    add_lora_option(p, "switched in at run time (no rebuild; torch and onnxruntime backends)")
    from . import controlnet_cli

    controlnet_cli.add_options(p)
    p.set_defaults(func=cmd_run)


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timesteps {text!r} (expected e.g. 999,749,499,249)") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid sigmas {text!r} (expected e.g. 14.6,3.0,0.9,0.2)") from None


def cmd_run(args: argparse.Namespace) -> int:
    from . import controlnet_cli
    from .pipeline import SDXLPipeline

    with SDXLPipeline.from_artifacts(args.artifacts, backend=args.backend, device=args.device,
                                     load_refiner=not args.no_refiner) as pipe:
        if args.loras:
            pipe.set_loras(dict(args.loras))
        height, width = args.height, args.width
        if args.bucket:
            height, width = pipe.nearest_size(height or pipe.native_size, width or pipe.native_size)
            log.info("nearest bucket: %dx%d", height, width)
        refiner = not args.no_refiner
        if refiner and not pipe.has_refiner and not args.refiner_only:
            log.warning("%s has no refiner: running the base only", args.artifacts)
            refiner = False
        from ..progress_bars import StepBar

        bar = StepBar(args.steps or 0)  # drawn only when stderr is a terminal; grows as stages start
        try:
            result = pipe(args.prompt, args.negative, height=height, width=width, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, denoising_end=args.denoising_end, refiner=refiner,
                          seed=args.seed, num_images_per_prompt=args.num_images, scheduler=args.scheduler,
                          image=args.image, strength=args.strength, refiner_only=args.refiner_only,
                          mask_image=args.mask, padding_mask_crop=args.mask_crop, eta=args.eta,
                          timesteps=args.timesteps, sigmas=args.sigmas, callback_on_step_end=bar,
                          **controlnet_cli.call_kwargs(args, height, width),
                          **({} if args.hires_scale is None else {
                              "hires_scale": args.hires_scale, "hires_upscaler": args.hires_upscaler,
                              "hires_steps": args.hires_steps, "hires_strength": args.hires_strength}))
        finally:
            bar.close()
    paths = output_paths(args.out, len(result.images))
    for image, path in zip(result.images, paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except OSError as exc:
            raise OutputDirError(f"cannot write {path} ({exc.strerror or exc})",
                                 "pass a writable --out FILE.png") from None
    info = result.info
    if pipe.random_weights_note:  # after the images: an error stays the one line it is
        print(pipe.random_weights_note, file=sys.stderr)
    if args.json:
        print(json.dumps({"images": [str(p) for p in paths], "seed": result.seed, **info,
                          "timings": result.timings.to_dict()}, indent=2))
        return 0
    for path in paths:
        print(f"wrote {path}")
    if info.get("inpaint"):
        print(f"inpainted {args.image} under {args.mask}, strength {info['strength']}"
              + (f", crop {info['mask_crop']}" if info.get("mask_crop") else ""))
    elif info.get("img2img"):
        print(f"img2img from {args.image}, strength {info['strength']}"
              + (", refiner only" if info["refiner_only"] else ""))
    if info.get("hires"):
        hi = info["hires"]
        print(f"hires fix: {hi['first_size'][0]}x{hi['first_size'][1]} -> {hi['upscaler']} -> "
              f"{hi['target'][0]}x{hi['target'][1]}, strength {hi['strength']}")
    print(f"seed {result.seed}, {info['height']}x{info['width']}, {info['scheduler']}, "
          f"{info['base_steps']} base + {info['refiner_steps']} refiner steps, {info['backend']} on {info['device']}")
    for line in result.timings.summary_lines():
        print(line)
    return 0
