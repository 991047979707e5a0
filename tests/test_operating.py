"""Operating fedmq as a new user does (issue 15): each problem a user hit, as a test.

`fedmq predict`, missing extras named at startup, help text, broker readiness on a busy port,
adding a device to a running broker, and the hints a misconfigured connection gets.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from broker.launcher import MosquittoBroker, free_port
from broker.pki import init
from cli.main import main as fedmq_main
from fedmq.config import AggregatorConfig, BrokerConfig, Config
from fedmq.topics import Topics
from models import create_model
from models.datasets import digits
from runtime.transport import client_kwargs, describe_failure

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def digits_onnx(tmp_path: Path) -> Path:
    pytest.importorskip("onnxruntime")
    from models.onnx_export import export_onnx

    m = create_model("softmax", num_features=64, num_classes=10)
    return export_onnx("softmax", m.get_weights(), tmp_path / "d.onnx", num_features=64, num_classes=10, version=3)


# --- fedmq predict -----------------------------------------------------------------------------


def test_predict_prints_every_prediction_and_writes_them_as_csv(
    tmp_path: Path, digits_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, test = digits()
    np.savez(tmp_path / "t.npz", x=test.x, y=test.y)
    out_csv = tmp_path / "pred.csv"
    assert fedmq_main(["predict", str(digits_onnx), str(tmp_path / "t.npz"), "--out", str(out_csv)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == len(test.y) == len(out["predictions"]) > 20
    assert out["accuracy"] == pytest.approx(float(np.mean(np.array(out["predictions"]) == test.y)))
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == len(test.y)
    assert [int(r["class"]) for r in rows] == out["predictions"]
    assert [int(r["y"]) for r in rows] == test.y.tolist()


def test_predict_takes_inputs_without_labels(
    tmp_path: Path, digits_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, test = digits()
    np.savez(tmp_path / "x_only.npz", x=test.x[:50])
    assert fedmq_main(["predict", str(digits_onnx), str(tmp_path / "x_only.npz")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 50 and len(out["predictions"]) == 50
    assert "accuracy" not in out
    folder = tmp_path / "folder"
    folder.mkdir()
    np.save(folder / "x.npy", test.x[:7])
    assert fedmq_main(["predict", str(digits_onnx), str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 7


def test_predict_names_a_missing_model_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 64), np.float32))
    assert fedmq_main(["predict", str(tmp_path / "missing.onnx"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "missing.onnx" in err and "Traceback" not in err


def test_predict_without_onnxruntime_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert fedmq_main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fedmq[onnx]'" in err and "onnxruntime" in err and "Traceback" not in err


# --- the broker ----------------------------------------------------------------------------------


def _fedmq(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def _until_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60.0) -> str:
    """Read the process's output until a line contains ``needle`` (readiness), or it exits."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} in the output (exit {proc.poll()}):\n{''.join(seen)}")


@pytest.mark.broker
def test_broker_on_a_busy_port_says_so_instead_of_listening() -> None:
    from tests.conftest import require_mosquitto

    require_mosquitto()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            _fedmq("broker", "--port", str(port)), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in done.stdout
    assert "listening" not in done.stdout


def _tls_client(root: Path, port: int, identity: str) -> aiomqtt.Client:
    client = root / "clients" / identity
    cfg = BrokerConfig(
        host="127.0.0.1",
        port=port,
        tls=True,
        ca_file=str(client / "ca.crt"),
        cert_file=str(client / "client.crt"),
        key_file=str(client / "client.key"),
    )
    return aiomqtt.Client(**client_kwargs(cfg))


async def _receives_model(root: Path, port: int, identity: str, topic: str, wait: float) -> bool:
    async with _tls_client(root, port, identity) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(wait):
                async for msg in client.messages:
                    return bytes(msg.payload) == b"model v1"  # type: ignore[arg-type]
        except TimeoutError:
            return False
    return False


@pytest.mark.broker
async def test_adding_an_agent_with_init_reloads_the_running_broker(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the new device connected and received nothing until someone sent SIGHUP by hand."""
    from tests.conftest import require_mosquitto

    require_mosquitto()
    root = Path(tempfile.mkdtemp(prefix="fedmq-pki-"))
    root.chmod(0o755)  # Mosquitto started as root reads the folder as user mosquitto
    port, ops = free_port(), free_port()
    prefix = "fedmq/grow"
    init(root, ["agent-1"], prefix=prefix, port=port, ops_port=ops, bind="127.0.0.1")
    broker = subprocess.Popen(
        _fedmq("broker", "--conf", str(root / "broker" / "mosquitto.conf"), "--port", str(port)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _until_line(broker, "listening")
        assert (root / "broker" / "mosquitto.pid").is_file()
        async with _tls_client(root, port, "aggregator") as server:
            await server.publish(Topics(prefix).model, b"model v1", qos=1, retain=True)
            await server.publish(Topics(prefix).metrics, b"model v1", qos=1, retain=True)
        assert await _receives_model(root, port, "agent-1", Topics(prefix).model, wait=30)
        # A device may read the federation's aggregate metrics (fedmq watch), which it could not before.
        assert await _receives_model(root, port, "agent-1", Topics(prefix).metrics, wait=30)

        assert fedmq_main(["broker", "init", str(root), "--agents", "agent-1,agent-2", "--prefix", prefix,
                           "--port", str(port), "--ops-port", str(ops), "--bind", "127.0.0.1"]) == 0  # fmt: skip
        out = capsys.readouterr().out
        assert "created: agent-2" in out and "sent SIGHUP to the broker" in out
        # The reload is asynchronous in Mosquitto: ask again until it has applied (generous deadline).
        deadline = time.monotonic() + 60
        while not await _receives_model(root, port, "agent-2", Topics(prefix).model, wait=2):
            assert time.monotonic() < deadline, "agent-2 never received the model: the ACL was not reloaded"
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(60)
        shutil.rmtree(root, ignore_errors=True)
    assert not (root / "broker" / "mosquitto.pid").exists()


def test_init_without_a_running_broker_says_to_reload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fedmq_main(["broker", "init", str(tmp_path), "--agents", "1", "--group", ""]) == 0
    assert "NEXT" not in capsys.readouterr().out  # a new deployment: nothing runs yet
    assert fedmq_main(["broker", "init", str(tmp_path), "--agents", "2", "--group", ""]) == 0
    out = capsys.readouterr().out
    assert "NEXT: reload a running broker" in out and "kill -HUP" in out


def test_generated_mosquitto_conf_comments_state_its_values(tmp_path: Path) -> None:
    init(tmp_path, ["agent-1"], group=None)
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    values = {w[0]: w[1] for w in (line.split() for line in conf.splitlines()) if len(w) == 2 and w[0][0] != "#"}
    assert f"{int(values['max_queued_messages']):,} messages" in conf
    assert f"{int(values['max_queued_bytes']) >> 30} GiB" in conf
    assert f"{int(values['max_packet_size']) >> 20} MiB packets" in conf
    assert f"every {values['autosave_interval']} s" in conf


# --- fedmq watch and connection hints ------------------------------------------------------------


@pytest.mark.broker
async def test_watch_prints_the_metrics_topic(mosquitto: MosquittoBroker, prefix: str) -> None:
    from tests.helpers import start_aggregator

    cfg = Config(
        prefix=prefix,
        broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port),
        aggregator=AggregatorConfig(buffer_size=1, metrics_interval=0.2),
    ).validate()
    server, stop, task = await start_aggregator(cfg)
    try:
        url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
        proc = await asyncio.create_subprocess_exec(
            *_fedmq("watch", url, "--prefix", prefix, "--once"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert "model version" in text and "agents online" in text and f"run {server.run_id}" in text
        proc = await asyncio.create_subprocess_exec(
            *_fedmq("watch", url, "--prefix", prefix, "--once", "--json"), cwd=ROOT, stdout=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
        metrics = json.loads(out)
        assert metrics["kind"] == "metrics" and metrics["run"] == server.run_id and metrics["version"] == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.mark.broker
async def test_plain_mqtt_against_a_tls_port_suggests_mqtts() -> None:
    from tests.helpers import tls_deployment

    with tls_deployment(["agent-1"], "fedmq/hint") as (_root, broker):
        plain = BrokerConfig(host="127.0.0.1", port=broker.port, tls=False)
        with pytest.raises(aiomqtt.MqttError) as caught:
            # Reset at once, or a timeout on a busy machine: the hint covers both, so it need not be long.
            async with aiomqtt.Client(**client_kwargs(plain), timeout=5):
                pass
        text = describe_failure(caught.value, plain)
        assert f"mqtts://127.0.0.1:{broker.port}" in text and "--ca-file" in text


def test_watch_names_a_broker_given_twice(capsys: pytest.CaptureFixture[str]) -> None:
    assert fedmq_main(["watch", "mqtt://127.0.0.1:1", "--broker", "mqtt://127.0.0.1:2"]) == 2
    assert "give the broker once" in capsys.readouterr().err


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["agent", "aggregator", "simulate", "watch", "predict"])
def test_every_flag_has_help_a_readable_metavar_and_shows_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        fedmq_main([command, "--help"])
    text = capsys.readouterr().out
    assert "CFG:" not in text and "cfg:" not in text
    options = text.split("options:", 1)[1]
    for block in re.split(r"\n  (?=-)", options)[1:]:
        head, _, rest = block.partition("  ")
        assert rest.strip(), f"{command} {head.split()[0]} has no help"
    if command == "agent":
        assert re.search(r"--id AGENT_ID\s", text)
        assert "[config agent.local_epochs, default 1]" in " ".join(text.split())


# --- missing extras, named at startup ------------------------------------------------------------


def test_onnx_out_without_onnx_fails_at_start_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the agent ran, and logged "model hook failed" at every model version."""
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    monkeypatch.setitem(sys.modules, "onnx", None)
    code = fedmq_main(["agent", "--broker", "mqtt://127.0.0.1:1", "--data", str(tmp_path / "d.npz"),
                       "--onnx-out", str(tmp_path / "m.onnx")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--onnx-out" in err and "pip install 'fedmq[onnx]'" in err


@pytest.mark.parametrize("command", [["agent", "--data"], ["aggregator", "--eval-data"]])
def test_bundled_data_without_scikit_learn_names_the_extra(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    which = "builtin:digits-train" if command[0] == "agent" else "builtin:digits-test"
    assert fedmq_main([*command, which, "--broker", "mqtt://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn is not installed" in err and "pip install 'fedmq[demo]'" in err


def test_the_dashboard_without_prometheus_client_names_the_server_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    assert fedmq_main(["aggregator", "--broker", "mqtt://127.0.0.1:1", "--http", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert "aggregator.http" in err and "pip install 'fedmq[server]'" in err


def test_a_busy_dashboard_port_is_named_at_startup(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert fedmq_main(["aggregator", "--broker", "mqtt://127.0.0.1:1", "--http", f"127.0.0.1:{port}"]) == 2
    assert f"config key 'aggregator.http': cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "simulate", "population"])
def test_server_side_commands_name_the_demo_extra_on_a_device_install(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert fedmq_main([command]) == 2
    assert "pip install 'fedmq[demo]'" in capsys.readouterr().err
