"""``fedmq aggregator``: run the aggregator service until SIGTERM (then checkpoint and exit)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

from aggregator.service import AggregatorService
from fedmq.config import DEFAULT_HTTP, Config
from runtime.args import add_common, flag, load_from_args
from runtime.extras import require, require_for_data
from runtime.process import run_until_signalled, setup_logging


def add_robust_flags(p: argparse.ArgumentParser) -> None:
    """Byzantine-robust aggregation flags (also used by ``fedmq simulate``)."""
    flag(
        p,
        "--robust",
        "aggregator.robust",
        choices=["none", "norm_bound", "median", "trimmed_mean", "krum"],
        help="robust buffer aggregation (default none)",
    )
    flag(p, "--norm-bound", "aggregator.norm_bound", type=float, help="L2 bound per delta: > 0 fixed, 0 adaptive")
    flag(p, "--trim-fraction", "aggregator.trim_fraction", type=float, help="trimmed_mean: fraction cut at each end")
    flag(p, "--krum-f", "aggregator.krum_f", type=int, help="krum: Byzantine deltas tolerated per buffer")
    flag(p, "--krum-m", "aggregator.krum_m", type=int, help="krum: deltas averaged after selection (0: K - f)")
    flag(
        p,
        "--dp-noise-multiplier",
        "aggregator.dp_noise_multiplier",
        type=float,
        help="reject updates whose norm does not fit this local DP noise (not_private)",
    )
    flag(p, "--dp-clip-norm", "aggregator.dp_clip_norm", type=float, help="the agents' clip norm for that check")


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    add_common(p)
    add_fresh_flag(p)
    flag(p, "--rule", "aggregator.rule", choices=["fedasync", "fedbuff", "fedavg"])
    flag(p, "--model", "aggregator.model", help="softmax, mlp, digits-cnn, med-cnn, speech-cnn (docs/protocol.md)")
    flag(p, "--num-features", "aggregator.num_features", type=int)
    flag(p, "--num-classes", "aggregator.num_classes", type=int)
    flag(p, "--hidden", "aggregator.hidden", type=int, help="mlp: hidden units (64)")
    flag(p, "--labels", "aggregator.labels", help="class names, comma-separated: announced, kept in ONNX exports")
    flag(
        p,
        "--input-min",
        "aggregator.input_min",
        type=float,
        help="inputs are scaled to [min, max] (default: eval data)",
    )
    flag(p, "--input-max", "aggregator.input_max", type=float)
    flag(p, "--buffer-size", "aggregator.buffer_size", type=int, help="FedBuff K")
    flag(
        p,
        "--nats",
        "aggregator.shard.nats",
        help="run as one shard of a sharded aggregator on this NATS cluster (URLs, comma-separated; "
        "--broker: a node's MQTT listener, for the model; docs/scale-out.md)",
    )
    flag(p, "--partial-size", "aggregator.shard.partial_size", type=int, help="updates per shard partial")
    flag(p, "--shard-replicas", "aggregator.shard.replicas", type=int, help="copies of the stream and state")
    flag(
        p,
        "--site",
        "aggregator.shard.site",
        action="store_true",
        help="a site aggregator: devices on --broker (the site's own), partial sums to the root at --nats",
    )
    flag(
        p,
        "--sites",
        "aggregator.sites",
        metavar="IDS",
        help="site aggregators whose sums this aggregator takes (ids, comma-separated; ID:N says the site has N"
        " devices: a sum of more is refused; docs/scale-out.md)",
    )
    flag(
        p,
        "--root",
        "aggregator.uplink.root",
        metavar="URL",
        help="run as a site of the aggregator behind this broker (mqtt[s]://...): devices on --broker, "
        "only sums go to the root (needs --site-id and --uplink-dir)",
    )
    flag(p, "--site-id", "aggregator.uplink.site_id", help="this site's id (its MQTT user) at the root")
    flag(p, "--uplink-dir", "aggregator.uplink.state_dir", help="where a site keeps its sums until the root's receipt")
    flag(p, "--server-lr", "aggregator.server_lr", type=float)
    flag(p, "--server-momentum", "aggregator.server_momentum", type=float)
    flag(p, "--alpha", "aggregator.alpha", type=float, help="FedAsync mixing weight")
    flag(p, "--staleness", "aggregator.staleness.function", choices=["constant", "polynomial", "hinge"])
    flag(p, "--staleness-a", "aggregator.staleness.a", type=float)
    flag(p, "--staleness-b", "aggregator.staleness.b", type=int)
    flag(p, "--max-staleness", "aggregator.max_staleness", type=int)
    flag(p, "--sync-agents", "aggregator.sync_agents", type=int, help="fedavg: agents per round (0: all online)")
    flag(p, "--eval-data", "aggregator.eval_data", help="held-out data: .npz, folder, builtin:digits-test")
    flag(p, "--checkpoint-dir", "aggregator.checkpoint_dir")
    flag(p, "--checkpoint-every", "aggregator.checkpoint_every", type=int)
    flag(p, "--max-versions", "aggregator.max_versions", type=int)
    flag(p, "--target-accuracy", "aggregator.target_accuracy", type=float)
    flag(p, "--seed", "aggregator.seed", type=int)
    flag(p, "--metrics-interval", "aggregator.metrics_interval", type=float, help="seconds between metrics (1)")
    flag(p, "--model-interval", "aggregator.model_interval", type=float, help="min seconds between model publishes")
    flag(p, "--agent-timeout", "aggregator.agent_timeout", type=float, help="silent agents count offline after (60 s)")
    flag(p, "--round-timeout", "aggregator.round_timeout", type=float, help="fedavg: a round closes after (300 s)")
    flag(p, "--rate-limit", "aggregator.rate_limit", type=float, help="updates/s one agent may send, sustained (1)")
    flag(p, "--rate-burst", "aggregator.rate_burst", type=float, help="updates an agent may send at once (20)")
    flag(p, "--max-num-examples", "aggregator.max_num_examples", type=int, help="cap on a claimed count (10000)")
    flag(p, "--max-update-norm", "aggregator.max_update_norm", type=float, help="larger L2 norms are refused (1e9)")
    flag(p, "--max-agents", "aggregator.max_agents", type=int, help="agents whose state is kept (100000)")
    flag(p, "--shutdown-grace", "aggregator.shutdown_grace", type=float, help="seconds for the goodbye at SIGTERM (5)")
    flag(
        p,
        "--http",
        "aggregator.http",
        metavar="HOST:PORT",
        help=f"serve the dashboard, /metrics (Prometheus) and /healthz here (default {DEFAULT_HTTP}; '' for none)",
    )
    flag(p, "--plan-epochs", "aggregator.plan.local_epochs", type=int)
    flag(p, "--plan-lr", "aggregator.plan.lr", type=float)
    flag(p, "--plan-batch-size", "aggregator.plan.batch_size", type=int)
    flag(p, "--plan-compression", "aggregator.plan.compression", choices=["none", "fp16", "int8", "topk"])
    add_robust_flags(p)
    flag(
        p,
        "--secure-aggregation",
        "aggregator.secure_aggregation",
        action="store_const",
        const=True,
        help="take only masked updates, in cohorts (SecAgg+): the aggregator learns only sums; agents follow",
    )
    flag(p, "--cohort-size", "aggregator.secagg.cohort_size", type=int, help="secure aggregation: K per cohort")
    flag(p, "--overselect", "aggregator.secagg.overselect", type=float, help="rho: K (1 + rho) devices per cohort")
    flag(p, "--threshold", "aggregator.secagg.threshold", type=float, help="t as a fraction of the holders (0.6)")
    flag(p, "--secagg-timeout", "aggregator.secagg.timeout", type=float, help="seconds each round waits (10)")
    add_dp_flags(p)


def add_dp_flags(p: argparse.ArgumentParser) -> None:
    """Central and distributed DP at the aggregator, and the participation cap (docs/privacy.md)."""
    flag(
        p,
        "--dp-epsilon",
        "aggregator.secagg.dp_epsilon",
        type=float,
        help="distributed DP under secure aggregation: devices noise before masking, calibrated so that "
        "--max-participation sums cost each device this epsilon",
    )
    flag(p, "--dp-survivors", "aggregator.secagg.dp_survivors", type=int, help="fewest uploads a noised sum holds")
    flag(
        p,
        "--central-dp",
        "aggregator.central_dp_noise_multiplier",
        type=float,
        metavar="Z",
        help="central DP, trusting the server: clip each delta to --dp-clip-norm, add N(0, (Z C)^2) to each sum",
    )
    flag(
        p,
        "--max-participation",
        "aggregator.max_participation",
        type=int,
        help="the most released sums one device may be in (bounds the federation's epsilon)",
    )
    flag(
        p,
        "--min-separation",
        "aggregator.min_separation",
        type=int,
        help="model versions between two released sums with one device in them (0: any)",
    )
    flag(p, "--dp-delta", "aggregator.dp_delta", type=float, help="delta of the reported epsilon (1e-5)")


def add_fresh_flag(p: argparse.ArgumentParser) -> None:
    """``--fresh``: begin a new run, moving an existing state aside."""
    p.add_argument(
        "--fresh",
        action="store_true",
        help="begin a new federation run: an existing state in --checkpoint-dir is moved aside (not deleted) "
        "and agents follow the new run; without it, missing or damaged state refuses to start",
    )


def run(args: argparse.Namespace) -> int:
    """Validate config, start up (fail fast), serve until signalled."""
    setup_logging(args.log_level)
    config = load_from_args(args, "aggregator")
    if config.aggregator.http is None:  # the command serves its dashboard unless told otherwise
        config = replace(config, aggregator=replace(config.aggregator, http=DEFAULT_HTTP))
    require_for_data(config.aggregator.eval_data, "aggregator.eval_data")
    if config.aggregator.shard.nats:
        return run_shard(config)
    if config.aggregator.uplink.root:
        return run_site(config)
    service = AggregatorService(config, fresh=args.fresh)
    core = service.startup()
    logging.getLogger("fedmq.aggregator").info(
        "aggregator: rule %s, model %s, version %d, broker %s:%d, prefix %s",
        config.aggregator.rule,
        config.aggregator.model,
        core.version,
        config.broker.host,
        config.broker.port,
        config.prefix,
    )
    summary = run_until_signalled(service.run)
    print(json.dumps({k: v for k, v in summary.items() if k != "accuracy_history"}))
    return 0


def run_site(config: Config) -> int:
    """A site whose root is an aggregator over MQTT (aggregator.uplink.root): serve until signalled."""
    from aggregator.site_mqtt import MqttSite

    site = MqttSite(config)
    site.startup()
    logging.getLogger("fedmq.aggregator").info(
        "site aggregator %s: devices on %s:%d, root at %s, sums of >= %d devices, prefix %s",
        site.site_id,
        config.broker.host,
        config.broker.port,
        config.aggregator.uplink.root.split("@")[-1],
        config.aggregator.shard.site_min_devices,
        config.prefix,
    )
    print(json.dumps(run_until_signalled(site.run)))
    return 0


def run_shard(config: Config) -> int:
    """One shard of a sharded aggregator (aggregator.shard.nats): serve until signalled."""
    require("cluster", key="aggregator.shard.nats", why="sharded aggregation")
    if config.aggregator.shard.site:
        from aggregator.site import LedgerConflict, SiteAggregator

        site = SiteAggregator(config)
        logging.getLogger("fedmq.aggregator").info(
            "site aggregator %s: devices on %s:%d, root %s, prefix %s",
            site.site_id,
            config.broker.host,
            config.broker.port,
            config.aggregator.shard.nats,
            config.prefix,
        )
        try:
            print(json.dumps(run_until_signalled(site.run)))
        except* LedgerConflict as group:  # the deployment's fault, said plainly (no sum left uncharged)
            logging.getLogger("fedmq.aggregator").error("site %s stopped: %s", site.site_id, group.exceptions[0])
            conflict = True
        else:
            conflict = False
        return 1 if conflict else 0
    from aggregator.cluster import ClusterAggregator

    shard = ClusterAggregator(config)
    logging.getLogger("fedmq.aggregator").info(
        "aggregator shard %s: FedBuff K=%d, model %s, NATS %s, prefix %s",
        shard.shard_id,
        config.aggregator.buffer_size,
        config.aggregator.model,
        config.aggregator.shard.nats,
        config.prefix,
    )
    summary = run_until_signalled(shard.run)
    print(json.dumps(summary))
    return 0
