"""Command line: `qwen-eval run --task gsm8k [...]`, or `python eval/runner.py --task gsm8k [...]` (the same).

Subcommands: run (the default), rescore RUN_DIR (re-score saved records, no model), report [RESULTS_DIR]
(reported vs measured), compare BASE_RUN NEW_RUN (regression gate), list (the tasks). The flags
`--rescore RUN_DIR` and `--list-tasks` of `run` do the same as rescore and list.
User errors print one line and exit with code 2; Ctrl-C writes the partial table and exits 130.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python eval/runner.py`: run as the module, from the repository
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "eval.runner", *sys.argv[1:]], {**os.environ, "PYTHONPATH": path})

from eval import distributed
from eval.api import UserError
from eval.data import DataSource
from eval.pipeline import execute, plan_task, rescore, write_dry_run
from eval.provenance import task_identity
from eval.results import read_info
from eval.registry import get_task, task_names

DEFAULT_MODELS = {"fewshot": "Qwen/Qwen-7B", "chat": "Qwen/Qwen-7B-Chat"}


def parse_args(argv=None, prog="python eval/runner.py") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", action="append", default=[], help="task name (repeat, or comma-separate, for several)")
    p.add_argument("--model", help="checkpoint directory or hub id (default Qwen/Qwen-7B; Qwen/Qwen-7B-Chat in chat mode)")
    p.add_argument("--tokenizer", help="qwen.tiktoken file or checkpoint dir (default: the model's)")
    p.add_argument("--mode", choices=["fewshot", "chat"], default="fewshot")
    p.add_argument("--backend", choices=["native", "hf"], default="native")
    p.add_argument("--device-map", choices=["auto"],
                   help="with --backend hf: place one model's layers over all GPUs of the node (accelerate)")
    p.add_argument("--dynamic-ntk", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint config's use_dynamic_ntk")
    p.add_argument("--logn", action=argparse.BooleanOptionalAction, default=None,
                   help="override the checkpoint config's use_logn_attn")
    p.add_argument("--window-attn", metavar="SPEC",
                   help="layer-wise attention windows, e.g. 4x2048,4x4096,8192 (see EVALUATION.md)")
    p.add_argument("--data-dir", help="root of the original benchmark files (default: Hugging Face hub)")
    p.add_argument("--limit", type=int, help="first N documents of each subject (or of the task)")
    p.add_argument("--subjects", help="comma-separated subjects of a multiple-choice task")
    p.add_argument("--batch-size", type=int, help="most sequences per batch (default: sized from free memory)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-dir", default="results")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run of another configuration")
    p.add_argument("--list-tasks", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write requests.jsonl without loading weights")
    p.add_argument("--rescore", metavar="RUN_DIR", help="recompute metrics and tables from saved samples")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written code (HumanEval) in the sandbox; or set QWEN_EVAL_ALLOW_CODE_EXECUTION=1")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed data rows instead of failing")
    p.add_argument("--verbatim-csv", action="store_true",
                   help="read CSV cells as written (the original parsed them with pandas: 'None' became 'nan')")
    p.add_argument("--lengths", help="long_ppl sample lengths, e.g. 1024,2048,4096,8192,16384")
    p.add_argument("--ceval-chat-rules", choices=["2023-08-25", "2023-08-03"], default="2023-08-25",
                   help="version of the chat C-Eval/CMMLU extraction regexes")
    p.add_argument("--tooluse-version", choices=["v20231206", "v1"],
                   help="tool-use data set version (default: the newest whose files are present)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HumanEval program")
    p.add_argument("--samples", type=int, default=1, help="HumanEval samples per task (pass@k for k <= samples)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.task = [t for item in args.task for t in item.split(",") if t]
    return args


def _rescore_command(argv) -> int:
    p = argparse.ArgumentParser(prog="qwen-eval rescore", description="recompute metrics and tables from saved samples")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--allow-code-execution", action="store_true", help="needed to re-score tasks that run code")
    args = p.parse_args(argv)
    return run(parse_args(["--rescore", args.run_dir] + ["--allow-code-execution"] * args.allow_code_execution))


def _list_command(argv) -> int:
    argparse.ArgumentParser(prog="qwen-eval list", description="the tasks and their modes").parse_args(argv)
    return run(parse_args(["--list-tasks"]))


def _module_command(name: str):
    def command(argv) -> int:
        import importlib

        return importlib.import_module(name).main(argv)
    return command


COMMANDS = {
    "run": lambda argv: run(parse_args(argv, prog="qwen-eval run")),
    "rescore": _rescore_command,
    "list": _list_command,
    "report": _module_command("eval.report"),
    "compare": _module_command("eval.compare"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character never stops the run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return run(parse_args(argv))  # no subcommand: `run`, as `python eval/runner.py --task ...` always was
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment: a full disk, a read-only file, no temporary directory
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(args) -> int:
    distributed.check_launch(args)  # --dry-run / --rescore are single-process
    if args.list_tasks:
        for name in task_names():
            task = get_task(name)
            summary = (sys.modules[type(task).__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:10s} modes: {', '.join(task.modes):14s} {summary}")
        return 0
    if args.rescore:
        task = _run_task(Path(args.rescore))
        if task in task_names() and get_task(task).executes_code:
            _require_code_execution(args)  # re-scoring runs the saved completions again
        rescore(Path(args.rescore), get_task)
        return 0
    if not args.task:
        raise UserError("no task given: pass --task NAME (see --list-tasks)")
    tasks = [get_task(name) for name in args.task]
    if any(t.executes_code for t in tasks) and not args.dry_run:
        _require_code_execution(args)  # before any generation is spent
    model_id = args.model or DEFAULT_MODELS[args.mode]
    tok = _tokenizer(args.tokenizer or model_id)
    data = _data_source(args)
    options = _options(args)
    model_name = _model_name(model_id)
    plans = []
    for task in tasks:
        run_dir = Path(args.output_dir) / model_name / _run_name(task, args)
        subjects = args.subjects.split(",") if args.subjects else None
        started = time.time()
        plans.append(plan_task(task, args.mode, data, tok, subjects=subjects, limit=args.limit, options=options,
                               run_dir=run_dir))
        plans[-1].timings["plan"] = time.time() - started
    if args.dry_run:
        for plan in plans:
            print(f"{plan.task.name}: {sum(map(len, plan.requests))} requests -> {write_dry_run(plan)}")
        return 0
    _seed(args.seed)
    ranks = distributed.setup(args, plans)  # SINGLE unless torchrun started several processes
    started = time.time()
    backend, identity = _backend(distributed.backend_args(args, ranks), model_id, tok)
    load = time.time() - started
    for plan in plans:
        plan.identity = {**identity, "model_name": model_name,
                         **task_identity(plan.task, args.mode, plan.options, plan.data_manifest["files"], tok)}
        plan.timings.update(load=load, warmup=getattr(backend, "timings", {}).get("warmup", 0.0))
        if plan.task.executes_code:  # how model-written code was confined on this machine
            from eval.sandbox import isolation_summary

            plan.environment["sandbox"] = isolation_summary()
        if execute(plan, backend, ranks, overwrite=args.overwrite, config=vars(args)) is not None:
            _plot(plan.run_dir)  # rank 0
    distributed.close(ranks)
    return 0


def _run_task(run_dir: Path) -> str | None:
    return read_info(run_dir).identity.get("task")


def _require_code_execution(args) -> None:
    from eval.sandbox import CodeExecutionRefused, require_opt_in

    try:
        require_opt_in(args.allow_code_execution)
    except CodeExecutionRefused as err:
        raise UserError(str(err)) from None


def _plot(run_dir: Path) -> None:
    """PNG plots next to the tables where a task has one (categories, perplexity against length)."""
    from eval.report import plot_run

    plot_run(run_dir)


def _tokenizer(path_or_id):
    from model import ModelLoadError, TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path_or_id)
    except (ModelLoadError, TokenizerError) as err:
        raise UserError(f"tokenizer: {err}") from None


def _data_source(args) -> DataSource:
    root = None
    if args.data_dir:
        root = Path(args.data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--data-dir {root} is not a directory")
    return DataSource(root, skip_bad_rows=args.skip_bad_rows, verbatim_csv=args.verbatim_csv)


def _options(args) -> dict:
    options = {"ceval_chat_rules": args.ceval_chat_rules, "timeout": args.timeout, "verbatim_csv": args.verbatim_csv}
    if args.samples > 1:
        options.update(samples=args.samples, temperature=args.temperature)
    if args.lengths:
        try:
            options["lengths"] = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            raise UserError(f"--lengths {args.lengths!r}: expected comma-separated integers") from None
    if args.window_attn:
        options["window_attn"] = args.window_attn
    if args.tooluse_version:
        options["tooluse_version"] = args.tooluse_version
    return options


def _model_name(model_id: str) -> str:
    return Path(model_id.rstrip("/")).name or "model"


def _run_name(task, args) -> str:
    """<task>-<mode>, plus a suffix for every switch given on the command line and a non-native backend."""
    parts = [task.name, args.mode]
    if args.dynamic_ntk is not None:
        parts.append(f"ntk_{'on' if args.dynamic_ntk else 'off'}")
    if args.logn is not None:
        parts.append(f"logn_{'on' if args.logn else 'off'}")
    if args.window_attn and not task.sets_switches:
        parts.append("win_" + re.sub(r"[^0-9x,]", "", args.window_attn).replace(",", "_"))
    if args.backend != "native":
        parts.append(args.backend)
    return "-".join(parts)


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _backend(args, model_id: str, tok):
    """Load the model (the only slow step) and describe it for the run's identity."""
    from model import ConfigError, ModelLoadError, load_model
    from model.loading import resolve_checkpoint

    from eval.backends import HFBackend, NativeBackend

    if args.device_map and args.backend != "hf":
        raise UserError("--device-map spreads a transformers model over GPUs: use it with --backend hf")
    try:
        ckpt = resolve_checkpoint(model_id)
        device = "cpu" if args.device_map else args.device  # the host holds it until accelerate places the layers
        model = load_model(ckpt, dtype=args.dtype, device=device, dynamic_ntk=args.dynamic_ntk, logn=args.logn,
                           window_attn=args.window_attn)
    except (ModelLoadError, ConfigError) as err:
        raise UserError(str(err)) from None
    kw = dict(batch_size=args.batch_size, progress=not args.no_progress)
    if args.backend == "hf":
        backend = HFBackend.from_native(model, tok, device_map=args.device_map, **kw)
    else:
        backend = NativeBackend(model, tok, **kw)
    a = model.args
    identity = {"model": model.weights_fingerprint, "backend": args.backend,
                "dtype": str(next(model.parameters()).dtype), "engine": getattr(backend, "mode", "default"),
                "switches": {"dynamic_ntk": a.use_dynamic_ntk, "logn": a.use_logn_attn, "windows": a.windows}}
    return backend, identity


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
