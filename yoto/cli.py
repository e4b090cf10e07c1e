"""The ``yoto`` command.

    yoto train [--preset NAME | --config FILE] [--set key=value ...] [--run-root DIR]
               [--name NAME] [--resume RUN_DIR] [--inject KIND@STEP ...]
    yoto config [--preset NAME | --config FILE] [--set key=value ...]   # print, validate
    yoto presets
    yoto runs list [ROOT] [--json]
    yoto runs show RUN_DIR [--json]
    yoto spectra RUN_DIR --step S [--no-write] [--json]
    yoto sample RUN_DIR [--prompt TEXT] [--step S] [--tokens N]
    yoto export RUN_DIR [--step S] --out DIR [--force]       # a Hugging Face transformers model
    yoto dashboards build --out DIR | push --url URL [--folder NAME]   # Grafana, from the catalog
               [--preset NAME | --config FILE] [--set key=value ...]   # probe thresholds
    yoto sweep --grid KEY=V1,V2 [--grid ...] [--preset NAME] [--set ...] [--budget B]
    yoto scaling fit RUNS... | --table CSV [--law auto|kaplan|chinchilla|floor] [--source S]
               [--metric val_loss|eval:TASK/METRIC]    # few-shot scores: effective size by score
    yoto explore [RUN_DIR_OR_ROOT ...] [--port N]                 # Streamlit post-mortem

Errors the user can fix (a config typo, a missing data path, a damaged run directory) are
printed as one clear message and exit with status 2; nothing else is caught.

Exit codes of ``yoto train``, for schedulers (README "Exit codes"): 0 finished; 1 crashed
(an exception, with its traceback); 2 bad input; 3 halted by the policy; 75 interrupted
(SIGTERM, preemption or a first Ctrl-C: checkpointed, resume it; EX_TEMPFAIL, "try again");
130 stopped at once by a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from yoto import config as config_mod
from yoto import runstore
from yoto.errors import ConfigError, RunFailed, YotoError

DEFAULT_PRESET = "tiny"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset", help=f"shipped preset (default {DEFAULT_PRESET}); see 'yoto presets'"
    )
    src.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one field, e.g. --set train.steps=100 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yoto", description=__doc__.split("\n\n")[0])
    # the deepspeed launcher passes --local_rank=N before the command; yoto reads the rank
    # from the environment, as torchrun sets it
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a GPT with DeepSpeed; writes a run directory")
    _add_config_args(p)
    p.add_argument(
        "--run-root",
        default="runs",
        metavar="DIR",
        help="folder that receives the run directory (default ./runs)",
    )
    p.add_argument("--name", help="run name (default: the preset or config file name)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--inject",
        metavar="KIND@STEP",
        action="append",
        default=[],
        help="inject a fault (lr_spike, bad_batch, nan_grad, weight_blowup, "
        "fp16_overflow, flaky, slow_rank), e.g. --inject lr_spike@300 (repeatable)",
    )
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default live.metrics_addr, 127.0.0.1:9477; 0 = off)",
    )
    p.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard event files under DIR (live.tensorboard; needs "
        "pip install 'yoto[tensorboard]')",
    )

    p = sub.add_parser("config", help="print the resolved configuration (validates it)")
    _add_config_args(p)

    sub.add_parser("presets", help="list the shipped presets")

    p = sub.add_parser("sample", help="continue a prompt with a checkpoint's model")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="", help="text to continue (a prefix-LM's prefix)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete)")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "export",
        help="a checkpoint as a Hugging Face transformers model (safetensors) and tokenizer, "
        "for the configurations that are exactly GPT-2, BLOOM, GPT-NeoX, Llama or Qwen3",
    )
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")

    p = sub.add_parser("spectra", help="weightwatcher on a checkpoint's weight matrices")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, required=True, help="a complete checkpoint's step")
    p.add_argument("--no-write", action="store_true", help="print only; leave spectra/ as is")
    p.add_argument("--json", action="store_true")

    alerts = sub.add_parser("alerts", help="alert rules, Alertmanager config, chat test")
    alerts_sub = alerts.add_subparsers(dest="alerts_command", required=True)
    p = alerts_sub.add_parser(
        "build", help="write the Prometheus rules and Alertmanager config into deploy/"
    )
    p.add_argument("--out", default="deploy", metavar="DIR", help="deploy folder (default)")
    _add_config_args(p)
    p = alerts_sub.add_parser("test", help="send one test message to a chat URL (Apprise)")
    p.add_argument(
        "url",
        nargs="?",
        help="Apprise URL, e.g. slack://..., json://host:port/path (default: the notify "
        "config's URLs, from $YOTO_NOTIFY_URLS or notify.urls_file)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for delivery")
    p = alerts_sub.add_parser(
        "resend",
        help="deliver the chat messages a run kept (given up on, refused, or still queued "
        "when it ended); exit 1 while any is still kept",
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--url",
        action="append",
        help="Apprise URL to deliver to (repeatable; default: $YOTO_NOTIFY_URLS or the "
        "notify config's urls_file, as a run finds them)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for delivery")
    p = sub.add_parser("explore", help="open the post-mortem explorer (Streamlit) on runs")
    p.add_argument("paths", nargs="*", default=["runs"], help="run directories or roots")
    p.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")

    runs = sub.add_parser("runs", help="summarise run directories")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    p = runs_sub.add_parser("list", help="table of the runs under ROOT")
    p.add_argument("root", nargs="?", default="runs")
    p.add_argument("--json", action="store_true")
    p = runs_sub.add_parser("show", help="one run: status, progress, losses, events, checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    data = sub.add_parser("data", help="prepare training data; the data as a run saw it")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "prepare",
        help="tokenize data.paths once into memory-mapped token files (train on --out)",
    )
    _add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared directory")
    p.add_argument(
        "--workers",
        type=int,
        help="tokenizer processes (default: one per CPU core; 0 = in this process, the "
        "default for data.tokenizer=bytes)",
    )
    p.add_argument("--force", action="store_true", help="replace what --out holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = data_sub.add_parser("batch", help="the sequences one step trained on")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--attempt", type=int, help="default: the newest attempt that trained it")
    p.add_argument("--snippet", type=int, default=60, help="characters of text per sequence")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "diagnose", help="replay a recorded spike: was it the data, the state or the machine?"
    )
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, required=True, help="the spike's onset step")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("eval", help="few-shot evaluation of a checkpoint with lm-eval")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete)")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated lm-eval tasks, e.g. stdlib_cloze,stdlib_next_line "
        "(yoto's offline tasks) or lambada_openai,hellaswag (from the local HF cache)",
    )
    p.add_argument("--num-fewshot", type=int, help="examples in each prompt (default 0)")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="your task YAMLs"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-write", action="store_true", help="print only; leave evals/ as is")
    p.add_argument("--json", action="store_true")
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on data.paths")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tok_sub.add_parser("train", help="train a byte-level BPE; use it as data.tokenizer")
    _add_config_args(p)
    p.add_argument("--vocab", type=int, required=True, help="vocabulary size, e.g. 32000")
    p.add_argument("--out", required=True, metavar="FILE", help="tokenizer.json to write")
    p.add_argument("--min-frequency", type=int, default=2, help="a merge's least count")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dashboards_parser(sub)
    _add_scaling_parsers(sub)
    return parser


def _add_dashboards_parser(sub: Any) -> None:
    p = sub.add_parser("dashboards", help="Grafana dashboards generated from the metric catalog")
    dash_sub = p.add_subparsers(dest="dashboards_command", required=True)
    b = dash_sub.add_parser("build", help="write the dashboard JSON files")
    b.add_argument("--out", required=True, metavar="DIR", help="e.g. deploy/grafana/dashboards")
    _add_config_args(b)  # thresholds that follow the probes (the spectra alpha band)
    u = dash_sub.add_parser(
        "push", help="create/overwrite the dashboards in a live Grafana (GRAFANA_TOKEN from env)"
    )
    u.add_argument("--url", required=True, help="Grafana base URL, e.g. http://localhost:3000")
    u.add_argument("--folder", metavar="NAME", help="Grafana folder (created if missing)")
    _add_config_args(u)


def cmd_dashboards(args: argparse.Namespace) -> int:
    from yoto.dashboards.live import grafana

    if args.dashboards_command == "build":
        for path in grafana.write_all(args.out, resolve_config(args)):
            print(path)
        return 0
    from yoto.dashboards.live import provision

    credential = provision.credential_from_env()
    boards = grafana.build_all(resolve_config(args))
    uids = provision.push(args.url, boards, credential, folder=args.folder)
    print(f"pushed {len(uids)} dashboards to {provision.public_url(args.url)}: {', '.join(uids)}")
    return 0


def _add_scaling_parsers(sub: Any) -> None:
    """``yoto sweep`` and ``yoto scaling fit`` (yoto.scaling: sweep, runs, laws)."""
    p = sub.add_parser("sweep", help="train a grid of runs, tagged as one sweep")
    _add_config_args(p)
    p.add_argument(
        "--grid",
        metavar="KEY=V1,V2",
        action="append",
        default=[],
        help="a config field and its values, e.g. model.n_layer=2,4,6 (repeatable: the "
        "Cartesian product is trained)",
    )
    p.add_argument(
        "--budget",
        default="equal-tokens",
        help="equal-tokens (default), compute-optimal (D = --tokens-per-param x N) or "
        "steps (train.steps as configured or gridded)",
    )
    p.add_argument("--tokens", type=int, help="equal-tokens: training tokens per run")
    p.add_argument("--tokens-per-param", type=float, default=20.0, help="compute-optimal ratio")
    p.add_argument("--run-root", default="runs", metavar="DIR")
    p.add_argument("--name", help="run name prefix (default: the preset or config name)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    p.add_argument("--progress", action="store_true", help="a progress bar per run")
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="each run serves Prometheus /metrics here in turn (default live.metrics_addr; "
        "0 = off)",
    )
    p.add_argument("--no-fit", action="store_true", help="no scaling fit at the end")

    scaling = sub.add_parser("scaling", help="scaling-law fits and effective model size")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", required=True)
    p = scaling_sub.add_parser("fit", help="fit a scaling law to runs or a CSV table")
    p.add_argument("runs", nargs="*", metavar="RUNS", help="run directories or roots of runs")
    p.add_argument("--table", metavar="CSV", help="points from a CSV: N, D, loss[, source, name]")
    p.add_argument("--sweep", metavar="ID", help="only the runs of this sweep")
    p.add_argument("--law", choices=["auto", "kaplan", "chinchilla", "floor"], default="auto")
    p.add_argument("--source", help="one validation source ('all' = the mean over sources)")
    p.add_argument(
        "--metric",
        default="val_loss",
        metavar="SPEC",
        help="what to fit: val_loss (default) or eval:TASK/METRIC, a few-shot score of "
        "yoto eval (e.g. eval:stdlib_next_line/acc_norm): each run's effective size by "
        "that score beside the one by loss",
    )
    direction = p.add_mutually_exclusive_group()
    direction.add_argument(
        "--higher-is-better",
        dest="higher_is_better",
        action="store_const",
        const=True,
        help="--metric's metric is a share in [0, 1] that rises with N (one yoto does not know)",
    )
    direction.add_argument(
        "--lower-is-better",
        dest="higher_is_better",
        action="store_const",
        const=False,
        help="--metric's metric falls with N like a loss (one yoto does not know)",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-missing", action="store_true", help="leave out runs without val loss")
    p.add_argument("--json", action="store_true")


def resolve_config(args: argparse.Namespace) -> config_mod.Config:
    preset = args.preset if (args.preset or args.config) else DEFAULT_PRESET
    return config_mod.load_config(
        preset=preset if not args.config else None, file=args.config, overrides=args.overrides
    )


def config_label(args: argparse.Namespace) -> str:
    """The preset's name or the config file's stem: a run's default name and its
    ``preset`` label in ``yoto_run_info``."""
    return Path(args.config).stem if args.config else (args.preset or DEFAULT_PRESET)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        if args.preset or args.config:
            raise ConfigError(
                "--resume continues with the run's saved config.yaml; give "
                "changes with --set (e.g. --set train.steps=2000), not "
                "--preset/--config"
            )
        run_dir = runstore.require_run_dir(args.resume)
        base = config_mod.load_config(file=run_dir / runstore.CONFIG, overrides=args.overrides)
        cfg, name = base, runstore.read_manifest(run_dir).get("name", run_dir.name)
    else:
        cfg = resolve_config(args)
        name = args.name or config_label(args)
    if args.no_progress:
        cfg.log.progress = False
    if args.inject:
        cfg.faults = [*cfg.faults, *args.inject]
    if args.metrics_addr is not None:
        cfg.live.metrics_addr = args.metrics_addr
    if args.tensorboard is not None:
        cfg.live.tensorboard = args.tensorboard
    preset = config_label(args)
    _check_harness(cfg)
    from yoto.trainer.run import train  # heavy imports (torch, DeepSpeed) only when training

    trained = train(
        cfg,
        run_root=args.run_root,
        name=name,
        resume=args.resume,
        argv=sys.argv[1:],
        live=lambda: live_sinks(cfg, preset),
        evaluator=background_evaluator,
    )
    return EXIT_CODES[trained.status]


def background_evaluator(cfg: config_mod.Config) -> Any:
    """eval.harness's evaluator (yoto.evals: lm-eval in a background process)."""
    from yoto.evals.inloop import BackgroundEvaluator

    return BackgroundEvaluator(cfg.eval.harness)


def _check_harness(cfg: config_mod.Config) -> None:
    """Before anything is written: in-loop evaluation needs lm-eval installed."""
    import importlib.util

    if cfg.eval.harness.every and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"eval.harness.every={cfg.eval.harness.every} needs lm-eval: "
            "pip install 'yoto[eval]', or set eval.harness.every=0"
        )


def live_sinks(cfg: config_mod.Config, preset: str) -> list[Any]:
    """The TensorBoard writer, the Prometheus exporter (listening when this returns: a busy
    port is an error before the run directory exists) and the chat notifier; made on rank
    0 only."""
    from yoto.alerts.notifier import ChatNotifier, resolve_urls
    from yoto.dashboards.live.exporter import Exporter, parse_addr
    from yoto.dashboards.live.tensorboard import TensorBoardSink

    sinks: list[Any] = [TensorBoardSink(cfg.live.tensorboard)] if cfg.live.tensorboard else []
    urls = resolve_urls(cfg.notify)
    notifier = ChatNotifier(urls, cfg.notify, link=cfg.notify.link) if urls else None
    addr = parse_addr(cfg.live.metrics_addr)
    if addr is not None:
        exporter = Exporter(
            preset,
            cfg.live.layer_series_max,
            extra=notifier.stats if notifier is not None else None,
            linger_seconds=cfg.live.linger_seconds,
        )
        bound = exporter.serve(addr, cfg.live.port_search)
        logging.getLogger("yoto").info("serving /metrics on http://%s/metrics", bound)
        sinks.append(exporter)
    if notifier is not None:
        sinks.append(notifier)
    return sinks


def cmd_alerts_build(args: argparse.Namespace) -> int:
    from yoto.alerts import alertmanager, rules

    out = Path(args.out)
    files = {
        out / rules.RULES_FILE.relative_to("deploy"): rules.render(
            rules.build_rules(resolve_config(args))
        ),
        out / alertmanager.CONFIG_FILE.relative_to("deploy"): alertmanager.render(),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        runstore.atomic_write_bytes(path, text.encode())
        print(path)
    return 0


def _one_off_notifier(urls: list[str], timeout: float, run: dict[str, str], command: str) -> Any:
    """The notifier a run uses, made for a command that delivers and stops: messages wait
    up to ``timeout`` for their channel."""
    from yoto.alerts.notifier import ChatNotifier, resolve_urls

    cfg = config_mod.Config()
    urls = urls or resolve_urls(cfg.notify)
    if not urls:
        raise ConfigError(
            f"no chat URL: give one ({command} slack://...) or set ${cfg.notify.urls_env}"
        )
    cfg.notify.give_up_after_seconds = timeout
    cfg.notify.backoff_seconds = min(cfg.notify.backoff_seconds, timeout / 4)
    return ChatNotifier(urls, cfg.notify, run)


def cmd_alerts_resend(args: argparse.Namespace) -> int:
    """Deliver what a run's outbox kept; the outcomes go to the same outbox."""
    from yoto.alerts import outbox

    run_dir = runstore.require_run_dir(args.run_dir)
    waiting = outbox.kept(run_dir)
    if not waiting:
        print(f"{run_dir}: no chat message kept; nothing to resend")
        return 0
    manifest = runstore.read_manifest_or_damage(run_dir)[0] or {}  # the id and name, if known
    run = {"run": manifest.get("id", run_dir.name), "name": manifest.get("name", "")}
    notifier = _one_off_notifier(args.url or [], args.timeout, run, "--url")
    notifier.bind_run({**run, "dir": str(run_dir)})  # queues the kept messages
    notifier.close(timeout=args.timeout)
    left = outbox.kept(run_dir)
    print(
        f"{len(waiting)} kept message(s): {len(waiting) - len(left)} delivered, "
        f"{len(left)} still kept" + (f" (see {run_dir / runstore.CHAT})" if left else "")
    )
    return 0 if not left else 1


def cmd_alerts_test(args: argparse.Namespace) -> int:
    """One message through the same notifier a run uses; exit 1 when it was not delivered."""
    from yoto.events import Event, EventKind, Severity

    run = {"run": "test", "name": "yoto alerts test"}
    urls = [args.url] if args.url else []
    notifier = _one_off_notifier(urls, args.timeout, run, "yoto alerts test")
    notifier.notify(Event(0, 0, EventKind.ALERT, Severity.WARNING, "a test message from yoto", {}))
    notifier.close(timeout=args.timeout)
    ok = True
    for channel in notifier.channels:
        sent = notifier.sent[channel.name] > 0
        ok &= sent
        print(f"{channel.name}: {'delivered' if sent else 'NOT delivered'}")
    if not ok:
        print(f"see the log above; channels tried: {', '.join(c.name for c in notifier.channels)}")
    return 0 if ok else 1


def cmd_config(args: argparse.Namespace) -> int:
    print(resolve_config(args).to_yaml(), end="")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    for name in config_mod.preset_names():
        cfg = config_mod.load_config(preset=name)
        m, t = cfg.model, cfg.train
        print(
            f"{name:12s} {m.n_layer} layers x {m.d_model} wide, {m.n_head} heads, "
            f"seq {m.seq_len}; batch {t.global_batch_size}, {t.precision}, "
            f"ZeRO-{t.zero_stage}, {t.steps} steps"
        )
    return 0


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _fmt_num(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _fmt_tokens(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def cmd_runs_list(args: argparse.Namespace) -> int:
    runs = runstore.list_runs(args.root)
    if args.json:
        print(json.dumps([r.to_json() for r in runs], indent=2))
        return 0
    if not runs:
        print(f"no runs under {args.root}")
        return 0
    header = (
        f"{'RUN':44s} {'STATUS':11s} {'STEP':>7s} {'TOKENS':>8s} {'LOSS':>8s} "
        f"{'BEST VAL':>9s} {'ROLLBK':>6s} {'STARTED':16s}"
    )
    print(header)
    for r in runs:
        best = min(r.best_val_loss.values()) if r.best_val_loss else None
        print(
            f"{r.id:44s} {r.state:11s} {_fmt_num(r.last_step, 'd'):>7s} "
            f"{_fmt_tokens(r.tokens):>8s} {_fmt_num(r.train_loss):>8s} {_fmt_num(best):>9s} "
            f"{r.events.get('rollback', 0):>6d} {_fmt_time(r.start):16s}"
        )
        for problem in r.problems:  # under its run: what was skipped to make the row
            print(f"  ! {problem}")
    return 0


def show_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything ``yoto runs show`` prints. ``manifest`` is None when it is deleted or
    damaged; the summary then comes from the run's other parts and its ``problems`` say
    what could not be read (the manifest, event lines, config.yaml)."""
    from yoto.alerts import outbox
    from yoto.runstore import list_checkpoints

    path = runstore.require_run_dir(run_dir)
    manifest, _ = runstore.read_manifest_or_damage(path)
    summary = runstore.summarize(path)
    events = runstore.read_events(path)
    ckpts = [
        {"step": c.step, "complete": c.complete, "path": str(c.path)}
        for c in list_checkpoints(path / runstore.CHECKPOINTS)
    ]
    return {
        "manifest": manifest,
        "summary": summary.to_json(),
        "checkpoints": ckpts,
        "events": events,
        "gaps": [str(g) for g in runstore.find_gaps(path)],
        "chat": dataclasses.asdict(chat) if (chat := outbox.summarize(path)) else None,
        "evals": _newest_scores(path),
    }


def _newest_scores(path: Path) -> list[dict[str, Any]]:
    """The newest few-shot score of each task/metric (``yoto scaling fit``'s final score:
    the newest evaluated step, ties to the highest attempt, then to the row written last),
    with the branch it is on: ``abandoned`` when a later attempt re-trained its step."""
    from yoto.scaling.runs import final_scores

    scores = final_scores(path)
    if not scores:
        return []
    firsts: dict[int, int] = {}
    for file in runstore.segment_files(path):
        span = runstore.segment_span(file.name)
        if span is None:  # a segment named otherwise: its rows say
            rows = runstore.read_metrics(path)
            firsts = {}
            for a, s in zip(rows["attempt"].to_pylist(), rows["step"].to_pylist(), strict=True):
                firsts[a] = min(firsts.get(a, s), s)
            break
        firsts[span[0]] = min(firsts.get(span[0], span[1]), span[1])
    out = []
    for key, sc in scores.items():
        task, _, metric = key.rpartition("/")
        later = [first for a, first in firsts.items() if a > sc.attempt]
        out.append(
            {
                "task": task,
                "metric": metric,
                "value": sc.value,
                "stderr": sc.stderr,
                "step": sc.step,
                "attempt": sc.attempt,
                "num_fewshot": sc.num_fewshot,
                "limit": None if sc.limit is None or sc.limit < 0 else sc.limit,
                "tokens": sc.d,
                "branch": "abandoned" if later and sc.step >= min(later) else "surviving",
            }
        )
    return out


def _status_line(manifest: dict[str, Any]) -> str:
    state = runstore.liveness(manifest)
    if state == runstore.CRASHED_MAYBE:
        return (
            f"{state} (the manifest says running, but process {manifest.get('pid')} on "
            f"{manifest.get('host')} is gone: killed without a word; resume it with "
            "yoto train --resume)"
        )
    if state == runstore.STALE:
        age = time.time() - float(manifest.get("updated") or 0)
        return (
            f"{state} (the manifest says running, but it was last updated {age / 60:.1f} min "
            f"ago on {manifest.get('host')}: the process died or hangs)"
        )
    return state


def cmd_runs_show(args: argparse.Namespace) -> int:
    info = show_run(args.run_dir)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    m, s = info["manifest"], info["summary"]
    lines = [
        f"run      {s['id']}" + (f"  ({s['name']})" if s["name"] else ""),
        f"path     {s['path']}",
        *(f"problem  {problem}" for problem in s["problems"]),
        *(_manifest_lines(m) if m is not None else _lost_manifest_lines(s)),
        f"progress step {_fmt_num(s['last_step'], 'd')}, {_fmt_tokens(s['tokens'])} tokens, "
        f"attempt {s['attempt']}, train loss {_fmt_num(s['train_loss'])}",
    ]
    for source, value in sorted(s["val_loss"].items()):
        best = s["best_val_loss"].get(source)
        lines.append(f"val      {source:12s} last {value:.4f}  best {_fmt_num(best)}")
    gaps = info["gaps"]
    lines.append(
        "record   "
        + (f"GAP: {'; '.join(gaps[:5])}{' ...' if len(gaps) > 5 else ''}" if gaps else "no gap")
        + (
            f" (every step from 1 to {s['last_step']} recorded)"
            if not gaps and s["last_step"]
            else ""
        )
    )
    lines.extend(_score_lines(info["evals"]))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s["events"].items())) or "none"
    lines.append(f"events   {counts}")
    if info["chat"]:
        chat = info["chat"]
        lines.append(
            f"chat     {chat['delivered']} delivered ({chat['attempts']} attempts)"
            + (
                f"; {chat['kept']} kept undelivered: yoto alerts resend {s['path']}"
                if chat["kept"]
                else ""
            )
        )
    notable = [e for e in info["events"] if e.get("severity") != "info"][-10:]
    lines.extend(map(_event_line, notable))
    ckpts = info["checkpoints"]
    lines.append(
        "checkpoints "
        + (
            ", ".join(f"step-{c['step']}{'' if c['complete'] else ' (incomplete)'}" for c in ckpts)
            or "none"
        )
    )
    print("\n".join(lines))
    return 0


def _score_lines(scores: list[dict[str, Any]]) -> list[str]:
    """The few-shot section: each task/metric's newest score, where and how it was taken."""
    keys = [f"{r['task']}/{r['metric']}" for r in scores]
    width = max(map(len, keys), default=0)
    lines = []
    for i, (key, r) in enumerate(zip(keys, scores, strict=True)):
        line = f"{'few-shot' if i == 0 else '':8s} {key:{width}s}  {r['value']:.4f}"
        if r["stderr"] is not None:
            line += f" ± {r['stderr']:.4f}"
        line += f"  step {r['step']}, attempt {r['attempt']}"
        if r["num_fewshot"] is not None:
            line += f", {r['num_fewshot']}-shot"
        if r["branch"] == "abandoned":
            line += ", on an abandoned branch (a later attempt re-trained this step)"
        lines.append(line)
    return lines


def _manifest_lines(m: dict[str, Any]) -> list[str]:
    """Status, code and model: what only the manifest knows."""
    duration = (m.get("end") or m.get("updated") or 0) - (m.get("start") or 0)
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v)
    git = m.get("git") or {}
    return [
        f"status   {_status_line(m)}  started {_fmt_time(m.get('start'))}, "
        f"{duration / 60:.1f} min, {m.get('world_size', '?')} rank(s) on {m.get('device', '?')}"
        f" at {m.get('host')}",
        f"code     {versions}"
        + (
            f"; git {git.get('sha', '')[:10]}{' (dirty)' if git.get('dirty') else ''}"
            if git
            else ""
        ),
        f"model    {m.get('parameters', 0):,} parameters "
        f"({m.get('non_embedding_parameters', 0):,} non-embedding)",
    ]


def _event_line(e: dict[str, Any]) -> str:
    return f"  step {e.get('step')!s:>6} [{e.get('severity')}] {e.get('kind')}: {e.get('message')}"


def _lost_manifest_lines(s: dict[str, Any]) -> list[str]:
    return [
        f"status   {s['state']} (no readable manifest: how the run ended, its code and model "
        f"are unknown)  started {_fmt_time(s['start'])} (its earliest event or metric row)"
    ]


def cmd_sample(args: argparse.Namespace) -> int:
    from yoto.trainer.offline import sample

    if args.tokens < 1 or args.temperature <= 0:
        raise ConfigError("--tokens must be >= 1 and --temperature > 0")
    step, text = sample(
        args.run_dir, args.prompt, args.step, args.tokens, args.temperature, args.top_k, args.seed
    )
    print(f"[checkpoint step-{step}]", file=sys.stderr)
    print(args.prompt + text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from yoto.evals.export import export

    done = export(args.run_dir, args.out, args.step, force=args.force)
    print(
        f"{done.out}: checkpoint step-{done.step} of {args.run_dir} as "
        f"{done.target.name} ({done.target.architecture})"
    )
    print(f"  wrote {', '.join(done.files)}")
    print(
        f"  logits agree with yoto's model on random tokens (largest relative difference "
        f"{done.difference:.2g})"
    )
    for note in done.notes:
        print(f"  {note}")
    print(f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(done.out)!r})")
    return 0


def cmd_spectra(args: argparse.Namespace) -> int:
    from yoto.trainer.offline import spectra_for_checkpoint

    rows = spectra_for_checkpoint(args.run_dir, args.step, write=not args.no_write)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "esd"} for r in rows], indent=2))
        return 0
    print(
        f"{'layer':24s} {'alpha':>7s} {'alpha_w':>8s} {'stable_rank':>11s} "
        f"{'log_spec':>9s} {'log_norm':>9s} {'evals':>6s}"
    )
    for r in rows:
        print(
            f"{r['layer']:24s} {r['alpha']:7.3f} {r['alpha_weighted']:8.3f} "
            f"{r['stable_rank']:11.3f} {r['log_spectral_norm']:9.3f} {r['log_norm']:9.3f} "
            f"{int(r['num_evals']):6d}"
        )
    if not args.no_write:
        print(f"written to {Path(args.run_dir) / 'spectra'} (step {args.step})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from yoto.scaling import sweep

    preset = args.preset if (args.preset or args.config) else DEFAULT_PRESET
    plan = sweep.plan(
        args.grid,
        preset=None if args.config else preset,
        file=args.config,
        overrides=args.overrides,
        budget=args.budget,
        tokens=args.tokens,
        tokens_per_param=args.tokens_per_param,
        name=args.name,
    )
    print(sweep.describe(plan), file=sys.stderr)
    if args.dry_run:
        return 0
    if args.metrics_addr is not None:
        for point in plan.points:
            point.cfg.live.metrics_addr = args.metrics_addr
    for point in plan.points[:1]:
        _check_harness(point.cfg)
    label = config_label(args)
    results = sweep.run(
        plan,
        args.run_root,
        progress=args.progress,
        argv=sys.argv[1:],
        live=lambda cfg: live_sinks(cfg, label),
        evaluator=background_evaluator,
    )
    failed = [r for r in results if r["status"] != "finished"]
    print(f"sweep {plan.id}: {len(results) - len(failed)} of {len(results)} runs finished")
    for r in results:
        print(f"  [{r['index']}] {r['status']:8s} {r.get('run_dir') or r.get('error')}")
    done = len(results) - len(failed)
    if not args.no_fit and done >= 2:
        law = "kaplan" if plan.budget == "equal-tokens" else "auto"
        try:
            _scaling_fit([args.run_root], None, plan.id, law, None, 100, 0, True, False)
        except YotoError as exc:
            print(f"no fit: {exc}")
    print(f"fit again: yoto scaling fit {args.run_root} --sweep {plan.id}")
    return 1 if failed else 0


def _scaling_fit(
    runs: list[str],
    table: str | None,
    sweep_id: str | None,
    law: str,
    source: str | None,
    bootstrap: int,
    seed: int,
    skip_missing: bool,
    as_json: bool,
    metric: str | None = None,
    higher_is_better: bool | None = None,
) -> int:
    from yoto.scaling import runs as sr

    if bool(runs) == bool(table):
        raise ConfigError("give run directories (or roots) or --table CSV, not both or neither")
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {bootstrap}")
    score = sr.parse_metric(metric, higher_is_better)
    if score is None and higher_is_better is not None:
        raise ConfigError("--higher-is-better/--lower-is-better go with --metric eval:TASK/METRIC")
    if score is not None:
        if table:
            raise ConfigError(f"--metric {score.label} reads run directories, not --table")
        records = sr.load_runs(runs, sweep_id)
        if source is not None:  # an unknown source is an error, as without --metric
            sr.groups_from_runs([r for r in records if r.val_loss], source)
        result = sr.fit_scores(records, score, law, bootstrap, seed, source or sr.ALL)
        if as_json:
            print(json.dumps([sr.score_report_json(result)], indent=2))
        else:
            print(sr.format_score_report(result))
        return 0
    if table:
        groups, what = sr.groups_from_table(sr.read_table(table), source), "points"
    else:
        records = sr.check_runs(sr.load_runs(runs, sweep_id), skip_missing)
        groups, what = sr.groups_from_runs(records, source), "runs"
    fits = sr.fit_groups(groups, law, bootstrap, seed)
    if as_json:
        print(json.dumps(sr.report_json(fits), indent=2))
    else:
        print(sr.format_report(fits, what))
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    return _scaling_fit(
        args.runs,
        args.table,
        args.sweep,
        args.law,
        args.source,
        args.bootstrap,
        args.seed,
        args.skip_missing,
        args.json,
        args.metric,
        args.higher_is_better,
    )


def cmd_explore(args: argparse.Namespace) -> int:
    """``streamlit run`` the explorer on 127.0.0.1; the runs travel in YOTO_RUNS. The
    process becomes Streamlit (exec), so Ctrl-C and SIGTERM reach the server itself."""

    paths = [Path(p).resolve() for p in args.paths]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise ConfigError(f"no such run directory or root: {', '.join(missing)}")
    from yoto.dashboards import postmortem  # the installed app, wherever it lives

    app = Path(postmortem.__file__).resolve().parent / "app.py"
    env = {**os.environ, "YOTO_RUNS": os.pathsep.join(map(str, paths))}
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "127.0.0.1"]
    cmd += ["--server.port", str(args.port), "--server.headless", "true"]
    cmd += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    print(f"yoto explore: http://127.0.0.1:{args.port}  ({len(paths)} path(s))", file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        return _cmd_data_prepare(args)
    from yoto.trainer.offline import data_batch

    got = data_batch(args.run_dir, args.step, args.attempt, snippet_chars=args.snippet)
    if args.json:
        print(json.dumps(got, indent=2))
        return 0
    print(
        f"step {got['step']} (attempt {got['attempt']}): {got['batch']} sequences of "
        f"{got['seq_len']} tokens from sampler position {got['sampler_position']}"
    )
    print(
        f"{'#':>4s} {'position':>9s} {'rank':>4s} {'source':10s} {'document':36s} "
        f"{'offset':>8s} {'docs':>4s}  text"
    )
    for q in got["sequences"]:
        mark = " [replaced by a fault]" if q["replaced"] else ""
        print(
            f"{q['index']:4d} {q['position']:9d} {q['rank']:4d} {q['source'][:10]:10s} "
            f"{(q['doc_id'] or '?')[-36:]:36s} {q['offset']:8d} {q['documents']:4d}  "
            f"{q['snippet']!r}{mark}"
        )
    print("tokens per source (expected by the mixture):")
    for name, n in got["source_tokens"].items():
        print(f"  {name:12s} {n:8d} ({got['expected_source_tokens'][name]:.0f})")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from yoto.trainer.data.prepare import prepare

    cfg = resolve_config(args)
    got = prepare(
        cfg, args.out, workers=args.workers, force=args.force, progress=not args.no_progress
    )
    sources = got.manifest["sources"]
    if got.up_to_date:
        print(f"{got.out}: already prepared with this config ({len(sources)} sources)")
    else:
        print(
            f"{got.out}: {got.bytes / 1e6:.1f} MB of text in {got.seconds:.1f} s "
            f"({got.mb_per_second:.2f} MB/s with {got.workers or 1} worker(s))"
        )
    for name, rec in sorted(sources.items()):
        print(
            f"  {name:16s} {rec['train_tokens']:>14,d} train tokens ({rec['train_docs']:,} "
            f"documents), {rec['val_tokens']:,} validation tokens ({rec['val_docs']:,})"
        )
    print(f"train on it: --set 'data.paths=[{got.out}]' --set data.tokenizer={cfg.data.tokenizer}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from yoto.evals.evaluate import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    step, rows = evaluate(
        args.run_dir,
        tasks,
        step=args.step,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        include_path=args.include_path,
        device=args.device,
        write=not args.no_write,
    )
    if args.json:
        print(json.dumps({"step": step, "results": rows}, indent=2))
        return 0
    print(f"step {step}: {len(rows)} results" + ("" if args.no_write else " (in evals/)"))
    for r in rows:
        print(
            f"  {r['task']:28s} {r['metric']:12s} {r['value']:.4f} ± {r['stderr']:.4f} "
            f"({r['num_fewshot']}-shot)"
        )
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from yoto.trainer.data import tokenizer as tokenizers
    from yoto.trainer.data.corpus import raw_documents

    cfg = resolve_config(args)
    docs = raw_documents(cfg.data, cfg.data.paths)
    tok = tokenizers.train_bpe(
        tokenizers.texts_of(docs),
        args.vocab,
        args.out,
        show_progress=not args.no_progress,
        min_frequency=args.min_frequency,
    )
    print(
        f"{args.out}: byte-level BPE, {tok.vocab_size:,} tokens, end of document "
        f"{tok.eos_token!r} = {tok.eos_id} ({tok.digest[:19]})"
    )
    print(f"train with it: --set data.tokenizer={args.out}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from yoto.trainer.offline import diagnose_after

    found = diagnose_after(args.run_dir, args.step)
    if args.json:
        print(json.dumps(found.to_data(), indent=2))
        return 0
    print(f"spike from step {found.onset}: {found.cause}")
    print(f"  {found.finding}")
    print(
        f"  replayed {found.replayed_steps} steps from the checkpoint at step "
        f"{found.checkpoint_step} to step {found.end} in {found.seconds:.1f} s "
        f"(tolerance {found.tolerance:g})"
    )
    print(f"  advice: {found.advice}")
    return 0


COMMANDS = {
    "data": cmd_data,
    "diagnose": cmd_diagnose,
    "tokenizer": cmd_tokenizer,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "scaling": cmd_scaling,
    "train": cmd_train,
    "config": cmd_config,
    "presets": cmd_presets,
    "spectra": cmd_spectra,
    "sample": cmd_sample,
    "export": cmd_export,
    "dashboards": cmd_dashboards,
    "explore": cmd_explore,
}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (a test's capture, a redirected stream), not
    the one that was current when the handler was made."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("yoto")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("yoto: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


EXIT_CRASHED = 1  # as an uncaught exception exits
EXIT_BAD_INPUT = 2
EXIT_STOPPED_AT_ONCE = 130  # 128 + SIGINT, as a shell reports it
EXIT_CODES = {"finished": 0, "halted": 3, "interrupted": 75}  # "crashed" raises: exit 1


# How long an OpenMP thread that finished its share spins before it sleeps: libgomp's
# default (300,000 spins) is free on an idle machine and ruinous beside another job; 10,000
# kept the step time alone (x1.03) and made it 2.3x faster beside a second job
# (benchmarks/cpu_sharing.py; OMP_WAIT_POLICY=PASSIVE: 3.2x faster shared, 1.4x slower alone).
CPU_SHARING_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def share_cpus_gracefully(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set yoto's OpenMP wait default unless the user chose a wait policy or spin count.
    Must run before torch is imported (libgomp reads it once, when torch loads it); the
    launchers' rank processes inherit it."""
    if not any(key in environ for key in _WAIT_SETTINGS):
        environ.update(CPU_SHARING_DEFAULTS)


def main(argv: list[str] | None = None) -> int:
    share_cpus_gracefully()  # first: nothing has loaded torch yet
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "alerts":
            commands = {
                "build": cmd_alerts_build,
                "test": cmd_alerts_test,
                "resend": cmd_alerts_resend,
            }
            return commands[args.alerts_command](args)
        if args.command == "runs":
            return (cmd_runs_list if args.runs_command == "list" else cmd_runs_show)(args)
        return COMMANDS[args.command](args)
    except YotoError as exc:
        print(f"yoto: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as exc:  # the run directory says 'crashed' and why
        print(f"yoto: error: {exc}", file=sys.stderr)
        return EXIT_CRASHED
    except KeyboardInterrupt:  # a second Ctrl-C; the run directory says 'interrupted'
        print("yoto: stopped at once (no checkpoint of the last steps)", file=sys.stderr)
        return EXIT_STOPPED_AT_ONCE


if __name__ == "__main__":
    sys.exit(main())
