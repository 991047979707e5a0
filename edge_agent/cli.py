"""``fedmq agent``: run one edge agent against a broker and a local data source."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

import numpy as np

from edge_agent.service import AgentService
from edge_agent.serving import OnnxExporter
from edge_agent.trainer import LocalTrainer
from fedmq.errors import ConfigError
from models.datasets import load_source
from runtime.args import add_common, flag, load_from_args
from runtime.extras import require, require_for_data
from runtime.process import run_until_signalled, setup_logging


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    add_common(p)
    flag(p, "--id", "agent.agent_id", help="agent id: 1-64 of [A-Za-z0-9_.-]")
    flag(p, "--data", "agent.data", help=".npz with x and y, a folder with x.npy/y.npy, or module:function")
    flag(p, "--epochs", "agent.local_epochs", type=int)
    flag(p, "--batch-size", "agent.batch_size", type=int)
    flag(p, "--lr", "agent.lr", type=float)
    flag(p, "--round-interval", "agent.round_interval", type=float, help="seconds between local rounds")
    flag(p, "--state-dir", "agent.state_dir", help="where sequence number and privacy accountant persist")
    flag(p, "--max-updates", "agent.max_updates", type=int)
    flag(p, "--outbox-max", "agent.outbox_max", type=int, help="updates kept until their receipt (default 16)")
    flag(p, "--receipt-timeout", "agent.receipt_timeout", type=float, help="seconds before re-sending (default 30)")
    flag(p, "--heartbeat-interval", "agent.heartbeat_interval", type=float, help="status heartbeat (default 15 s)")
    flag(p, "--seed", "agent.seed", type=int)
    flag(p, "--compression", "agent.compression", help="none, fp16, int8 or topk (update compression on the wire)")
    flag(p, "--topk-fraction", "agent.topk_fraction", type=float, help="topk: share of entries sent (default 0.01)")
    flag(p, "--shutdown-grace", "agent.shutdown_grace", type=float, help="seconds to abandon a round at SIGTERM (5)")
    p.add_argument(
        "--send-train-loss",
        dest="cfg:agent.send_train_loss",
        action="store_const",
        const=True,
        default=None,
        help="send the local training loss with each update (outside the DP guarantee; off by default)",
    )
    p.add_argument(
        "--exact-num-examples",
        dest="cfg:agent.exact_num_examples",
        action="store_const",
        const=True,
        default=None,
        help="send the exact example count, not the power of two below it (outside the DP guarantee)",
    )
    p.add_argument(
        "--require-secure-aggregation",
        dest="cfg:agent.require_secure_aggregation",
        action="store_const",
        const=True,
        default=None,
        help="send nothing unless the aggregator announces secure aggregation (it then sees only sums)",
    )
    flag(p, "--checkin-interval", "agent.checkin_interval", type=float, help="secure aggregation: check-in every (2 s)")
    p.add_argument(
        "--no-follow-plan",
        dest="cfg:agent.follow_plan",
        action="store_const",
        const=False,
        default=None,
        help="use this device's own settings, not the aggregator's federation plan [config agent.follow_plan]",
    )
    flag(p, "--keep-local", "agent.keep_local", help="plan keys this device keeps its own value for: "
         "local_epochs,batch_size")  # fmt: skip
    p.add_argument("--onnx-out", metavar="PATH", help="keep the newest global model here as ONNX, for `fedmq predict`")
    flag(p, "--clip-norm", "privacy.clip_norm", type=float)
    flag(p, "--noise-multiplier", "privacy.noise_multiplier", type=float)
    flag(p, "--delta", "privacy.delta", type=float)
    flag(p, "--epsilon-budget", "privacy.epsilon_budget", type=float, help="stop before a release past it")
    flag(
        p,
        "--require-distributed-dp",
        "privacy.require_distributed",
        action="store_const",
        const=True,
        help="send nothing unless the aggregator announces distributed DP under secure aggregation",
    )
    p.add_argument(
        "--no-dp",
        dest="cfg:privacy.enabled",
        action="store_const",
        const=False,
        default=None,
        help="switch differential privacy off (updates then leak more about local data)",
    )


def run(args: argparse.Namespace) -> int:
    """Load data, build the trainer, serve until signalled."""
    setup_logging(args.log_level)
    config = load_from_args(args, "agent")
    if not config.agent.data:
        raise ConfigError("agent.data", "no data source given (--data PATH)")
    require_for_data(config.agent.data, "agent.data")
    if args.onnx_out:  # checked now, not at the first model version
        require("onnx", key="--onnx-out", why="keeping the model as ONNX", modules=("onnx",))
    try:
        data = load_source(config.agent.data)
    except (ValueError, OSError, ImportError, AttributeError) as exc:
        raise ConfigError("agent.data", str(exc)) from None
    state_path = Path(config.agent.state_dir) / f"{config.agent.agent_id}.state" if config.agent.state_dir else None
    try:
        trainer = LocalTrainer(
            config.agent, config.privacy, data, rng=np.random.default_rng(config.agent.seed), state_path=state_path
        )
    except ValueError as exc:
        raise ConfigError("agent.state_dir", str(exc)) from None
    logging.getLogger("fedmq.agent").info(
        "agent %s: %d examples, broker %s:%d, DP: %s",
        config.agent.agent_id,
        len(data),
        config.broker.host,
        config.broker.port,
        "local" if config.privacy.enabled else "distributed only" if config.privacy.require_distributed else "OFF",
    )

    async def main(stop: asyncio.Event) -> dict[str, object]:
        hook = OnnxExporter(args.onnx_out) if args.onnx_out else None
        stats = await AgentService(config, trainer, on_model=hook).run(stop)
        return stats.to_dict()

    print(json.dumps(run_until_signalled(main)))
    return 0
