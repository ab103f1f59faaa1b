"""``sdxl-export run`` options for one ControlNet (several go through the Python API and the server)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidImageError


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet (export/build with --controlnet first)")
    g.add_argument("--control-image", type=Path, default=None, metavar="FILE",
                   help="control map (or, with --control-module, the image to preprocess)")
    g.add_argument("--controlnet", default=None, metavar="NAME", help="which ControlNet (default: the only one built)")
    g.add_argument("--controlnet-scale", type=float, default=1.0, metavar="S",
                   help="controlnet_conditioning_scale (default 1.0)")
    g.add_argument("--control-start", type=float, default=0.0, metavar="F",
                   help="control_guidance_start: fraction of steps before the ControlNet acts (default 0)")
    g.add_argument("--control-end", type=float, default=1.0, metavar="F",
                   help="control_guidance_end: fraction of steps after which it stops (default 1)")
    g.add_argument("--guess-mode", action="store_true", help="diffusers' guess mode")
    g.add_argument("--control-module", default="none", metavar="NAME",
                   help="preprocessor: none (the image is a control map), canny, invert, tile_resample")
    g.add_argument("--control-threshold-a", type=float, default=None, metavar="A",
                   help="A1111 threshold_a (canny low threshold, tile_resample rate)")
    g.add_argument("--control-threshold-b", type=float, default=None, metavar="B",
                   help="A1111 threshold_b (canny high threshold)")
    g.add_argument("--control-resize-mode", default="Crop and Resize", metavar="MODE",
                   help='"Just Resize", "Crop and Resize" (default) or "Resize and Fill"')


def call_kwargs(args: argparse.Namespace, height: int | None, width: int | None, vae_scale: int = 8) -> dict[str, Any]:
    """The pipeline keyword arguments of the ControlNet options ({} without --control-image)."""
    if args.control_image is None:
        return {}
    from PIL import Image, UnidentifiedImageError

    from .control_preprocess import canonical_module, control_map

    module = canonical_module(args.control_module)
    try:
        image: Any = Image.open(args.control_image).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidImageError(f"cannot read --control-image {args.control_image} ({exc})",
                                "pass a PNG or JPEG file") from None
    if module != "none":
        h = height or image.height // vae_scale * vae_scale
        w = width or image.width // vae_scale * vae_scale
        image = control_map(image, module, h, w, resize_mode=args.control_resize_mode,
                            threshold_a=args.control_threshold_a, threshold_b=args.control_threshold_b,
                            processor_res=min(h, w))
    return {"control_image": image, "controlnet": args.controlnet,
            "controlnet_conditioning_scale": args.controlnet_scale, "control_guidance_start": args.control_start,
            "control_guidance_end": args.control_end, "guess_mode": args.guess_mode}
