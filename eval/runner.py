"""Command line: `qwen-eval run --task gsm8k [...]`, or `python eval/runner.py --task gsm8k [...]` (the same).

Subcommands: run (the default), rescore RUN_DIR (re-score saved records, no model), report [RESULTS_DIR]
(reported vs measured), compare BASE_RUN NEW_RUN (regression gate), list (the tasks). The flags
`--rescore RUN_DIR` and `--list-tasks` of `run` do the same as rescore and list.
User errors print one line and exit with code 2; Ctrl-C writes the partial table and exits 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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

from eval import distributed, lm_eval_spellings
from eval.api import UserError, counted
from eval.cli_checks import check_flags, check_paths, check_run_dir, check_same_configuration
from eval.data import DataSource
from eval.stats import with_stderr
from eval.pipeline import execute, plan_task, rescore, write_dry_run
from eval.provenance import task_identity
from eval.registry import get_task, task_names, task_options
from eval.results import atomic_write, read_info, read_results
from eval.run_layout import dtype_name, model_folder, run_folder
from eval.run_config import BACKEND_OPTIONS, RunConfig, add_flags
from eval.suites import SUITES, expand

DEFAULT_MODELS = {"fewshot": "Qwen/Qwen-7B", "chat": "Qwen/Qwen-7B-Chat"}


USAGE = """%(prog)s --task NAME[,NAME] [--model PATH|HUB_ID] [--data-dir DIR] [options]
       {prog} --dry-run --task NAME --tokenizer FILE | --rescore RUN_DIR | --list-tasks
       qwen-eval run|rescore|report|compare|list ... (python eval/runner.py report|compare|rescore|list ...)"""


def parse_config(argv=None, prog="python eval/runner.py") -> RunConfig:
    return RunConfig.from_args(parser(prog).parse_args(lm_eval_spellings.translate(sys.argv[1:] if argv is None else list(argv))))


def parser(prog: str = "python eval/runner.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, usage=USAGE.format(prog=prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", action="append", default=[], metavar="NAME",
                   help=f"task or suite (repeat, or comma-separate, for several); suites: {', '.join(SUITES)} "
                        f"(each task in its own run directory, the report printed at the end); see --list-tasks")
    p.add_argument("--model", help="checkpoint directory or hub id (default Qwen/Qwen-7B; Qwen/Qwen-7B-Chat in chat mode)")
    p.add_argument("--tokenizer", help="qwen.tiktoken file or checkpoint dir (default: the model's)")
    p.add_argument("--mode", choices=["fewshot", "chat"],
                   help="fewshot: the base model's few-shot prompts; chat: zero-shot ChatML (default fewshot)")
    p.add_argument("--backend", choices=list(BACKEND_OPTIONS), default="native",
                   help="native engine, or plain transformers batched as lm-evaluation-harness batches (the "
                        "benchmark baseline; --batch-size 1: one request at a time, as the original scripts)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and CI)")
    p.add_argument("--plots", action="store_true",
                   help="also draw the task's PNG plots into the run directory, after the table (matplotlib: "
                        "seconds); `report` draws them for any finished run")
    add_flags(p.add_argument_group("task options (each read by the tasks named)"),
              [_named_readers(option, readers) for option, readers in task_options().values()])
    for backend, options in BACKEND_OPTIONS.items():
        add_flags(p.add_argument_group(f"--backend {backend} options"), options)
    return p


def _named_readers(option, readers: list[str]):
    return dataclasses.replace(option, help=f"{option.help} [{', '.join(readers)}]")


def _rescore_command(argv) -> int:
    p = argparse.ArgumentParser(prog="qwen-eval rescore", description="recompute metrics and tables from saved samples")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--allow-code-execution", action="store_true", help="needed to re-score tasks that run code")
    args = p.parse_args(argv)
    return rescore_run(RunConfig(rescore=args.run_dir, allow_code_execution=args.allow_code_execution))


def _list_command(argv) -> int:
    argparse.ArgumentParser(prog="qwen-eval list", description="the tasks and their modes").parse_args(argv)
    return list_tasks()


def _module_command(name: str):
    def command(argv) -> int:
        import importlib

        return importlib.import_module(name).main(argv)
    return command


COMMANDS = {
    "run": lambda argv: run(parse_config(argv, prog="qwen-eval run")),
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
        return run(parse_config(argv))  # no subcommand: `run`, as `python eval/runner.py --task ...` always was
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment: a full disk, a read-only file, no temporary directory
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished documents are saved; run the same command again to resume", file=sys.stderr)
        return 130


# ---- subcommands -------------------------------------------------------------------------------------
def run(config: RunConfig) -> int:
    distributed.check_launch(config)  # --dry-run / --rescore are single-process
    if config.list_tasks:
        return list_tasks()
    if config.rescore:
        if config.dry_run or config.task:
            raise UserError(f"--rescore re-scores the saved run {config.rescore} as it was made: drop "
                            + ("--dry-run" if config.dry_run else "--task"))
        return rescore_run(config)
    if not config.task:
        raise UserError("no task given: pass --task NAME (see --list-tasks)")
    check_flags(config)  # from here on, whatever can fail on user input fails before any weight loads
    check_paths(config.model, config.tokenizer)
    endpoint = None
    if config.backend == "api" and not config.dry_run:  # reachable, key accepted, model served: before any planning
        from eval.endpoint import connect

        endpoint = connect(config.backend_options)
        # the served name names the run folder; the tokenizer comes from it or --tokenizer
        config = dataclasses.replace(config, model=config.model or endpoint.model)
    entries = expand(config.task, config.mode)
    _refuse_unread_options(config, {e.task for e in entries})
    if any(get_task(e.task).executes_code for e in entries) and not config.dry_run:
        _require_code_execution(config)  # before any generation is spent
    groups = _plan_all(config, entries)
    if config.dry_run:
        return dry_run(config, groups)
    return evaluate(config, groups, endpoint)


def _refuse_unread_options(config: RunConfig, tasks: set[str]) -> None:
    """A task option given on the command line that no task of this run reads is a mistake, not a no-op."""
    for name, (option, readers) in task_options().items():
        if name in config.task_options and not tasks & set(readers):
            raise UserError(f"{option.flag_name} is an option of {', '.join(readers)}, which this run does not "
                            f"include (--task {','.join(config.task)}): drop it")


def list_tasks() -> int:
    for name in task_names():
        task = get_task(name)
        summary = (sys.modules[type(task).__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} modes: {', '.join(task.modes):14s} {summary}")
    print(f"suites: {', '.join(SUITES)} (see --help)")
    return 0


def rescore_run(config: RunConfig) -> int:
    task = _run_task(Path(config.rescore))
    if task in task_names() and get_task(task).executes_code:
        _require_code_execution(config)  # re-scoring runs the saved completions again
    rescore(Path(config.rescore), get_task)
    return 0


def dry_run(config: RunConfig, groups: dict) -> int:
    for group in groups.values():
        for job in group.jobs:
            path = write_dry_run(job.plan, overwrite=config.overwrite)
            n = sum(map(len, job.plan.requests))
            print(f"{job.plan.task.name} ({job.plan.mode}): {counted(n, 'request')} -> {shown_path(path)}")
    return 0


def evaluate(config: RunConfig, groups: dict, endpoint=None) -> int:
    """Every check that needs the checkpoint's config, then each model loaded once (or the endpoint reached) and
    its runs served; plots (with --plots) last, after every table is out: matplotlib's import and drawing take
    seconds, a quarter of a quick check's wall time on a GPU (bench/RESULTS.md)."""
    from eval.backends import refuse_unapplied_switches  # imports torch: not for --dry-run

    for model_id, group in groups.items():  # before any weights load
        refuse_unapplied_switches(config, model_id, [job.plan for job in group.jobs])
    _seed(config.seed)
    plans = [job.plan for group in groups.values() for job in group.jobs]
    ranks = distributed.setup(config, plans)  # SINGLE in one process
    load_config = distributed.backend_config(config, ranks)
    for model_id, group in groups.items():  # every model described, every run directory checked, then loads
        _describe_group(load_config, model_id, group, endpoint, writer=ranks.global_rank == 0)
    finished = []
    for model_id, group in groups.items():
        finished += _serve_group(load_config, model_id, group, ranks, endpoint)
    distributed.close(ranks)
    if finished:
        _last_words(config, finished)
    for job in finished if config.plots else ():
        _plot(job.plan.run_dir)
    return 0


@dataclass
class Job:
    plan: object  # eval.pipeline.Plan
    config: dict  # the settings this run was made with (a suite sets some per task)
    model_name: str
    known: dict = field(default_factory=dict)  # the identity known before the weights load


@dataclass
class ModelGroup:
    """The runs one model serves; it is loaded once for all of them."""

    tok: object
    jobs: list[Job] = field(default_factory=list)
    ckpt: Path | None = None


def _plan_all(config: RunConfig, entries) -> dict[str | None, ModelGroup]:
    """Every run planned (documents, requests, run directory), grouped by the model that serves it: a suite
    of both modes needs the base and the chat model. All data and tokenizer errors surface here."""
    groups: dict[str | None, ModelGroup] = {}
    for entry in entries:
        task = get_task(entry.task)
        default = entry.model or DEFAULT_MODELS[entry.mode]  # a family suite names its own model
        model_id = config.model or (None if config.dry_run and config.tokenizer else default)
        if model_id not in groups:
            groups[model_id] = ModelGroup(_tokenizer(config.tokenizer or model_id, explicit=bool(config.tokenizer)))
        group = groups[model_id]
        folder = run_folder(task.name, entry.mode, config, window_in_name=not task.sets_switches,
                            dtype=None if config.dry_run or config.backend == "api" else dtype_name(_dtype(config)))
        run_dir = Path(config.output_dir) / model_folder(model_id, config.tokenizer) / folder
        subjects = config.subjects.split(",") if config.subjects else None
        own = _task_options(task, entry, config)
        started = time.time()
        plan = plan_task(task, entry.mode, _data_source(config), group.tok, subjects=subjects, limit=config.limit,
                         options=_run_options(task, entry.mode, own, config), run_dir=run_dir)
        plan.timings["plan"] = time.time() - started
        recorded = config.record(entry.mode, entry.task, {**entry.flags, **own})  # what a suite set, too
        group.jobs.append(Job(plan, recorded, _model_name(model_id or config.tokenizer)))
    return groups


def _task_options(task, entry, config: RunConfig) -> dict:
    """The task's own options for one run: a suite entry's values, else the command line's, else the defaults."""
    values = {}
    for option in task.options:
        value = entry.flags.get(option.name, config.task_options.get(option.name, option.default))
        if value is not None:
            values[option.name] = value
    return values


def _run_options(task, mode: str, own: dict, config: RunConfig) -> dict:
    """The options a run records: its task's own, and the general settings the task reads (Task.option_names)."""
    general = {"verbatim_csv": config.verbatim_csv, "seed": config.seed,
               **({"window_attn": config.window_attn} if config.window_attn else {})}
    return task.check_options({**{k: v for k, v in general.items() if k in task.option_names}, **own}, mode)


def _describe_group(config: RunConfig, model_id: str | None, group: ModelGroup, endpoint=None,
                    writer: bool = True) -> None:
    """The identity each run of the group will have, known from the checkpoint's config (or the endpoint) before
    the weights load; each run directory is checked against it. writer: this process writes the run directories
    (rank 0 of a torchrun launch), so it alone tries their lock: ranks trying it at once would see each other."""
    plans = [job.plan for job in group.jobs]
    group.ckpt, known = endpoint.describe(plans) if endpoint else _describe(config, model_id)
    for job in group.jobs:
        plan = job.plan
        job.known = {**known, "model_name": job.model_name,
                     **task_identity(plan.task, plan.mode, plan.options, plan.data_manifest["files"], group.tok)}
        check_same_configuration(plan.run_dir, job.known, config.overwrite)
        if writer:
            check_run_dir(plan.run_dir, config.overwrite)


def _serve_group(config: RunConfig, model_id: str | None, group: ModelGroup, ranks, endpoint=None) -> list[Job]:
    """Load the group's model once and serve each of its runs; the runs finished here (on rank 0). Under tensor
    parallelism the group's other ranks repeat the batched calls of its rank 0 instead."""
    started = time.time()
    if endpoint:
        backend, loaded = endpoint.backend(group.tok, not config.no_progress), endpoint.identity_after_load()
    else:
        backend, loaded = _load(config, model_id, group.ckpt, group.tok, ranks.tp)
    load = time.time() - started
    if ranks.tp is not None and ranks.tp.rank:
        from model.tensor_parallel import follow

        follow(backend, ranks.tp)
        return []
    finished = []
    for job in group.jobs:
        plan = job.plan
        plan.identity = {**loaded, **job.known}  # run.json checks the weights themselves once they are read
        if job is group.jobs[0]:  # the model loads once, for all of the group's runs: counted in the first
            plan.timings.update(load=load, warmup=0.0)  # no backend warms up apart: kernels compile inside serve
        if plan.task.executes_code:  # how model-written code was confined on this machine
            from eval.sandbox import isolation_summary

            plan.environment["sandbox"] = isolation_summary()
        backend.label = f"{plan.task.name} ({plan.mode})"
        results = execute(plan, backend, ranks, overwrite=config.overwrite, config=job.config)
        if results is not None:  # rank 0
            print(summary_line(plan, results))
            finished.append(job)
    if ranks.tp is not None:  # the group's other ranks stop repeating (a failed rank 0: torchrun stops them)
        from model.tensor_parallel import release

        release(ranks.tp)
    return finished


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
    cut = sum(any(r.truncated for r in requests) for requests in plan.requests)
    cuts = f"; {cut} truncated prompt{'' if cut == 1 else 's'} (see table.md)" if cut else ""
    return (f"{plan.task.name} ({plan.mode}): {headline} on {counted(results.n_done, 'document')}{skips}{cuts} -> "
            f"{shown_path(plan.run_dir)}")


def shown_path(path) -> str:
    """A path on one terminal line: one holding a newline or another control character is quoted, escaped."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _last_words(config: RunConfig, jobs: list[Job]) -> None:
    """A suite ends with the reproduction report of its models; every command ends saying where its files are."""
    if any(name in SUITES for name in config.task):
        from eval import report

        report.write_report(Path(config.output_dir), sorted({j.model_name for j in jobs}),
                            own=[j.plan.run_dir for j in jobs], with_plots=False)
    for folder, runs in _by_folder(jobs).items():
        summary = write_summary(folder, runs)
        print(f"summary of this invocation's {counted(len(runs), 'run')}: {shown_path(summary)}")
    folders = sorted({shown_path(j.plan.run_dir.parent) for j in jobs})
    print(f"results written to {', '.join(folders)}/ ({', '.join(shown_path(j.plan.run_dir.name) for j in jobs)})")


def _by_folder(jobs: list[Job]) -> dict[Path, list[Job]]:
    folders: dict[Path, list[Job]] = {}
    for job in jobs:
        folders.setdefault(job.plan.run_dir.parent, []).append(job)
    return folders


def write_summary(folder: Path, jobs: list[Job]) -> Path:
    """summary.json beside the run folders, as lm-evaluation-harness users expect its results JSON: each run of
    the folder by name, its headline metrics with their standard errors; this invocation's runs replace theirs."""
    path = folder / "summary.json"
    runs = json.loads(path.read_text(encoding="utf-8")).get("runs", {}) if path.exists() else {}
    for job in jobs:
        results = read_results(job.plan.run_dir)
        runs[job.plan.run_dir.name] = {"task": results.task, "mode": results.mode, "n": results.n_done,
                                       "partial": results.partial, **headline_metrics(results)}
    atomic_write(path, json.dumps({"model": jobs[0].model_name, "runs": dict(sorted(runs.items()))}, indent=2,
                                  ensure_ascii=False, default=str) + "\n")
    return path


def headline_metrics(results) -> dict:
    """The run's headline metrics; beside each one a table row shows with a standard error, `<metric>_stderr`."""
    table = with_stderr(results.table)
    errors = {row[2]: row[3] for row in table.rows if "stderr" in table.columns and row[3] != ""}
    out = {}
    for name, value in results.metrics.items():
        out[name] = value
        if isinstance(value, float) and value in errors:
            out[f"{name}_stderr"] = errors[value]
    return out


def _run_task(run_dir: Path) -> str | None:
    return read_info(run_dir).identity.get("task")


def _require_code_execution(config: RunConfig) -> None:
    from eval.sandbox import CodeExecutionRefused, require_opt_in

    try:
        require_opt_in(config.allow_code_execution)
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


def _data_source(config: RunConfig) -> DataSource:
    """A fresh source per run, so each run records only the files it read and the rows it skipped."""
    root = None
    if config.data_dir:
        root = Path(config.data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"--data-dir {root} is not a directory")
    return DataSource(root, skip_bad_rows=config.skip_bad_rows, verbatim_csv=config.verbatim_csv)


def _model_name(model_id: str) -> str:
    return Path(model_id.rstrip("/")).name or "model"


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(config: RunConfig) -> str:
    """The host holds a --device-map model until accelerate places its layers."""
    return "cpu" if config.backend_options.get("device_map") else config.device


def _dtype(config: RunConfig):
    """The dtype the weights will be held in, known before they load."""
    from model.loading import resolve_device, resolve_dtype

    return resolve_dtype(config.dtype, resolve_device(_device(config)))


def _describe(config: RunConfig, model_id: str) -> tuple[Path, dict]:
    """The checkpoint, and the part of the model's identity known from its config without reading a weight
    (the weights' own fingerprint comes with the load)."""
    from model import ConfigError, ModelLoadError
    from model.config import model_shape, read_config, with_switches
    from model.loading import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(model_id)
        a = with_switches(read_config(ckpt / "config.json"), config.dynamic_ntk, config.logn, config.window_attn)
    except (ModelLoadError, ConfigError) as err:
        raise UserError(str(err)) from None
    return ckpt, {"backend": config.backend, "dtype": str(_dtype(config)),
                  "switches": {"dynamic_ntk": a.use_dynamic_ntk, "logn": a.use_logn_attn, "windows": a.windows},
                  "shape": model_shape(a), "tensor_parallel": config.backend_options.get("tensor_parallel", 1)}


def _load(config: RunConfig, model_id: str, ckpt: Path, tok, tp=None) -> tuple[object, dict]:
    """Load the model (the only slow step), saying so; the backend, and the identity only the load gives.
    tp: this rank's tensor-parallel group, whose ranks each load their shard."""
    import model as qwen

    from eval.backends import make_backend
    from model.loading import resolve_device
    from model.tensor_parallel import lead, load_tensor_parallel

    print(f"loading {model_id} ({dtype_name(_dtype(config))}, {resolve_device(_device(config))}) ...", flush=True)
    started = time.time()
    load = qwen.load_model if tp is None else partial(load_tensor_parallel, g=tp)
    try:
        native = load(ckpt, dtype=config.dtype, device=_device(config), dynamic_ntk=config.dynamic_ntk,
                      logn=config.logn, window_attn=config.window_attn)
    except (qwen.ModelLoadError, qwen.ConfigError) as err:
        raise UserError(str(err)) from None
    print(f"loaded {model_id} in {time.time() - started:.1f} s", flush=True)
    backend = make_backend(config, native, tok)
    if tp is not None and tp.rank == 0:
        lead(backend, tp)
    fixed = config.backend_options.get("fixed_new_tokens")
    engine = getattr(backend, "mode", "default") + (f", {fixed} fixed new tokens" if fixed else "")
    return backend, {"model": native.weights_fingerprint, "engine": engine}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
