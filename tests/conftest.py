"""Shared fixtures: the real tokenizer, a tiny random checkpoint with its vocabulary, and a data root."""
from pathlib import Path

import pytest

from checkpoints import tiny_model, vocab_file, write_checkpoint
from fixtures import fixture_root
from model import QwenTokenizer


@pytest.fixture(scope="session")
def tok():
    """The real Qwen tokenizer (qwen.tiktoken); it holds no state, so one serves every test."""
    return QwenTokenizer(vocab_file())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen in the v1.1 on-disk layout (real vocabulary size, so real token ids fit)."""
    model = tiny_model(seed=5, dim=32, n_head=2, intermediate_size=48)
    return write_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", "v1.1")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Small benchmark files in the release layouts (tests never depend on ../shared being there)."""
    return fixture_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(params=["namespaces", "basic"])
def mode(request, monkeypatch) -> str:
    """Run a sandbox test under each isolation mode this machine supports (basic mode always works)."""
    from eval.sandbox import supervisor

    namespaces = request.param == "namespaces"
    if namespaces and not supervisor.namespaces_work():
        pytest.skip("this machine does not permit the namespaces (see isolation_summary())")
    monkeypatch.setattr(supervisor, "namespaces_work", lambda: namespaces)
    return request.param


# A checkpoint on disk means the CLI end to end (model loads, runs, resumes); allow_execution runs HumanEval
# programs in the sandbox, a few processes per program.
SLOW_FIXTURES = {"tiny_checkpoint", "allow_execution"}
SLOW_MODULES = {"test_sandbox", "test_sandbox_hostile"}  # every test starts sandboxed processes
# Several seconds each on 2 CPU cores (whole-benchmark sandbox runs, a model converted twice).
SLOW_TESTS = {"test_all_canonical_solutions_pass", "test_parallel_results_equal_sequential_ones",
              "test_logits_equal_the_dequantized_fp32_model",
              "test_tiny_model_end_to_end_ntk_matters_only_past_the_training_length"}


@pytest.fixture
def launches_pin_fp_fusion(monkeypatch):
    """Every Triton launch in the interpreter asks for FMA contraction itself (model.kernels.launch pins
    FP_FUSION), so a Triton release that changes the default (3.10 turns it off) does not move a kernel's bits."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    run = interpreter.InterpretedFunction.run

    def checked(self, *args, grid, warmup, **kwargs):
        assert kwargs.get("enable_fp_fusion") is True, f"{self.fn.__name__} launched without enable_fp_fusion"
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", checked)


def pytest_collection_modifyitems(items):
    """`-m "not slow"`: the quick subset. End-to-end runs are marked here, by the fixtures they use or by name."""
    for item in items:
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.originalname in SLOW_TESTS
                or item.module.__name__ in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
