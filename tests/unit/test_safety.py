"""Nothing read from disk runs code, and secrets stay out of logs and dumped configs.

- A scan of every module in torchtitan/ and scripts/ (with ``ast``, imports resolved):
  torch.load only with ``weights_only=True``; no eval/exec; no plain unpickling (pickle,
  marshal, yaml.load, torch.jit.load, ...) except through an Unpickler that overrides
  ``find_class``; DCP loads only through the safe reader and planner. The scanner is
  first shown to flag each pattern, aliases included, so a clean scan means something.
- Crafted files whose unpickling would create a directory: a checkpoint entry, a
  checkpoint's ``.metadata`` and a Flight Recorder dump. DCP's own loaders do create it
  (the threat is real); ours refuse with one line and create nothing.
- A short training run with a W&B key and a Hub token in the environment and W&B and
  TensorBoard on: neither secret appears in its output or in any file it writes, while a
  marker passed as a config value appears in all of them (the scan looks in the right
  places).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchtitan.components.checkpoint import CheckpointError
from torchtitan.components.checkpoint.storage import load_state, read_metadata
from torchtitan.tools.flight_recorder import FlightRecorderError, load_dumps

REPO = Path(__file__).resolve().parents[2]

# Calls that unpickle (or otherwise run) whatever a file names.
UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "yaml.load", "yaml.unsafe_load",
    "yaml.full_load", "torch.jit.load", "torch.package.PackageImporter",
    "torch.distributed.checkpoint.FileSystemReader",
    "torch.distributed.checkpoint.filesystem.FileSystemReader",
}
DCP_LOAD = "torch.distributed.checkpoint.load"
UNPICKLER_BASES = {"pickle.Unpickler", "_pickle.Unpickler"}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` for a name or attribute chain, with the first name resolved through imports."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_code(source: str) -> list[str]:
    """Each line of ``source`` that may run code from data it reads, with why."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b, aliases) for b in node.bases}
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            if bases & UNPICKLER_BASES and "find_class" not in methods:
                found.append(f"{node.lineno}: Unpickler {node.name} without find_class")
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec") and node.func.id not in aliases:
            found.append(f"{node.lineno}: {node.func.id}()")
            continue
        name = _dotted(node.func, aliases)
        weights_only = _keyword(node, "weights_only")
        if name == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif name in UNSAFE_CALLS:
            found.append(f"{node.lineno}: {name}")
        elif name in ("numpy.load", "np.load") and _keyword(node, "allow_pickle") is not None:
            found.append(f"{node.lineno}: numpy.load with allow_pickle")
        elif name == DCP_LOAD and not (_keyword(node, "storage_reader") and _keyword(node, "planner")):
            found.append(f"{node.lineno}: {DCP_LOAD} without the safe storage_reader and planner")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


def test_scanner_flags_every_unsafe_pattern():
    bad = """
import pickle as pk, torch
import torch.distributed.checkpoint as dcp
from pickle import loads
from torch import load as tload
from torch.distributed.checkpoint import FileSystemReader
import yaml, numpy as np
class U(pk.Unpickler):
    pass
torch.load(f)
torch.load(f, weights_only=False)
tload(f)
loads(b)
pk.Unpickler(f).load()
eval("1")
exec("x = 1")
yaml.load(s)
np.load(f, allow_pickle=True)
torch.jit.load(f)
dcp.load(state, checkpoint_id=p)
FileSystemReader(p)
"""
    found = unsafe_code(bad)
    assert [int(f.split(":")[0]) for f in found] == [8, *range(10, 22)], found
    good = """
import io, pickle, torch
import torch.distributed.checkpoint as dcp
class Safe(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(name)
torch.load(f, map_location="cpu", weights_only=True)
Safe(io.BytesIO(b)).load()
model.eval()
dcp.load(state, checkpoint_id=p, storage_reader=r, planner=q)
pickle.dump(obj, f)
"""
    assert unsafe_code(good) == []


def test_no_code_runs_from_loaded_files_anywhere_in_torchtitan_or_scripts():
    files = sorted(p for d in ("torchtitan", "scripts") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 50
    found = [f"{p.relative_to(REPO)}:{f}" for p in files for f in unsafe_code(p.read_text(encoding="utf-8"))]
    assert found == []


class _Payload:
    """Unpickling it creates the directory ``path``: stands for any code a file could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def _checkpoint(path: Path, step: object) -> None:
    """A DCP checkpoint like the trainer's: tensors, and plain data saved as pickled bytes."""
    state = {"model": {"w": torch.arange(4.0)}, "train_state": {"step": step, "position": "file 3, byte 120"}}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _template() -> dict:
    return {"model": {"w": torch.zeros(4)}, "train_state": {"step": 0, "position": ""}}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_crafted_checkpoint_entry_or_metadata_is_refused_without_running_code(tmp_path):
    plain = tmp_path / "plain"
    _checkpoint(plain, 7)
    state = _template()
    load_state(state, str(plain), no_dist=True)  # plain data loads as before
    assert state["train_state"] == {"step": 7, "position": "file 3, byte 120"}
    assert torch.equal(state["model"]["w"], torch.arange(4.0))

    crafted, ran = tmp_path / "crafted", tmp_path / "ran"
    _checkpoint(crafted, _Payload(ran))
    with pytest.raises(CheckpointError) as info:
        load_state(_template(), str(crafted), no_dist=True)
    assert not ran.exists()
    message = str(info.value)
    assert "\n" not in message and str(crafted) in message and "train_state.step" in message
    dcp.load(_template(), checkpoint_id=str(crafted), no_dist=True)  # DCP's default planner...
    assert ran.exists()  # ...runs it

    ran.rmdir()
    (plain / ".metadata").write_bytes(pickle.dumps(_Payload(ran)))
    with pytest.raises(CheckpointError, match=r"cannot read \.metadata .*makedirs.*could run code"):
        read_metadata(str(plain))
    with pytest.raises(CheckpointError):
        load_state(_template(), str(plain), no_dist=True)
    assert not ran.exists()
    try:
        dcp.FileSystemReader(str(plain)).read_metadata()  # DCP's reader runs it
    except Exception:  # noqa: BLE001 - it is no Metadata afterwards
        pass
    assert ran.exists()


def test_crafted_flight_recorder_dump_is_refused_without_running_code(tmp_path):
    ran = tmp_path / "ran"
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "rank_0").write_bytes(pickle.dumps({"entries": [], "x": _Payload(ran)}))
    with pytest.raises(FlightRecorderError, match="makedirs"):
        load_dumps(str(tmp_path / "traces"))
    assert not ran.exists()
    (tmp_path / "traces" / "rank_0").write_bytes(pickle.dumps({"entries": [], "version": "2.10"}))
    assert load_dumps(str(tmp_path / "traces"))[0]["version"] == "2.10"


WANDB_STUB = '''
"""Stands in for wandb: records what the trainer hands it."""
import json, os

class _Run:
    def finish(self):
        pass

_dir = None

def init(project=None, dir=None, mode=None, config=None, **kwargs):
    global _dir
    _dir = dir
    with open(os.path.join(dir, "wandb_init.json"), "w") as f:
        json.dump({"project": project, "mode": mode, "config": config, **kwargs}, f, default=str)
    return _Run()

def log(metrics, step=None):
    with open(os.path.join(_dir, "wandb_log.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\\n")
'''


def test_secrets_in_the_environment_reach_no_log_and_no_written_file(tmp_path):
    stub = tmp_path / "stub"
    (stub / "wandb").mkdir(parents=True)
    (stub / "wandb" / "__init__.py").write_text(WANDB_STUB)
    dump = tmp_path / "run"
    data = tmp_path / "data.txt"  # plain text: no Arrow cache to build
    data.write_text("".join(f"document {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(64)))
    wandb_key, hf_token = secrets.token_hex(20), "hf_" + secrets.token_hex(17)
    canary = "canary-" + secrets.token_hex(8)  # a config value: must show up where config goes
    env = dict(
        os.environ, WANDB_API_KEY=wandb_key, HF_TOKEN=hf_token, OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(stub), os.environ.get("PYTHONPATH", "")])),
    )
    cmd = [
        sys.executable, "-m", "torchtitan.train",
        "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump), "--job.description", canary,
        "--training.dataset", "text", "--training.dataset_path", str(data),
        "--training.steps", "2", "--training.seq_len", "32", "--training.local_batch_size", "1",
        "--metrics.enable_wandb", "--metrics.wandb_mode", "offline", "--metrics.enable_tensorboard",
        "--checkpoint.enable", "--comm.trace_buf_size", "0",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    written = {p: p.read_bytes() for p in dump.rglob("*") if p.is_file()}
    assert any(p.name == "config.toml" for p in written) and any(".tfevents." in p.name for p in written)
    wandb_config = json.loads((dump / "wandb_init.json").read_text())["config"]
    # The places checked do receive config values: the canary is in each of them.
    assert canary in log and canary in (dump / "config.toml").read_text()
    assert wandb_config["job"]["description"] == canary
    for secret in (wandb_key, hf_token):
        assert secret not in log
        assert not [p for p, content in written.items() if secret.encode() in content]
