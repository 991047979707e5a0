"""``fedmq data``: write per-device data folders, and speak a keyword into a WAV file.

``fedmq data split TASK|SOURCE --devices N --out DIR`` writes one folder per device
(``DIR/<device>/data.npz``, what ``fedmq agent --data`` reads), the held-out test set
(``DIR/test/data.npz``, for ``fedmq aggregator --eval-data``) and ``DIR/manifest.json``, which
records the model, labels, input range and the normalisation applied. A SOURCE is your own
``.npz`` or folder of raw features. ``--normalize`` scales it the same way for every device,
with constants written into the manifest, so that data collected later can be scaled to match.

``fedmq data normalize RAW --manifest DIR/manifest.json --out data.npz`` scales a site's raw
export with the federation's constants (never the site's own statistics).

``fedmq data say WORD --out FILE.wav`` synthesises a keyword with espeak-ng, to try
``fedmq predict MODEL.onnx FILE.wav``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.errors import ConfigError
from models.datasets import Dataset, dirichlet_split, load_source, range_mismatch, save_npz
from models.tasks import TASKS, get_task


@dataclass(frozen=True)
class Normalizer:
    """``x' = (x - offset) / scale`` per feature, with constants fixed before the split."""

    method: str
    offset: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]

    @classmethod
    def fit(cls, method: str, x: npt.NDArray[np.float32]) -> Normalizer:
        """Constants for ``method`` from the whole source (the data owner's one-time step).

        Raises:
            ValueError: an unknown method, or ``scale:C`` with C not a positive number.
        """
        d = x.shape[1]
        if method == "none":
            return cls(method, np.zeros(d), np.ones(d))
        if method.startswith("scale:"):
            try:
                c = float(method.split(":", 1)[1])
            except ValueError:
                c = -1.0
            if not (np.isfinite(c) and c > 0):
                raise ValueError(f"--normalize {method}: need scale:C with C > 0, e.g. scale:16")
            return cls(method, np.zeros(d), np.full(d, c))
        if method == "minmax":
            lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
            return cls(method, lo, np.where(hi > lo, hi - lo, 1.0))
        if method == "zscore":
            mu, sd = x.mean(axis=0).astype(np.float64), x.std(axis=0).astype(np.float64)
            return cls(method, mu, np.where(sd > 0, sd, 1.0))
        raise ValueError(f"--normalize: unknown method {method!r}; use none, minmax, zscore or scale:C")

    def apply(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Scale ``x`` with the fitted constants."""
        return ((x.astype(np.float64) - self.offset) / self.scale).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """The constants as the manifest records them."""
        return {"method": self.method, "offset": self.offset.tolist(), "scale": self.scale.tolist()}


def configure(p: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = sub.add_parser("split", help="write one data folder per device, a test folder and a manifest")
    s.add_argument("source", help=f"a task ({', '.join(TASKS)}) or your own .npz / folder with x and y")
    s.add_argument("--out", required=True, help="folder to write (created; must be empty or absent)")
    s.add_argument("--devices", type=int, default=None, help="how many devices (default: the task's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID skew for digits and sources")
    s.add_argument("--test-fraction", type=float, default=0.2, help="sources: share held out for evaluation")
    s.add_argument(
        "--normalize",
        default=None,
        help="sources: none, minmax, zscore or scale:C (default none; tasks are already normalised)",
    )
    n = sub.add_parser("normalize", help="scale a raw data file with the constants of a manifest (a new site's data)")
    n.add_argument("source", help="raw .npz or folder with x and y, in the features' documented order")
    n.add_argument("--manifest", required=True, help="the federation's manifest.json (from fedmq data split)")
    n.add_argument("--out", required=True, help="the .npz to write (what fedmq agent --data reads)")
    w = sub.add_parser("say", help="speak a keyword into a 16 kHz WAV with espeak-ng (needs espeak-ng)")
    w.add_argument("word")
    w.add_argument("--out", required=True, help="the WAV file to write")
    w.add_argument("--voice", default="en-gb+f5", help="espeak-ng voice, ACCENT+VARIANT (default en-gb+f5)")
    w.add_argument("--pitch", type=int, default=50)
    w.add_argument("--speed", type=int, default=150)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    if args.data_command == "say":
        return _say(args)
    if args.data_command == "normalize":
        return _normalize(args)
    return _split(args)


def _normalize(args: argparse.Namespace) -> int:
    try:
        manifest = json.loads(Path(args.manifest).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("--manifest", f"{args.manifest}: {exc}") from None
    spec = manifest.get("normalization")
    if not isinstance(spec, dict) or not {"method", "offset", "scale"} <= spec.keys():
        raise ConfigError("--manifest", f"{args.manifest} records no normalisation constants (a generated task's data)")
    try:
        data = load_source(args.source)
    except (ValueError, OSError, ImportError, AttributeError) as exc:
        raise ConfigError("source", str(exc)) from None
    norm = Normalizer(str(spec["method"]), np.asarray(spec["offset"], float), np.asarray(spec["scale"], float))
    if data.x.shape[1] != len(norm.offset):
        raise ConfigError("source", f"{data.x.shape[1]} features, the manifest's constants are for {len(norm.offset)}")
    x = norm.apply(data.x)
    save_npz(args.out, Dataset(x, data.y))
    lo, hi = manifest.get("input_range") or [0.0, 1.0]
    problem = range_mismatch(x, (float(lo), float(hi)))
    if problem is not None:
        print(f"fedmq data normalize: warning: {problem}", file=sys.stderr)
    print(json.dumps({"out": args.out, "examples": len(data), "range": [float(x.min()), float(x.max())]}))
    return 0


def _say(args: argparse.Namespace) -> int:
    from models.audio import SAMPLE_RATE, wav_bytes
    from models.speech import Speaker, SpeechUnavailable, SynthesisFailed, synthesize

    accent, _, variant = args.voice.partition("+")
    try:
        audio = synthesize(args.word, Speaker(accent, variant or "m1", args.pitch, args.speed))
    except SpeechUnavailable as exc:
        raise ConfigError("espeak-ng", str(exc)) from None
    except SynthesisFailed as exc:
        raise ConfigError("--voice", str(exc)) from None
    pad = np.zeros(SAMPLE_RATE // 4, dtype=np.float32)
    try:
        Path(args.out).write_bytes(wav_bytes(np.concatenate([pad, 0.8 * audio, pad])))
    except OSError as exc:
        raise ConfigError("--out", f"{args.out}: {exc.strerror or exc}") from None
    print(json.dumps({"wav": args.out, "word": args.word, "voice": args.voice, "seconds": len(audio) / SAMPLE_RATE}))
    return 0


def _prepare_out(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError("--out", f"{path} exists and is not an empty folder; choose a new one")
    path.mkdir(parents=True, exist_ok=True)


def _split(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.source in TASKS:
        if args.normalize not in (None, "none"):
            raise ConfigError("--normalize", f"task {args.source!r} is already normalised; use it on your own data")
        task = get_task(args.source)
        from models.speech import SynthesisFailed

        try:
            shards, test = task.load(args.devices, args.seed, args.alpha)
        except SynthesisFailed as exc:  # this espeak-ng build lacks a voice the generator uses
            raise ConfigError("espeak-ng", str(exc)) from None
        except ValueError as exc:
            raise ConfigError("--devices", str(exc)) from None
        except RuntimeError as exc:  # espeak-ng missing or failing
            raise ConfigError("espeak-ng", str(exc)) from None
        names = _device_names(task.name, len(shards))
        manifest: dict[str, Any] = {
            "task": task.name,
            "summary": task.summary,
            "model": task.model,
            "torch_model": task.torch_model,
            "hidden": task.hidden,
            "labels": list(task.labels),
            "input_range": list(task.input_range),
            "normalization": _task_normalization(task.name),
            "test_set": task.test_description,
        }
    else:
        shards, test, manifest, names = _split_source(args)
    _prepare_out(out)
    devices = {}
    for name, shard in zip(names, shards, strict=True):
        (out / name).mkdir()
        save_npz(out / name / "data.npz", shard)
        devices[name] = {"examples": len(shard), "label_counts": np.bincount(shard.y).tolist()}
    (out / "test").mkdir()
    save_npz(out / "test" / "data.npz", test)
    manifest.update(
        seed=args.seed,
        num_features=int(test.x.shape[1]),
        num_classes=int(max(len(manifest.get("labels") or []), int(test.y.max()) + 1)),
        devices=devices,
        test_examples=len(test),
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(
        json.dumps({"out": str(out), "devices": len(devices), "examples": sum(d["examples"] for d in devices.values())})
    )
    return 0


def _task_normalization(task: str) -> Any:
    """The constants a new site applies to its raw data, where the task has any."""
    if task == "hospitals":
        from models.medical import breast_cancer_ranges

        lo, hi = breast_cancer_ranges()
        return Normalizer("minmax (published WDBC ranges)", lo, hi - lo).to_json()
    if task == "digits":
        return Normalizer("scale:16", np.zeros(64), np.full(64, 16.0)).to_json()
    return "built into the task's features (docs/protocol.md, 'Input normalisation')"


def _device_names(task: str, n: int) -> list[str]:
    if task.startswith("hospitals"):
        from models.medical import HOSPITALS

        return [h.name for h in HOSPITALS[:n]]
    prefix = "household" if task == "speech" else "device"
    return [f"{prefix}-{i:03d}" for i in range(n)]


def _split_source(args: argparse.Namespace) -> tuple[list[Dataset], Dataset, dict[str, Any], list[str]]:
    try:
        data = load_source(args.source)
    except (ValueError, OSError, ImportError, AttributeError) as exc:
        raise ConfigError("source", str(exc)) from None
    if not 0 < args.test_fraction < 1:
        raise ConfigError("--test-fraction", f"must be in (0, 1), got {args.test_fraction}")
    method = args.normalize or "none"
    try:
        norm = Normalizer.fit(method, data.x)
    except ValueError as exc:
        raise ConfigError("--normalize", str(exc)) from None
    x = norm.apply(data.x)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(data))
    n_test = max(1, round(args.test_fraction * len(data)))
    test = Dataset(x[order[:n_test]], data.y[order[:n_test]])
    train = Dataset(x[order[n_test:]], data.y[order[n_test:]])
    devices = args.devices or 10
    try:
        parts = dirichlet_split(
            train.y, devices, args.alpha, rng, min_size=max(1, min(10, len(train) // max(devices, 1)))
        )
    except ValueError as exc:
        raise ConfigError("--devices", str(exc)) from None
    if method == "none" and float(np.abs(x).max()) > 10:
        print(
            f"fedmq data split: warning: features reach {float(np.abs(x).max()):.4g} and were not normalised; "
            "models train best on inputs near [0, 1] (--normalize minmax or scale:C)",
            file=sys.stderr,
        )
    manifest: dict[str, Any] = {
        "task": None,
        "source": args.source,
        "input_range": [float(x.min()), float(x.max())],
        "normalization": norm.to_json(),
    }
    return [train.subset(p) for p in parts], test, manifest, _device_names("source", devices)
