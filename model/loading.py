"""Find, check and stream a Qwen checkpoint (original .bin or v1.1 sharded safetensors) into the model.
A GPTQ Int4 checkpoint (quantize_config.json beside the weights, or GPTQ settings in config.json) goes through the
same path, see gptq.py.

Every tensor name, shape and file is checked before any weight is read, so a bad checkpoint fails
with one message and nothing half-loaded. Weights stream one tensor at a time (safetensors mmap),
straight into the target dtype and device. The safetensors shards are read once, front to back, in large
chunks into a few (pinned) staging buffers by a few reader threads, while this thread hashes each chunk and
copies it to its tensor, in file order: peak host memory is the buffers. Every byte loaded (config,
quantisation config, each tensor's name, dtype, shape and data) is hashed on the way with xxh3-128, which
runs several times faster than the read: `model.weights_fingerprint` identifies the exact weights at no
extra pass.
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from . import gptq
from .config import read_config, with_switches
from .qwen import Qwen
from .tokenizer import QwenTokenizer

CHECKPOINT_FILES = ["config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json",
                    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "quantize_config.json"]
LOCAL_CHECKPOINT_FILES = ("the folder needs config.json, qwen.tiktoken and the weights (model.safetensors, "
                          "pytorch_model.bin, or shards with their .index.json)")
READ_CHUNK, READ_BUFFERS, READERS = 64 * 2**20, 6, 4  # pieces in flight: read ahead, hashed, being copied
# safetensors dtype names (GPTQ checkpoints add the integer ones)
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
# Buffers the original code stored or registered that carry no weights.
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


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are (absolute file offset) and what they hold."""

    name: str
    dtype: torch.dtype
    shape: tuple
    start: int
    size: int


def _safetensors_header(path: Path) -> list[StoredTensor]:
    """The tensors of a safetensors file in file order, checking the data is all there (not truncated)."""
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
    tensors = []
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which no Qwen checkpoint uses")
        begin, stop = info["data_offsets"]
        tensors.append(StoredTensor(name, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin, stop - begin))
    return sorted(tensors, key=lambda t: t.start)


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
        shapes = {t.name: t.shape for t in _safetensors_header(path)} if path.suffix == ".safetensors" else {
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


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Builds a model on the meta device without running torch.nn.init: meta tensors hold no values, and
    normal_ on one goes through a Python decomposition that imports torch._dynamo (seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def load_model(path_or_id, *, dtype="auto", device="auto", dynamic_ntk=None, logn=None, window_attn=None) -> Qwen:
    """A ready-to-run Qwen: config from the checkpoint, switches overridden where not None."""
    ckpt = resolve_checkpoint(str(path_or_id))
    args = with_switches(read_config(ckpt / "config.json"), dynamic_ntk, logn, window_attn)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quantization = gptq.read_quantize_config(ckpt)  # None: a full-precision checkpoint
    with torch.device("meta"), _SkipInit():
        model = Qwen(args)
        if quantization is not None:  # before validation: the projections now expect GPTQ tensors
            gptq.quantize_linears(model, quantization)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    files = weight_files(ckpt)
    _check_tensors(files, expected)
    fingerprint = xxhash.xxh3_128()
    for config in ("config.json", "quantize_config.json"):
        if (ckpt / config).exists():
            fingerprint.update((ckpt / config).read_bytes())

    def place(name: str, stored: torch.dtype, shape: tuple, path: Path):
        """Where a tensor goes, and what to do once it is there (None: hashed only)."""
        if quantization is not None and gptq.is_quantized_tensor(name):  # codes and scales stay as stored
            return torch.empty(shape, dtype=stored), lambda t: gptq.assign(model, name, t, device, path)
        if _IGNORED.match(name):
            return None
        return torch.empty(shape, dtype=dtype, device=device), lambda t: _assign(model, name, t)

    if files[0].suffix == ".safetensors":  # weight_files gives one kind
        _load_safetensors(files, place, fingerprint, device)
    else:
        for path in files:
            _load_bin(path, place, fingerprint, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last copies were issued without waiting
    if quantization is not None:
        gptq.use_int4mm(model)  # on a GPU: repack for the fused int4 kernel; elsewhere the reference path
    model.checkpoint = str(ckpt)
    model.weights_fingerprint = fingerprint.hexdigest()
    return model.eval().requires_grad_(False)


def _tensor_line(name: str, dtype: torch.dtype, shape: tuple) -> bytes:
    return f"{name} {dtype} {tuple(shape)}\n".encode()


def _load_bin(path: Path, place, fingerprint, device: torch.device) -> None:
    """The original layout (pickled, memory-mapped): one tensor at a time, hashed as stored."""
    for name, tensor in _bin_tensors(path).items():
        fingerprint.update(_tensor_line(name, tensor.dtype, tensor.shape))
        fingerprint.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        if target := place(name, tensor.dtype, tuple(tensor.shape), path):
            dest, done = target
            done(dest.copy_(tensor))


def _load_safetensors(paths: list[Path], place, fingerprint, device: torch.device) -> None:
    """Read the shards front to back once, as one stream of READ_CHUNK pieces: READERS threads read pieces
    ahead (positional reads, several in flight: one thread alone reads the page cache at about 4 GB/s) into
    staging buffers (pinned for a GPU); here each piece is hashed and copied (converting the dtype) into its
    tensor, in file order, and its buffer goes to the read READ_BUFFERS pieces further on."""
    pieces = [(path, t, offset, min(READ_CHUNK, t.size - offset))
              for path in paths for t in _safetensors_header(path) for offset in range(0, max(t.size, 1), READ_CHUNK)]
    cuda = device.type == "cuda"
    buffers = [torch.empty(READ_CHUNK, dtype=torch.uint8, pin_memory=cuda) for _ in range(min(READ_BUFFERS, len(pieces)))]
    with ExitStack() as files, ThreadPoolExecutor(READERS, thread_name_prefix="checkpoint-reader") as readers:
        fds = {path: files.enter_context(path.open("rb", buffering=0)).fileno() for path in paths}

        def read(i: int, buffer: torch.Tensor, copy_done):
            path, t, offset, n = pieces[i]
            if copy_done is not None:  # the device copy of the piece this buffer held before has left it
                copy_done.synchronize()
            _read_exactly(fds[path], memoryview(buffer.numpy())[:n], t.start + offset, path)
            return buffer

        ahead = deque(readers.submit(read, i, buffer, None) for i, buffer in enumerate(buffers))
        target = flat = None
        for i, (path, t, offset, n) in enumerate(pieces):
            if offset == 0:
                fingerprint.update(_tensor_line(t.name, t.dtype, t.shape))
                target = place(t.name, t.dtype, t.shape, path)
                flat = target[0].view(-1) if target else None
            buffer = ahead.popleft().result()
            fingerprint.update(buffer.numpy()[:n])
            if flat is not None and n:
                flat[offset // t.dtype.itemsize:(offset + n) // t.dtype.itemsize].copy_(buffer[:n].view(t.dtype),
                                                                                       non_blocking=cuda)
            if i + len(buffers) < len(pieces):
                ahead.append(readers.submit(read, i + len(buffers), buffer, _copied(device)))
            if target and offset + READ_CHUNK >= t.size:
                target[1](target[0])


def _copied(device: torch.device):
    """An event the reader waits on before it overwrites a buffer a device copy is still reading (the copy
    went to the current stream of the destination's GPU, which need not be the current GPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _read_exactly(fd: int, view: memoryview, position: int, path: Path) -> None:
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], position + got)
        except OSError as err:
            raise ModelLoadError(f"{path}: cannot read ({err.strerror or err})") from None
        if not n:
            raise ModelLoadError(f"{path}: file ended early (changed while loading?)")
        got += n


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

