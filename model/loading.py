"""Find, check and stream a Qwen checkpoint (original .bin or v1.1 sharded safetensors) into the model.
A GPTQ Int4 checkpoint (quantize_config.json beside the weights) goes through the same path, see gptq.py.

Every tensor name, shape and file is checked before any weight is read, so a bad checkpoint fails
with one message and nothing half-loaded. Weights stream one tensor at a time (safetensors mmap),
straight into the target dtype and device: peak host memory stays near one tensor. Every byte loaded
(config, quantisation config, each tensor's name, dtype, shape and data) is hashed on the way, in threads
beside the copy to the device: `model.weights_fingerprint` identifies the exact weights at no extra pass.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import gptq
from .config import read_config, with_switches
from .qwen import Qwen
from .tokenizer import QwenTokenizer

CHECKPOINT_FILES = ["config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json",
                    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "quantize_config.json"]
LOCAL_CHECKPOINT_FILES = ("the folder needs config.json, qwen.tiktoken and the weights (model.safetensors, "
                          "pytorch_model.bin, or shards with their .index.json)")
# Buffers the original code stored or registered that carry no weights.
HASH_THREADS, HASH_CHUNK = 4, 64 * 2**20  # blake2b runs at about 1 GB/s per core; chunks hash in parallel
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias|logn_tensor)$")


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be found or loaded; the message names the path, file or tensor."""


def resolve_checkpoint(path_or_id: str, patterns=CHECKPOINT_FILES) -> Path:
    """A local directory, or a hub id fetched through huggingface_hub (then ModelScope when installed)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: expected a checkpoint directory, found a file")
        return path
    if not _looks_like_hub_id(str(path_or_id)):
        raise ModelLoadError(f"model path {str(path_or_id)!r} does not exist")
    errors = []
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated: all end in the same advice
        errors.append(f"Hugging Face hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    try:
        from modelscope import snapshot_download as ms_download

        return Path(ms_download(path_or_id, allow_patterns=patterns))
    except ImportError:
        pass
    except Exception as err:
        errors.append(f"ModelScope: {type(err).__name__}: {err}")
    raise ModelLoadError(
        f"could not fetch {path_or_id!r} ({'; '.join(errors)}). Without network access, download the "
        f"checkpoint elsewhere and pass its local directory instead (e.g. --model /path/to/Qwen-7B): "
        f"{LOCAL_CHECKPOINT_FILES}. For an offline trial run, unpack the small model "
        f"../shared/models/tiny-qwen-256 as README.md, 'First hour', shows."
    )


def _looks_like_hub_id(name: str) -> bool:
    """'org/name', unless 'org' is a local folder: then scratch/nonexist is a mistyped path, not a hub id."""
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name):
        return False
    return not Path(name.split("/")[0]).is_dir()


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """'auto' as the original: bf16 where supported, else fp16 on a GPU, else fp32."""
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in names:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
        return names[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _safetensors_header(path: Path) -> dict:
    """Names, shapes and dtypes of a safetensors file, checking the data is all there (not truncated)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes)")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise ModelLoadError(f"{path}: corrupt safetensors header length ({n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{path}: unreadable safetensors header (truncated or not safetensors)") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{path}: truncated: header says {8 + n + end} bytes, file has {size}")
    return {name: tuple(info["shape"]) for name, info in header.items()}


def _bin_tensors(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"{path}: cannot read PyTorch weights ({type(err).__name__}: {err})") from None


def weight_files(ckpt: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise ModelLoadError(f"{index}: not a valid shard index (needs a 'weight_map')") from None
            files = sorted({ckpt / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ModelLoadError(f"{index}: shard file(s) missing from {ckpt}: {', '.join(missing)}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (ckpt / name).exists():
            return [ckpt / name]
    raise ModelLoadError(f"{ckpt}: no weights (expected model.safetensors, pytorch_model.bin or a shard index)")


def _check_tensors(files: list[Path], expected: dict[str, tuple]) -> None:
    found: dict[str, Path] = {}
    for path in files:
        shapes = _safetensors_header(path) if path.suffix == ".safetensors" else {
            k: tuple(t.shape) for k, t in _bin_tensors(path).items()}
        for name, shape in shapes.items():
            if _IGNORED.match(name):
                continue
            if name not in expected:
                raise ModelLoadError(f"{path}: unexpected tensor {name!r} (not a Qwen parameter)")
            if shape != expected[name]:
                raise ModelLoadError(f"{path}: tensor {name!r} has shape {list(shape)}, config says {list(expected[name])}")
            found[name] = path
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"{files[0].parent}: missing tensor(s) {', '.join(missing[:3])}{more}")


def _stream_tensors(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        yield from _bin_tensors(path).items()


def load_model(path_or_id, *, dtype="auto", device="auto", dynamic_ntk=None, logn=None, window_attn=None) -> Qwen:
    """A ready-to-run Qwen: config from the checkpoint, switches overridden where not None."""
    ckpt = resolve_checkpoint(str(path_or_id))
    args = with_switches(read_config(ckpt / "config.json"), dynamic_ntk, logn, window_attn)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quantization = gptq.read_quantize_config(ckpt)  # None: a full-precision checkpoint
    with torch.device("meta"):
        model = Qwen(args)
        if quantization is not None:  # before validation: the projections now expect GPTQ tensors
            gptq.quantize_linears(model, quantization)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    files = weight_files(ckpt)
    _check_tensors(files, expected)
    fingerprint = hashlib.blake2b(digest_size=16)
    for config in ("config.json", "quantize_config.json"):
        if (ckpt / config).exists():
            fingerprint.update((ckpt / config).read_bytes())
    with ThreadPoolExecutor(HASH_THREADS) as hasher:  # hashing releases the GIL: it overlaps the device copy
        for path in files:
            for name, tensor in _stream_tensors(path):
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                chunks = [hasher.submit(_digest, data[i: i + HASH_CHUNK]) for i in range(0, len(data), HASH_CHUNK)]
                if quantization is not None and gptq.is_quantized_tensor(name):
                    gptq.assign(model, name, tensor, device, path)  # codes and scales stay as stored
                elif not _IGNORED.match(name):
                    _assign(model, name, tensor.to(device=device, dtype=dtype))
                fingerprint.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
                for chunk in chunks:  # before the stream moves on (and may unmap this tensor's bytes)
                    fingerprint.update(chunk.result())
    if quantization is not None:
        gptq.use_int4mm(model)  # on a GPU: repack for the fused int4 kernel; elsewhere the reference path
    model.checkpoint = str(ckpt)
    model.weights_fingerprint = fingerprint.hexdigest()
    return model.eval().requires_grad_(False)


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def load_tokenizer(path_or_id) -> QwenTokenizer:
    """The tokenizer from a checkpoint directory, a hub id, or a qwen.tiktoken file."""
    path = Path(str(path_or_id)).expanduser()
    if path.is_file():
        return QwenTokenizer(path)
    ckpt = resolve_checkpoint(str(path_or_id), patterns=["qwen.tiktoken", "config.json", "tokenizer_config.json"])
    vocab = ckpt / "qwen.tiktoken"
    if not vocab.exists():
        raise ModelLoadError(f"{ckpt}: no qwen.tiktoken vocabulary file")
    return QwenTokenizer(vocab)

