"""The examples run: federations of each task through a real Mosquitto, ONNX agreement with the
backends, ``fedmq predict`` on a WAV, ``fedmq data split`` and the agent's range warning."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import AggregatorService
from broker.launcher import MosquittoBroker
from cli.main import main as fedmq_main
from edge_agent.service import AgentService
from edge_agent.trainer import LocalTrainer
from fedmq.config import AgentConfig, AggregatorConfig, BrokerConfig, Config, PrivacyConfig
from models import create_model
from models.base import evaluate
from models.datasets import Dataset, digits, load_source, save_npz
from models.tasks import get_task
from simulator.harness import SimConfig, Stragglers, for_task, run_federation, split_task
from tests.helpers import wait_until
from tests.test_models import HAS_ONNX, HAS_TORCH

ROOT = Path(__file__).resolve().parents[1]


def fedmq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def task_config(task: str, prefix: str, agents: int, target: float, *, torch: bool = False) -> SimConfig:
    # 60 s at most, so that generating the data and shutting down stay inside the 120 s test
    # timeout on a busy machine; each run stops as soon as it reaches its target.
    cfg = for_task(SimConfig(task=task, agents=agents, prefix=prefix, duration=60), torch=torch)
    return replace(
        cfg,
        stragglers=Stragglers(median=0.02),
        privacy=PrivacyConfig(enabled=False),
        aggregator=replace(cfg.aggregator, buffer_size=min(3, agents), target_accuracy=target),
    )


# --- federations through a real broker ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.broker
async def test_speech_households_learn_keywords_of_voices_they_never_heard(
    mosquitto: MosquittoBroker, prefix: str, speech_cache: str
) -> None:
    cfg = task_config("speech", prefix, agents=12, target=0.35)
    shards, test = await asyncio.to_thread(split_task, cfg)
    s = await run_federation(cfg, mosquitto.host, mosquitto.port, shards=shards, test=test)
    # Chance is 0.10 on 1,200 held-out utterances (one standard error is 0.009).
    assert s["final_accuracy"] > 0.25, s
    assert s["task"] == "speech" and s["model"] == "mlp" and s["range_warnings"] == 0


@pytest.mark.slow
@pytest.mark.broker
async def test_hospitals_learn_breast_cancer_diagnosis_above_the_majority_class(
    mosquitto: MosquittoBroker, prefix: str
) -> None:
    cfg = task_config("hospitals", prefix, agents=5, target=0.93)
    shards, test = split_task(cfg)
    s = await run_federation(cfg, mosquitto.host, mosquitto.port, shards=shards, test=test)
    majority = max(np.mean(test.y == 0), np.mean(test.y == 1))  # 0.63
    assert s["final_accuracy"] > majority + 0.15, s


@pytest.mark.slow
@pytest.mark.broker
async def test_hospitals_learn_the_synthetic_cell_images(mosquitto: MosquittoBroker, prefix: str) -> None:
    cfg = task_config("hospitals-imaging", prefix, agents=5, target=0.5)
    shards, test = split_task(cfg)
    s = await run_federation(cfg, mosquitto.host, mosquitto.port, shards=shards, test=test)
    assert s["final_accuracy"] > 0.4, s  # four balanced classes: chance 0.25


@pytest.mark.broker
async def test_agent_warns_when_its_data_is_not_scaled_like_the_model(
    mosquitto: MosquittoBroker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Raw digits pixels (0-16) against a model evaluated on [0, 1]: the seed's silent stall."""
    train, test = digits()
    agg = AggregatorConfig(rule="fedbuff", buffer_size=2, metrics_interval=0.1, eval_every=1)
    cfg = Config(prefix=prefix, broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port), aggregator=agg)
    server = AggregatorService(cfg.validate(), eval_data=test)
    acfg = AgentConfig(agent_id="raw-pixels", round_interval=0.05)
    raw = Dataset(train.x[:80] * 16, train.y[:80])
    trainer = LocalTrainer(acfg, PrivacyConfig(enabled=False), raw, rng=np.random.default_rng(0))
    dev = AgentService(replace(cfg, agent=acfg), trainer)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="fedmq.agent")
    tasks = [asyncio.create_task(server.run(stop)), asyncio.create_task(dev.run(stop))]
    try:
        await wait_until(dev.pulse, lambda: trainer.range_warning is not None, limit=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert server.spec.input_range == (0.0, 1.0)
    assert "[0, 16]" in (trainer.range_warning or "")
    assert any("expects inputs in [0, 1]" in r.getMessage() for r in caplog.records)


# --- ONNX agrees with the backends ----------------------------------------------------------


def _trained(name: str, data: Dataset, num_classes: int, hidden: int = 64) -> object:
    m = create_model(name, num_features=data.x.shape[1], num_classes=num_classes, hidden=hidden)
    m.fit(data.x, data.y, epochs=2, batch_size=32, lr=0.1, rng=np.random.default_rng(0))
    return m


@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed")
@pytest.mark.parametrize(
    ("model", "task"),
    [
        ("mlp", "speech"),
        ("mlp", "hospitals"),
        pytest.param("speech-cnn", "speech", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
        pytest.param("med-cnn", "hospitals-imaging", marks=pytest.mark.skipif(not HAS_TORCH, reason="no torch")),
    ],
)
def test_onnx_predictions_match_the_backend(
    model: str, task: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from models.onnx_export import OnnxPredictor, export_onnx

    if task == "speech":
        request.getfixturevalue("speech_cache")
    t = get_task(task)
    shards, test = t.load(4 if task == "speech" else None)
    train = Dataset(np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards]))
    m = _trained(model, train, t.num_classes, t.hidden)
    path = export_onnx(
        model,
        m.get_weights(),  # type: ignore[attr-defined]
        tmp_path / "m.onnx",
        num_features=train.x.shape[1],
        num_classes=t.num_classes,
        hidden=t.hidden,
        version=4,
        labels=t.labels,
    )
    p = OnnxPredictor(path)
    assert p.version == 4 and p.labels == t.labels and p.model_name == model
    ref = m.predict_proba(test.x[:200])  # type: ignore[attr-defined]
    got = p.predict_proba(test.x[:200])
    assert np.allclose(got, ref, atol=1e-5)
    assert np.array_equal(np.argmax(got, axis=1), np.argmax(ref, axis=1))


@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed")
def test_predict_prints_the_word_of_a_wav(tmp_path: Path, speech_cache: str) -> None:
    """A model trained on 40 households names keywords spoken by a voice none of them has."""
    from models import audio, speech
    from models.onnx_export import export_onnx

    shards = speech.households(40)
    train = Dataset(np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards]))
    m = create_model("mlp", num_features=196, num_classes=10, hidden=128)
    m.fit(train.x, train.y, epochs=30, batch_size=32, lr=0.1, rng=np.random.default_rng(0))
    assert evaluate(m, speech.held_out_set().x, speech.held_out_set().y)[1] > 0.3
    onnx_path = export_onnx(
        "mlp", m.get_weights(), tmp_path / "kws.onnx", num_features=196, num_classes=10, hidden=128,
        labels=speech.KEYWORDS,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wavs = []
    for word in speech.KEYWORDS:
        wav = tmp_path / f"{word}.wav"
        done = subprocess.run(
            fedmq_cmd("data", "say", word, "--out", str(wav), "--voice", "en-gb-x-rp+f5", "--pitch", "60"),
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        wavs.append(wav)
    done = subprocess.run(
        fedmq_cmd("predict", str(onnx_path), *map(str, wavs)), cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(x["wav"]).stem for x in lines] == list(speech.KEYWORDS)
    for x, wav in zip(lines, wavs, strict=True):
        # The command's answer is exactly the backend's on the same device pipeline.
        expected = int(np.argmax(m.predict_proba(audio.wav_features(wav)[None, :])))
        assert x["word"] == speech.KEYWORDS[expected] and x["class"] == expected
    correct = sum(x["word"] == Path(x["wav"]).stem for x in lines)
    assert correct >= 4, lines  # chance: one in ten


def test_predict_refuses_a_wav_for_a_model_of_other_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from models import audio
    from models.onnx_export import export_onnx

    m = create_model("softmax", num_features=64, num_classes=10)
    path = export_onnx("softmax", m.get_weights(), tmp_path / "d.onnx", num_features=64, num_classes=10)
    wav = tmp_path / "x.wav"
    wav.write_bytes(audio.wav_bytes(np.zeros(8000, dtype=np.float32)))
    assert fedmq_main(["predict", str(path), str(wav)]) == 2
    assert "the model takes 64" in capsys.readouterr().err
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not a wav")
    path2 = export_onnx("mlp", create_model("mlp", num_features=196, num_classes=10).get_weights(), tmp_path / "s.onnx",
                        num_features=196, num_classes=10)  # fmt: skip
    assert fedmq_main(["predict", str(path2), str(bad)]) == 2
    assert "not a PCM WAV" in capsys.readouterr().err


# --- fedmq data split -----------------------------------------------------------------------


def test_data_split_writes_hospital_folders_an_agent_reads(tmp_path: Path) -> None:
    out = tmp_path / "hospitals"
    assert fedmq_main(["data", "split", "hospitals", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "hospitals" and manifest["labels"] == ["malignant", "benign"]
    assert manifest["input_range"] == [0.0, 1.0] and manifest["num_features"] == 30
    names = list(manifest["devices"])
    assert names[0] == "university-hospital" and len(names) == 5
    total = 0
    for name in names:
        d = load_source(str(out / name))
        assert len(d) == manifest["devices"][name]["examples"]
        total += len(d)
    assert total + len(load_source(str(out / "test"))) == 569
    # The same command again: the folder is not empty, nothing is overwritten.
    assert fedmq_main(["data", "split", "hospitals", "--out", str(out)]) == 2
    assert fedmq_main(["data", "split", "hospitals", "--devices", "6", "--out", str(tmp_path / "six")]) == 2


def test_data_split_normalises_raw_digits_and_warns_when_asked_not_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, _ = digits()
    raw = tmp_path / "raw.npz"
    save_npz(raw, Dataset(np.round(train.x * 16), train.y))
    out = tmp_path / "scaled"
    args = ["data", "split", str(raw), "--devices", "8", "--out", str(out), "--normalize", "scale:16"]
    assert fedmq_main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["normalization"]["method"] == "scale:16" and m["input_range"] == [0.0, 1.0]
    shard = load_source(str(out / "device-000"))
    assert shard.x.min() >= 0 and shard.x.max() <= 1
    assert sum(d["examples"] for d in m["devices"].values()) + m["test_examples"] == len(train)
    capsys.readouterr()
    assert fedmq_main(["data", "split", str(raw), "--devices", "8", "--out", str(tmp_path / "unscaled")]) == 0
    assert "were not normalised" in capsys.readouterr().err
    assert fedmq_main(["data", "split", str(raw), "--out", str(tmp_path / "x"), "--normalize", "scale:0"]) == 2
    assert "--normalize" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.broker
def test_demo_hospitals_command(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        fedmq_cmd("demo", "--task", "hospitals", "--duration", "10", "--json", str(out), "--quiet"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    s = json.loads(out.read_text())
    assert s["task"] == "hospitals" and s["agents"] == 5 and s["final_accuracy"] > 0.85
    assert "breast" not in done.stderr and "time to target" in done.stdout


def test_data_normalize_scales_a_new_sites_raw_export_like_the_federation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sklearn.datasets import load_breast_cancer

    from models.medical import normalize_breast_cancer

    assert fedmq_main(["data", "split", "hospitals", "--out", str(tmp_path / "fed")]) == 0
    bunch = load_breast_cancer()
    save_npz(tmp_path / "raw.npz", Dataset(bunch.data[:40].astype(np.float32), bunch.target[:40]))
    manifest = str(tmp_path / "fed" / "manifest.json")
    out = tmp_path / "site.npz"
    capsys.readouterr()
    assert fedmq_main(["data", "normalize", str(tmp_path / "raw.npz"), "--manifest", manifest, "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    got = load_source(str(out))
    assert np.allclose(got.x, normalize_breast_cancer(bunch.data[:40]), atol=1e-6)
    # Already-normalised data normalised again is flagged, and a wrong width is refused.
    assert fedmq_main(["data", "normalize", str(out), "--manifest", manifest, "--out", str(tmp_path / "b.npz")]) == 0
    assert "warning: the local data lies in" in capsys.readouterr().err
    train, _ = digits()
    save_npz(tmp_path / "d.npz", train)
    assert fedmq_main(["data", "normalize", str(tmp_path / "d.npz"), "--manifest", manifest, "--out", "x.npz"]) == 2
    assert "64 features" in capsys.readouterr().err


def test_demo_settings_per_task() -> None:
    import argparse

    from simulator.cli_demo import demo_config

    def cfg(task: str, **kw: object) -> SimConfig:
        base = {"task": task, "agents": None, "duration": 30.0, "broker": "auto", "seed": 0, "torch": False}
        return demo_config(argparse.Namespace(**{**base, "secure_aggregation": False, **kw}))

    digits_cfg, speech_cfg, hospitals_cfg = cfg("digits"), cfg("speech"), cfg("hospitals")
    assert digits_cfg.agents == 20 and digits_cfg.privacy.enabled and digits_cfg.aggregator.model == "softmax"
    assert speech_cfg.agents == 100 and not speech_cfg.privacy.enabled and speech_cfg.lr == 0.2
    assert speech_cfg.aggregator.max_staleness == 10 and speech_cfg.aggregator.label_names[8] == "stop"
    assert cfg("speech", secure_aggregation=True).aggregator.max_staleness == 5
    assert hospitals_cfg.agents == 5 and hospitals_cfg.aggregator.buffer_size == 3
    assert cfg("hospitals", agents=2).aggregator.buffer_size == 2  # K never above the devices
    assert cfg("hospitals-imaging", torch=True).aggregator.model == "med-cnn"
    assert cfg("speech", torch=True).aggregator.model == "speech-cnn"
    assert cfg("speech", torch=True).aggregator.max_staleness == 20
    with pytest.raises(ValueError, match="has 5 devices"):
        cfg("hospitals", agents=6).validate()


def test_data_say_names_an_unknown_voice(tmp_path: Path, capsys: pytest.CaptureFixture[str], speech_cache: str) -> None:
    out = tmp_path / "x.wav"
    assert fedmq_main(["data", "say", "yes", "--voice", "nosuch+zz", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--voice" in err and "does not exist" in err and "Traceback" not in err
    assert not out.exists()
    assert fedmq_main(["data", "say", "yes", "--out", str(tmp_path / "missing" / "x.wav")]) == 2
    assert "--out" in capsys.readouterr().err
