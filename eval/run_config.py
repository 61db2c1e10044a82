"""The run configuration: built once from the command line, frozen, and passed to whatever needs it (layout,
checks, ranks, backends), which never read the argparse namespace.

Backend-specific flags live in BACKEND_OPTIONS, one tuple per `--backend` value: the runner adds them to the
command line, refuses one given with another backend, and fills in the chosen backend's defaults. A new
backend (or a flag of an existing one) is an entry there; its code reads `config.backend_options`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .api import Option, UserError, positive
from .registry import task_options

BACKEND_OPTIONS: dict[str, tuple[Option, ...]] = {
    "native": (
        Option("kernels", "GPU kernels of the native backend: batch-invariant (every document's numbers are the same "
               "at any batch size, rank count or free memory; the default) or the library kernels (faster, numbers "
               "move with the batching)", default="invariant", choices=("invariant", "fast")),
        Option("no_prefix_reuse", "serve every prompt whole instead of computing a shared few-shot prefix once "
               "(same numbers with --kernels invariant, slower)", bool, False),
        Option("fixed_new_tokens", "benchmarks only: generate exactly N tokens per request, ignoring stop rules",
               int, check=positive, metavar="N"),
        Option("tensor_parallel", "split each model over N processes of a torchrun launch (heads, MLP, vocabulary; "
               "world = N x data parallel)", int, default=1, check=positive, metavar="N"),
    ),
    "hf": (
        Option("device_map", "with --backend hf: place one model's layers over all GPUs of the node (accelerate)",
               choices=("auto",)),
    ),
    "api": (  # a served model behind an OpenAI-compatible endpoint (eval/endpoint.py)
        Option("base_url", "the endpoint, e.g. http://localhost:8000/v1", metavar="URL"),
        Option("api_model", "the served model's name (default: the only one the endpoint serves)", metavar="NAME"),
        Option("api_key_env", "the environment variable holding the API key (never written anywhere)", metavar="VAR"),
        Option("concurrency", "requests in flight at once", int, default=8, check=positive, metavar="N"),
    ),
}


@dataclass(frozen=True)
class RunConfig:
    """Every general setting of one invocation; task options by option name (only those given), the chosen
    backend's options by name (defaults filled in)."""

    task: tuple[str, ...] = ()
    model: str | None = None
    tokenizer: str | None = None
    mode: str | None = None  # None: not given (fewshot for a plain task; a suite sets its own)
    backend: str = "native"
    dynamic_ntk: bool | None = None
    logn: bool | None = None
    window_attn: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    subjects: str | None = None
    batch_size: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 1234
    output_dir: str = "results"
    overwrite: bool = False
    list_tasks: bool = False
    dry_run: bool = False
    rescore: str | None = None
    allow_code_execution: bool = False
    skip_bad_rows: bool = False
    verbatim_csv: bool = False
    no_progress: bool = False
    plots: bool = False
    task_options: dict = field(default_factory=dict)
    backend_options: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args) -> "RunConfig":
        general = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        general["task"] = tuple(t for item in args.task or () for t in item.split(",") if t)
        given = {name: option.parse(getattr(args, option.dest))
                 for name, (option, _) in task_options().items() if getattr(args, option.dest) is not None}
        return cls(**general, task_options=given, backend_options=backend_options(args))

    def record(self, mode: str, task: str, options: dict) -> dict:
        """The settings a run's results.json records: this run's task and mode, every general setting, the
        backend's options, every task option as this invocation set it, and `options` (this run's own)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("task_options",
                                                                                       "backend_options")}
        every = {name: self.task_options.get(name, option.default) for name, (option, _) in task_options().items()}
        return {**plain, "task": task, "mode": mode, **self.backend_options, **every, **options}


def backend_options(args) -> dict:
    """The chosen backend's options (defaults filled in); a flag of another backend is refused."""
    values = {}
    for backend, options in BACKEND_OPTIONS.items():
        for option in options:
            raw = getattr(args, option.dest)
            if raw is not None and raw is not False and backend != args.backend:
                raise UserError(f"{option.flag_name} applies to --backend {backend} only "
                                f"(this run: --backend {args.backend})")
            if backend == args.backend:
                given = raw if option.type is bool or raw is None else option.parse(raw)
                values[option.name] = option.default if given is None else given
    return values


def add_flags(parser, options) -> None:
    """Each option as a flag: a switch for bool, else a value read as text (Option.parse converts and checks it)."""
    for option in options:
        if option.type is bool:
            parser.add_argument(option.flag_name, action="store_true", default=None, help=option.help)
        else:
            parser.add_argument(option.flag_name, default=None, choices=option.choices or None, help=option.help,
                                metavar=option.metavar)
