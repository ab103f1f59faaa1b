"""Bad requests and unusable artifact folders: each a named error with a fix, and from
the CLI one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from sdxl_export.errors import (
    ArtifactError,
    BackendUnavailableError,
    CorruptArtifactError,
    IncompatibleManifestError,
    InvalidRequestError,
    MissingComponentError,
)
from sdxl_export.runtime import SDXLPipeline


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    with SDXLPipeline.from_artifacts(tiny_artifacts, backend="onnxruntime", device="cpu") as p:
        yield p


def run_cli(*argv: str) -> tuple[int, str, str]:
    from sdxl_export.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _edit_manifest(root: Path, edit: Any) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


BAD_REQUESTS = {
    "size-not-multiple-of-8": ({"height": 100}, "multiples of 8"),
    "zero-width": ({"width": 0}, "positive"),
    "steps-0": ({"num_inference_steps": 0}, "num_inference_steps"),
    "steps-float": ({"num_inference_steps": 2.5}, "num_inference_steps"),
    "negative-guidance": ({"guidance_scale": -1.0}, "guidance_scale"),
    "nan-guidance": ({"guidance_scale": float("nan")}, "guidance_scale"),
    "denoising-end-0": ({"denoising_end": 0.0}, "denoising_end"),
    "denoising-end-1": ({"denoising_end": 1.0}, "denoising_end"),
    "denoising-end-1.5": ({"denoising_end": 1.5}, "denoising_end"),
    "unknown-scheduler": ({"scheduler": "heun_plus"}, "scheduler"),
    "zero-images": ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    "unknown-output": ({"output_type": "bmp"}, "output_type"),
    "seed-and-generator": ({"seed": 1, "generator": torch.Generator()}, "seed"),
    "negative-seed": ({"seed": -1}, "seed"),
    "negative-batch-mismatch": ({"negative_prompt": ["a", "b", "c"]}, "negative_prompt"),
    "bad-original-size": ({"original_size": (256,)}, "original_size"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_a_named_error(pipe, name):
    kwargs, words = BAD_REQUESTS[name]
    with pytest.raises(InvalidRequestError) as err:
        pipe(["a cat", "a dog"], **kwargs)
    assert words in err.value.message and err.value.hint


@pytest.mark.parametrize("prompt", [None, 5, [], ["a", 3]])
def test_prompt_must_be_text(pipe, prompt):
    with pytest.raises(InvalidRequestError):
        pipe(prompt)


# ---- artifact folders ------------------------------------------------------------------------
def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist") as err:
        SDXLPipeline.from_artifacts(tmp_path / "nope")
    assert "sdxl-export export" in err.value.hint


def test_foreign_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("not ours")
    with pytest.raises(ArtifactError, match="not an sdxl-export artifact folder"):
        SDXLPipeline.from_artifacts(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "someone-else", "format_version": "1.0"}))
    with pytest.raises(ArtifactError, match="not written by sdxl-export"):
        SDXLPipeline.from_artifacts(tmp_path)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "x.onnx"
    f.write_bytes(b"")
    with pytest.raises(ArtifactError, match="is a file"):
        SDXLPipeline.from_artifacts(f)


def test_incompatible_manifest_version(tiny_artifacts_copy):
    _edit_manifest(tiny_artifacts_copy, lambda m: m.update(format_version="99.0"))
    with pytest.raises(IncompatibleManifestError, match="format version 99.0") as err:
        SDXLPipeline.from_artifacts(tiny_artifacts_copy)
    assert "sdxl-export export" in err.value.hint


def test_interrupted_export(tiny_artifacts_copy):
    _edit_manifest(tiny_artifacts_copy, lambda m: m.update(complete=False))
    with pytest.raises(ArtifactError, match="interrupted export") as err:
        SDXLPipeline.from_artifacts(tiny_artifacts_copy)
    assert "finish" in err.value.hint


def test_missing_component_entry(tiny_artifacts_copy):
    _edit_manifest(tiny_artifacts_copy, lambda m: m["components"].pop("unet"))
    with pytest.raises(MissingComponentError, match="no exported unet"):
        SDXLPipeline.from_artifacts(tiny_artifacts_copy)


def test_missing_component_file(tiny_artifacts_copy):
    (tiny_artifacts_copy / "onnx/vae_decoder/model.onnx").unlink()
    with pytest.raises(MissingComponentError, match="vae_decoder"):
        SDXLPipeline.from_artifacts(tiny_artifacts_copy)


def test_truncated_component_file(tiny_artifacts_copy):
    path = tiny_artifacts_copy / "onnx/text_encoder/model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        SDXLPipeline.from_artifacts(tiny_artifacts_copy)


def test_corrupt_component_file_same_size(tiny_artifacts_copy):
    path = tiny_artifacts_copy / "onnx/text_encoder/model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="hash"):
        SDXLPipeline.from_artifacts(tiny_artifacts_copy, verify_hashes=True)


def test_missing_tokenizer(tiny_artifacts_copy):
    shutil.rmtree(tiny_artifacts_copy / "tokenizer_2")
    with pytest.raises(MissingComponentError, match="tokenizer_2"):
        SDXLPipeline.from_artifacts(tiny_artifacts_copy)


def test_export_without_refiner_runs_base_only(tiny_artifacts_copy):
    _edit_manifest(tiny_artifacts_copy, lambda m: m["components"].pop("refiner_unet"))
    with SDXLPipeline.from_artifacts(tiny_artifacts_copy) as p:
        assert not p.has_refiner
        with pytest.raises(MissingComponentError) as err:
            p("a cat", num_inference_steps=2)
        assert "--no-refiner" in err.value.hint
        out = p("a cat", num_inference_steps=2, refiner=False, output_type="latent")
        assert out.info["refiner_steps"] == 0


def test_unknown_and_unavailable_backends(tiny_artifacts):
    with pytest.raises(InvalidRequestError, match="unknown backend"):
        SDXLPipeline.from_artifacts(tiny_artifacts, backend="tpu")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError):
            SDXLPipeline.from_artifacts(tiny_artifacts, backend="tensorrt")


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_writes_images_and_prints_timings(tiny_artifacts, tmp_path, pipe):
    out = tmp_path / "img" / "cat.png"
    rc, stdout, stderr = run_cli("-q", "run", "a cat", "--artifacts", str(tiny_artifacts), "--steps", "3",
                                 "--seed", "5", "--num-images", "2", "--out", str(out))
    assert rc == 0, stderr
    files = [out, out.with_name("cat-1.png")]
    assert all(f.is_file() for f in files)
    assert f"wrote {files[1]}" in stdout and "seed 5" in stdout
    # the tiny preset has random weights: one line says the image is noise and how to get real ones
    notes = [line for line in stderr.splitlines() if "random" in line]
    assert len(notes) == 1 and "'tiny' preset" in notes[0] and "sdxl-export build --model" in notes[0], stderr
    assert any(line.startswith("unet") for line in stdout.splitlines())
    from PIL import Image

    lib = pipe("a cat", num_inference_steps=3, seed=5, num_images_per_prompt=2)
    for f, img in zip(files, lib.images):
        assert Image.open(f).tobytes() == img.tobytes()  # the CLI is the library, nothing else


def test_random_weights_note_only_for_presets(tiny_artifacts):
    from sdxl_export.runtime.artifact_reader import random_weights_note, read_artifacts

    arts = read_artifacts(tiny_artifacts)
    assert arts.random_weight_preset == "tiny" and "coloured noise" in (random_weights_note(arts) or "")
    arts.manifest = {**arts.manifest, "source": {**arts.manifest["source"], "kind": "folder", "id": "/models/x"}}
    assert arts.random_weight_preset is None and random_weights_note(arts) is None


def test_cli_bucket_and_json(tiny_artifacts, tmp_path):
    rc, stdout, stderr = run_cli("-q", "run", "", "--artifacts", str(tiny_artifacts), "--steps", "2",
                                 "--height", "100", "--width", "410", "--bucket", "--no-refiner", "--json",
                                 "--out", str(tmp_path / "x.png"))
    assert rc == 0, stderr
    report = json.loads(stdout)
    assert report["height"] % 64 == 0 and report["width"] > report["height"]
    assert report["refiner_steps"] == 0 and report["timings"]["total"] > 0


CLI_ERRORS = {
    "missing-folder": (["--artifacts", "{missing}"], "does not exist"),
    "bad-size": (["--height", "100"], "multiples of 8"),
    "steps-0": (["--steps", "0"], "num_inference_steps"),
    "negative-guidance": (["--guidance", "-2"], "guidance_scale"),
    "denoising-end": (["--denoising-end", "1.5"], "denoising_end"),
    "unknown-scheduler": (["--scheduler", "heun_plus"], "unknown scheduler"),
    "unknown-backend": (["--backend", "tpu"], "unknown backend"),
    "interrupted-export": (["--artifacts", "{interrupted}"], "interrupted export"),
}


@pytest.mark.parametrize("name", list(CLI_ERRORS))
def test_cli_errors_are_one_line(name, tiny_artifacts, tmp_path):
    args, words = CLI_ERRORS[name]
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "manifest.json").write_text(json.dumps(
        {"format": "sdxl-export/onnx", "format_version": "1.0", "complete": False, "components": {}}))
    args = [a.format(missing=tmp_path / "missing", interrupted=interrupted) for a in args]
    if "--artifacts" not in args:
        args += ["--artifacts", str(tiny_artifacts)]
    rc, _stdout, stderr = run_cli("-q", "run", "a cat", *args, "--out", str(tmp_path / "o.png"))
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sdxl-export: error:") and words in lines[0] and "Fix:" in lines[0]
    assert "Traceback" not in stderr and not (tmp_path / "o.png").exists()

