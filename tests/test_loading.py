"""Checkpoints in both published layouts load to identical logits; each bad input has its clear error."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import SHARED, tiny_model, write_checkpoint
from model import ConfigError, ModelLoadError, load_model, load_tokenizer
from model.config import args_from_config, parse_windows

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("ckpt")
    return {fmt: write_checkpoint(model, root / fmt, fmt) for fmt in ("original", "v1.1")}


def test_both_layouts_load_to_identical_logits(model, checkpoints):
    ids = torch.randint(0, 151851, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids)
    for path in checkpoints.values():
        loaded = load_model(path, dtype="fp32", device="cpu")
        assert loaded.args == model.args
        assert torch.equal(loaded(ids), expected)


def test_switch_overrides_and_config_defaults(checkpoints):
    default = load_model(checkpoints["v1.1"], device="cpu")
    assert default.args.use_dynamic_ntk and default.args.use_logn_attn and default.args.windows is None
    assert next(default.parameters()).dtype == torch.float32  # auto on CPU
    off = load_model(checkpoints["v1.1"], device="cpu", dynamic_ntk=False, logn=False, window_attn="1x8,16")
    assert not off.args.use_dynamic_ntk and not off.args.use_logn_attn and off.args.windows == (8, 16)
    assert next(load_model(checkpoints["original"], device="cpu", dtype="bf16").parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(not (SHARED / "qwen").exists(), reason="real Qwen config files live in ../shared/qwen")
def test_real_qwen_configs_give_qwen_7b_shapes():
    for name in ("original", "v1.1"):
        args = args_from_config(json.loads((SHARED / "qwen" / name / "config.json").read_text()))
        assert (args.dim, args.n_layer, args.n_head, args.head_dim, args.intermediate_size) == (4096, 32, 32, 128, 11008)
        assert args.vocab_size == 151936 and args.rope_base == 10000
    original = args_from_config(json.loads((SHARED / "qwen" / "original" / "config.json").read_text()))
    v11 = args_from_config(json.loads((SHARED / "qwen" / "v1.1" / "config.json").read_text()))
    assert (original.seq_length, v11.seq_length) == (2048, 8192)


def test_window_schedules():
    assert parse_windows("4x2048,4x4096,8192", 12) == (2048,) * 4 + (4096,) * 4 + (8192,) * 4
    assert parse_windows(512, 3) == (512, 512, 512)
    assert parse_windows("none", 3) is None
    for bad in ("4x2048,x", "2048,4x4096", "9x10"):
        with pytest.raises(ConfigError, match="window schedule"):
            parse_windows(bad, 8)
    with pytest.raises(ConfigError, match=r"'0' gives sizes \[0, 0\]; needs one size of at least 1 for each of the 2"):
        parse_windows("0", 2)


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_config(checkpoints, tmp_path):
    path = _copy(checkpoints["original"], tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: config file not found"):
        load_model(path, device="cpu")


def test_config_without_size_key(checkpoints, tmp_path):
    path = _copy(checkpoints["original"], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["n_embd"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing size key 'n_embd' or 'hidden_size'"):
        load_model(path, device="cpu")


def test_missing_weights(checkpoints, tmp_path):
    path = _copy(checkpoints["original"], tmp_path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(path, device="cpu")


def test_missing_shard(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.1"], tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_model(path, device="cpu")


def _rewrite_shard(path, edit):
    shard = path / "model-00001-of-00002.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def test_wrong_shape_names_file_and_tensor(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.1"], tmp_path)
    name = "transformer.h.0.attn.c_attn.weight"
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    from safetensors.torch import load_file

    tensors = load_file(path / shard)
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, path / shard)
    with pytest.raises(ModelLoadError, match=rf"{shard}: tensor '{name}' has shape \[191, 64\], config says \[192, 64\]"):
        load_model(path, device="cpu")


def test_missing_and_unexpected_tensors(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.1"], tmp_path)
    _rewrite_shard(path, lambda t: t.pop(sorted(t)[0]))
    with pytest.raises(ModelLoadError, match="missing tensor"):
        load_model(path, device="cpu")
    path = _copy(checkpoints["v1.1"], tmp_path / "b")
    _rewrite_shard(path, lambda t: t.update({"transformer.h.9.mlp.extra": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'transformer.h.9.mlp.extra'"):
        load_model(path, device="cpu")


def test_truncated_files(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.1"], tmp_path)
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="model-00001-of-00002.safetensors: truncated"):
        load_model(path, device="cpu")
    path = _copy(checkpoints["original"], tmp_path / "b")
    weights = path / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: cannot read PyTorch weights"):
        load_model(path, device="cpu")


def test_corrupt_header_length_names_the_file(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.1"], tmp_path)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])  # a length past any file (OverflowError on read)
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors: corrupt safetensors header length"):
        load_model(path, device="cpu")


def test_missing_vocab(checkpoints, tmp_path):
    path = _copy(checkpoints["original"], tmp_path)
    (path / "qwen.tiktoken").unlink()
    with pytest.raises(ModelLoadError, match="no qwen.tiktoken"):
        load_tokenizer(path)
    assert load_tokenizer(checkpoints["original"]).encode("答案") == [102349]


def test_nonexistent_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"could not fetch 'Qwen/Qwen-7B'.*--model /path/to/Qwen-7B") as err:
        load_model("Qwen/Qwen-7B", device="cpu")
    for needed in ("config.json", "qwen.tiktoken", "model.safetensors", "tiny-qwen-256"):
        assert needed in str(err.value)


def test_relative_path_under_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scratch").mkdir()
    with pytest.raises(ModelLoadError, match="^model path 'scratch/nonexist' does not exist"):
        load_model("scratch/nonexist", device="cpu")


def test_bad_dtype(checkpoints):
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        load_model(checkpoints["original"], device="cpu", dtype="fp8")


def _flip_byte_in_the_middle_of(path, name: str) -> None:
    """One byte of a tensor's data changed in place: the file keeps its size, header and every other byte."""
    from model.loading import _safetensors_header

    for shard in sorted(path.glob("*.safetensors")):
        for t in _safetensors_header(shard):
            if t.name == name:
                with shard.open("r+b") as f:
                    f.seek(t.start + t.size // 2)
                    byte = f.read(1)
                    f.seek(t.start + t.size // 2)
                    f.write(bytes([byte[0] ^ 0x01]))
                return
    raise AssertionError(name)


@pytest.mark.parametrize("chunk", [64 * 2**20, 3 * 2**15])  # one read per tensor; many reads per tensor
def test_fingerprint_sees_a_changed_middle_tensor_of_the_same_size(checkpoints, tmp_path, monkeypatch, chunk):
    from model import loading

    monkeypatch.setattr(loading, "READ_CHUNK", chunk)
    path = _copy(checkpoints["v1.1"], tmp_path)
    base = load_model(path, dtype="fp32", device="cpu")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    _flip_byte_in_the_middle_of(path, "transformer.h.1.mlp.w1.weight")  # the last layer's, in the middle of a shard
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) == size
    changed = load_model(path, dtype="fp32", device="cpu")
    assert changed.weights_fingerprint != base.weights_fingerprint
    assert not torch.equal(changed.transformer.h[1].mlp.w1.weight, base.transformer.h[1].mlp.w1.weight)
    _flip_byte_in_the_middle_of(path, "transformer.h.1.mlp.w1.weight")  # restored: the same weights again
    assert load_model(path, dtype="fp32", device="cpu").weights_fingerprint == base.weights_fingerprint


def test_fingerprint_is_the_hash_of_the_config_then_every_tensor_in_file_order(checkpoints, monkeypatch):
    """Pieces read ahead by several threads are hashed in file order: the fingerprint stays the plain
    sequential hash (a run's identity does not move with the reader's concurrency)."""
    import xxhash

    from model import loading

    monkeypatch.setattr(loading, "READ_CHUNK", 3 * 2**15)
    path = checkpoints["v1.1"]
    expected = xxhash.xxh3_128((path / "config.json").read_bytes())
    for shard in loading.weight_files(path):
        data = shard.read_bytes()
        for t in loading._safetensors_header(shard):
            expected.update(f"{t.name} {t.dtype} {tuple(t.shape)}\n".encode())
            expected.update(data[t.start:t.start + t.size])
    assert len(loading.weight_files(path)) > 1
    assert load_model(path, dtype="fp32", device="cpu").weights_fingerprint == expected.hexdigest()


def test_chunked_reads_load_every_byte_and_convert_the_dtype(model, checkpoints, monkeypatch):
    """Tensors read in many small pieces (some cut mid-tensor) load exactly; bf16 pieces convert as wholes."""
    from model import loading

    monkeypatch.setattr(loading, "READ_CHUNK", 3 * 2**15)  # a multiple of every element size, as the default
    loaded = load_model(checkpoints["v1.1"], dtype="bf16", device="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-buffer path to a GPU")
def test_chunked_reads_to_a_gpu_equal_the_cpu_load(checkpoints, monkeypatch):
    from model import loading

    monkeypatch.setattr(loading, "READ_CHUNK", 3 * 2**15)  # buffers reused many times while copies are in flight
    cpu = load_model(checkpoints["v1.1"], dtype="bf16", device="cpu")
    gpu = load_model(checkpoints["v1.1"], dtype="bf16", device="cuda")
    assert gpu.weights_fingerprint == cpu.weights_fingerprint
    for name, tensor in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[name].cpu(), tensor), name
