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
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python eval/runner.py`: run as the module, from the repository
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "eval.runner", *sys.argv[1:]], {**os.environ, "PYTHONPATH": path})

from eval import distributed
from eval.api import UserError
from eval.cli_checks import check_flags, check_same_configuration
from eval.data import DataSource
from eval.stats import with_stderr
from eval.pipeline import execute, plan_task, rescore, write_dry_run
from eval.provenance import task_identity
from eval.registry import get_task, task_names
from eval.results import read_info
from eval.run_layout import dtype_name, model_folder, run_folder
from eval.suites import SUITES, expand

DEFAULT_MODELS = {"fewshot": "Qwen/Qwen-7B", "chat": "Qwen/Qwen-7B-Chat"}


USAGE = """%(prog)s --task NAME[,NAME] [--model PATH|HUB_ID] [--data-dir DIR] [options]
       {prog} --dry-run --task NAME --tokenizer FILE | --rescore RUN_DIR | --list-tasks
       qwen-eval run|rescore|report|compare|list ... (python eval/runner.py report|compare|rescore|list ...)"""


def parse_args(argv=None, prog="python eval/runner.py") -> argparse.Namespace:
    args = parser(prog).parse_args(argv)
    args.task = [t for item in args.task for t in item.split(",") if t]
    return args


def parser(prog: str = "python eval/runner.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, usage=USAGE.format(prog=prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help=f"task or suite (repeat, or comma-separate, for several); suites: {', '.join(SUITES)} "
                        f"(each task in its own run directory, the report printed at the end); see --list-tasks")
    p.add_argument("--model", help="checkpoint directory or hub id (default Qwen/Qwen-7B; Qwen/Qwen-7B-Chat in chat mode)")
    p.add_argument("--tokenizer", help="qwen.tiktoken file or checkpoint dir (default: the model's)")
    p.add_argument("--mode", choices=["fewshot", "chat"], default="fewshot",
                   help="fewshot: the base model's few-shot prompts; chat: zero-shot ChatML (default fewshot)")
    p.add_argument("--backend", choices=["native", "hf", "api"], default="native",
                   help="native engine, plain transformers at batch 1 (the benchmark baseline), or a served model "
                        "behind an OpenAI-compatible endpoint (--base-url)")
    # --backend api (eval/endpoint.py)
    p.add_argument("--base-url", metavar="URL", help="with --backend api: the endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--api-model", metavar="NAME", help="the served model name (default: the only one /v1/models lists)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoint's key")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
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
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights dtype; auto: bf16 where supported, else fp16 on a GPU, else fp32")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N processes of torchrun (heads, MLP and vocabulary; world = N x data "
                        "parallel); part of the run's identity (see EVALUATION.md, 'Tensor parallel')")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: a GPU when there is one)")
    p.add_argument("--seed", type=int, default=1234, help="seed of python, numpy and torch (default 1234)")
    p.add_argument("--output-dir", default="results",
                   help="where runs go: OUTPUT_DIR/<model>-<hash>/<task>-<mode>[-<switches>]-<dtype>/ (default results)")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run of another configuration")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks, their modes and the suites, then exit")
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
    p.add_argument("--code-execution", choices=["separate", "in_process"], default="separate",
                   help="HumanEval: the dataset's check runs outside the sandboxed completion (default; a program "
                        "cannot forge its verdict) or inside it, as the original human-eval did (parity)")
    p.add_argument("--samples", type=int, default=1, help="HumanEval samples per task (pass@k for k <= samples)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    p.add_argument("--kernels", choices=["invariant", "fast"], default="invariant",
                   help="GPU kernels of the native backend: batch-invariant (every document's numbers are the same "
                        "at any batch size, rank count or free memory; the default) or the library kernels (faster, "
                        "numbers move with the batching)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="serve every prompt whole instead of computing a shared few-shot prefix once (same numbers "
                        "with --kernels invariant, slower)")
    p.add_argument("--fixed-new-tokens", type=int, metavar="N",
                   help="benchmarks only: generate exactly N tokens per request, ignoring stop rules")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    return p


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
        print(f"suites: {', '.join(SUITES)} (see --help)")
        return 0
    if args.rescore:
        task = _run_task(Path(args.rescore))
        if task in task_names() and get_task(task).executes_code:
            _require_code_execution(args)  # re-scoring runs the saved completions again
        rescore(Path(args.rescore), get_task)
        return 0
    if not args.task:
        raise UserError("no task given: pass --task NAME (see --list-tasks)")
    check_flags(args)  # from here on, whatever can fail on user input fails before any weight loads
    endpoint = None
    if args.backend == "api" and not args.dry_run:  # reachable, key accepted, model served: before any planning
        from eval.endpoint import connect

        endpoint = connect(args)
        args.model = args.model or endpoint.model  # names the run folder; the tokenizer comes from it or --tokenizer
    entries = expand(args.task, args.mode)
    if any(get_task(e.task).executes_code for e in entries) and not args.dry_run:
        _require_code_execution(args)  # before any generation is spent
    groups = _plan_all(args, entries)
    if args.dry_run:
        for group in groups.values():
            for job in group.jobs:
                path = write_dry_run(job.plan, overwrite=args.overwrite)
                print(f"{job.plan.task.name} ({job.plan.mode}): {sum(map(len, job.plan.requests))} requests -> {path}")
        return 0
    from eval.backends import refuse_unapplied_switches  # imports torch: not for --dry-run

    for model_id, group in groups.items():  # before any weights load
        refuse_unapplied_switches(args, model_id, [job.plan for job in group.jobs])
    _seed(args.seed)
    ranks = distributed.setup(args, [job.plan for group in groups.values() for job in group.jobs])  # SINGLE: 1 process
    load_args = distributed.backend_args(args, ranks)
    for model_id, group in groups.items():  # every model described, every run directory checked, then loads
        plans = [job.plan for job in group.jobs]
        group.ckpt, known = endpoint.describe(plans) if endpoint else _describe(load_args, model_id)
        for job in group.jobs:
            plan = job.plan
            job.known = {**known, "model_name": job.model_name,
                         **task_identity(plan.task, plan.mode, plan.options, plan.data_manifest["files"], group.tok)}
            check_same_configuration(plan.run_dir, job.known, args.overwrite)
    finished = []
    for model_id, group in groups.items():
        started = time.time()
        backend, loaded = (endpoint.backend(group.tok, not args.no_progress), endpoint.identity_after_load()) \
            if endpoint else _load(load_args, model_id, group.ckpt, group.tok)
        load = time.time() - started
        if ranks.tp is not None and ranks.tp.rank:  # tensor parallel: repeat the calls of the group's rank 0
            from model.tensor_parallel import follow

            follow(backend, ranks.tp)
            continue
        for job in group.jobs:
            plan = job.plan
            plan.identity = {**loaded, **job.known}  # run.json checks the weights themselves once they are read
            plan.timings.update(load=load, warmup=0.0)  # no backend warms up apart: kernels compile inside serve
            if plan.task.executes_code:  # how model-written code was confined on this machine
                from eval.sandbox import isolation_summary

                plan.environment["sandbox"] = isolation_summary()
            backend.label = f"{plan.task.name} ({plan.mode})"
            results = execute(plan, backend, ranks, overwrite=args.overwrite, config=job.config)
            if results is not None:  # rank 0
                print(summary_line(plan, results))
                finished.append(job)
        if ranks.tp is not None:  # the group's other ranks stop repeating (a failed rank 0: torchrun stops them)
            from model.tensor_parallel import release

            release(ranks.tp)
    distributed.close(ranks)
    if finished:
        _last_words(args, finished)
    for job in finished:  # last: matplotlib's import and font set-up take seconds, after every table is out
        _plot(job.plan.run_dir)
    return 0


@dataclass
class Job:
    plan: object  # eval.pipeline.Plan
    config: dict  # the flags this run was made with (a suite sets some per task)
    model_name: str
    known: dict = field(default_factory=dict)  # the identity known before the weights load


@dataclass
class ModelGroup:
    """The runs one model serves; it is loaded once for all of them."""

    tok: object
    jobs: list[Job] = field(default_factory=list)
    ckpt: Path | None = None


def _plan_all(args, entries) -> dict[str | None, ModelGroup]:
    """Every run planned (documents, requests, run directory), grouped by the model that serves it: a suite
    of both modes needs the base and the chat model. All data and tokenizer errors surface here."""
    groups: dict[str | None, ModelGroup] = {}
    for entry in entries:
        task = get_task(entry.task)
        entry_args = argparse.Namespace(**{**vars(args), "mode": entry.mode, **entry.flags})
        default = entry.model or DEFAULT_MODELS[entry.mode]  # a family suite names its own model
        model_id = args.model or (None if args.dry_run and args.tokenizer else default)
        if model_id not in groups:
            groups[model_id] = ModelGroup(_tokenizer(args.tokenizer or model_id, explicit=bool(args.tokenizer)))
        group = groups[model_id]
        folder = run_folder(task.name, entry.mode, args, window_in_name=not task.sets_switches,
                            dtype=None if args.dry_run or args.backend == "api" else dtype_name(_dtype(args)))
        run_dir = Path(args.output_dir) / model_folder(model_id, args.tokenizer) / folder
        subjects = args.subjects.split(",") if args.subjects else None
        started = time.time()
        plan = plan_task(task, entry.mode, _data_source(args), group.tok, subjects=subjects, limit=args.limit,
                         options=_options(entry_args), run_dir=run_dir)
        plan.timings["plan"] = time.time() - started
        group.jobs.append(Job(plan, vars(entry_args), _model_name(model_id or args.tokenizer)))
    return groups


def summary_line(plan, results) -> str:
    """One line per finished run: its headline number (± standard error where it is a percentage of
    documents), documents, skipped data rows and directory."""
    table = with_stderr(results.table)
    if "stderr" in table.columns and table.rows:
        row = table.rows[0]
        headline = f"{table.columns[2]} {row[2]:.2f}" + (f" ± {row[3]:.2f}" if row[3] != "" else "")
    else:
        name, value = next(iter(results.metrics.items()), ("-", "-"))
        headline = f"{name} {value:.2f}" if isinstance(value, float) else f"{name} {value}"
    skipped = plan.data_manifest.get("skipped_rows") or []
    skips = f"; {len(skipped)} bad data rows skipped (listed in table.md)" if skipped else ""
    return f"{plan.task.name} ({plan.mode}): {headline} on {results.n_done} documents{skips} -> {plan.run_dir}"


def _last_words(args, jobs: list[Job]) -> None:
    """A suite ends with the reproduction report of its models; every command ends saying where its files are."""
    if any(name in SUITES for name in args.task):
        from eval import report

        root = Path(args.output_dir)
        print(report.render_report(root, report.find_runs(root, sorted({j.model_name for j in jobs})),
                                   with_plots=False))
    folders = sorted({str(j.plan.run_dir.parent) for j in jobs})
    print(f"results written to {', '.join(folders)}/ ({', '.join(j.plan.run_dir.name for j in jobs)})")


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


def _tokenizer(path_or_id, *, explicit: bool):
    """The tokenizer; its errors name --tokenizer only when it was given (else they are the checkpoint's)."""
    from model import ModelLoadError, TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path_or_id)
    except (ModelLoadError, TokenizerError) as err:
        raise UserError(f"--tokenizer {path_or_id}: {err}" if explicit else str(err)) from None


def _data_source(args) -> DataSource:
    """A fresh source per run, so each run records only the files it read and the rows it skipped."""
    root = None
    if args.data_dir:
        root = Path(args.data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--data-dir {root} is not a directory")
    return DataSource(root, skip_bad_rows=args.skip_bad_rows, verbatim_csv=args.verbatim_csv)


def _options(args) -> dict:
    options = {"ceval_chat_rules": args.ceval_chat_rules, "timeout": args.timeout, "verbatim_csv": args.verbatim_csv,
               "execution": args.code_execution}
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


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(args) -> str:
    return "cpu" if args.device_map else args.device  # the host holds it until accelerate places the layers


def _dtype(args):
    """The dtype the weights will be held in, known before they load."""
    from model.loading import resolve_device, resolve_dtype

    return resolve_dtype(args.dtype, resolve_device(_device(args)))


def _describe(args, model_id: str) -> tuple[Path, dict]:
    """The checkpoint, and the part of the model's identity known from its config without reading a weight
    (the weights' own fingerprint comes with the load)."""
    from model import ConfigError, ModelLoadError
    from model.config import model_shape, read_config, with_switches
    from model.loading import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(model_id)
        a = with_switches(read_config(ckpt / "config.json"), args.dynamic_ntk, args.logn, args.window_attn)
    except (ModelLoadError, ConfigError) as err:
        raise UserError(str(err)) from None
    return ckpt, {"backend": args.backend, "dtype": str(_dtype(args)),
                  "switches": {"dynamic_ntk": a.use_dynamic_ntk, "logn": a.use_logn_attn, "windows": a.windows},
                  "shape": model_shape(a), "tensor_parallel": args.tensor_parallel}


def _load(args, model_id: str, ckpt: Path, tok) -> tuple[object, dict]:
    """Load the model (the only slow step), saying so; the backend, and the identity only the load gives."""
    import model as qwen

    from eval.backends import HFBackend, NativeBackend

    from model.loading import resolve_device
    from model.tensor_parallel import lead, load_tensor_parallel

    print(f"loading {model_id} ({dtype_name(_dtype(args))}, {resolve_device(_device(args))}) ...", flush=True)
    started = time.time()
    tp = getattr(args, "tp_group", None)
    load = qwen.load_model if tp is None else partial(load_tensor_parallel, g=tp)
    try:
        native = load(ckpt, dtype=args.dtype, device=_device(args), dynamic_ntk=args.dynamic_ntk,
                      logn=args.logn, window_attn=args.window_attn)
    except (qwen.ModelLoadError, qwen.ConfigError) as err:
        raise UserError(str(err)) from None
    print(f"loaded {model_id} in {time.time() - started:.1f} s", flush=True)
    kw = dict(batch_size=args.batch_size, progress=not args.no_progress)
    if args.backend == "hf":
        backend = HFBackend.from_native(native, tok, device_map=args.device_map, **kw)
    else:
        backend = NativeBackend(native, tok, kernels=args.kernels, prefix_reuse=not args.no_prefix_reuse,
                                fixed_new_tokens=args.fixed_new_tokens, **kw)
    if tp is not None and tp.rank == 0:
        lead(backend, tp)
    engine = getattr(backend, "mode", "default") + (f", {args.fixed_new_tokens} fixed new tokens"
                                                     if args.fixed_new_tokens else "")
    return backend, {"model": native.weights_fingerprint, "engine": engine}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
