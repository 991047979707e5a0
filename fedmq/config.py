"""Configuration: frozen dataclasses, loaded once from file + environment + flags, validated.

Precedence, lowest first: defaults, a TOML file, ``FEDMQ_<SECTION>__<KEY>`` environment
variables (e.g. ``FEDMQ_BROKER__PORT=8883``), then command-line flags. Every problem
raises :class:`~fedmq.errors.ConfigError` naming the dotted key, before anything connects.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fedmq.compression import METHODS
from fedmq.errors import ConfigError
from fedmq.messages import PLAN_FIELDS, plan_problem
from fedmq.topics import Topics, is_agent_id, validate_agent_id

ENV_PREFIX = "FEDMQ_"


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    """The broker's host name or address."""
    port: int = 1883
    """The broker's port (1883 plain, 8883 TLS)."""
    username: str | None = None
    """MQTT user name (password deployments)."""
    password: str | None = None
    """MQTT password (prefer the FEDMQ_BROKER__PASSWORD environment variable to a file)."""
    keepalive: int = 30
    """Seconds between MQTT pings; the broker publishes the Will after 1.5 times this without one."""
    tls: bool = False
    """Connect with TLS (mqtts://)."""
    ca_file: str | None = None
    """CA certificate that signed the broker's certificate."""
    cert_file: str | None = None
    """This client's certificate (its common name is its identity in the ACL)."""
    key_file: str | None = None
    """This client's private key."""
    max_payload_bytes: int = 64 * 1024 * 1024
    """Largest message accepted from the broker, before decoding."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid field."""
        _check(0 < self.port < 65536, "broker.port", f"must be 1-65535, got {self.port}")
        _check(self.keepalive >= 5, "broker.keepalive", "must be >= 5 seconds")
        _check(self.max_payload_bytes >= 1024, "broker.max_payload_bytes", "must be >= 1024")
        _check(
            (self.cert_file is None) == (self.key_file is None),
            "broker.cert_file",
            "cert_file and key_file go together",
        )
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            _check(path is None or Path(path).is_file(), f"broker.{key}", f"no such file: {path}")


@dataclass(frozen=True)
class StalenessConfig:
    """Staleness weighting ``s(t - tau)``; see :mod:`aggregator.staleness`."""

    function: str = "polynomial"
    """Staleness weight s(t - tau): constant, polynomial (1 + t - tau)^-a or hinge."""
    a: float = 0.5
    """The weight's exponent (polynomial) or slope (hinge)."""
    b: int = 4
    """hinge: staleness up to which updates keep full weight."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid field."""
        _check(
            self.function in ("constant", "polynomial", "hinge"),
            "aggregator.staleness.function",
            f"must be constant, polynomial or hinge, got {self.function!r}",
        )
        _check(self.a >= 0 and math.isfinite(self.a), "aggregator.staleness.a", "must be a finite number >= 0")
        _check(self.b >= 0, "aggregator.staleness.b", "must be >= 0")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (``aggregator.secure_aggregation``): cohorts, threshold, quantization."""

    cohort_size: int = 0
    """K: masked uploads that close a cohort (one FedBuff step). 0: ``aggregator.buffer_size``."""
    overselect: float = 0.2
    """rho: a cohort has ``ceil(K (1 + rho))`` devices, so that it completes despite dropouts."""
    threshold: float = 0.6
    """t as a fraction of a device's holders (its neighbours and itself); must be more than 0.5."""
    degree: int = 0
    """Neighbours per device (0: everyone up to 32 devices, else about 3 log2 n, as in SecAgg+)."""
    min_cohort: int = 3
    """Fewest devices that form a cohort once the first has waited ``form_wait`` seconds."""
    form_wait: float = 2.0
    """Seconds a device waits in the pool for a full cohort before a smaller one forms."""
    timeout: float = 10.0
    """Seconds each protocol round waits at most for slow or vanished devices."""
    max_cohorts: int = 4
    """Cohorts in flight at once; a device is in at most one."""
    bits: int = 32
    """Integers mod 2^bits on the wire (4 bytes per value up to 32 bits, else 8)."""
    clip_norm: float = 4.0
    """Each device clips its update to this L2 norm before weighting and quantizing: what bounds a
    device's influence when nobody sees its update. Set it near the norm of honest updates (a
    tighter bound slows learning: on digits, 1.0 took 2.5x plain FedBuff's time to 0.90, 4.0 1.5x)."""
    clip_range: float = 8.0
    """Each value is clamped to [-clip_range, clip_range] before quantizing (the modular range)."""
    dp_epsilon: float | None = None
    """Distributed DP: devices add discrete Gaussian noise before masking, calibrated at startup so
    that ``aggregator.max_participation`` sums cost each device this epsilon at
    ``aggregator.dp_delta`` (docs/privacy.md). Unset: no distributed noise."""
    dp_survivors: int = 0
    """The fewest uploads a noised sum may hold (t): any t shares carry the whole noise, and devices
    refuse to unmask a smaller sum. 0: ``ceil(0.8 K)``."""

    def survivors_for(self, k: int) -> int:
        """The survivor floor for cohorts of ``k`` uploads."""
        return self.dp_survivors or max(2, math.ceil(0.8 * k))

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid field."""
        k = "aggregator.secagg."
        _check(self.cohort_size == 0 or self.cohort_size >= 2, k + "cohort_size", "must be >= 2 (0: buffer_size)")
        _check(_finite(self.overselect) and 0 <= self.overselect <= 4, k + "overselect", "must be in [0, 4]")
        _check(0.5 < self.threshold <= 1, k + "threshold", "must be in (0.5, 1]: a strict majority of the holders")
        _check(self.degree == 0 or (self.degree >= 2 and self.degree % 2 == 0), k + "degree", "must be 0 or even >= 2")
        _check(self.min_cohort >= 3, k + "min_cohort", "must be >= 3")
        _check(_finite(self.form_wait) and self.form_wait >= 0, k + "form_wait", "must be >= 0 seconds")
        _check(_finite(self.timeout) and 0 < self.timeout <= 3600, k + "timeout", "must be in (0, 3600] seconds")
        _check(self.max_cohorts >= 1, k + "max_cohorts", "must be >= 1")
        _check(16 <= self.bits <= 62, k + "bits", "must be in [16, 62]")
        _check(_finite(self.clip_norm) and self.clip_norm > 0, k + "clip_norm", "must be > 0")
        _check(_finite(self.clip_range) and self.clip_range > 0, k + "clip_range", "must be > 0")
        _check(
            self.dp_epsilon is None or (_finite(self.dp_epsilon) and self.dp_epsilon > 0),
            k + "dp_epsilon",
            "must be > 0 or unset",
        )
        _check(self.dp_survivors == 0 or self.dp_survivors >= 2, k + "dp_survivors", "must be >= 2 (0: 0.8 K)")


@dataclass(frozen=True)
class ShardConfig:
    """Sharded aggregation on a NATS cluster (``fedmq aggregator --nats``; docs/scale-out.md)."""

    nats: str = ""
    """NATS URLs of the cluster's nodes, comma-separated (``nats://h1:4222,nats://h2:4222``).
    Set, the aggregator runs as one of N shards that share the update stream; one of them leads."""
    partial_size: int = 0
    """Updates a shard sums before it offers the partial to the leader. 0: half of ``buffer_size``."""
    partial_wait: float = 1.0
    """Seconds a shard holds an unfinished partial before it offers it as it is."""
    lease: float = 5.0
    """Seconds the leader's lease lasts without renewal: how long a dead leader stalls the steps."""
    ack_wait: float = 30.0
    """Seconds before a message a dead shard held goes to another shard (held ones are kept alive)."""
    replicas: int = 3
    """Copies of the update stream and the cluster's state (1 for a one-node cluster)."""
    site: bool = False
    """This process is a site aggregator: its devices are on ``broker`` (the site's own broker) and
    it forwards only partial sums to the root cluster at ``nats`` (docs/scale-out.md)."""
    site_min_devices: int = 2
    """A site forwards a sum only once it holds updates of at least this many devices."""

    def partial_for(self, buffer_size: int) -> int:
        """The partial size for FedBuff's ``buffer_size``."""
        return self.partial_size or max(1, buffer_size // 2)

    def validate(self, agg: AggregatorConfig) -> None:
        """Raise :class:`ConfigError` on the first invalid field, or a feature sharding does not do."""
        k = "aggregator.shard."
        if not self.nats:
            return
        urls = [u.strip() for u in self.nats.split(",")]
        _check(all(u.startswith(("nats://", "tls://")) for u in urls), k + "nats", "must be nats:// or tls:// URLs")
        _check(self.partial_size >= 0, k + "partial_size", "must be >= 0 (0: half of buffer_size)")
        _check(_finite(self.partial_wait) and self.partial_wait > 0, k + "partial_wait", "must be > 0 seconds")
        _check(_finite(self.lease) and 1 <= self.lease <= 600, k + "lease", "must be in [1, 600] seconds")
        _check(_finite(self.ack_wait) and self.ack_wait >= 2, k + "ack_wait", "must be >= 2 seconds")
        _check(self.replicas in (1, 3, 5), k + "replicas", "must be 1, 3 or 5")
        _check(self.site_min_devices >= 1, k + "site_min_devices", "must be >= 1")
        unsupported = [
            ("aggregator.rule", agg.rule != "fedbuff", "must be fedbuff"),
            (
                "aggregator.secure_aggregation",
                agg.secure_aggregation and not self.site,
                "is not sharded yet (a site serves cohorts)",
            ),
            (
                "aggregator.secagg.dp_epsilon",
                agg.secagg.dp_epsilon is not None and not self.site,
                "needs secure aggregation, which only a site serves (aggregator.shard.site)",
            ),
            (
                "aggregator.uplink.site_id",
                agg.secagg.dp_epsilon is not None and self.site and not is_agent_id(agg.uplink.site_id),
                "is required for distributed DP at a site (1-64 characters of [A-Za-z0-9_.-]): it names the "
                "site's privacy ledger in the cluster, which a restarted site must find again",
            ),
            ("aggregator.robust", agg.robust != "none", "is not sharded yet (a robust rule needs every update)"),
            ("aggregator.central_dp_noise_multiplier", agg.central_dp_noise_multiplier is not None, "is not sharded"),
            ("aggregator.dp_noise_multiplier", agg.dp_noise_multiplier is not None, "is not sharded yet"),
            ("aggregator.server_momentum", agg.server_momentum != 0, "is not sharded yet"),
        ]
        for key, bad, why in unsupported:
            _check(not bad, key, f"{why} with aggregator.shard.nats set")


@dataclass(frozen=True)
class UplinkConfig:
    """A site aggregator whose root is an aggregator over MQTT (docs/scale-out.md, "Hierarchical").

    ``fedmq aggregator --root mqtts://root-broker --site-id hospital-a --uplink-dir /var/lib/fedmq/uplink
    --broker mqtt://site-mosquitto``: the site's devices publish to the site's broker; the site
    sends the root each sum of at least ``aggregator.shard.site_min_devices`` devices' updates
    (``aggregator.shard.partial_size`` updates, or what ``partial_wait`` seconds gathered) as one
    weighted update, and relays the root's model and receipts.
    """

    root: str = ""
    """The root's broker: ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS). Set: this
    aggregator is a site of that root."""
    site_id: str = ""
    """This site's id at the root: its MQTT identity there, listed in the root's ``aggregator.sites``.
    A site of a NATS root (``aggregator.shard.site``) needs it only for distributed DP: it names
    the site's privacy ledger in the cluster (each site process still has a shard id of its own)."""
    state_dir: str = ""
    """The uplink folder: each sum is written here before it is sent and kept until the root's
    receipt, with the receipts of the last sums (a restarted site sends a sum again, never a new
    sum of the same updates)."""
    password: str | None = None
    """The password at the root's broker (or in ``root``; prefer FEDMQ_AGGREGATOR__UPLINK__PASSWORD)."""
    ca_file: str | None = None
    """CA certificate that signed the root broker's certificate."""
    cert_file: str | None = None
    """This site's certificate at the root (its common name is ``site_id``)."""
    key_file: str | None = None
    """This site's private key."""
    max_pending: int = 16
    """Sums sent and not yet receipted; beyond it devices are answered ``retry`` (back-pressure)."""
    resend_after: float = 30.0
    """Seconds after which a sum the root has not receipted is sent again (same seq: exactly once)."""
    model_wait: float = 30.0
    """Seconds without the root's model after subscribing before the site subscribes again (a root
    broker that is a NATS cluster may not hold the retained model yet: see ``agent.model_wait``)."""

    def broker(self) -> BrokerConfig:
        """How to reach the root's broker."""
        fields = parse_broker_url(self.root, "aggregator.uplink.root")
        tls = bool(fields["tls"]) or self.ca_file is not None
        return BrokerConfig(
            host=str(fields["host"]),
            port=int(fields["port"]),  # type: ignore[call-overload]
            username=str(fields.get("username", self.site_id)),
            password=self.password if self.password is not None else fields.get("password"),  # type: ignore[arg-type]
            tls=tls,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )

    def validate(self, agg: AggregatorConfig) -> None:
        """Raise :class:`ConfigError` on the first invalid field, or a feature a site does not do."""
        if not self.root:
            return
        k = "aggregator.uplink."
        self.broker()  # the URL
        _check(is_agent_id(self.site_id), k + "site_id", "must be 1-64 characters of [A-Za-z0-9_.-] (required)")
        _check(bool(self.state_dir), k + "state_dir", "is required: sums are kept there until the root receipts them")
        _check(1 <= self.max_pending <= 1024, k + "max_pending", "must be in [1, 1024]")
        _check(_finite(self.resend_after) and self.resend_after >= 1, k + "resend_after", "must be >= 1 second")
        _check(_finite(self.model_wait) and self.model_wait > 0, k + "model_wait", "must be > 0 seconds")
        pair = (self.cert_file is None) == (self.key_file is None)
        _check(pair, k + "cert_file", "cert_file and key_file go together")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            _check(path is None or Path(path).is_file(), k + key, f"no such file: {path}")
        _check(not agg.shard.nats, k + "root", "a site has one root: aggregator.shard.nats or this, not both")
        unsupported = [
            ("aggregator.robust", agg.robust != "none", "judges single updates: a site forwards sums"),
        ]
        for key, bad, why in unsupported:
            _check(not bad, key, f"{why} (aggregator.uplink.root is set)")


def parse_broker_url(url: str, key: str = "broker.url") -> dict[str, object]:
    """``host``, ``port``, ``tls`` and, if given, ``username`` and ``password`` from ``mqtt[s]://[user[:password]@]host[:port]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
        raise ConfigError(key, f"{url!r} is not mqtt://host:port or mqtts://host:port")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(key, f"{url!r} has an invalid port") from None
    out: dict[str, object] = {"host": parts.hostname, "port": port, "tls": tls}
    if parts.username:
        out["username"] = unquote(parts.username)
    if parts.password:
        out["password"] = unquote(parts.password)
    return out


@dataclass(frozen=True)
class PlanConfig:
    """The federation plan (``[aggregator.plan]``), announced with every model; unset keys are not planned.

    Devices follow it (``agent.follow_plan``), keeping their own value only for the keys they list
    in ``agent.keep_local`` (``local_epochs``, ``batch_size``). docs/protocol.md describes it.
    """

    local_epochs: int | None = None
    """Passes over the local data per round, for every device."""
    lr: float | None = None
    """Local learning rate, for every device."""
    batch_size: int | None = None
    """Minibatch size of local training, for every device."""
    clip_norm: float | None = None
    """Local DP clip C (unset: aggregator.dp_clip_norm when aggregator.dp_noise_multiplier is set)."""
    noise_multiplier: float | None = None
    """Local DP noise z (unset: aggregator.dp_noise_multiplier, the noise its check expects)."""
    compression: str | None = None
    """Update compression: none, fp16, int8 or topk."""
    topk_fraction: float | None = None
    """topk: share of entries sent."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid field (the rule the model message's decoder applies)."""
        for key in PLAN_FIELDS:
            value = getattr(self, key)
            problem = plan_problem(key, value) if value is not None else None
            _check(problem is None, f"aggregator.plan.{key}", str(problem))


@dataclass(frozen=True)
class AggregatorConfig:
    """The aggregator service."""

    rule: str = "fedbuff"
    """Aggregation rule: fedbuff (buffered async), fedasync (one update at a time) or fedavg (sync rounds)."""
    model: str = "softmax"
    """Model registry name: softmax, mlp, digits-cnn, med-cnn, speech-cnn."""
    hidden: int = 64
    """mlp: hidden units."""
    labels: str = ""
    """Class names, comma-separated ("yes,no,up,..."): announced with the model, kept in ONNX exports."""
    input_min: float | None = None
    input_max: float | None = None
    """The range the model's inputs are scaled to, announced so that agents can check their data.
    Unset: the evaluation data's minimum and maximum, when there is evaluation data."""
    num_features: int = 64
    """Inputs per example (64 for the 8x8 digits)."""
    num_classes: int = 10
    """Classes the model predicts."""
    buffer_size: int = 10
    """FedBuff K: updates per new model version. Sizing: docs/operating.md."""
    server_lr: float = 1.0
    """Server learning rate applied to each aggregated step."""
    server_momentum: float = 0.0
    """Server momentum (0: none)."""
    alpha: float = 0.6
    """FedAsync mixing weight of each update."""
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    max_staleness: int = 20
    """Updates trained on a model more than this many versions old are refused (too_stale)."""
    sync_agents: int = 0
    """fedavg: agents per round (0: all online)."""
    eval_data: str | None = None
    """Held-out data to evaluate each version on: .npz, folder, or builtin:digits-test."""
    eval_every: int = 1
    """Evaluate every this many versions."""
    checkpoint_dir: str | None = None
    """State folder: checkpoints and the write-ahead log behind every receipt (unset: memory only)."""
    checkpoint_every: int = 10
    """Versions between checkpoints."""
    max_versions: int = 0
    """Stop after this many versions (0: run until stopped)."""
    target_accuracy: float | None = None
    """Stop once a version reaches this held-out accuracy."""
    metrics_interval: float = 1.0
    """Seconds between retained metrics messages."""
    model_interval: float = 0.0
    """Seconds at least between two model publishes; versions made meanwhile coalesce into the
    newest. Every publish goes to every device: with thousands of them this fan-out, not the
    updates, is what saturates the broker (``benchmarks/fleet.py``). 0: publish every version."""
    seed: int = 0
    """Seed of the initial model."""
    robust: str = "none"
    """Byzantine-robust buffer aggregation: none, norm_bound, median, trimmed_mean or krum."""
    norm_bound: float | None = None
    """L2 bound on each delta before aggregation: > 0 fixed, 0 adaptive (median norm), unset off."""
    trim_fraction: float = 0.2
    """trimmed_mean: fraction of values dropped at each end, per coordinate."""
    krum_f: int = 2
    """krum: Byzantine deltas tolerated per buffer (needs buffer_size >= 2 f + 3)."""
    krum_m: int = 0
    """krum: deltas averaged after selection (0: buffer_size - krum_f)."""
    dp_noise_multiplier: float | None = None
    """The local DP noise every agent must add (z); updates whose norm does not fit it are
    rejected as ``not_private``. Unset: no check."""
    dp_clip_norm: float = 1.0
    """The agents' clipping bound C for the check above, and the aggregator's under central DP."""
    central_dp_noise_multiplier: float | None = None
    """Central DP, trusting the server: clip each delta to ``dp_clip_norm``, add ``N(0, (z C)^2)``
    to each FedBuff sum (DP-FedAvg). The aggregator sees every update; the published models are
    protected. Unset: off. Prefer distributed DP under secure aggregation (``secagg.dp_epsilon``)."""
    max_participation: int = 0
    """The most released sums one device's updates may be in; further ones are refused
    (``participation_cap``). The federation's epsilon is bounded by this many releases. 0: no cap
    (then required to be set with distributed DP, which is calibrated to it)."""
    min_separation: int = 0
    """Model versions that must pass between two released sums with one device in them (Gboard
    DP-FTRL's minimum separation); a device asking sooner is told to retry (``participation_window``).
    Over a run of T versions a device is then in at most ``ceil(T / min_separation)`` sums. 0: off."""
    dp_delta: float = 1e-5
    """The delta at which the aggregator calibrates distributed DP and reports the federation's epsilon."""
    agent_timeout: float = 60.0
    """Seconds without any message (update or status heartbeat) after which an agent counts as
    offline, even if its Will never fired (a hung process whose MQTT thread still answers pings)."""
    round_timeout: float = 300.0
    """fedavg: seconds a sync round waits for its selected agents before it closes with what it
    has (a device that reports online and never sends cannot stall the federation). 0: no limit."""
    rate_limit: float = 1.0
    """Updates per second one agent may have accepted, sustained (a token bucket; 0: no limit).
    Set it to about twice the rate of your fastest honest devices: a device faster than that is
    told to retry later, and cannot fill the buffers."""
    rate_burst: float = 20.0
    """Updates an agent may send at once beyond the rate (an outbox flushed after a reconnect)."""
    max_num_examples: int = 10_000
    """Cap on the example count a device claims (a claim is not trusted: robust rules ignore it)."""
    max_update_norm: float = 1e9
    """Updates with a larger L2 norm are refused (out_of_range): aggregating them could overflow float32."""
    max_agents: int = 100_000
    """Agents whose state (dedupe window, rate, liveness) is remembered; the least recently
    active is forgotten first. The TLS deployment admits only issued identities anyway."""
    buffer_patience: float = 5.0
    """FedBuff holds at most one update per agent in a buffer (while K agents are active); a
    buffer still open after this many seconds admits one more per agent, so it always fills."""
    shutdown_grace: float = 5.0
    """Seconds the final messages and the disconnect may take after SIGTERM (a hung broker)."""
    secure_aggregation: bool = False
    """Take only masked updates, in cohorts, and learn only their sums (SecAgg+; docs/security.md)."""
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    sites: str = ""
    """The site aggregators whose sums this aggregator takes, by id, comma-separated
    (hierarchical aggregation, docs/scale-out.md). A sum from any other sender is refused
    (``not_a_site``). Needs rule fedbuff with the weighted mean. ``ID:N`` also says that the
    site has ``N`` devices: a sum of more devices' updates from it is refused (``out_of_range``)."""
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    http: str | None = None
    """Where to serve the dashboard, ``/metrics`` (Prometheus) and ``/healthz``: ``HOST:PORT`` (port 0:
    any free one), or empty for none. Unset: ``fedmq aggregator`` serves them on 127.0.0.1:8700; a
    service embedded in a program (the simulator, tests) serves none. Keep it on loopback or behind
    an authenticating proxy: the dashboard lists agent ids and their epsilons."""

    @property
    def site_ids(self) -> tuple[str, ...]:
        """The ids in :attr:`sites`."""
        return tuple(name for name, _ in self._site_entries())

    @property
    def site_devices(self) -> dict[str, int]:
        """How many devices each site of :attr:`sites` that says so has (``ID:N``)."""
        return {name: int(count) for name, count in self._site_entries() if count is not None}

    def _site_entries(self) -> list[tuple[str, str | None]]:
        """``(id, N as written, or None)`` for each comma-separated entry of :attr:`sites`."""
        entries: list[tuple[str, str | None]] = []
        for item in self.sites.split(","):
            if item.strip():
                name, colon, count = item.partition(":")
                entries.append((name.strip(), count.strip() if colon else None))
        return entries

    @property
    def label_names(self) -> tuple[str, ...]:
        """:attr:`labels` split at commas."""
        return tuple(n.strip() for n in self.labels.split(",")) if self.labels.strip() else ()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid field."""
        _check(
            self.rule in ("fedasync", "fedbuff", "fedavg"),
            "aggregator.rule",
            f"must be fedasync, fedbuff or fedavg, got {self.rule!r}",
        )
        _check(self.buffer_size >= 1, "aggregator.buffer_size", "must be >= 1")
        _check(self.server_lr > 0, "aggregator.server_lr", "must be > 0")
        _check(0 <= self.server_momentum < 1, "aggregator.server_momentum", "must be in [0, 1)")
        _check(0 < self.alpha <= 1, "aggregator.alpha", "must be in (0, 1]")
        _check(self.max_staleness >= 0, "aggregator.max_staleness", "must be >= 0")
        _check(self.sync_agents >= 0, "aggregator.sync_agents", "must be >= 0 (0: every online agent)")
        _check(self.eval_every >= 1, "aggregator.eval_every", "must be >= 1")
        _check(self.checkpoint_every >= 1, "aggregator.checkpoint_every", "must be >= 1")
        _check(self.max_versions >= 0, "aggregator.max_versions", "must be >= 0 (0: run until stopped)")
        _check(
            self.num_features >= 1 and self.num_classes >= 2,
            "aggregator.num_classes",
            "need num_features >= 1 and num_classes >= 2",
        )
        names = self.label_names
        _check(
            len(names) <= self.num_classes and all(0 < len(n) <= 64 for n in names),
            "aggregator.labels",
            f"{len(names)} comma-separated names of 1-64 characters for {self.num_classes} classes",
        )
        _check(
            (self.input_min is None) == (self.input_max is None)
            and (
                self.input_min is None
                or (
                    self.input_max is not None
                    and _finite(self.input_min)
                    and _finite(self.input_max)
                    and self.input_min < self.input_max
                )
            ),
            "aggregator.input_min",
            "set both input_min and input_max, finite, with input_min < input_max",
        )
        _check(
            self.target_accuracy is None or 0 < self.target_accuracy <= 1,
            "aggregator.target_accuracy",
            "must be in (0, 1]",
        )
        _check(self.metrics_interval > 0, "aggregator.metrics_interval", "must be > 0")
        _check(
            self.model_interval >= 0 and math.isfinite(self.model_interval),
            "aggregator.model_interval",
            "must be >= 0 seconds",
        )
        _check(self.agent_timeout > 0, "aggregator.agent_timeout", "must be > 0 seconds")
        _check(_finite(self.round_timeout) and self.round_timeout >= 0, "aggregator.round_timeout", "must be >= 0 s")
        _check(_finite(self.rate_limit) and self.rate_limit >= 0, "aggregator.rate_limit", "must be >= 0 (0: off)")
        _check(_finite(self.rate_burst) and self.rate_burst >= 1, "aggregator.rate_burst", "must be >= 1")
        _check(self.max_num_examples >= 1, "aggregator.max_num_examples", "must be >= 1")
        _check(_finite(self.max_update_norm) and self.max_update_norm > 0, "aggregator.max_update_norm", "must be > 0")
        _check(self.max_agents >= 1, "aggregator.max_agents", "must be >= 1")
        _check(
            _finite(self.buffer_patience) and self.buffer_patience > 0, "aggregator.buffer_patience", "must be > 0 s"
        )
        _check(_finite(self.shutdown_grace) and self.shutdown_grace > 0, "aggregator.shutdown_grace", "must be > 0 s")
        if self.http:
            parse_listen(self.http, "aggregator.http")
        self.staleness.validate()
        self.plan.validate()
        for name in ("noise_multiplier", "clip_norm"):
            planned, checked = getattr(self.plan, name), getattr(self, f"dp_{name}")
            _check(
                planned is None or self.dp_noise_multiplier is None or planned == checked,
                f"aggregator.plan.{name}",
                f"is {planned}, but the not_private check expects aggregator.dp_{name} = {checked}: "
                "every update would be refused (leave the plan's unset to announce the check's)",
            )
        self._validate_robust()
        self.secagg.validate()
        self.shard.validate(self)
        self.uplink.validate(self)
        self._validate_sites()
        self._validate_dp()
        if self.secure_aggregation:
            self._validate_secure()

    def _validate_dp(self) -> None:
        """Central and distributed DP: the rule and settings their accounting assumes."""
        _check(self.max_participation >= 0, "aggregator.max_participation", "must be >= 0 (0: no cap)")
        _check(self.min_separation >= 0, "aggregator.min_separation", "must be >= 0 versions (0: off)")
        _check(
            not self.min_separation
            or self.central_dp_noise_multiplier is not None
            or self.secagg.dp_epsilon is not None,
            "aggregator.min_separation",
            "separates a device's DP releases: set central DP or aggregator.secagg.dp_epsilon",
        )
        _check(0 < self.dp_delta < 1, "aggregator.dp_delta", f"must be in (0, 1), got {self.dp_delta}")
        z = self.central_dp_noise_multiplier
        if z is not None:
            _check(_finite(z) and z > 0, "aggregator.central_dp_noise_multiplier", "must be > 0 or unset")
            _check(
                self.rule == "fedbuff" and self.robust == "none" and self.norm_bound is None,
                "aggregator.central_dp_noise_multiplier",
                "central DP noises FedBuff's sum: needs rule fedbuff, robust none and no norm_bound",
            )
            _check(
                not self.secure_aggregation,
                "aggregator.central_dp_noise_multiplier",
                "is the trusted-server baseline; under secure aggregation use aggregator.secagg.dp_epsilon",
            )
        if self.secagg.dp_epsilon is not None:
            _check(
                self.secure_aggregation,
                "aggregator.secagg.dp_epsilon",
                "distributed noise only sums to the target under secure aggregation (aggregator.secure_aggregation)",
            )
            _check(
                self.max_participation >= 1,
                "aggregator.max_participation",
                "distributed DP is calibrated to a participation cap: set the most sums a device may be in",
            )
            k = self.secagg.cohort_size or self.buffer_size
            t = self.secagg.survivors_for(k)
            _check(t <= k, "aggregator.secagg.dp_survivors", f"must be at most the cohort's K = {k}, got {t}")

    def _validate_secure(self) -> None:
        """Secure aggregation hides every individual update: refuse what would need one."""
        why = "secure aggregation hides individual updates"
        _check(
            self.rule == "fedbuff",
            "aggregator.rule",
            f"must be fedbuff with secure aggregation (one cohort per buffer), got {self.rule!r}",
        )
        _check(
            self.robust == "none",
            "aggregator.robust",
            f"{self.robust} needs individual updates and {why}: with secure aggregation only client-side "
            "clipping (aggregator.secagg.clip_norm) and the quantization range bound a device's influence",
        )
        _check(
            self.norm_bound is None,
            "aggregator.norm_bound",
            f"bounds each update, and {why}; use aggregator.secagg.clip_norm",
        )
        _check(
            self.dp_noise_multiplier is None,
            "aggregator.dp_noise_multiplier",
            f"checks each update's noise, and {why}; leave it unset",
        )
        k = self.secagg.cohort_size or self.buffer_size
        _check(k >= 2, "aggregator.buffer_size", "a cohort needs K >= 2 devices (aggregator.secagg.cohort_size)")

    def _validate_sites(self) -> None:
        """The root of sites: their sums go into FedBuff's weighted mean, nothing that judges one update."""
        if not self.sites:
            return
        bad = [n for n in self.site_ids if not is_agent_id(n)]
        _check(bool(self.site_ids) and not bad, "aggregator.sites", f"ids of 1-64 characters of [A-Za-z0-9_.-]: {bad}")
        bad = [f"{n}:{c}" for n, c in self._site_entries() if c is not None and not (c.isdigit() and int(c) > 0)]
        _check(not bad, "aggregator.sites", f"ID:N gives a site's number of devices, N >= 1: {bad}")
        _check(len(set(self.site_ids)) == len(self.site_ids), "aggregator.sites", "lists a site twice")
        unsupported = [
            ("aggregator.rule", self.rule != "fedbuff", "must be fedbuff"),
            ("aggregator.robust", self.robust != "none", "judges single updates, not sums"),
            ("aggregator.norm_bound", self.norm_bound is not None, "judges single updates, not sums"),
            ("aggregator.secure_aggregation", self.secure_aggregation, "is not combined with sites' sums yet"),
            ("aggregator.central_dp_noise_multiplier", self.central_dp_noise_multiplier is not None, "is not combined"),
            ("aggregator.dp_noise_multiplier", self.dp_noise_multiplier is not None, "checks one device's noise"),
            ("aggregator.shard.nats", bool(self.shard.nats), "sites of a sharded root use --site --nats"),
        ]
        for key, bad_setting, why in unsupported:
            _check(not bad_setting, key, f"{why} (aggregator.sites is set)")

    def _validate_robust(self) -> None:
        _check(
            self.dp_noise_multiplier is None
            or (math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier > 0),
            "aggregator.dp_noise_multiplier",
            "must be > 0 or unset",
        )
        _check(math.isfinite(self.dp_clip_norm) and self.dp_clip_norm > 0, "aggregator.dp_clip_norm", "must be > 0")
        rules = ("none", "norm_bound", "median", "trimmed_mean", "krum")
        _check(self.robust in rules, "aggregator.robust", f"must be one of {', '.join(rules)}, got {self.robust!r}")
        nb = self.norm_bound
        _check(
            nb is None or (math.isfinite(nb) and nb >= 0),
            "aggregator.norm_bound",
            "must be > 0 (fixed), 0 (adaptive) or unset",
        )
        if self.rule == "fedasync":
            _check(
                self.robust in ("none", "norm_bound"),
                "aggregator.robust",
                f"{self.robust} needs a buffer of updates: use rule fedbuff or fedavg",
            )
            _check(
                (nb is None or nb > 0) and (self.robust != "norm_bound" or nb is not None),
                "aggregator.norm_bound",
                "FedAsync has no buffer to take an adaptive bound from: set a fixed bound > 0",
            )
        n = self.buffer_size
        if self.robust == "trimmed_mean":
            # With trim < 0.5, n - 2 floor(trim n) >= n (1 - 2 trim) > 0: something always remains.
            _check(0 <= self.trim_fraction < 0.5, "aggregator.trim_fraction", "must be in [0, 0.5)")
        if self.robust == "krum":
            _check(self.krum_f >= 0, "aggregator.krum_f", "must be >= 0")
            _check(
                self.rule != "fedbuff" or n >= 2 * self.krum_f + 3,
                "aggregator.krum_f",
                f"Krum needs buffer_size >= 2 * krum_f + 3; buffer_size {n} allows krum_f <= {(n - 3) // 2}",
            )
            _check(
                self.krum_m >= 0 and (self.rule != "fedbuff" or self.krum_m <= n - self.krum_f),
                "aggregator.krum_m",
                f"must be in [0, buffer_size - krum_f] (0: all {n - self.krum_f} that Krum keeps)",
            )


@dataclass(frozen=True)
class PrivacyConfig:
    """Update-level (local) differential privacy of an agent: clip, Gaussian noise, accountant."""

    enabled: bool = True
    """Clip and noise each update on the device (local DP)."""
    clip_norm: float = 1.0
    """L2 bound C each update is clipped to (the aggregator announces its own in the plan)."""
    noise_multiplier: float = 1.0
    """Gaussian noise z: each coordinate gets N(0, (z C)^2)."""
    delta: float = 1e-5
    """Delta of the reported epsilon."""
    epsilon_budget: float | None = None
    """Stop before a release would take this device's epsilon past it."""
    require_distributed: bool = False
    """Send nothing unless the aggregator announces distributed DP under secure aggregation: it then
    learns only sums that carry the noise, and this device's ledger charges each sum it is in
    against ``epsilon_budget`` (docs/privacy.md). Local noise (``enabled``) is added on top if on."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid field."""
        _check(self.clip_norm > 0 and math.isfinite(self.clip_norm), "privacy.clip_norm", "must be > 0")
        _check(
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
            "privacy.noise_multiplier",
            "must be >= 0",
        )
        _check(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}")
        _check(self.epsilon_budget is None or self.epsilon_budget > 0, "privacy.epsilon_budget", "must be > 0")
        _check(
            not (self.enabled and self.epsilon_budget is not None and self.noise_multiplier == 0),
            "privacy.noise_multiplier",
            "an epsilon budget needs noise_multiplier > 0",
        )
        _check(
            self.enabled or self.require_distributed or self.epsilon_budget is None,
            "privacy.epsilon_budget",
            "is set but privacy is off (--no-dp) and distributed DP is not required "
            "(--require-distributed-dp): nothing would be accounted against it",
        )


@dataclass(frozen=True)
class AgentConfig:
    """One edge agent."""

    agent_id: str = "agent-1"
    """This device's id: 1-64 of [A-Za-z0-9_.-] (with TLS, its certificate's name)."""
    data: str | None = None
    """Local data: .npz with x and y, a folder with x.npy and y.npy, builtin:NAME or module:function."""
    local_epochs: int = 1
    """Passes over the local data per round."""
    batch_size: int = 16
    """Minibatch size of local training."""
    lr: float = 0.1
    """Local learning rate."""
    round_interval: float = 5.0
    """Seconds between local rounds."""
    state_dir: str | None = None
    """Where the sequence number, the privacy ledger and the outbox persist."""
    max_updates: int = 0
    """Stop after this many updates (0: no limit)."""
    seed: int | None = None
    """Seed of shuffling and noise (unset: from the OS)."""
    outbox_max: int = 16
    """Updates kept until their receipt arrives (on disk under ``state_dir``); training pauses when full."""
    receipt_timeout: float = 30.0
    """Seconds without a receipt after which an update is published again."""
    heartbeat_interval: float = 15.0
    """Seconds between status heartbeats (retained ``online`` with the current seq and epsilon)."""
    model_wait: float = 30.0
    """Seconds without a global model after subscribing (or since the last ask) before the agent
    subscribes to the model topic again, which makes the broker send the retained model again.
    A NATS cluster keeps retained messages eventually consistent: a device that subscribes on
    one node just after the model was written on another can miss it (docs/scale-out.md)."""
    compression: str = "none"
    """Update compression on the wire: none, fp16, int8 or topk (see :mod:`fedmq.compression`)."""
    topk_fraction: float = 0.01
    """With ``compression = "topk"``: the share of entries sent per tensor (the rest feed back)."""
    send_train_loss: bool = False
    """Send the local training loss with each update. It is outside the DP guarantee (computed
    on the raw data, never noised), so it is off unless you want it for debugging."""
    exact_num_examples: bool = False
    """Send the exact example count instead of the power of two below it (the count is outside
    the DP guarantee; see docs/protocol.md)."""
    shutdown_grace: float = 5.0
    """Seconds after SIGTERM before an unfinished local round is abandoned (nothing is released,
    no privacy budget spent) and before a hung broker is given up on."""
    require_secure_aggregation: bool = False
    """Send nothing unless the aggregator announces secure aggregation (it then sees only sums)."""
    checkin_interval: float = 2.0
    """Secure aggregation: seconds between check-ins while the agent waits for a cohort."""
    summary_interval: float = 60.0
    """Seconds between the one-line INFO summaries in the agent's log (updates, receipts, epsilon)."""
    follow_plan: bool = True
    """Train and protect updates as the aggregator's federation plan says (docs/protocol.md)."""
    keep_local: str = ""
    """Plan keys for which this device keeps its own setting: local_epochs and/or batch_size (its compute)."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first invalid field."""
        validate_agent_id(self.agent_id, key="agent.agent_id")
        _check(self.compression in METHODS, "agent.compression", f"must be one of {METHODS}")
        _check(0 < self.topk_fraction <= 1, "agent.topk_fraction", "must be in (0, 1]")
        _check(self.local_epochs >= 1, "agent.local_epochs", "must be >= 1")
        _check(self.batch_size >= 1, "agent.batch_size", "must be >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "agent.lr", "must be > 0")
        _check(self.max_updates >= 0, "agent.max_updates", "must be >= 0 (0: no limit)")
        _check(self.outbox_max >= 1, "agent.outbox_max", "must be >= 1")
        _check(
            self.receipt_timeout > 0 and math.isfinite(self.receipt_timeout),
            "agent.receipt_timeout",
            "must be > 0 seconds",
        )
        _check(self.heartbeat_interval > 0, "agent.heartbeat_interval", "must be > 0 seconds")
        _check(self.model_wait > 0 and math.isfinite(self.model_wait), "agent.model_wait", "must be > 0 seconds")
        _check(
            self.round_interval >= 0 and math.isfinite(self.round_interval),
            "agent.round_interval",
            "must be >= 0 seconds",
        )
        _check(_finite(self.shutdown_grace) and self.shutdown_grace > 0, "agent.shutdown_grace", "must be > 0 seconds")
        _check(_finite(self.checkin_interval) and self.checkin_interval > 0, "agent.checkin_interval", "must be > 0 s")
        _check(_finite(self.summary_interval) and self.summary_interval > 0, "agent.summary_interval", "must be > 0 s")
        kept = {k.strip() for k in self.keep_local.split(",") if k.strip()}
        _check(
            kept <= {"local_epochs", "batch_size"},
            "agent.keep_local",
            f"only local_epochs and batch_size may be kept against the federation plan, got {sorted(kept)}",
        )


@dataclass(frozen=True)
class Config:
    """Everything one process needs; each role reads its own sections."""

    prefix: str = "fedmq/default"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def topics(self) -> Topics:
        """Topic names of this federation."""
        return Topics(self.prefix)

    def validate(self, *, role: str | None = None) -> Config:
        """Validate the sections ``role`` uses (all when ``None``) and return ``self``."""
        Topics(self.prefix)
        self.broker.validate()
        if role in (None, "aggregator"):
            self.aggregator.validate()
        if role in (None, "agent"):
            self.agent.validate()
            self.privacy.validate()
        return self


DEFAULT_HTTP = "127.0.0.1:8700"
"""Where ``fedmq aggregator`` serves its dashboard unless ``aggregator.http`` says otherwise."""


def parse_listen(value: str, key: str = "aggregator.http") -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free port) into its parts; :class:`ConfigError` naming ``key`` otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(key, f"must be HOST:PORT (e.g. {DEFAULT_HTTP}), or empty to turn it off; got {value!r}")
    return host.strip("[]"), int(port)


@functools.cache
def _field_docs() -> dict[str, str]:
    """``Section.field`` -> its attribute docstring in this file (for command-line help)."""
    docs: dict[str, str] = {}
    for node in ast.parse(Path(__file__).read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for stmt, nxt in itertools.pairwise(body):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[f"{node.name}.{stmt.target.id}"] = " ".join(nxt.value.value.split())
    return docs


def describe(key: str) -> tuple[Any, str]:
    """The default and the first sentence of the documentation of the dotted config ``key``.

    Raises:
        KeyError: no such key (a flag mapped to a key that does not exist: our bug).
    """
    obj: Any = Config()
    cls: type[Any] = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise KeyError(key)
        cls = type(obj)
        obj = getattr(obj, part)
    doc = _field_docs().get(f"{cls.__name__}.{key.split('.')[-1]}", "")
    first = doc.split(". ")[0].rstrip(".") if doc else ""
    return obj, first


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a file/env/flag value to the annotated type ``typ`` or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a table, got {value!r}")
        return _build(typ, value, key)  # type: ignore[arg-type]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be {typ.__name__}, got {value!r}") from None
    raise ConfigError(key, f"unsupported type {typ!r}")  # pragma: no cover - our own bug


def _build(cls: type[Any], values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(dotted, f"unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(path), "conflicts with a scalar value")
    node[path[-1]] = value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    role: str | None = None,
) -> Config:
    """Load, merge and validate the configuration.

    Args:
        path: a TOML file (optional); its tables are the sections of :class:`Config`.
        env: environment to read ``FEDMQ_*`` variables from (default ``os.environ``).
        overrides: dotted keys to values, from command-line flags; ``None`` values are skipped.
        role: validate only the sections that role uses (``"aggregator"``, ``"agent"``).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    env = os.environ if env is None else env
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
            if parts[0] in {f.name for f in dataclasses.fields(Config)}:
                _set_path(tree, parts, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            tree = _merge(tree, _nest(dotted.split("."), value))
    config: Config = _build(Config, tree, "")
    return config.validate(role=role)


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _set_path(out, path, value)
    return out
