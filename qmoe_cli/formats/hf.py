"""Original Hugging Face checkpoints: finding the directory, lazy per-tensor access, and the
`ModelWeights` over them (what the directory holds, its typed description: `original.py`).

A `CheckpointReader` maps tensor names to shards through the index JSON (or the single shard),
opens shards on demand and keeps at most `max_open_shards` open (least recently used closed
first), and reads one tensor at a time: the model is never loaded whole. Safetensors shards
come first; legacy `pytorch_model*.bin` shards are read with `torch.load(weights_only=True,
mmap=True)`, which never unpickles code and maps the file instead of reading it. Block-scaled
fp8 checkpoints (DeepSeek-V3's hub format, `fp8.py`) are dequantized per tensor on read; their
`*_scale_inv` tensors are no model tensors and are hidden from the name map. MXFP4 experts
(GPT-OSS, `mxfp4.py`) are read as the tensor `X` their `X_blocks` and `X_scales` stand for,
dequantized per expert row.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..arch import Architecture, resolve_name
from ..arch.presets import Preset, load_preset, preset_names
from ..data.hub import offline_variable, probe_hub
from ..errors import QmoeError, UsageError, did_you_mean
from ..files import read_json_object
from ..resources import package_dir
from .fp8 import FP8, SCALE_SUFFIX, BlockFp8, dequantize
from .mxfp4 import BLOCKS, SCALES, Mxfp4, dequantize_mxfp4, split_mxfp4_names
from .original import OriginalManifest, WeightFiles, find_weight_files
from .safetensors_io import SafetensorsFile

# What a checkpoint directory holds beside its config and weights that compressed checkpoints copy
# (each recorded with its checksum): the tokenizer's files and the generation defaults.
COMPANION_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(directory: Path, vocab_size: int | None = None) -> tuple[int, ...]:
    """The EOS ids `generation_config.json` in `directory` names (`eos_token_id`: an id or a list;
    transformers' `generate` stops at any of them), () without the file or the field; QmoeError
    naming the file when it is not JSON or the field holds anything but ids >= 0 (and, given
    `vocab_size`, below it: an id the model can never produce would index past the logits)."""
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return ()
    value = read_json_object(path, "").get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise QmoeError(f"{path}: eos_token_id must be a token id or a list of ids >= 0, got {json.dumps(value)}")
    outside = [i for i in ids if vocab_size is not None and i >= vocab_size]
    if outside:
        raise QmoeError(f"{path}: eos_token_id {outside[0]} is outside the model's vocabulary of {vocab_size} "
                        "tokens; the file does not belong to this model: fix or remove it")
    return tuple(ids)


class _BinShard:
    """A legacy PyTorch shard, memory-mapped; tensors are copied out one at a time."""

    def __init__(self, path: Path):
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a bad zip / unpickling refusal
            raise QmoeError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); download it again") from None
        if not isinstance(self._tensors, dict):
            raise QmoeError(f"{path}: expected a dict of tensors, found {type(self._tensors).__name__}")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        tensor = self._tensors[name]
        return (tensor if row is None else tensor[row]).clone()

    def close(self) -> None:
        self._tensors = {}


class CheckpointReader:
    """Tensor-by-tensor reader of one checkpoint directory (see module docstring)."""

    def __init__(self, directory: Path, max_open_shards: int = 2, fp8: BlockFp8 | None = None,
                 mxfp4: Mxfp4 | None = None, files: WeightFiles | None = None):
        """`fp8`, `mxfp4`: the scheme `config.json` declares, None for an unquantized checkpoint;
        `files`: the weight files (`OriginalManifest.weights`), found in `directory` when None."""
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.directory = directory
        self.max_open_shards = max_open_shards
        self.fp8 = fp8
        weight_map = self._weight_map(directory, files or find_weight_files(directory))
        self.scale_map = {n: f for n, f in weight_map.items() if fp8 is not None and n.endswith(SCALE_SUFFIX)}
        self.weight_map = {n: f for n, f in weight_map.items() if n not in self.scale_map}
        self.mxfp4_map: dict[str, tuple[str, str]] = {}  # X -> (X_blocks file, X_scales file)
        if mxfp4 is not None:
            self.weight_map, self.mxfp4_map = split_mxfp4_names(self.weight_map, directory)
        self._open: OrderedDict[str, SafetensorsFile | _BinShard] = OrderedDict()

    @staticmethod
    def _weight_map(directory: Path, files: WeightFiles) -> dict[str, str]:
        """Tensor name -> shard file: the index's, or the one shard's header read."""
        if files.index is not None:
            return files.index
        [single_name] = files.shards
        shard = (SafetensorsFile if files.layout == "safetensors" else _BinShard)(directory / single_name)
        names = shard.keys()
        shard.close()
        return {name: single_name for name in names}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self.mxfp4_map

    def _shard(self, file_name: str) -> SafetensorsFile | _BinShard:
        if file_name in self._open:
            self._open.move_to_end(file_name)
            return self._open[file_name]
        while len(self._open) >= self.max_open_shards:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        path = self.directory / file_name
        shard = SafetensorsFile(path) if file_name.endswith(".safetensors") else _BinShard(path)
        self._open[file_name] = shard
        return shard

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor `name`, from the shard header (nothing is read)."""
        file_name = self.weight_map.get(name)
        if file_name is None:
            raise QmoeError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self._shard(file_name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`, from the shard header (nothing is read)."""
        file_name = self.weight_map.get(name)
        if file_name is None:
            raise QmoeError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        return self._shard(file_name).shape(name)

    def get(self, name: str, dtype: torch.dtype | None = None,
            device: torch.device | str = "cpu", row: int | None = None) -> torch.Tensor:
        """Read tensor `name` (or only its `row` along the first dim: one expert of a fused
        tensor), cast to `dtype` (floating tensors only) and moved to `device`. An fp8 tensor is
        dequantized with its block scales to `dtype` (float32 when None); memory: its fp8
        bytes, one fp32 copy and the result."""
        if name in self.mxfp4_map:  # exact in any float dtype (see mxfp4.py); fp32 when None
            blocks_file, scales_file = self.mxfp4_map[name]
            blocks = self._read({name + BLOCKS: blocks_file}, name + BLOCKS, row)
            scales = self._read({name + SCALES: scales_file}, name + SCALES, row)
            return dequantize_mxfp4(blocks, scales, dtype or torch.float32).to(device)
        tensor = self._read(self.weight_map, name, row)
        if tensor.dtype == FP8:
            tensor = self._dequantize(name, tensor, dtype or torch.float32)
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def _read(self, names: dict[str, str], name: str, row: int | None = None) -> torch.Tensor:
        file_name = names.get(name)
        if file_name is None:
            raise QmoeError(f"{self.directory}: tensor '{name}' is missing from the checkpoint")
        shard = self._shard(file_name)
        if name not in shard.keys():
            raise QmoeError(f"{self.directory / file_name}: tensor '{name}' is listed in the index "
                            "but missing from the shard; the checkpoint is incomplete")
        return shard.read(name, row)

    def _dequantize(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[rows, cols] fp8 `weight` (tensor `name`) times its block scales, as `dtype`."""
        if self.fp8 is None:
            raise QmoeError(f"{self.directory}: tensor '{name}' is stored as float8_e4m3fn but config.json "
                            "declares no fp8 quantization_config (weight_block_size) to dequantize it with")
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.scale_map:
            raise QmoeError(f"{self.directory}: fp8 tensor '{name}' has no scale '{scale_name}' in the checkpoint")
        scale = self._read(self.scale_map, scale_name)  # [ceil(rows/b), ceil(cols/b)] fp32
        grid = list(self.fp8.scale_shape(tuple(weight.shape))) if weight.dim() == 2 else None
        # uint8 (exponent-byte) and fp8 scales are other formats, not read here
        if grid is None or list(scale.shape) != grid or not scale.is_floating_point() or scale.dtype == FP8:
            expected = f"a float32{grid} scale" if grid else "a 2-D weight"
            raise QmoeError(f"{self.directory}: fp8 tensor '{name}' {list(weight.shape)} has scale '{scale_name}' "
                            f"{scale.dtype}{list(scale.shape)}, but {self.fp8.rows}x{self.fp8.cols} blocks need "
                            f"{expected}")
        return dequantize(weight, scale, self.fp8, dtype)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and the preset it matched (if any)."""

    directory: Path
    preset: Preset | None
    label: str  # what the user named: preset name, hub id or directory

    def manifest(self) -> OriginalManifest:
        """What its directory holds (config, architecture with the preset's overrides, weight
        files), read and checked."""
        return OriginalManifest.read(self.directory, self.preset.config_overrides if self.preset else None)


def resolve_model(name: str) -> ModelSource:
    """Turn `--model` (a directory, a preset name, or a hub id) into local files.

    Hub models are downloaded with `huggingface_hub` (cached), fetching only config, tokenizer
    and one weight format: safetensors when the repository has them, else the legacy `.bin`.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QmoeError(f"{path}: not a model directory (no config.json)")
        return ModelSource(path, None, str(path))
    if path.exists():
        raise UsageError(f"--model {name}: is a file; give a checkpoint directory, a preset or a hub id")
    if looks_like_path(name):
        raise UsageError(f"--model {name}: no such directory")
    preset = load_preset(name)
    if preset is not None and preset.local_dir is not None:
        return ModelSource(package_dir() / preset.local_dir, preset, name)
    if preset is None and name.count("/") != 1:
        raise UsageError(f"--model {name}: not a directory, a preset or a hub id like google/switch-base-8"
                         f"{did_you_mean(name, preset_names())}; `qmoe presets` lists the presets")
    hub_id = preset.hub_id if preset else name
    return ModelSource(_download(hub_id), preset, name)


def looks_like_path(name: str) -> bool:
    """Whether `--model` is meant as a local path, never a hub id: it starts with ./ ../ / ~ (or
    is . or ..), has more than one /, or is x/y where directory x exists here."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def _download(hub_id: str) -> Path:
    """The local snapshot of `hub_id`: from the cache only under HF_HUB_OFFLINE (failing at once
    when it is not there), else after one quick metadata request (`probe_hub`), so that an
    unreachable hub fails in seconds, not after huggingface_hub's retries."""
    from huggingface_hub import list_repo_files, snapshot_download

    remedy = "pass a local checkpoint directory"
    patterns = ["config.json", *COMPANION_FILES]
    offline = offline_variable("HF_HUB_OFFLINE")
    if offline:
        try:
            return Path(snapshot_download(hub_id, allow_patterns=[*patterns, *_WEIGHT_PATTERNS],
                                          local_files_only=True))
        except Exception:  # LocalEntryNotFoundError and its kin: not cached
            raise QmoeError(f"--model {hub_id}: not in the local Hugging Face cache and {offline} is set; "
                            f"{remedy}, or unset HF_HUB_OFFLINE to download it") from None
    probe_hub("model", hub_id, f"--model {hub_id}", remedy)
    try:
        files = list_repo_files(hub_id)
        weights = list(_WEIGHT_PATTERNS[:2])
        if not any(f.endswith(".safetensors") for f in files):
            weights = list(_WEIGHT_PATTERNS[2:])
        return Path(snapshot_download(hub_id, allow_patterns=[*patterns, *weights]))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise QmoeError(f"--model {hub_id}: could not download from the Hugging Face hub "
                        f"({type(exc).__name__}); check the name and network, or {remedy}") from None


_WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json")


class CheckpointExperts:
    """The experts of one sparse block, read from the checkpoint when asked for (lazily)."""

    def __init__(self, reader: CheckpointReader, arch: Architecture, stack: str, index: int):
        self.reader, self.arch, self.stack, self.index = reader, arch, stack, index
        self.num_experts = arch.num_experts

    def load(self, ids: Sequence[int], device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
        return [self.arch.make_expert({m: self.matrix(j, m, dtype, device) for m in self.arch.expert.matrices})
                for j in ids]

    def matrix(self, j: int, m: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Expert j's matrix `m` [rows, cols]: its own tensor, or its part of row j of the
        block's fused tensor (`fused_expert`), read alone."""
        fused = getattr(self.arch, "fused_expert", None)
        source = None if fused is None else fused(self.stack, self.index, m)
        if source is None:
            return self.reader.get(self.arch.expert_tensor(self.stack, self.index, j, m), dtype, device)
        name, select = source
        name = resolve_name(self.arch, name, self.reader.__contains__, self.reader.directory)
        return select(self.reader.get(name, dtype, device, row=j)).contiguous()


class CheckpointWeights:
    """Tensors of an original checkpoint by Hugging Face name, read on demand."""

    def __init__(self, source: ModelSource, max_open_shards: int = 2):
        self.source = source
        self.manifest = source.manifest()
        self.arch = self.manifest.arch
        self.reader = CheckpointReader(source.directory, max_open_shards, self.manifest.fp8, self.manifest.mxfp4,
                                       self.manifest.weights)
        self._check_embedding()

    def _check_embedding(self) -> None:
        """config.json against the weights, before anything is computed: the first embedding's
        stored shape must be the [vocab, d_model] the config asks for (a config claiming
        d_model=10**9 would otherwise allocate for it)."""
        name = self.arch.embedding_tensor(self.arch.stacks[0])
        expected = self.arch.head_tensors().get(name)
        stored_name = self.stored_name(name)
        stored = self.reader.shape(stored_name)
        if expected is not None and tuple(stored) != tuple(expected):
            raise QmoeError(f"{self.source.directory / 'config.json'}: says the embedding is {list(expected)} "
                            f"([vocab, d_model]) but the weights' '{stored_name}' is {list(stored)}; the config "
                            "does not belong to these weights: fix or replace it")

    def stored_name(self, name: str) -> str:
        return resolve_name(self.arch, name, self.reader.__contains__, self.source.directory)

    def tensor(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        """Tensor `name` as `dtype`; None keeps the stored dtype, except that an fp8 weight is
        dequantized to the checkpoint's `stored_dtype` (a compressed checkpoint stores it so)."""
        stored = self.stored_name(name)
        if dtype is None and self.reader.dtype(stored) == FP8:
            dtype = self.stored_dtype()
        return self.reader.get(stored, dtype, device)

    def experts(self, stack: str, index: int) -> CheckpointExperts:
        return CheckpointExperts(self.reader, self.arch, stack, index)

    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its floating weights in (from the first stack's
        embedding), the dtype of its unquantized tensors in an fp8 checkpoint (bf16 for DeepSeek-V3)."""
        dtype = self.reader.dtype(self.stored_name(self.arch.embedding_tensor(self.arch.stacks[0])))
        return torch.bfloat16 if dtype == FP8 else dtype  # an fp8 embedding: none ships one; bf16 is the norm

    def close(self) -> None:
        self.reader.close()
