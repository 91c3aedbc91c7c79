"""`seedlm export RUN_DIR OUT_DIR`: a run's checkpoint as a self-contained Hugging Face folder.

The weights come from the checkpoint's DeepSpeed files (ds/), whatever ZeRO stage or expert-parallel size
wrote them, one tensor at a time: each file's pickled structure is read with its tensors left on disk
(TorchFile), and a parameter is assembled from the byte ranges that hold it (the module file under ZeRO
0-2; each rank's fp32 partition under ZeRO-3; each expert-parallel rank's fp32 fragments for experts under
ZeRO 1/2). They go into safetensors shards of max_shard_size, one shard in memory at a time, so the peak
is about two shards (the shard and safetensors' serialised copy), never the whole model. Next to them:
the config with the family's `auto_map`, the remote-code files, the tokenizer (from the checkpoint's
model/ folder), a generation config and a model card, so the folder loads with `AutoModelForCausalLM` (or
AutoModel, AutoConfig) `.from_pretrained(OUT_DIR, trust_remote_code=True)` without seedlm. Every file
gets the mode the umask gives a new file.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from seedlm.launch.checkpoint import HF_DIR, MODEL_FILES_DIR, CheckpointError, run_checkpoint
from seedlm.launch.metrics import read_metrics


def current_umask() -> int:
    """The process umask. Read from /proc where it can be: os.umask can only read it by setting it, which for
    a moment would give other threads' new files (a background checkpoint save) a wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def use_umask_file_modes(folder: str | Path) -> None:
    """Give every file under `folder` the mode the umask gives a new file (0644 under umask 022).

    safetensors writes each weight file to a private temporary file (mode 0600) and renames it, so without
    this colleagues sharing a filesystem can read the config and code of a saved model but not its weights."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def model_card(config, run_dir: Path, checkpoint: Path, repo_hint: str) -> str:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    data = run_config.get("data", {}) or {}
    sources = [s if isinstance(s, str) else s.get("kind", "?") + ":" + str(s.get("path") or "")
               for s in data.get("sources", ["stdlib"])]
    if isinstance(data.get("synthetic"), dict):  # a generated task, not text (data_pipeline/synthetic.py)
        sources = ["synthetic " + ", ".join(f"{k}={v}" for k, v in data["synthetic"].items())]
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r and r["step"] <= state["step"]]
    train_losses = [r for r in records if "loss" in r and r["step"] <= state["step"]]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [seedlm, " + config.model_type + "]",
        "---",
        f"# {repo_hint}",
        "",
        f"A {config.card_summary()}, trained with seedlm.",
        "",
        "## Architecture",
        "",
        *config.card_lines(),
        "",
        "",
        "## Training",
        "",
        f"- data: {', '.join(sources)}",
        f"- steps: {state['step']}, tokens seen: {state['tokens_seen']:,}",
    ]
    if train_losses:
        lines.append(f"- final training loss: {train_losses[-1]['loss']:.4f}")
    if evals:
        lines += ["", "## Evaluation", "", "| step | held-out loss |", "|---|---|"]
        lines += [f"| {r['step']} | {r['eval_loss']:.4f} |" for r in evals]
    finals = [r for r in records if r.get("final") and r["step"] <= state["step"]]
    if finals:  # a synthetic task's final accuracy on all its held-out sequences
        lines += ["", f"Final evaluation at step {finals[-1]['step']}:", ""]
        lines += [f"- {k}: {v:.4f}" for k, v in finals[-1].items() if k.startswith("eval/") and v is not None]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_hint}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_hint}", trust_remote_code=True)',
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading DeepSpeed's files one tensor at a time


class StoredTensor:
    """A tensor inside a torch.save zip file, read only when asked (all of it or a range of its elements)."""

    def __init__(self, archive: TorchFile, key: str, dtype: torch.dtype, offset: int, shape, stride):
        self.archive, self.key, self.dtype, self.offset = archive, key, dtype, offset
        self.shape, self.stride = torch.Size(shape), tuple(stride)

    def numel(self) -> int:
        return self.shape.numel()

    def read(self, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor (the whole tensor, shaped, by default)."""
        whole = count is None
        if whole and self.stride != torch.empty(self.shape).stride():
            raise CheckpointError(f"{self.archive.path}: tensor {self.key} is not contiguous; cannot stream it")
        count = self.numel() if whole else count
        out = torch.empty(count, dtype=self.dtype)
        self.archive.read_into(self.key, (self.offset + start) * out.element_size(), out)
        return out.view(self.shape) if whole else out


class TorchFile:
    """A torch.save (zip) file unpickled with every tensor left on disk as a StoredTensor: the structure of a
    DeepSpeed checkpoint file costs kilobytes, its tensors are read one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.zip = zipfile.ZipFile(self.path)
        pickle_name = next(n for n in self.zip.namelist() if n.endswith("/data.pkl"))
        self.prefix = pickle_name[: -len("data.pkl")]
        archive = self

        class LazyUnpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return lambda storage, offset, shape, stride, *_: StoredTensor(archive, storage[0], storage[1],
                                                                                   offset, shape, stride)
                if (module, name) == ("torch._utils", "_rebuild_parameter"):
                    return lambda data, *_: data
                if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):  # a tensor with attributes
                    return lambda rebuild, new_type, args, state: rebuild(*args)
                return super().find_class(module, name)

            def persistent_load(self, saved_id):  # ("storage", storage type, key, location, numel)
                return saved_id[2], saved_id[1]._dtype  # ._dtype: .dtype warns that TypedStorage is deprecated

        pickle_bytes = torch.empty(self.zip.getinfo(pickle_name).file_size, dtype=torch.uint8)
        self.read_record(pickle_name, 0, pickle_bytes)  # not zip.open: background saves write no CRC to check
        self.root = LazyUnpickler(io.BytesIO(pickle_bytes.numpy())).load()

    def read_into(self, key: str, byte_offset: int, out: torch.Tensor) -> None:
        self.read_record(f"{self.prefix}data/{key}", byte_offset, out)

    def read_record(self, name: str, byte_offset: int, out: torch.Tensor) -> None:
        """Fill `out` with the bytes of record `name` from `byte_offset` on."""
        info = self.zip.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: compressed record {name}; cannot stream it")
        with open(self.path, "rb") as f:  # torch stores records uncompressed after a local file header
            f.seek(info.header_offset)
            header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len + byte_offset)
            view = memoryview(out.view(torch.uint8).numpy())
            if f.readinto(view) != len(view):
                raise CheckpointError(f"{self.path}: record {name} is truncated")


@dataclass
class ExportTensor:
    name: str
    shape: torch.Size
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def zero3_reader(files: list[TorchFile], group: int, offset: int, numel: int, shape, dtype):
    """A ZeRO-3 parameter: each rank holds ceil(numel / world) consecutive elements at `offset` of its flat
    fp32 group (zero_to_fp32's layout); concatenated in rank order and trimmed, they are the parameter."""
    part = math.ceil(numel / len(files))

    def read():
        pieces = [f.root["optimizer_state_dict"]["fp32_flat_groups"][group].read(offset, part) for f in files]
        return torch.cat(pieces)[:numel].view(shape).to(dtype)

    return read


def zero12_expert_reader(name: str, files: list[TorchFile], ep_size: int, shape, dtype):
    """An expert parameter under ZeRO 1/2 with expert parallelism: EP rank e's slice is partitioned over its
    expert-data-parallel ranks (global ranks e, e + ep_size, ...), each holding the fragment its
    param_slice_mappings name; the slices of EP ranks 0..ep_size-1 stacked along dim 0 are the parameter."""

    def fragment(file: TorchFile) -> torch.Tensor | None:
        state = file.root["optimizer_state_dict"]
        for group, mapping in enumerate(state["param_slice_mappings"]):
            if name in mapping:
                address = mapping[name]
                return state["single_partition_of_fp32_groups"][group].read(address.start, address.numel)
        return None

    def read():
        slices = []
        for e in range(ep_size):
            pieces = [fragment(files[r]) for r in range(e, len(files), ep_size)]
            slices.append(torch.cat([p for p in pieces if p is not None]))
        return torch.cat(slices).view(shape).to(dtype)

    return read


def checkpoint_tensors(checkpoint: Path, model) -> list[ExportTensor]:
    """Every tensor the HF folder of `checkpoint` holds, in `model`'s state-dict order (a tied weight once), each
    read from the checkpoint's ds/ folder only when asked. `model` is the meta-device model of the config."""
    ds = checkpoint / "ds"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    world, ep_size = state["world_size"], state["expert_parallel_size"]
    zero3_model_files = sorted(ds.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=rank_of)
    optim_files = [TorchFile(p) for p in sorted(ds.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)]
    zero3 = bool(zero3_model_files)
    module_file = TorchFile(zero3_model_files[0] if zero3 else ds / "mp_rank_00_model_states.pt")
    saved = module_file.root["module"]
    if optim_files and len(optim_files) != world:
        raise CheckpointError(f"{ds} holds ZeRO files of {len(optim_files)} ranks, trainer_state.json says {world}")
    locations = {}  # ZeRO-3: name -> (group, offset in each rank's flat group)
    if zero3:
        for group, shapes in enumerate(module_file.root["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                locations[name] = (group, offset)
                offset += math.ceil(torch.Size(shape).numel() / world)
    tensors, seen = [], set()
    for name, target in model.state_dict(keep_vars=True).items():
        if id(target) in seen:  # a tied weight: saved once, under its first name, as save_pretrained does
            continue
        seen.add(id(target))
        if name not in saved:
            raise CheckpointError(f"{ds} has no tensor {name}: was it written for another model config?")
        stored, shape = saved[name], target.shape
        if name in locations:
            group, offset = locations[name]
            read = zero3_reader(optim_files, group, offset, shape.numel(), shape, stored.dtype)
        elif stored.shape == shape:
            read = stored.read
        elif ep_size > 1 and optim_files and stored.shape[1:] == shape[1:]:
            read = zero12_expert_reader(name, optim_files, ep_size, shape, stored.dtype)
        else:
            raise CheckpointError(f"{ds}: {name} has shape {list(stored.shape)}, the model config says {list(shape)}")
        tensors.append(ExportTensor(name, shape, stored.dtype, read))
    return tensors


def rank_of(path: Path) -> int:
    return int(path.name.split("_")[3])  # zero_pp_rank_<rank>_mp_rank_00_...


def shard_size_bytes(size: str | int) -> int:
    """'2GB', '500MB', '1GiB' or a number of bytes."""
    if isinstance(size, int) or str(size).isdigit():
        return int(size)
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
    text = str(size).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    raise CheckpointError(f"max_shard_size={size!r}: give bytes or a size such as 2GB, 500MB")


def write_weight_shards(tensors: list[ExportTensor], out_dir: Path, max_shard_size: int) -> None:
    """safetensors shards of at most max_shard_size (a tensor larger than that gets a shard of its own), named
    and indexed as save_pretrained names them. Only one shard's tensors are in memory at a time."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes() > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes()
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file_name, shard in zip(names, shards):
        save_file({t.name: t.read().contiguous() for t in shard}, out_dir / file_name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes() for t in tensors)},
                 "weight_map": {t.name: file_name for file_name, shard in zip(names, shards) for t in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def model_files_dir(checkpoint: Path) -> Path:
    """The checkpoint's folder holding its HF config and tokenizer (model/; older checkpoints: hf/)."""
    for folder in (checkpoint / MODEL_FILES_DIR, checkpoint / HF_DIR):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(f"{checkpoint} has neither {MODEL_FILES_DIR}/config.json nor {HF_DIR}/config.json: "
                          "it was not written by seedlm train")


def export_checkpoint(checkpoint: Path, out_dir: Path, max_shard_size: str | int = "2GB"):
    """Write the HF folder of `checkpoint` (weights from ds/, streamed shard by shard; config, remote code,
    tokenizer, generation config) into out_dir. Returns the meta-device model (its config is the folder's)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    from seedlm.launch.materialize import build_meta_model

    source = model_files_dir(checkpoint)
    config = AutoConfig.from_pretrained(source)
    model = build_meta_model(config)
    tensors = checkpoint_tensors(checkpoint, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_weight_shards(tensors, out_dir, shard_size_bytes(max_shard_size))
    config.architectures = [type(model).__name__]
    config.dtype = tensors[0].dtype
    custom_object_save(model, out_dir, config=config)
    config.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)
    use_umask_file_modes(out_dir)
    return model


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, max_shard_size: str = "2GB") -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint = run_checkpoint(run_dir, step)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new output folder")
    model = export_checkpoint(checkpoint, out_dir, max_shard_size)
    (out_dir / "README.md").write_text(model_card(model.config, run_dir, checkpoint, out_dir.name))
    use_umask_file_modes(out_dir)
    return out_dir


def export_and_sample(run_dir: str | Path, prompt: str | None, max_new_tokens: int = 48) -> str:
    """Export the run's latest checkpoint to <run_dir>/export, load it back with AutoModelForCausalLM
    (trust_remote_code, as a user would) and continue `prompt` greedily. Returns a report for the console."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(run_dir) / "export"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the run's own export is rewritten at each end of training
    export_run(run_dir, out_dir)
    net = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
    report = [f"exported {out_dir} ({type(net).__name__}, loaded back with AutoModelForCausalLM)"]
    if prompt:
        tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
        inputs = tokenizer(prompt, return_tensors="pt")
        generated = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2)
        report.append("sample:\n" + tokenizer.decode(generated[0], skip_special_tokens=True))
    return "\n".join(report)
