"""``sdxl-export export`` and ``inspect`` through the command line.

Bad input must give one line on stderr naming the fix, exit code 2, no traceback and
nothing partial on disk; a killed export must leave nothing a reader trusts and must
resume on rerun.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fixtures import file_states, run_cli, tiny_diffusers_folders, tiny_folder_artifacts
from sdxl_export.artifacts import EXPORT_MANIFEST
from sdxl_export.errors import ArtifactError
from sdxl_export.export import export_model, load_export_manifest

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d [DIWE] ")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def assert_one_line_error(rc: int, stderr: str, *words: str) -> str:
    """Exit 2, and stderr is exactly one line (log lines aside): the error naming its fix."""
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("sdxl-export: error: ") and ". Fix: " in line, line
    for w in words:
        assert w in line, (w, line)
    return line


# ---- a model saved as diffusers folders, exported through --model/--refiner ----------------------
def test_export_cli_from_diffusers_folders(tiny_model, tiny_artifacts, tmp_path_factory, tmp_path):
    base, refiner = tiny_diffusers_folders(tmp_path_factory, tiny_model)
    out = shutil.copytree(tiny_folder_artifacts(tmp_path_factory, tiny_model), tmp_path / "artifacts")
    rc, stdout, stderr = run_cli("export", "--model", str(base), "--refiner", str(refiner), "--out", str(out))
    assert rc == 0, stderr
    m = load_export_manifest(out, verify=True)
    assert m["source"]["kind"] == "folder" and m["source"]["id"] == str(base.resolve())
    assert m["source"]["refiner"] == str(refiner.resolve())
    assert len(m["components"]) == 6 and all(c["validation"]["passed"] for c in m["components"].values())
    table = [ln for ln in stdout.splitlines() if ln.split() and ln.split()[0] in m["components"]]
    assert len(table) == 6 and all(" pass " in ln for ln in table), stdout
    # Same weights as the preset: the folder's graphs compute what the preset's compute.
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    feeds = None
    for root in (out, tiny_artifacts):
        sess = ort.InferenceSession(str(root / "onnx/unet/model.onnx"), opts, providers=["CPUExecutionProvider"])
        if feeds is None:
            from sdxl_export.specs import ComponentSpec

            feeds = ComponentSpec.from_dict(m["components"]["unet"]["spec"]).example_inputs(1, 256, 320, seed=3)
            first = sess.run(None, feeds)[0]
        else:
            np.testing.assert_allclose(sess.run(None, feeds)[0], first, atol=1e-6)

    rc, stdout, _ = run_cli("export", "--model", str(base), "--refiner", str(refiner), "--out", str(out))
    assert rc == 0 and stdout.startswith("up to date: nothing to do"), stdout

    rc, stdout, stderr = run_cli("export", "--model", str(base), "--no-refiner", "--out", str(out))
    assert rc == 0, stderr
    m = load_export_manifest(out)
    assert "refiner_unet" not in m["components"] and len(m["components"]) == 5
    assert "exported 0, kept 5 of 5 components" in stdout


# ---- bad input -------------------------------------------------------------------------------------
def _broken_base(folders: tuple[Path, Path], tmp_path: Path, how: str) -> Path:
    base = shutil.copytree(folders[0], tmp_path / "base")
    if how == "missing":
        shutil.rmtree(base / "text_encoder_2")
    else:  # pickle-only: a .bin whose unpickling would create a folder
        for p in (base / "vae").glob("*.safetensors"):
            p.unlink()
        (base / "vae" / "diffusion_pytorch_model.bin").write_bytes(
            pickle.dumps(_Evil(str(tmp_path / "UNPICKLED"))))
    return base


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize(("case", "words"), [
    ("unknown_preset", ("'tiny2'", "tiny, small, sdxl")),
    ("missing_path", ("neither a preset, an existing folder or file, nor a hub id",)),
    ("missing_component", ("missing text_encoder_2", "save_pretrained")),
    ("pickle_only", ("only pickle weights", "safetensors")),
    ("base_as_refiner", ("not an SDXL refiner",)),
    ("out_is_file", ("is a file",)),
    ("out_unwritable", ("cannot write to",)),
    ("out_foreign", ("holds no sdxl-export manifest", "new or empty folder")),
    ("opset_low", ("opset 5", "--opset between 17 and 20")),
    ("opset_high", ("opset 99",)),
])
def test_export_bad_input_is_one_line_and_writes_nothing(tiny_model, tmp_path_factory, tmp_path, case, words):
    folders = tiny_diffusers_folders(tmp_path_factory, tiny_model)
    out = tmp_path / "out"
    args = ["export", "--out", str(out)]
    if case == "unknown_preset":
        args += ["--model", "tiny2"]
    elif case == "missing_path":
        args += ["--model", str(tmp_path / "no" / "such" / "model")]
    elif case in ("missing_component", "pickle_only"):
        args += ["--model", str(_broken_base(folders, tmp_path, case.split("_")[0]))]
    elif case == "base_as_refiner":
        args += ["--model", str(folders[0]), "--refiner", str(folders[0])]
    elif case == "out_is_file":
        out.write_text("not a folder")
    elif case == "out_unwritable":
        (tmp_path / "file").write_text("x")
        args[2] = str(tmp_path / "file" / "out")  # below a file: mkdir fails (also as root)
    elif case == "out_foreign":
        out.mkdir()
        (out / "notes.txt").write_text("somebody else's")
    elif case.startswith("opset"):
        args += ["--opset", "5" if case == "opset_low" else "99"]
    before = file_states(out) if out.is_dir() else None
    rc, stdout, stderr = run_cli(*args)
    assert_one_line_error(rc, stderr, *words)
    assert stdout == ""
    if case == "out_is_file":
        assert out.read_text() == "not a folder"
    elif before is not None:
        assert file_states(out) == before  # a foreign folder is left exactly as it was
    else:
        assert not out.exists()
    assert not (tmp_path / "UNPICKLED").exists()


def test_export_unreachable_hub_id_in_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sdxl_export.cli", "export", "--model", "nosuch-org/nosuch-model", "--out", str(out)],
        check=False, capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "nosuch-org/nosuch-model", "hub")
    assert not out.exists()


# ---- inspect ----------------------------------------------------------------------------------------
def test_inspect_table_and_json(tiny_artifacts, tiny_artifacts_copy):
    rc, stdout, stderr = run_cli("inspect", str(tiny_artifacts))
    assert rc == 0, stderr
    for word in ("source:    preset tiny", "opset:     17", "versions:  torch", "vae_decoder", "refiner_unet",
                 "2x192x320", "latent_height", "engines:   none"):
        assert word in stdout, word
    rows = [ln for ln in stdout.splitlines() if ln.startswith(("text_encoder ", "unet ", "vae_encoder "))]
    assert len(rows) == 3 and all(ln.rstrip().endswith("pass") for ln in rows), stdout
    rc, stdout, _ = run_cli("inspect", str(tiny_artifacts), "--json")
    assert rc == 0 and json.loads(stdout) == json.loads((tiny_artifacts / EXPORT_MANIFEST).read_text())
    (tiny_artifacts_copy / "engines").mkdir()
    (tiny_artifacts_copy / "engines" / "manifest.json").write_text("{}")
    rc, stdout, _ = run_cli("inspect", str(tiny_artifacts_copy), "--verify")
    assert rc == 0 and "engines:   present (see `sdxl-export plan`)" in stdout


@pytest.mark.parametrize(("case", "words"), [
    ("missing", ("is not a folder",)),
    ("not_ours", ("not an sdxl-export artifact folder",)),
    ("corrupt_json", ("is not valid JSON",)),
    ("foreign_format", ("not written by sdxl-export",)),
    ("malformed", ("malformed",)),
    ("interrupted", ("interrupted export", "sdxl-export export --out")),
    ("tampered", ("does not match its manifest hash",)),
])
def test_inspect_bad_folders_are_one_line(tiny_artifacts_copy, tmp_path, case, words):
    root = tiny_artifacts_copy
    manifest = root / EXPORT_MANIFEST
    data = json.loads(manifest.read_text())
    args = ["inspect", str(root)]
    if case == "missing":
        args[1] = str(tmp_path / "nothing")
    elif case == "not_ours":
        manifest.unlink()
    elif case == "corrupt_json":
        manifest.write_text(manifest.read_text()[:200])
    elif case == "foreign_format":
        manifest.write_text(json.dumps({"format": "someone-else", "components": {}}))
    elif case == "malformed":
        manifest.write_text(json.dumps({**data, "components": ["unet"]}))
    elif case == "interrupted":
        manifest.write_text(json.dumps({**data, "complete": False}))
    elif case == "tampered":
        unet = root / "onnx" / "unet" / "model.onnx"
        unet.write_bytes(unet.read_bytes()[:-4] + b"\0\0\0\0")
        args.append("--verify")
    rc, stdout, stderr = run_cli(*args)
    assert_one_line_error(rc, stderr, *words)
    assert stdout == ""


# ---- a killed export ----------------------------------------------------------------------------------
def _read_lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def test_killed_export_is_not_trusted_and_the_rerun_resumes(tiny_artifacts_copy):
    """SIGKILL a real export after its first component; the folder must not be trusted,
    and the rerun must keep that component and export only what is left."""
    root = tiny_artifacts_copy
    (root / "onnx" / "text_encoder" / "model.onnx").unlink()
    enc = root / "onnx" / "vae_encoder" / "model.onnx"
    enc.write_bytes(enc.read_bytes()[:-8])
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl_export.cli", "export", "--out", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=300)
            assert line is not None, "export ended before its first component: " + "".join(seen)
            seen.append(line)
            if "[1/2] text_encoder: done" in line:
                proc.send_signal(signal.SIGKILL)  # mid-export: vae_encoder is being traced
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    manifest = json.loads((root / EXPORT_MANIFEST).read_text())
    assert manifest["complete"] is False
    assert "text_encoder" in manifest["components"] and "vae_encoder" not in manifest["components"]
    with pytest.raises(ArtifactError, match="interrupted"):
        load_export_manifest(root)
    from sdxl_export.runtime.artifact_reader import read_artifacts

    with pytest.raises(ArtifactError, match="interrupted"):
        read_artifacts(root)
    rc, _, stderr = run_cli("inspect", str(root))
    assert_one_line_error(rc, stderr, "interrupted")

    result = export_model("tiny", root)
    assert result["exported"] == ["vae_encoder"]  # text_encoder was finished before the kill: kept
    m = load_export_manifest(root, verify=True)
    assert m["complete"] and list(m["components"]) == list(result["components"])
    assert not [p for p in root.rglob(".tmp-*")]
