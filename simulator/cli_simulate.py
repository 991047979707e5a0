"""``fedmq simulate``: the researcher's tool. N agents in one process; every knob a flag."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from broker.launcher import port_in_use
from fedmq.compression import METHODS
from fedmq.config import PrivacyConfig, StalenessConfig, parse_listen
from models.registry import MODEL_NAMES
from models.tasks import TASKS, Task, get_task
from runtime.process import run_until_signalled, setup_logging
from simulator.attacks import ATTACKS
from simulator.harness import SimConfig, Stragglers, run_simulation
from simulator.report import ProgressBar, format_comparison, format_summary, plot_accuracy


def add_run_args(p: argparse.ArgumentParser, *, dashboard_default: str = "") -> None:
    """Flags shared by ``simulate`` and ``demo`` (the demo serves its dashboard by default)."""
    d = SimConfig()
    p.add_argument(
        "--task",
        choices=list(TASKS),
        default=d.task,
        help="the example: digits (default), speech (espeak-ng keywords), hospitals (breast cancer), "
        "hospitals-imaging (synthetic cells); see models/tasks.py",
    )
    p.add_argument("--agents", type=int, default=None, help="devices (default: the task's, 20 for digits)")
    p.add_argument("--duration", type=float, default=d.duration, help="wall-clock seconds (default %(default)s)")
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="the broker the run starts: Mosquitto if installed (auto), or the embedded amqtt",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, model and agents")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of test accuracy against wall-clock time")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        default=dashboard_default,
        help="serve the aggregator's dashboard and /metrics here while it runs ('' for none)",
    )
    p.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity"
    )


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    d = SimConfig()
    a, pr, s = d.aggregator, d.privacy, d.stragglers
    add_run_args(p)
    g = p.add_argument_group("aggregation")
    g.add_argument("--rule", choices=["fedasync", "fedbuff", "fedavg"], default=a.rule, help="aggregation rule")
    g.add_argument(
        "--compare",
        metavar="RULES",
        help="comma-separated rules run one after another on equal terms, "
        "e.g. fedavg,fedasync,fedbuff: one table, one plot",
    )
    g.add_argument("--report-accuracy", type=float, default=0.9, help="accuracy for the time-to-accuracy column")
    g.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecAgg+ cohorts (one per FedBuff buffer): the aggregator learns only sums",
    )
    g.add_argument("--model", default=None, help=f"{', '.join(MODEL_NAMES)} (the CNNs need torch; default: the task's)")
    g.add_argument("--buffer-size", type=int, default=None, help=f"FedBuff K (default: the task's, {a.buffer_size})")
    g.add_argument("--server-lr", type=float, default=a.server_lr, help="server learning rate")
    g.add_argument("--server-momentum", type=float, default=a.server_momentum, help="server momentum")
    g.add_argument("--mix-alpha", type=float, default=a.alpha, help="FedAsync alpha")
    g.add_argument(
        "--staleness",
        choices=["constant", "polynomial", "hinge"],
        default=a.staleness.function,
        help="staleness weight",
    )
    g.add_argument("--staleness-a", type=float, default=a.staleness.a, help="staleness exponent or slope")
    g.add_argument("--staleness-b", type=int, default=a.staleness.b, help="hinge: full weight up to this")
    g.add_argument(
        "--max-staleness",
        type=int,
        default=None,
        help="versions; default 20, or 3 x agents for fedasync (one version per update)",
    )
    g.add_argument("--sync-agents", type=int, default=0, help="fedavg: agents per round (0: all)")
    g.add_argument("--max-versions", type=int, default=0, help="stop after this many versions (0: duration)")
    g.add_argument("--target-accuracy", type=float, default=None, help="stop when reached")
    g.add_argument(
        "--robust",
        choices=["none", "norm_bound", "median", "trimmed_mean", "krum"],
        default=a.robust,
        help="Byzantine-robust buffer aggregation (default none)",
    )
    g.add_argument("--norm-bound", type=float, default=None, help="L2 bound per delta: > 0 fixed, 0 adaptive")
    g.add_argument("--trim-fraction", type=float, default=a.trim_fraction, help="trimmed_mean: cut at each end")
    g.add_argument(
        "--krum-f",
        type=int,
        default=None,
        help="krum: Byzantine deltas per buffer (default (K - 3) // 2, the most Krum allows)",
    )
    g.add_argument("--krum-m", type=int, default=0, help="krum: deltas averaged after selection (0: K - f)")
    g = p.add_argument_group("attack (Byzantine agents)")
    g.add_argument(
        "--attack",
        choices=list(ATTACKS),
        default="none",
        help="what the malicious agents do (simulator/attacks.py)",
    )
    g.add_argument("--malicious-fraction", type=float, default=0.2, help="share of agents that attack (default 0.2)")
    g.add_argument(
        "--attack-conform",
        action="store_true",
        help="with DP: attackers add the agreed noise and keep their signal inside the aggregator's norm check",
    )
    g = p.add_argument_group("agents")
    g.add_argument("--epochs", type=int, default=None, help=f"local epochs (default: the task's, {d.local_epochs})")
    g.add_argument("--lr", type=float, default=None, help=f"local learning rate (default: the task's, {d.lr})")
    g.add_argument("--batch-size", type=int, default=None, help=f"default: the task's, {d.batch_size}")
    g.add_argument("--compression", choices=METHODS, default=d.compression, help="update compression")
    g.add_argument("--topk-fraction", type=float, default=d.topk_fraction, help="topk: share of entries sent")
    g.add_argument("--dirichlet-alpha", type=float, default=d.alpha, help="non-IID skew (smaller: more skewed)")
    g = p.add_argument_group("privacy")
    g.add_argument("--no-dp", action="store_true", help="no local DP on the agents")
    g.add_argument("--clip-norm", type=float, default=pr.clip_norm, help="L2 clip of each update")
    g.add_argument("--noise-multiplier", type=float, default=pr.noise_multiplier, help="local DP noise z")
    g.add_argument("--delta", type=float, default=pr.delta, help="delta of the reported epsilon")
    g.add_argument("--epsilon-budget", type=float, default=None, help="each agent stops before passing it")
    g.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="distributed DP (with --secure-aggregation): devices noise before masking, calibrated so that "
        "--max-participation sums cost each device this epsilon",
    )
    g.add_argument(
        "--central-dp",
        type=float,
        default=None,
        metavar="Z",
        help="central DP, trusting the aggregator: it clips each delta to --clip-norm and noises each sum",
    )
    g.add_argument("--max-participation", type=int, default=0, help="the most released sums per device (0: no cap)")
    g.add_argument(
        "--no-verify-dp",
        action="store_true",
        help="do not reject updates whose norm does not fit the agreed noise (not_private)",
    )
    g = p.add_argument_group("stragglers (simulated compute time per local round)")
    g.add_argument("--straggler-median", type=float, default=s.median, help="seconds; 0 disables")
    g.add_argument("--straggler-sigma", type=float, default=s.sigma, help="log-normal sigma")
    g.add_argument("--slow-fraction", type=float, default=s.slow_fraction, help="share of much slower devices")
    g.add_argument("--slow-factor", type=float, default=s.slow_factor, help="how much slower they are")


def task_defaults(args: argparse.Namespace) -> tuple[Task, dict[str, Any]]:
    """The task, and the settings a flag left unset takes from the task's recipe (else SimConfig's)."""
    task = get_task(args.task)
    d = SimConfig()
    recipe = task.recipe
    given = {"agents": args.agents, "local_epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    out = {k: v if v is not None else recipe.get(k, getattr(d, k)) for k, v in given.items()}
    if args.agents is None:
        out["agents"] = task.default_devices
    k = args.buffer_size
    settings = task.aggregator_settings(args.model or task.model)
    out["buffer_size"] = k if k is not None else settings.get("buffer_size", d.aggregator.buffer_size)
    return task, out


def sim_config(args: argparse.Namespace) -> SimConfig:
    """Build the run's configuration from the flags."""
    d = SimConfig()
    task, t = task_defaults(args)
    args.agents = t["agents"]
    return SimConfig(
        agents=t["agents"],
        task=task.name,
        alpha=args.dirichlet_alpha,
        duration=args.duration,
        broker=args.broker,
        seed=args.seed,
        local_epochs=t["local_epochs"],
        batch_size=t["batch_size"],
        lr=t["lr"],
        stragglers=Stragglers(args.straggler_median, args.straggler_sigma, args.slow_fraction, args.slow_factor),
        aggregator=replace(
            d.aggregator,
            rule=args.rule,
            model=args.model or task.model,
            hidden=task.hidden,
            labels=",".join(task.labels),
            buffer_size=t["buffer_size"],
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            alpha=args.mix_alpha,
            staleness=StalenessConfig(args.staleness, args.staleness_a, args.staleness_b),
            max_staleness=_max_staleness(args, args.rule),
            sync_agents=args.sync_agents,
            max_versions=args.max_versions,
            target_accuracy=args.target_accuracy,
            seed=args.seed,
            robust=args.robust,
            norm_bound=args.norm_bound,
            trim_fraction=args.trim_fraction,
            krum_f=args.krum_f if args.krum_f is not None else max(0, (t["buffer_size"] - 3) // 2),
            krum_m=args.krum_m,
            secure_aggregation=args.secure_aggregation,
            secagg=replace(d.aggregator.secagg, dp_epsilon=args.dp_epsilon, clip_norm=args.clip_norm)
            if args.dp_epsilon is not None
            else d.aggregator.secagg,
            central_dp_noise_multiplier=args.central_dp,
            dp_clip_norm=args.clip_norm,
            max_participation=args.max_participation,
        ),
        attack=args.attack,
        verify_dp=not args.no_verify_dp,
        conforming_attack=args.attack_conform,
        compression=args.compression,
        topk_fraction=args.topk_fraction,
        malicious_fraction=args.malicious_fraction if args.attack != "none" else 0.0,
        privacy=PrivacyConfig(
            enabled=not args.no_dp,
            clip_norm=args.clip_norm,
            noise_multiplier=args.noise_multiplier,
            delta=args.delta,
            epsilon_budget=args.epsilon_budget,
        ),
    )


def _max_staleness(args: argparse.Namespace, rule: str) -> int:
    if args.max_staleness is not None:
        return int(args.max_staleness)
    if rule == "fedasync":
        return 3 * int(args.agents)
    task = get_task(args.task)
    over = task.aggregator_settings(args.model or task.model)
    return int(over.get("max_staleness", SimConfig().aggregator.max_staleness))


def execute(cfg: SimConfig, args: argparse.Namespace, title: str) -> dict[str, Any]:
    """Run with a progress bar, print the summary, write JSON and plot if asked."""
    setup_logging(args.log_level)
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"fedmq: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    bar = None if args.quiet else ProgressBar(cfg.duration, cfg.aggregator.target_accuracy)
    # SIGTERM / Ctrl-C end the run early but gracefully: summary printed, broker stopped.
    if getattr(args, "dashboard", ""):
        host, port = parse_listen(args.dashboard, "--dashboard")
        if port and port_in_use(host, port):  # a demo should run anyway: any free port will do
            port = 0
        cfg = replace(cfg, aggregator=replace(cfg.aggregator, http=f"{host}:{port}"))

    def show(url: str) -> None:
        line = f"  dashboard: {url}  (Prometheus: {url}metrics)"
        if bar is not None:  # on its own line, above the progress bar's
            sys.stderr.write("\r\x1b[K" + line + "\n")
            sys.stderr.flush()
        else:
            print(line, flush=True)

    summary = run_until_signalled(lambda stop: run_simulation(cfg, on_progress=bar, stop=stop, on_dashboard=show))
    if bar is not None:
        bar.close()
    print(f"\n{title}\n{format_summary(summary)}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"  summary written to {args.json}")
    if args.plot:
        plot_accuracy({summary["rule"]: summary}, args.plot, title=title)
        print(f"  plot written to {args.plot}")
    logging.shutdown()
    return summary


def run(args: argparse.Namespace) -> int:
    """Entry point: one run, or several rules compared on the same split, stragglers and seed."""
    if not args.compare:
        cfg = sim_config(args)
        execute(cfg, args, f"fedmq simulate: {args.rule}, {cfg.agents} agents, task {cfg.task}")
        return 0
    rules = [r.strip() for r in args.compare.split(",") if r.strip()]
    bad = [r for r in rules if r not in ("fedasync", "fedbuff", "fedavg")]
    if bad:
        print(f"fedmq simulate: error: --compare: unknown rules {bad}", file=sys.stderr)
        return 2
    json_path, plot_path = args.json, args.plot
    args.json = args.plot = None
    results: dict[str, dict[str, Any]] = {}
    for rule in rules:
        cfg = sim_config(args)
        cfg = replace(cfg, aggregator=replace(cfg.aggregator, rule=rule, max_staleness=_max_staleness(args, rule)))
        results[rule] = execute(cfg, args, f"fedmq simulate: {rule}, {args.agents} agents")
    print(f"\ncomparison ({args.agents} agents, {args.duration:.0f} s each, seed {args.seed}):")
    print(format_comparison(results, args.report_accuracy))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    if plot_path:
        plot_accuracy(results, plot_path, title=f"fedmq: {', '.join(rules)} ({args.agents} agents)")
    return 0
