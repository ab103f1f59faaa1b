"""Named benchmark suites: the settings each preset is benchmarked with.

``tiny``   smoke test: proves the benchmark runs end to end (the test suite runs it).
``small``  the CPU benchmark whose table goes in the README: 512x512, 20 steps,
           base+refiner (denoising_end 0.8), guidance 5.0, Euler: ONNX Runtime, OpenVINO fp32,
           OpenVINO bf16 and OpenVINO int8 (engines built with ``--precision bf16|int8``, each
           into its own folder) vs diffusers eager fp32 and diffusers eager bf16, with the
           fidelity gates (bf16: 1 dB, int8: 3 dB; see runtime/fidelity.py).
``sdxl``   full-size architecture with random weights, GPU only: TensorRT and the torch
           backend vs diffusers on the GPU, over three SDXL buckets.

Run one::

    sdxl-export bench --suite small --work-dir bench-small --json small.json --plot small.png
    python -m sdxl_export.benchmarks.suites small --json small.json     # the same

``--work-dir`` keeps the export and engines between runs (they are rebuilt only when
the model or the code changed: export and build are incremental).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BackendUnavailableError
from .bench import BenchConfig, Variant


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    config: Callable[[], BenchConfig]
    needs_gpu: bool = False

    def check_machine(self) -> None:
        if not self.needs_gpu:
            return
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"the {self.name} suite needs a CUDA GPU and torch sees none",
                                          "run it on a GPU machine, or use --suite small on CPU")


def _torch_gpu_variants() -> list[Variant]:
    """The PyTorch CUDA backend as eager fp32 (what diffusers does) and with our CUDA graphs."""
    return [
        Variant("torch-eager-fp32", backend="torch", device="cuda"),
        Variant("torch-graphs-fp32", backend="torch", device="cuda", options={"cuda_graphs": True}),
        Variant("torch-graphs-fp16", backend="torch", device="cuda",
                options={"cuda_graphs": True, "dtype": "float16"}),
    ]


def _cpu_variants() -> list[Variant]:
    """ONNX Runtime, and OpenVINO from its fp32, bf16 and int8 engine builds (three engine sets:
    ``build --backend openvino`` and ``build --backend openvino --precision bf16|int8``, the VAE fp32)."""
    return [
        Variant("onnxruntime", backend="onnxruntime", device="cpu"),
        Variant("openvino-fp32", backend="openvino", device="cpu"),
        Variant("openvino-bf16", backend="openvino", device="cpu", precision="bf16"),
        Variant("openvino-int8", backend="openvino", device="cpu", precision="int8"),
    ]


SUITES: dict[str, Suite] = {
    "tiny": Suite(
        "tiny", "smoke test of the benchmark itself (seconds)",
        lambda: BenchConfig(model="tiny", variants=[Variant("onnxruntime", backend="onnxruntime")], steps=4,
                            runs=2, warmup=1),
    ),
    "small": Suite(
        "small", "CPU: 512x512, 20 steps, base+refiner, guidance 5: ONNX Runtime, OpenVINO fp32/bf16 vs "
        "diffusers eager fp32 and bf16 (minutes)",
        lambda: BenchConfig(model="small", variants=_cpu_variants(), steps=20, runs=5, warmup=1,
                            baseline_device="cpu", baseline_bf16=True),
    ),
    "small-gpu": Suite(
        "small-gpu", "GPU: the small preset, torch eager / CUDA graphs fp32 / CUDA graphs fp16 vs diffusers "
        "eager fp32 on the same GPU",
        lambda: BenchConfig(model="small", variants=_torch_gpu_variants(), steps=20, runs=10, warmup=2,
                            baseline_device="cuda"),
        needs_gpu=True,
    ),
    "sdxl": Suite(
        "sdxl", "GPU: full-size SDXL (random weights), TensorRT and torch vs diffusers, three buckets",
        lambda: BenchConfig(model="sdxl", variants=[Variant("tensorrt", backend="tensorrt", device="cuda",
                                                            options={"cuda_graphs": True}),
                                                    *_torch_gpu_variants()],
                            buckets="1024x1024,832x1216,1216x832", steps=20, runs=5, warmup=2,
                            baseline_device="cuda"),
        needs_gpu=True,
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sdxl_export.benchmarks.suites NAME [bench options]``: ``sdxl-export bench --suite NAME``
    through the bench's own parser (benchmarks do not go through the top-level command line)."""
    from ..cli_common import Parser, add_subcommands
    from ..errors import SDXLExportError
    from ..logs import setup_logging
    from .cli import register

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUITES:
        print(f"usage: python -m sdxl_export.benchmarks.suites {{{','.join(SUITES)}}} [bench options]",
              file=sys.stderr)
        return 2
    parser = Parser(prog="python -m sdxl_export.benchmarks.suites")
    register(add_subcommands(parser, dest="command"))
    ns = parser.parse_args(["bench", "--suite", *args])
    setup_logging(0)
    try:
        return int(ns.func(ns) or 0)
    except SDXLExportError as exc:
        print(f"suites: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
